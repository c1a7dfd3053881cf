"""Faults that must not degrade silently: OOM in the fused path, pinning failures, over-long prompts,
closing a model, and kernels compiled at load rather than on the first token."""

from __future__ import annotations

import gc

import pytest
import torch

from colab_helpers.conversation.generation import PromptTooLongError, SamplingConfig, chat_prompt_ids, generate_stream
from colab_helpers.conversation.session import ChatSession
from colab_helpers.model import close_model, load_model, load_tokenizer
from colab_helpers.runtime import kernels, pinning
from colab_helpers.runtime.experts import ExpertCache, ExpertLayout
from colab_helpers.weights.model_spec import ModelSpec
from colab_helpers.weights.quant import DEMO_EXPERT_SPEC, QuantizedWeight, dequantized_linear
from colab_helpers.weights.tiny import tiny_model_path

# ---- the fused kernel: OOM is memory, not a broken kernel ------------------------------------------


def _weight() -> QuantizedWeight:
    gen, t = torch.Generator().manual_seed(0), {}
    for key, (dtype, shape) in DEMO_EXPERT_SPEC.tensor_specs((64, 256)).items():
        t[key] = (
            torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
            if dtype == torch.uint8
            else torch.rand(shape, generator=gen).to(dtype)
        )
    return QuantizedWeight.from_tensors(DEMO_EXPERT_SPEC, (64, 256), t)


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 MiB"), RuntimeError("CUDA error: out of memory")],
    ids=["OutOfMemoryError", "driver_oom"],
)
def test_oom_inside_the_fused_path_keeps_the_kernel_enabled(monkeypatch, error) -> None:
    def oom(*args, **kwargs):
        raise error

    monkeypatch.setattr(kernels, "_fused_enabled", True)
    monkeypatch.setattr(kernels, "use_fused_kernel", lambda x, w: kernels._fused_enabled)  # a GPU machine
    monkeypatch.setattr(kernels, "triton_gemv", oom)
    with pytest.raises(type(error)):
        kernels.quant_linear(torch.randn(1, 256), _weight())
    assert kernels._fused_enabled  # the next token still takes the fused kernel


