"""Logits at every step of generation, not only greedy tokens, equal plain transformers' on the same weights.

Greedy tokens hide a decode-only error until it flips an argmax (routing weights not renormalized at
decode survived until step 10). Here every forward the offloaded model runs — each prefill chunk,
the first token, every decode step, the second chat turn over a reused KV cache — has its last logits
compared with one full-sequence forward of ``dequantized_reference`` (transformers' own class, the
same dequantized weights) at the same position. Positions come from the KV cache each forward is
given, so the test holds however generation is split into forwards.
"""

from __future__ import annotations

import pytest
import torch

from colab_helpers.conversation.generation import SamplingConfig, generate_stream
from colab_helpers.conversation.session import ChatSession
from colab_helpers.model import dequantized_reference, load_model
from colab_helpers.runtime.attention import T4_CAPABILITY, choose_attention
from colab_helpers.runtime.moe import PrefetchConfig
from colab_helpers.sim.random_moe import families, random_model
from colab_helpers.weights.checkpoint import save_checkpoint

PROMPT = torch.tensor([[1, 17, 45, 99, 3, 64, 12, 7, 88, 23, 5, 41]])
NEW = 8
TOL = 1e-3  # relative L2 error of one position's logits (fp32 compute; the offloaded sums run in another order)
CHUNK = 4  # prefill chunk: the 12-token prompt runs as 4 + 4 + 3 tokens, then the last one through generate


class ForwardLog:
    """Every forward of ``model``: the KV length it started from, the tokens fed, the last position's logits."""

    def __init__(self, model) -> None:
        self.calls: list[tuple[int, list[int], torch.Tensor]] = []
        self._pending: list[tuple[int, list[int]]] = []
        model.register_forward_pre_hook(self._before, with_kwargs=True)
        model.register_forward_hook(self._after, with_kwargs=True)

    def _before(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        start = cache.get_seq_length() if cache is not None else 0
        self._pending.append((int(start), ids[0].tolist()))

    def _after(self, module, args, kwargs, output) -> None:
        start, ids = self._pending.pop()
        self.calls.append((start, ids, output.logits[0, -1].detach().float().clone()))

    def tokens(self, calls=None) -> list[int]:
        """The sequence the forwards built (a later forward overwrites positions it re-feeds)."""
        seq: list[int] = []
        for start, ids, _ in self.calls if calls is None else calls:
            seq = seq[:start] + ids
        return seq


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check_every_forward(ref, calls, seq: list[int], label: str) -> int:
    """Compare each call's last logits with the reference's at that position; returns positions checked."""
    with torch.no_grad():
        ref_logits = ref(torch.tensor([seq])).logits[0].float()
    for start, ids, logits in calls:
        pos = start + len(ids) - 1
        assert seq[start : pos + 1] == ids
        err = rel_err(logits, ref_logits[pos])
        assert err < TOL, f"{label}: position {pos} (forward of {len(ids)} tokens after {start}): rel err {err:.2e}"
    return len(calls)


def loaded(path, k: int, prefetch: bool, chunked: bool):
    attention = choose_attention("cpu", capability=T4_CAPABILITY, prefill_chunk=CHUNK) if chunked else None
    model = load_model(
        path, experts_on_device=k, prefetch=PrefetchConfig(enabled=prefetch), attention=attention, progress=False
    )
    model.generation_config.eos_token_id = None  # random weights: run every step even if token 2 comes up
    return model


class CharTokenizer:
    """A chat template over characters, enough for ``ChatSession`` on a random model with 128 tokens.

    A decoded answer encodes back to the same ids (one private-use character per id), as a real
    tokenizer's usually does, so the next turn's prompt starts with everything the cache holds."""

    BASE = 0xE000

    def encode(self, text: str) -> list[int]:
        return [ord(c) - self.BASE if ord(c) >= self.BASE else 3 + ord(c) % 110 for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, **kw) -> list[int]:
        ids = [1]
        for m in messages:
            ids += [120 if m["role"] == "user" else 121] + self.encode(m["content"]) + [122]
        return ids + ([121] if add_generation_prompt else [])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(self.BASE + i) for i in ids)


@pytest.fixture(scope="module", params=["mixtral", "olmoe", "qwen3_moe", "qwen2_moe", "phimoe"])
def family(request, tmp_path_factory):
    """``(family, checkpoint path, reference model)``; OLMoE and Qwen2-MoE do not renormalize the top-k
    weights, Mixtral and Qwen3-MoE do, Phi-3.5-MoE routes by sparsemixer."""
    if request.param not in families():
        pytest.skip(f"this transformers has no {request.param}")
    path = tmp_path_factory.mktemp(f"decode_{request.param}")
    save_checkpoint(random_model(request.param), path, optimize=False, progress=False)
    return request.param, path, dequantized_reference(path)


