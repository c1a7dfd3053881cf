"""Every supported family, offloaded, computes what plain transformers computes with the same dequantized weights.

A tiny random model of each family (``random_moe``: shared expert, dense layers, renormalized and plain top-k,
sparsemixer, biases) is saved in the layout and loaded with ``load_model``; copies run through the
asynchronous-copy simulator, so the stream ordering of every schedule is checked too.
"""

from __future__ import annotations

import pytest
import torch

from colab_helpers.model import dequantized_reference, load_model
from colab_helpers.runtime.linear import QuantLinear
from colab_helpers.runtime.moe import OffloadedMoE, PrefetchConfig
from colab_helpers.sim.copysim import simulate_copies
from colab_helpers.sim.dispatch_count import count_decode
from colab_helpers.sim.random_moe import families, random_model, small_config
from colab_helpers.sim.trace import RoutingRecorder
from colab_helpers.weights.checkpoint import Checkpoint, save_checkpoint
from colab_helpers.weights.families import from_transformers

PROMPT = torch.tensor([[1, 17, 45, 99, 3, 64, 12, 7, 88, 23, 5, 41]])
NEW = 12
FAMILIES = families()
EXPERTS = 8  # every tiny variant has 8 experts per MoE layer


@pytest.fixture(scope="module", params=FAMILIES)
def family_pair(request, tmp_path_factory):
    """``(family, path, reference logits, reference greedy tokens)``; 4-bit attention, 2-bit experts."""
    path = tmp_path_factory.mktemp(f"parity_{request.param}")
    save_checkpoint(random_model(request.param), path, optimize=False, progress=False)
    ref = dequantized_reference(path)
    with torch.no_grad():
        logits = ref(PROMPT).logits
    return request.param, path, logits, ref.generate(PROMPT, max_new_tokens=NEW, do_sample=False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no_prefetch"])
@pytest.mark.parametrize("k", range(1, EXPERTS + 1))
def test_logits_and_greedy_tokens_match_for_every_cache_size(family_pair, k: int, prefetch: bool) -> None:
    family, path, ref_logits, ref_greedy = family_pair
    model = load_model(path, experts_on_device=k, prefetch=PrefetchConfig(enabled=prefetch), progress=False)
    simulate_copies(model, compute_s=1e-4)
    assert type(model).__name__ == from_transformers(model.config).model_class  # the family's stock class
    with torch.no_grad():
        assert rel_err(model(PROMPT).logits, ref_logits) < 1e-3
    assert torch.equal(model.generate(PROMPT, max_new_tokens=NEW, do_sample=False), ref_greedy)
    stats = model.expert_cache.stats
    assert (sum(stats.predicted) > 0) == prefetch  # the next MoE layer's experts were guessed (or not)
    if not prefetch:
        assert sum(stats.prefetch_loads) == 0
    if k < EXPERTS:
        assert sum(stats.misses) > 0  # offloading really happened
    else:
        assert sum(stats.misses) == 0 and sum(stats.h2d_bytes) == 0
    model.expert_cache.check_invariants()


def test_the_cache_holds_moe_layers_only_and_dense_layers_keep_their_mlp(family_pair) -> None:
    family, path, _, _ = family_pair
    model = load_model(path, experts_on_device=[1, 8], progress=False)
    arch = from_transformers(model.config)
    blocks = [layer.mlp for layer in model.model.layers]
    moe = [i for i, b in enumerate(blocks) if isinstance(b, OffloadedMoE)]
    assert tuple(moe) == arch.moe_layers
    assert [blocks[i].layer for i in moe] == list(range(len(moe)))  # the cache's layer = rank among MoE layers
    assert [blocks[i].decoder_layer for i in moe] == moe
    assert model.expert_cache.num_layers == len(moe) and model.expert_cache.base_capacity == [1, 8]  # before lending
    for i in arch.dense_layers:  # the family's own MLP, low-bit
        assert all(isinstance(getattr(blocks[i], m), QuantLinear) for m in ("gate_proj", "up_proj", "down_proj"))
    shared = [blocks[i].shared_expert for i in moe]
    assert all((s is not None) == bool(arch.shared_intermediate) for s in shared)
    with RoutingRecorder(model) as rec:
        model.generate(PROMPT, max_new_tokens=3, do_sample=False)
    assert rec.layers == list(range(len(moe)))


def test_layers_split_across_devices(family_pair) -> None:
    """Whole layers per device (CPU stand-ins for GPUs): the same tokens; dense layers refuse a split for now."""
    from colab_helpers.runtime.placement import LayerPlacement

    family, path, _, ref_greedy = family_pair
    arch = Checkpoint.open(path, verify=False).arch
    placement = LayerPlacement.even(["cpu", "cpu"], arch.num_layers)
    if arch.dense_layers:
        with pytest.raises(ValueError, match="cannot be split across devices"):
            load_model(path, experts_on_device=2, placement=placement, progress=False)
        return
    model = load_model(path, experts_on_device=2, placement=placement, progress=False)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=NEW, do_sample=False), ref_greedy)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_host_sync_per_moe_layer_per_decode_token(family, tmp_path) -> None:
    save_checkpoint(random_model(family), tmp_path, optimize=False, progress=False)
    model = load_model(
        tmp_path, dtype=torch.float16, experts_on_device=2, dense_on_cpu=False, progress=False, check_memory=False
    )
    d = count_decode(model, PROMPT[:, :8], tokens=4)
    assert d.moe_layers == len(from_transformers(model.config).moe_layers)
    assert d.syncs_per_layer_token <= 1, d.moe.ops  # reading the router's choice (and guesses), nothing else
    assert not [op for op in d.moe.ops if op.startswith("sync:") and op != "sync:tolist"], d.moe.ops


