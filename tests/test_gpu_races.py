"""CUDA checks that can find races and precision or memory surprises (run by scripts/gpu_check.sh on a GPU).

A missing event between a copy stream and the compute stream goes unnoticed when copies are fast: the
data is usually there in time. Here every asynchronous copy on a side stream is queued behind a
``torch.cuda._sleep`` (a GPU busy-wait of a few milliseconds), so a kernel that does not wait for its
copy reads a half-filled slot, and a copy that does not wait for a kernel overwrites weights in use.
Both show up as different tokens, different logits or changed expert bytes.
"""

from __future__ import annotations

import pytest
import torch

from colab_helpers.conversation.generation import chat_prompt_ids
from colab_helpers.model import OffloadConfig, assemble_model, dequantized_reference, load_model, load_tokenizer
from colab_helpers.runtime.experts import ExpertLayout
from colab_helpers.runtime.moe import PrefetchConfig
from colab_helpers.weights.checkpoint import Checkpoint
from colab_helpers.weights.tiny import tiny_model_path

pytestmark = pytest.mark.requires_cuda

SLEEP_CYCLES = 5_000_000  # about 2.5-3.5 ms at 1.4-2 GHz: far longer than a tiny expert's copy (~10 us)
NEW_TOKENS = 64
FP16_MAX_REL_ERR = 1e-2  # fp16 vs fp32 logits (CPU fp16 measured 7e-4 on the embedded model)
FP16_MIN_TOP1 = 0.95  # share of answer positions where fp16 and fp32 pick the same next token (CPU fp16: 1.0)


@pytest.fixture
def delayed_copies(monkeypatch) -> list[int]:
    """Queue a GPU busy-wait before every non-blocking copy issued on a non-default stream; counts them."""
    original = torch.Tensor.copy_
    count = [0]

    def copy_after_a_delay(self, src, non_blocking=False):
        if non_blocking and torch.cuda.current_stream() != torch.cuda.default_stream():
            torch.cuda._sleep(SLEEP_CYCLES)
            count[0] += 1
        return original(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_after_a_delay)
    return count


def expert_bytes(cache, layer: int, expert: int) -> torch.Tensor:
    """The flat bytes of one expert wherever it lives now (a device slot, a slot the KV cache lent, or the host
    store), on the CPU."""
    return cache.expert_bytes(layer, expert)


def packed_checkpoint_experts(path) -> dict[tuple[int, int], torch.Tensor]:
    """Every expert's flat bytes as the cache packs them, straight from the shards."""
    ckpt = Checkpoint.open(path)
    layout = ExpertLayout.of(ckpt.spec)
    out = {}
    for layer, e, tensors in ckpt.iter_experts():
        buf = torch.empty(layout.nbytes, dtype=torch.uint8)
        layout.pack(tensors, buf)
        out[(layer, e)] = buf
    return out


def greedy(model, ids: torch.Tensor):
    return model.generate(
        ids.to(model.device),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )


def test_delayed_copies_one_expert_per_layer_with_prefetch(delayed_copies) -> None:
    """1 expert per layer + prefetch, every copy late: same tokens and logits as all-resident, bytes intact."""
    path = tiny_model_path()
    ids = chat_prompt_ids(load_tokenizer(path), "Recite the Zen of Python.")
    resident = load_model(path, device="cuda", dtype=torch.float32, experts_on_device=8, progress=False)
    ref = greedy(resident, ids)  # no copies at all (every expert has its slot)
    assert delayed_copies[0] == 0
    del resident

    model = load_model(
        path,
        device="cuda",
        dtype=torch.float32,
        experts_on_device=1,
        prefetch=PrefetchConfig(enabled=True),
        progress=False,
    )
    out = greedy(model, ids)
    torch.cuda.synchronize()
    stats = model.expert_cache.stats
    assert delayed_copies[0] > 0 and sum(stats.misses) > 0 and sum(stats.prefetch_loads) > 0  # copies really ran
    # generate wrote K/V into the arena; its slot at position 5 (the embedded model's) went back, copies late
    assert sum(stats.given_back) >= 1 and type(out.past_key_values).__name__ == "PreallocatedCache"
    assert torch.equal(out.sequences.cpu(), ref.sequences.cpu())
    for step, (got, want) in enumerate(zip(out.scores, ref.scores, strict=True)):
        # fp32; only the order of the expert sums differs (EOS is -inf in both: min_new_tokens)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3, msg=lambda m, step=step: f"step {step}: {m}")
    model.expert_cache.check_invariants()
    for (layer, e), want in packed_checkpoint_experts(path).items():
        assert torch.equal(expert_bytes(model.expert_cache, layer, e), want), f"expert {layer}.{e} bytes changed"