def cases(family_name: str):
    if family_name == "mixtral":  # every cache size with prefetch on and off, chunked prefill on and off
        return [
            (1, True, False),
            (1, False, True),
            (3, True, True),
            (3, False, False),
            (8, True, False),
            (8, False, True),
        ]
    return [(1, True, True), (2, False, False), (8, True, False)]


def test_every_forward_of_generation_matches_the_reference(family) -> None:
    """Cache sizes 1, some and all; prefetch on and off; whole and chunked prefill."""
    name, path, ref = family
    for k, prefetch, chunked in cases(name):
        model = loaded(path, k, prefetch, chunked)
        log = ForwardLog(model)
        out = model.generate(PROMPT, max_new_tokens=NEW, do_sample=False) if not chunked else None
        if chunked:  # generate_stream runs the chunked prefill itself
            res = generate_stream(model, CharTokenizer(), PROMPT, SamplingConfig(max_new_tokens=NEW))
            assert len(res.token_ids) == NEW
            assert [len(ids) for _, ids, _ in log.calls[:3]] == [CHUNK, CHUNK, 3]  # three prefill chunks
        else:
            assert out.shape[1] == PROMPT.shape[1] + NEW
        label = f"{name} k={k} prefetch={prefetch} chunked={chunked}"
        decode_steps = [c for c in log.calls if len(c[1]) == 1]
        assert len(decode_steps) >= NEW - 1, label
        check_every_forward(ref, log.calls, log.tokens(), label)
        if k < 8:
            assert sum(model.expert_cache.stats.misses) > 0, label  # offloading really happened


def test_second_chat_turn_reuses_the_kv_cache_and_matches_the_reference(family) -> None:
    """Turn 2 feeds only what the cache lacks; its logits (and turn 1's) equal a fresh full forward."""
    name, path, ref = family
    for chunked in (False, True):
        model = loaded(path, 2, True, chunked)
        log = ForwardLog(model)
        chat = ChatSession(model, CharTokenizer(), SamplingConfig(max_new_tokens=6))
        answer = chat.send("hello there, model")
        first = list(log.calls)
        chat.send("and again")
        second = log.calls[len(first) :]
        label = f"{name} chunked={chunked}"
        # the cache holds turn 1 but its answer's last token (never fed); turn 2 starts right there
        assert second[0][0] == len(log.tokens(first)), f"{label}: the second turn did not reuse the KV cache"
        assert second[0][1][0] == answer.token_ids[-1]
        check_every_forward(ref, first, log.tokens(first), label + " turn 1")
        check_every_forward(ref, second, log.tokens(), label + " turn 2")
        assert len([c for c in second if len(c[1]) == 1]) >= 5


def test_a_turn_after_an_interrupt_mid_forward_matches_the_reference(family) -> None:
    """Ctrl-C inside a decode forward, after the first layers appended this token's keys and before the last
    did: the session crops every layer back to the answer kept, and the next turn computes what a fresh
    full forward computes (a stale key left in one layer would shift its attention)."""
    name, path, ref = family
    model = loaded(path, 2, True, False)
    log = ForwardLog(model)
    decode_forwards = {"n": 0}

    def interrupt_third_decode_step(module, args, kwargs) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden.shape[1] == 1:
            decode_forwards["n"] += 1
            if decode_forwards["n"] == 3:
                raise KeyboardInterrupt

    hook = model.model.layers[-1].register_forward_pre_hook(interrupt_third_decode_step, with_kwargs=True)
    chat = ChatSession(model, CharTokenizer(), SamplingConfig(max_new_tokens=8))
    first = chat.send("hello there, model")
    hook.remove()
    assert first.stats.stop_reason == "interrupted" and len(first.token_ids) == 3
    before = len(log.calls)
    chat.send("and again")
    second = log.calls[before:]
    assert len([c for c in second if len(c[1]) == 1]) >= 7
    check_every_forward(ref, second, log.tokens(), f"{name} after an interrupt")


def test_fp16_decode_routing_is_the_routers_own_bit_for_bit(family) -> None:
    """In fp16 (the GPU's dtype) the fused decode routing returns the router module's own experts and
    weights exactly: softmax in fp32, renormalized where the family says (a fp16 softmax or a skipped
    renormalization is invisible in fp32 CPU logits but not here)."""
    from colab_helpers.runtime.moe import OffloadedMoE

    name, path, _ = family
    model = load_model(
        path, dtype=torch.float16, experts_on_device=8, dense_on_cpu=False, progress=False, check_memory=False
    )
    block = next(m for m in model.modules() if isinstance(m, OffloadedMoE) and m.next_gates)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        x = torch.randn(1, model.config.hidden_size, generator=g).half()
        weights, choice, _ = block._route_one(x)
        _, want_w, want_e = block.gate(x)
        assert choice == want_e.tolist(), name
        assert torch.equal(weights.to(want_w.dtype), want_w), (name, weights, want_w)