def test_a_compile_failure_disables_the_kernel_with_a_warning(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("PTX JIT compilation failed")

    monkeypatch.setattr(kernels, "_fused_enabled", True)
    monkeypatch.setattr(kernels, "use_fused_kernel", lambda x, w: kernels._fused_enabled)
    monkeypatch.setattr(kernels, "triton_gemv", broken)
    x, w = torch.randn(1, 256), _weight()
    with pytest.warns(UserWarning, match="fused low-bit GEMV failed"):
        assert torch.equal(kernels.quant_linear(x, w), dequantized_linear(x, w))
    assert not kernels._fused_enabled


@pytest.fixture(scope="module")
def tiny():
    path = tiny_model_path()
    return load_model(path, experts_on_device=2, progress=False), load_tokenizer(path)


def test_oom_during_generation_is_reported_and_the_kernel_stays_on(tiny, monkeypatch) -> None:
    """A decode-step OOM inside the fused path ends the answer as out_of_memory (KV dropped), nothing else."""
    model, tok = tiny

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(kernels, "_fused_enabled", True)
    monkeypatch.setattr(kernels, "use_fused_kernel", lambda x, w: x.numel() // x.shape[-1] == 1)  # decode only
    monkeypatch.setattr(kernels, "triton_gemv", oom)
    result = generate_stream(model, tok, chat_prompt_ids(tok, "What is the capital of France?"), SamplingConfig(8))
    assert result.stats.stop_reason == "out_of_memory" and "out of GPU memory" in result.error
    assert kernels._fused_enabled


# ---- warm-up: kernels compiled at load -------------------------------------------------------------


def test_warm_up_compiles_each_weight_geometry_once_with_a_progress_line(capsys) -> None:
    w = _weight()
    other = QuantizedWeight.from_tensors(w.spec, w.shape, w.tensors())  # same geometry: no second compile
    calls = []

    def gemv(x, weight):
        calls.append(("gemv", tuple(x.shape), x.dtype))
        return x.new_zeros(x.shape[0], weight.shape[0])

    def expert(x, ws, coef, out=None):
        calls.append(("expert", tuple(x.shape), out is not None))  # first and accumulating launch
        return x.new_zeros(1, ws["w2"].shape[0])

    mlp = {"w1": w, "w3": w, "w2": other}
    n = kernels.warm_up([w, other], [mlp, dict(mlp)], torch.float16, "cpu", gemv=gemv, expert=expert)
    assert n == 2  # one matrix geometry (attention and experts share it here), one expert geometry
    rows = [("gemv", (r, 256), torch.float16) for r in range(1, kernels.MAX_GEMV_ROWS + 1)]  # decode + short prefill
    assert calls == [*rows, ("expert", (1, 256), False), ("expert", (1, 256), True)]
    assert "compiling fused low-bit kernels" in capsys.readouterr().err
    assert kernels.warm_up([w], [mlp], torch.float16, "cpu") == 0  # no GPU: nothing to compile


def test_a_warm_up_compile_failure_disables_the_fused_kernels_with_a_warning(monkeypatch) -> None:
    def broken(*args):
        raise RuntimeError("triton compilation failed: sm_75")

    monkeypatch.setattr(kernels, "_fused_enabled", True)
    with pytest.warns(UserWarning, match="compilation failed"):
        assert kernels.warm_up([_weight()], [], torch.float16, "cpu", gemv=broken, expert=broken) == 0
    assert not kernels._fused_enabled


def test_load_model_warms_up_every_quantized_shape(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(
        kernels, "warm_up", lambda linears, experts, dtype, device, progress=True: seen.append((linears, experts))
    )
    load_model(tiny_model_path(), experts_on_device=2, progress=False)
    assert len(seen) == 1
    linears, experts = seen[0]
    assert {tuple(w.shape) for w in linears} == {(256, 256), (64, 256)}  # q/o, k/v of the tiny model
    assert [{k: tuple(v.shape) for k, v in e.items()} for e in experts] == [
        {"w1": (512, 256), "w3": (512, 256), "w2": (256, 512)}
    ]


# ---- pinning the host store --------------------------------------------------------------------------


class FakeCudart:
    """The CUDA runtime calls ``pinned_host_buffer`` makes, with CUDA's sticky last-error semantics."""

    def __init__(self, limit: int | None = None, fail_all: bool = False) -> None:
        self.limit, self.fail_all = limit, fail_all
        self.registered: dict[int, int] = {}
        self.last_error = 0
        self.log: list[str] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:
        if self.fail_all or (self.limit is not None and size > self.limit):
            self.last_error = 2  # cudaErrorMemoryAllocation, left for the next launch check
            return 2
        self.registered[ptr] = size
        self.log.append("register")
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:
        del self.registered[ptr]
        self.log.append("unregister")
        return 0

    def cudaGetLastError(self) -> int:
        err, self.last_error = self.last_error, 0
        return err

    def cudaGetErrorString(self, code: int) -> str:
        return "out of memory"


def test_pinning_registers_the_exact_size_once() -> None:
    fake = FakeCudart()
    buf = pinning.pinned_host_buffer(5, 1000, cudart=fake)
    assert fake.registered == {buf.data_ptr(): 5000} and fake.last_error == 0
    del buf
    gc.collect()
    assert fake.registered == {}  # unregistered when freed


def test_unpinning_waits_for_the_copies_of_the_caches_own_device(monkeypatch) -> None:
    """With several GPUs the finalizer may run while another device is current: it synchronizes the device
    whose copies use the buffer (the expert cache's), before unregistering."""
    fake, order = FakeCudart(), []
    monkeypatch.setattr(pinning, "_wait_for_copies", lambda device: order.append(("sync", device)))
    unregister = fake.cudaHostUnregister
    fake.cudaHostUnregister = lambda ptr: (order.append(("unregister", ptr)), unregister(ptr))[1]
    buf = pinning.pinned_host_buffer(3, 1000, cudart=fake, device=torch.device("cuda:1"))
    base = buf.data_ptr()
    pinning.release(buf)
    assert order == [("sync", torch.device("cuda:1")), ("unregister", base)] and fake.registered == {}
    seen = {}
    monkeypatch.setattr(pinning, "pinned_host_buffer", lambda rows, nbytes, **kw: seen.update(kw))
    from colab_helpers.runtime.experts import host_buffer

    host_buffer(2, 64, pin=True, device=torch.device("cuda:1"))  # what ExpertCache passes: its own device
    assert seen == {"device": torch.device("cuda:1")}


def test_a_refused_registration_clears_the_error_and_pins_in_chunks(monkeypatch) -> None:
    monkeypatch.setattr(pinning, "PIN_CHUNK", 3000)
    fake = FakeCudart(limit=3000)
    buf = pinning.pinned_host_buffer(7, 1000, cudart=fake)
    assert fake.last_error == 0  # nothing stale for the next kernel
    base = buf.data_ptr()
    assert fake.registered == {base: 3000, base + 3000: 3000, base + 6000: 1000}  # whole rows, exactly 7000 B
    del buf
    gc.collect()
    assert fake.registered == {}


def test_pinning_that_fails_even_in_chunks_stops_with_a_clear_message(monkeypatch) -> None:
    monkeypatch.setattr(pinning, "PIN_CHUNK", 3000)
    fake = FakeCudart(limit=3000)
    calls = {"n": 0}
    register = fake.cudaHostRegister

    def third_chunk_fails(ptr, size, flags):
        calls["n"] += 1
        if calls["n"] == 4:  # the whole store, two chunks, then this one
            fake.last_error = 2
            return 2
        return register(ptr, size, flags)

    fake.cudaHostRegister = third_chunk_fails
    with pytest.raises(pinning.PinnedMemoryError, match=r"could not page-lock 0\.00 GB .* 9 host experts") as err:
        pinning.pinned_host_buffer(9, 1000, cudart=fake)
    assert "keep more experts on the GPU" in str(err.value)
    assert fake.registered == {} and fake.last_error == 0  # chunks already pinned were released, error cleared


def test_clear_last_error_without_a_cuda_runtime_is_harmless() -> None:
    assert pinning.clear_last_error(FakeCudart()) == 0
    cleared = pinning.clear_last_error()  # CPU torch: no libcudart mapped; CUDA torch without a GPU: an error code
    assert cleared is None or cleared >= 0


# ---- close -------------------------------------------------------------------------------------------


def test_close_synchronizes_before_freeing_pinned_and_device_buffers(tiny) -> None:
    from transformers import MixtralConfig

    from colab_helpers.weights.checkpoint import QuantConfig

    cfg = MixtralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_local_experts=4)
    layout = ExpertLayout.of(ModelSpec.of(cfg, QuantConfig()))
    cache = ExpertCache(layout, 2, 4, 2)
    fake = FakeCudart()
    cache.host_buf = pinning.pinned_host_buffer(*cache.host_buf.shape, cudart=fake)  # as on a GPU
    cache.engine.synchronize = lambda: fake.log.append("synchronize")
    cache.close()
    assert fake.log == ["register", "synchronize", "unregister"] and fake.registered == {}
    assert cache.device_bytes == 0 and cache.host_bytes == 0
    with pytest.raises(RuntimeError, match="closed"):
        cache.fetch(0, 0)
    cache.close()  # twice is fine


def test_close_model_releases_the_cache(make_checkpoint) -> None:
    model = load_model(make_checkpoint(2), experts_on_device=2, progress=False)
    assert model.kv_arena is not None  # the KV bytes, lending a slot
    close_model(model)
    assert model.expert_cache.device_bytes == 0 and model.expert_cache.host_bytes == 0
    assert model.kv_arena is None


# ---- context: the plan's, and prompts that do not fit -----------------------------------------------


def test_chat_session_context_defaults_to_the_plan(tiny) -> None:
    model, tok = tiny
    assert model.memory_plan.context == 1024  # min(OffloadConfig.context 4096, 1024 positions)
    assert ChatSession(model, tok).max_context == 1024
    short = load_model(tiny_model_path(), experts_on_device=2, progress=False, context=256)
    assert ChatSession(short, tok).max_context == 256 == short.memory_plan.context


def test_generate_refuses_a_prompt_longer_than_the_context(tiny) -> None:
    model, tok = tiny
    ids = chat_prompt_ids(tok, "word " * 13000)
    assert ids.shape[1] > 13000
    with pytest.raises(PromptTooLongError, match=r"prompt is 13\d{3} tokens .* 1024"):
        generate_stream(model, tok, ids, SamplingConfig(16))
    fits = chat_prompt_ids(tok, "word " * 900)
    with pytest.raises(PromptTooLongError, match="max new tokens"):  # the answer would not fit
        generate_stream(model, tok, fits, SamplingConfig(200))


def test_cli_generate_with_a_13k_token_prompt_is_one_line_and_exit_2(capsys) -> None:
    from colab_helpers.cli import main

    assert main(["generate", "word " * 13000, "--device", "cpu", "--max-new-tokens", "8"]) == 2
    out, err = capsys.readouterr()
    assert out.strip() == ""  # no garbage answer
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: prompt is 13") and "1024" in last and "Traceback" not in err