@pytest.mark.parametrize("family", [f for f in ("qwen2_moe", "olmoe") if f in FAMILIES])
def test_routing_semantics_are_the_familys(family, tmp_path) -> None:
    """The same weights with the opposite ``norm_topk_prob`` give other logits: the runtime follows the config."""
    config = small_config(family)
    flipped = small_config(family, norm_topk_prob=not config.norm_topk_prob)
    outs = []
    for i, c in enumerate((config, flipped)):
        save_checkpoint(random_model(c), tmp_path / str(i), optimize=False, progress=False)
        model = load_model(tmp_path / str(i), experts_on_device=8, progress=False)
        ref = dequantized_reference(tmp_path / str(i))
        with torch.no_grad():
            outs.append(model(PROMPT).logits)
            assert rel_err(outs[-1], ref(PROMPT).logits) < 1e-3
    assert rel_err(outs[0], outs[1]) > 1e-2


@pytest.mark.requires_cuda
@pytest.mark.parametrize("k", [1, 8])
def test_cuda_offloaded_family_matches_the_reference(family_pair, k: int) -> None:
    """fp32 on CUDA (async copy streams, pinned host store, fused kernels where they apply): same logits as
    the CPU reference and the same greedy tokens."""
    family, path, ref_logits, ref_greedy = family_pair
    model = load_model(path, device="cuda", dtype=torch.float32, experts_on_device=k, progress=False)
    with torch.no_grad():
        assert rel_err(model(PROMPT.cuda()).logits.cpu(), ref_logits) < 1e-3
    assert torch.equal(model.generate(PROMPT.cuda(), max_new_tokens=NEW, do_sample=False).cpu(), ref_greedy)
    model.expert_cache.check_invariants()


def test_tied_embeddings_are_not_stored_and_still_tied(tmp_path) -> None:
    """A family other than Mixtral with tied embeddings: no ``lm_head`` in the trunk, the loaded head is the
    embedding (one tensor), and the logits match the reference."""
    from safetensors.torch import load_file

    family = "qwen3_moe" if "qwen3_moe" in FAMILIES else FAMILIES[-1]
    save_checkpoint(
        random_model(small_config(family, tie_word_embeddings=True)), tmp_path, optimize=False, progress=False
    )
    assert "lm_head.weight" not in load_file(tmp_path / "model-00001-of-00017.safetensors")
    model = load_model(tmp_path, experts_on_device=3, progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = dequantized_reference(tmp_path)
    with torch.no_grad():
        assert rel_err(model(PROMPT).logits, ref(PROMPT).logits) < 1e-3
    assert torch.equal(
        model.generate(PROMPT, max_new_tokens=NEW, do_sample=False),
        ref.generate(PROMPT, max_new_tokens=NEW, do_sample=False),
    )