def test_the_delay_exposes_a_missing_wait(delayed_copies, monkeypatch) -> None:
    """Negative control: with compute no longer waiting for its copies, the delayed copies change the answer."""
    from colab_helpers.runtime.experts import CopyEngine

    if not hasattr(CopyEngine, "compute_waits"):
        pytest.skip("CopyEngine.compute_waits is gone: update this control to the new copy schedule")
    path = tiny_model_path()
    ids = chat_prompt_ids(load_tokenizer(path), "Recite the Zen of Python.")
    resident = load_model(path, device="cuda", dtype=torch.float32, experts_on_device=8, progress=False)
    ref = greedy(resident, ids)
    del resident
    model = load_model(path, device="cuda", dtype=torch.float32, experts_on_device=1, progress=False)
    monkeypatch.setattr(CopyEngine, "compute_waits", lambda self, event: None)  # the race, on purpose
    out = greedy(model, ids)
    torch.cuda.synchronize()
    assert delayed_copies[0] > 0
    assert not torch.equal(out.sequences.cpu(), ref.sequences.cpu()) or any(
        not torch.allclose(g, w, rtol=1e-4, atol=1e-3) for g, w in zip(out.scores, ref.scores, strict=True)
    )


def test_fp16_logits_are_close_to_the_fp32_reference() -> None:
    """The fp16 GPU model (the Colab path) against the fp32 CPU reference on the reference's own greedy answer."""
    path = tiny_model_path()
    ref = dequantized_reference(path)  # fp32 transformers model on the CPU
    ids = chat_prompt_ids(load_tokenizer(path), "Recite the Zen of Python.")
    seq = ref.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    half = load_model(path, device="cuda", dtype=torch.float16, experts_on_device=2, progress=False)
    with torch.no_grad():
        want = ref(seq).logits[0]
        got = half(seq.cuda()).logits[0].float().cpu()
    rel = ((got - want).norm() / want.norm()).item()
    answer = slice(ids.shape[1] - 1, seq.shape[1] - 1)  # positions that predict the answer's tokens
    top1 = (got[answer].argmax(-1) == want[answer].argmax(-1)).float().mean().item()
    print(f"fp16 vs fp32: relative logits error {rel:.2e}, top-1 agreement {top1:.3f}")
    assert rel < FP16_MAX_REL_ERR
    assert top1 >= FP16_MIN_TOP1


def test_prefill_of_4096_tokens_stays_within_the_planned_vram() -> None:
    """A full-width random Mixtral (2 layers, 2 experts per layer): measured peak VRAM of a 4096-token prefill."""
    from colab_helpers.planning.planner import Budget, plan_memory
    from colab_helpers.sim.synthetic import mixtral_8x7b_config, random_experts, random_trunk
    from colab_helpers.weights.checkpoint import QuantConfig

    config, quant, context = mixtral_8x7b_config(), QuantConfig(), 4096
    config.num_hidden_layers = 2  # full width; depth only repeats the same per-layer memory
    cfg = OffloadConfig(device="cuda", experts_on_device=2, context=context, progress=False)
    budget = Budget.given(vram_gb=15, ram_gb=12.7)  # a T4's
    plan = plan_memory(
        config, quant, budget, "cuda", context, 2, spare_slots=cfg.spare_slots, attention=cfg.attention_path()
    )
    assert plan.fits, plan.report()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_reserved()
    trunk = random_trunk(config, quant, "cpu")  # made in fp16 on the CPU: no fp32 temporaries on the GPU
    model = assemble_model(config, quant, trunk, random_experts(config, quant), cfg)
    ids = torch.randint(3, config.vocab_size, (1, context - 1), generator=torch.Generator().manual_seed(0))
    # the prefill as the CLI and the session run it: generate_stream feeds the attention path's chunks into
    # the KV cache (generation.prefill), then 1 new token fills the planned 4096-token context
    from types import SimpleNamespace

    from colab_helpers.conversation.generation import SamplingConfig, generate_stream

    no_text = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "")
    result = generate_stream(model, no_text, ids, SamplingConfig(max_new_tokens=1))
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_reserved() - base
    print(f"4096-token prefill: measured {measured / 1e9:.3f} GB reserved, planned {plan.vram_peak / 1e9:.3f} GB")
    assert result.error is None and len(result.token_ids) == 1
    assert measured <= plan.vram_peak, plan.report()
