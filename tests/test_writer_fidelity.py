"""The writer against the float model it was given: every stored matrix is the source matrix it claims to be.

The parity tests compare the offloaded model with a reference built from the *same* checkpoint, so a
writer that stores the wrong matrix under a name (gate and up swapped, experts in the wrong order, a
transposed weight) passes them. Here each matrix read back through the project's reader and dequantizer
is compared with the transformers 5 source: it must be within quantization error of its own source and
clearly farther from every plausible wrong one (the other half of ``gate_up_proj``, the same matrix of
every other expert or layer, its transpose). The mutation tests break the writer on purpose and expect
this check to fail, so it is known to catch each bug.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import colab_helpers.weights.checkpoint as checkpoint
import colab_helpers.weights.quant as quant
from colab_helpers.model import load_model
from colab_helpers.weights.checkpoint import (
    ATTENTION_PROJS,
    Checkpoint,
    save_checkpoint,
)
from colab_helpers.weights.model_spec import ModelSpec
from colab_helpers.weights.quant import QuantizedWeight

# Relative Frobenius error of a dequantized random-normal matrix against its source, per bit width:
# measured at most 0.33 / 0.19 / 0.09 (2 / 3 / 4 bits, min/max quantization, seed 0); ~20% headroom.
MAX_REL_ERR = {2: 0.4, 3: 0.24, 4: 0.12}
# A wrong source is an independent matrix: error about sqrt(2) (measured >= 1.40), so the worst measured
# ratio right/wrong is 0.23 (2 bits); requiring < 0.5 fails on any swap, permutation or transpose.
MARGIN = 0.5
PROMPT = torch.tensor([[1, 17, 45, 99, 3, 64, 12, 7, 88, 23, 5, 41]])


def fidelity_config() -> MixtralConfig:
    """Tiny, but square experts and q/o (hidden == intermediate == heads*head_dim), so a transpose keeps the shape."""
    return MixtralConfig(
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=128,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )


def source_model(seed: int = 0) -> MixtralForCausalLM:
    """Random normal weights; large embeddings keep the residual stream steady, so logits error stays readable."""
    torch.manual_seed(seed)
    model = MixtralForCausalLM(fidelity_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02 if "self_attn" in name else 0.05 if "experts" in name else 1.0)
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)  # varied routing
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def source_matrices(model: MixtralForCausalLM) -> dict[str, torch.Tensor]:
    """Every quantized matrix of the source under its checkpoint name, sliced by hand from transformers 5."""
    out, inter = {}, model.config.intermediate_size
    for layer, block in enumerate(model.model.layers):
        for proj in ATTENTION_PROJS:
            out[f"{layer}.{proj}"] = getattr(block.self_attn, proj).weight.detach()
        gate_up, down = block.mlp.experts.gate_up_proj.detach(), block.mlp.experts.down_proj.detach()
        for e in range(model.config.num_local_experts):
            out[f"{layer}.{e}.w1"] = gate_up[e, :inter]  # gate: first half of the fused rows
            out[f"{layer}.{e}.w3"] = gate_up[e, inter:]  # up: second half
            out[f"{layer}.{e}.w2"] = down[e]
    return out


def stored_matrices(path: Path) -> dict[str, torch.Tensor]:
    """Every quantized matrix read back through the project's reader and dequantizer."""
    ckpt = Checkpoint.open(path)
    cfg, q = ckpt.config, ckpt.quant
    out = {}
    trunk = ckpt.load_trunk()
    for layer in range(cfg.num_hidden_layers):
        for proj, shape in ModelSpec.of(cfg).arch.attention_shapes.items():
            prefix = f"model.layers.{layer}.self_attn.{proj}."
            t = {s: trunk[prefix + s] for s in quant.SUFFIXES}
            out[f"{layer}.{proj}"] = QuantizedWeight.from_tensors(q.attention, shape, t).dequantize(torch.float32)
    for layer, e, tensors in ckpt.iter_experts():
        for mat, shape in ModelSpec.of(cfg).expert_shapes.items():
            t = {s: tensors[f"{mat}.{s}"] for s in quant.SUFFIXES}
            out[f"{layer}.{e}.{mat}"] = QuantizedWeight.from_tensors(q.experts, shape, t).dequantize(torch.float32)
    return out


