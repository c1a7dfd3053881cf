"""A second chat widget in Notebook 6.5 + ipywidgets 7.7.1 (Colab's widget version) shows the conversation so far.

Run All on the quickstart (which also checks the first widget survives Run All: see ``NB6_READY`` in
``browser_harness``), then a new cell builds another ``ChatUI`` over the same session: the ``chat()`` turn and
its numbers must be in it at once. Skipped like ``test_browser.py`` without the browser environments.
"""

from __future__ import annotations

import shutil

import pytest
from browser_harness import (
    CHROMIUM,
    CHROMIUM_ARGS,
    FRONT_ENDS,
    NB6_READY,
    NB6_RUN_ALL,
    REQUIRED,
    Server,
    import_playwright,
    missing,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

LONG = 240_000  # ms: kernel start + Run All on a slow shared runner
ALL_RAN = """() => { const cells = Jupyter.notebook.get_cells().filter(c => c.cell_type === 'code');
    const failed = cells.some(c => c.output_area.outputs.some(o => o.output_type === 'error'));
    const ran = cells.every(c => typeof c.input_prompt_number === 'number');
    return (failed || ran) && !document.querySelector('#kernel_indicator_icon.kernel_busy_icon'); }"""
ERRORS = """() => Jupyter.notebook.get_cells().flatMap(c => c.cell_type !== 'code' ? [] :
    c.output_area.outputs.filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue))"""
SECOND = """() => { const chats = document.querySelectorAll('.colab-helpers-chat');
    return chats.length > 1 && !!chats[1].querySelector('.colab-helpers-transcript'); }"""


def test_a_second_widget_shows_the_conversation_so_far(tmp_path) -> None:
    reason = missing(FRONT_ENDS["nb6"])
    if reason:
        if REQUIRED:
            pytest.fail(f"browser test required but: {reason}")
        pytest.skip(reason)
    sync_playwright = import_playwright()
    server = Server(FRONT_ENDS["nb6"], tmp_path / "server")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page_errors: list[str] = []
            page.on("pageerror", lambda err: page_errors.append(str(err)))
            try:
                page.goto(server.url("quickstart.ipynb"))
                page.wait_for_function(NB6_READY, timeout=LONG, polling=100)
                page.evaluate(NB6_RUN_ALL)
                page.wait_for_function(ALL_RAN, timeout=LONG, polling=200)
                assert not page.evaluate(ERRORS), page.evaluate(ERRORS)
                chats = page.locator(".colab-helpers-chat")
                assert chats.count() == 1 and chats.first.is_visible(), "Run All left no visible chat widget"

                page.evaluate(
                    """() => { const c = Jupyter.notebook.insert_cell_at_bottom('code');
                    c.set_text('ChatUI(session, title="The same conversation")'); c.execute(); }"""
                )
                page.wait_for_function(SECOND, timeout=LONG, polling=200)
                second = chats.nth(1).locator(".colab-helpers-transcript").inner_text()
                assert "What is the capital of France?" in second and "Paris" in second, second
                assert (
                    "No messages yet" not in second
                    and "tok/s" in chats.nth(1).locator(".colab-helpers-status").inner_text()
                )
                assert second == chats.first.locator(".colab-helpers-transcript").inner_text()
                assert not chats.nth(1).locator(".colab-helpers-send").is_disabled()
                assert not page_errors, f"JavaScript errors on the page: {page_errors[:3]}"
            except BaseException:
                print(server.log_text()[-4000:])
                raise
            finally:
                page.close()
                browser.close()
    finally:
        server.close()
        shutil.rmtree(tmp_path / "server" / "jupyter", ignore_errors=True)
