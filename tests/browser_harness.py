"""Local notebook servers and a headless Chromium for the real-browser tests (``test_browser.py``).

Each front end runs from its own virtual environment (made by ``.ci/run``) so it never touches the
main one: JupyterLab 4 (ipywidgets 8 front end, kernel comms on subshells) and classic Notebook 6.5
(ipywidgets 7.7.1, like Colab). The kernel is this interpreter with the package on ``PYTHONPATH``
(plus ipywidgets 7.7.1 first for Notebook 6), through a private ``python3`` kernelspec; every Jupyter
directory points into a temporary folder. The browser is Debian's chromium driven by Playwright.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENVS = Path(os.environ.get("COLAB_HELPERS_BROWSER_ENVS", Path.home() / ".cache" / "colab_helpers" / "browser"))
CHROMIUM = os.environ.get("COLAB_HELPERS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REQUIRED = os.environ.get("COLAB_HELPERS_REQUIRE_BROWSER", "") not in ("", "0")

# Notebook 6 with ipywidgets 7.7.1's front end (widgetsnbextension 3.6) loses every widget displayed by a Run All
# sent too early. At kernel start its widget manager asks the kernel which widgets exist (a
# "jupyter.widget.control" comm, which a kernel that has not imported ipywidgets closes at once, then a
# comm_info_request) and, once answered, re-renders every cell that shows a widget (Notebook.render_cell_output).
# That re-render clears the output first; clearing removes the widget's view, whose "remove" handler sets the
# output's model_id to "" in the very object being re-rendered (OutputArea.toJSON copies shallowly), so the
# widget comes back hidden (display: none). The kernel answers shell messages in order, so a Run All whose
# execute_requests reach it before that comm_info_request is answered only after the last cell ran, and the
# re-render then wipes the chat widget and the load progress bar. Seen in 15 probe runs here: the 3 whose Run
# All was sent before the manager's comm_info_request rendered no widget, the 12 sent after all rendered one.
# So a Notebook 6 page on a fresh kernel (no other comm) is ready for Run All once the kernel is ready and the
# control comm is gone (the manager has sent its question), and Run All first makes one comm_info round trip,
# answered after the manager's. docs/notebooks.md has the details.
NB6_READY = """() => { const k = window.Jupyter && Jupyter.notebook && Jupyter.notebook.kernel;
    return !!(k && k.is_connected() && k.widget_manager && k.info_reply && k.info_reply.protocol_version &&
        Object.keys(k.comm_manager.comms).length === 0); }"""
NB6_RUN_ALL = """async () => { const k = Jupyter.notebook.kernel;
    await new Promise(answered => k.comm_info('jupyter.widget', answered));
    Jupyter.notebook.execute_all_cells(); }"""


@dataclass(frozen=True)
class FrontEnd:
    name: str  # "lab" | "nb6"
    server: Path  # the server's executable inside its venv
    url_path: str  # where a notebook opens, relative to the server root


FRONT_ENDS = {
    "lab": FrontEnd("lab", ENVS / "lab" / "bin" / "jupyter-lab", "lab/tree/"),
    "nb6": FrontEnd("nb6", ENVS / "nb6" / "bin" / "jupyter-notebook", "notebooks/"),
}


def missing(front_end: FrontEnd) -> str | None:
    """Why this front end's test cannot run here, or None."""
    if not Path(CHROMIUM).exists():
        return f"no chromium at {CHROMIUM} (apt-get install chromium)"
    if not front_end.server.exists():
        return f"no {front_end.server} (bash .ci/run makes it)"
    if not (ENVS / "playwright" / "playwright").is_dir():
        return f"no Playwright in {ENVS / 'playwright'} (bash .ci/run installs it)"
    if front_end.name == "nb6" and not os.environ.get("IPYWIDGETS7_PATH"):
        return "IPYWIDGETS7_PATH is not set (the Notebook 6 kernel needs ipywidgets 7.7.1)"
    return None


def import_playwright():
    sys.path.insert(0, str(ENVS / "playwright"))
    from playwright.sync_api import sync_playwright

    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_kernelspec(data_dir: Path, front_end: FrontEnd) -> None:
    paths = [str(REPO)]
    if front_end.name == "nb6":
        paths.insert(0, os.environ["IPYWIDGETS7_PATH"])
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3",
        "language": "python",
        "env": {"PYTHONPATH": os.pathsep.join(paths), "COLAB_HELPERS_TINY": "1", "OMP_NUM_THREADS": "1"},
    }
    kernel = data_dir / "kernels" / "python3"
    kernel.mkdir(parents=True)
    (kernel / "kernel.json").write_text(json.dumps(spec))


class Server:
    """A notebook server on a free local port, serving a copy of ``notebooks/`` from ``root``."""

    def __init__(self, front_end: FrontEnd, root: Path) -> None:
        self.front_end = front_end
        self.root = root
        self.port = _free_port()
        self.notebooks = root / "notebooks"
        shutil.copytree(REPO / "notebooks", self.notebooks)
        jupyter = root / "jupyter"
        _write_kernelspec(jupyter / "data", front_end)
        settings = jupyter / "lab-settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True)
        (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(jupyter / "config"),
            "JUPYTER_DATA_DIR": str(jupyter / "data"),
            "JUPYTER_PATH": str(jupyter / "data"),  # our kernelspec before the venv's own python3
            "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(jupyter / "lab-settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(jupyter / "workspaces"),
            "PYTHONPATH": "",
        }
        common = ["--no-browser", f"--port={self.port}", "--ip=127.0.0.1", "--allow-root"]
        if front_end.name == "lab":
            args = common + [
                "--IdentityProvider.token=",
                "--ServerApp.password=",
                f"--ServerApp.root_dir={self.notebooks}",
                "--LabApp.expose_app_in_browser=True",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            ]
        else:
            args = common + ["--NotebookApp.token=", "--NotebookApp.password=", f"--notebook-dir={self.notebooks}"]
        self.log = (root / "server.log").open("w")
        self.proc = subprocess.Popen(
            [str(front_end.server), *args], env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=root
        )
        self._wait_until_up(timeout=120)

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {self.front_end.name} server exited: {self.log_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.25)  # polling a server that is still starting
        raise TimeoutError(f"the {self.front_end.name} server did not answer within {timeout}s")

    def url(self, notebook: str) -> str:
        return f"http://127.0.0.1:{self.port}/{self.front_end.url_path}{notebook}"

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.root / "server.log").read_text(errors="replace")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        self.log.close()