def wrong_sources(name: str, src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a layout bug could have stored under ``name`` instead: every other matrix of its shape, its transpose."""
    w = src[name]
    out = {other: m for other, m in src.items() if other != name and m.shape == w.shape}
    if w.shape[0] == w.shape[1]:
        out[name + ".T"] = w.T
    return out


def fidelity_problems(path: Path, model: MixtralForCausalLM, bits: dict[str, int]) -> list[str]:
    """Each stored matrix within quantization error of its source and clearly closer to it than to any wrong one."""
    src, got = source_matrices(model), stored_matrices(path)
    assert set(src) == set(got)
    problems = []
    for name, w in got.items():
        kind = "attention" if name.split(".")[-1] in ATTENTION_PROJS else "experts"
        err = rel_err(w, src[name])
        nearest, alt_err = min(((o, rel_err(w, m)) for o, m in wrong_sources(name, src).items()), key=lambda t: t[1])
        if err > MAX_REL_ERR[bits[kind]]:
            problems.append(f"{name}: error {err:.3f} to its source, above the {bits[kind]}-bit bound")
        if err > MARGIN * alt_err:
            problems.append(f"{name}: error {err:.3f} to its source but {alt_err:.3f} to {nearest}")
    return problems


def write(model: MixtralForCausalLM, out: Path, attn_bits: int, expert_bits: int) -> Path:
    return save_checkpoint(model, out, attn_bits=attn_bits, expert_bits=expert_bits, optimize=False, progress=False)


@pytest.fixture(scope="module")
def model() -> MixtralForCausalLM:
    return source_model()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_stored_matrix_is_its_source_within_quantization_error(model, bits: int, tmp_path: Path) -> None:
    path = write(model, tmp_path, attn_bits=bits, expert_bits=bits)
    assert fidelity_problems(path, model, {"attention": bits, "experts": bits}) == []
    # float tensors are stored exactly (as float16), under the old names
    trunk = Checkpoint.open(path).load_trunk()
    sd = model.state_dict()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight"):
        assert torch.equal(trunk[name], sd[name].half()), name


# Logits of the loaded model against the float model on PROMPT, per expert bit width (attention at 4 bits):
# measured 0.25 / 0.13 / 0.063 relative error (seed 0); a w1/w3 swap gives 0.28 at 4 bits. Quantization
# error adds up over all 14 matrices, so only the 4-bit bound is tight enough to see a swap in the logits;
# the matrix-by-matrix check above is what catches layout bugs at every width.
MAX_LOGITS_ERR = {2: 0.3, 3: 0.16, 4: 0.08}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_logits_of_the_loaded_model_are_close_to_the_float_model(model, bits: int, tmp_path: Path) -> None:
    path = write(model, tmp_path, attn_bits=4, expert_bits=bits)
    with torch.no_grad():
        ref = model(PROMPT).logits
        got = load_model(path, experts_on_device=2, progress=False)(PROMPT).logits
    assert rel_err(got, ref) < MAX_LOGITS_ERR[bits]


# ---- the check catches each layout bug (the writer broken on purpose) ---------------------------------------


def swapped_gate_up(gate_up, down, expert):
    mats = ORIGINAL_EXPERT_MATRICES(gate_up, down, expert)
    return {"w1": mats["w3"], "w2": mats["w2"], "w3": mats["w1"]}


def permuted_experts(gate_up, down, expert):
    return ORIGINAL_EXPERT_MATRICES(gate_up, down, (expert + 1) % gate_up.shape[0])


ORIGINAL_EXPERT_MATRICES = checkpoint.expert_matrices
ORIGINAL_QUANTIZE = quant.quantize


def transposed(weight, spec, optimize=True):
    return ORIGINAL_QUANTIZE(weight.T if weight.shape[0] == weight.shape[1] else weight, spec, optimize)


@pytest.mark.parametrize(
    "target, mutant, expected",
    [
        (checkpoint, ("expert_matrices", swapped_gate_up), "0.0.w1: error"),
        (checkpoint, ("expert_matrices", permuted_experts), "0.0.w1: error"),
        (quant, ("quantize", transposed), "0.q_proj: error"),
    ],
    ids=["w1_w3_swap", "permuted_experts", "transpose"],
)
def test_the_fidelity_check_catches_a_broken_writer(model, tmp_path: Path, monkeypatch, target, mutant, expected):
    monkeypatch.setattr(target, *mutant)
    path = write(model, tmp_path, attn_bits=4, expert_bits=4)
    monkeypatch.undo()  # read back with the intact reader
    problems = fidelity_problems(path, model, {"attention": 4, "experts": 4})
    assert any(p.startswith(expected) for p in problems), problems[:3]


def test_the_logits_bound_catches_a_gate_up_swap(model, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(checkpoint, "expert_matrices", swapped_gate_up)
    path = write(model, tmp_path, attn_bits=4, expert_bits=4)
    monkeypatch.undo()
    with torch.no_grad():
        ref = model(PROMPT).logits
        got = load_model(path, experts_on_device=2, progress=False)(PROMPT).logits
    assert rel_err(got, ref) > 2 * MAX_LOGITS_ERR[4]
