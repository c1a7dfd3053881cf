"""The quickstart's calls, in its order, on a converted model of every supported family (not only Mixtral).

``MODEL = "<folder>"`` in the quickstart goes through exactly these calls: choose_model, plan_for and
check_fits, load_model with the plan's numbers, load_tokenizer, ChatSession and the ChatUI, chat().
Each family's tiny random model is written with ``save_checkpoint`` and the embedded model's tokenizer.
"""

from __future__ import annotations

import pytest
import torch

from colab_helpers import ChatSession, SamplingConfig, load_model, load_tokenizer, save_checkpoint
from colab_helpers.conversation.chat import ChatUI, chat
from colab_helpers.notebook import choose_model, plan_for
from colab_helpers.planning.planner import check_fits
from colab_helpers.sim.random_moe import families, random_model, small_config
from colab_helpers.walkthroughs.setup import prefetch_config
from colab_helpers.weights.families import from_transformers
from colab_helpers.weights.tiny import tiny_model_path


@pytest.mark.parametrize("family", families())
def test_quickstart_runs_a_converted_model_of_every_family(family, tmp_path, monkeypatch):
    monkeypatch.delenv("COLAB_HELPERS_TINY", raising=False)
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(tiny_model_path())
    source = random_model(small_config(family, vocab_size=len(tokenizer)))
    out = save_checkpoint(source, tmp_path / family, tokenizer=tokenizer, progress=False)

    choice = choose_model(str(out))  # the quickstart's MODEL = "<folder>"
    assert choice.path == out and not choice.tiny
    plan = plan_for(choice, 4096, None)
    check_fits(plan)
    model = load_model(
        choice.path,
        device=choice.device,
        experts_on_device=plan.experts_on_device,
        spare_slots=plan.spare_slots,
        context=plan.context,
        policy="lfu_decay",
        prefetch=prefetch_config(None),  # the quickstart's PREFETCH = None: the engine's default
    )
    assert type(model).__name__ == from_transformers(source.config).model_class
    session = ChatSession(model, load_tokenizer(choice.path), SamplingConfig(8, 0.0, 1.0), max_context=plan.context)
    ChatUI(session, title=f"Chat with {choice.name}")
    result = chat("What is the capital of France?", session)
    assert result.stats.new_tokens > 0 and model.expert_cache.stats.summary()
