"""The sync/launch counter: each kind of host sync is seen, views are free, copies are not launches."""

from __future__ import annotations

import torch

from colab_helpers.model import load_model
from colab_helpers.sim.dispatch_count import count_decode, count_ops, count_prefill
from colab_helpers.weights.tiny import tiny_model_path

PROMPT = torch.tensor([[1, 17, 45, 99, 3, 64, 12, 7]])


def test_every_kind_of_host_sync_is_counted() -> None:
    t = torch.tensor([[0.5, -1.0, 2.0]])
    i = torch.tensor([[1, 2]])
    cases = {
        "tolist": lambda: i.tolist(),
        "item": lambda: t.sum().item(),
        "bool": lambda: bool(t[0, 0] > 0),
        "int": lambda: int(i[0, 0]),
        "cpu": lambda: t.cpu(),
        "numpy": lambda: t.numpy(),
        "nonzero": lambda: torch.nonzero(t),
        "where one-argument": lambda: torch.where(t > 0),
        "boolean mask": lambda: t[t > 0],
        "masked_select": lambda: t.masked_select(t > 0),
        "list upload": lambda: torch.tensor([1, 2], device=t.device),  # pageable H2D + stream sync on CUDA
    }
    for name, run in cases.items():
        with count_ops(uploads=True) as c:
            run()
        assert c.total.syncs == 1, (name, c.total.ops)


def test_views_are_not_launches_and_kernels_are() -> None:
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    with count_ops() as c:
        v = a.reshape(6, 4).t()[1:].unsqueeze(0)  # views only
        torch.empty(3)  # allocation, no kernel
    assert c.total.launches == 0 and c.total.syncs == 0
    with count_ops() as c:
        (a + b).relu_()
        torch.where(a > b, a, b)  # three-argument where: no sync
    assert c.total.launches == 4 and c.total.syncs == 0, c.total.ops
    del v


def test_scopes_attribute_counts_and_patches_are_undone() -> None:
    x = torch.randn(3)
    with count_ops() as c:
        x.tolist()
        with c.scope("inner"):
            x.tolist()
            x + 1
    assert c.scopes["inner"].syncs == 1 and c.scopes["inner"].launches == 1
    assert c.total.syncs == 2
    assert "tolist" not in vars(torch.Tensor)  # the method patch is gone
    with count_ops() as c2:
        pass
    assert c2.total.syncs == 0


def test_decode_counts_on_the_embedded_model() -> None:
    model = load_model(tiny_model_path(), experts_on_device=4, dense_on_cpu=False, progress=False)
    d = count_decode(model, PROMPT, tokens=3)
    assert d.tokens == 3 and d.moe_layers == model.config.num_hidden_layers
    assert d.launches_per_layer_token > 0 and d.moe.syncs > 0
    assert d.total.launches > d.moe.launches  # attention, norms and lm_head happen outside the MoE blocks
    assert any(op.startswith("launch:triton.") for op in d.moe.ops)  # low-bit matmuls counted as fused launches
    assert not any(op.startswith("launch:copy_") for op in d.moe.ops)  # expert copies are copies, not launches


def test_prefill_syncs_and_uploads_per_layer_on_the_embedded_model() -> None:
    """A 256-token prefill: the routing readback is the one host sync per MoE layer (tokens are grouped by
    expert on the device, no index list uploaded per expert; main had 1 sync + 16 uploads per layer), and
    each low-bit matrix dequantizes in one launch on the CUDA path."""
    model = load_model(tiny_model_path(), experts_on_device=2, progress=False)
    ids = torch.randint(3, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    c = count_prefill(model, ids)
    assert c.moe_layers == model.config.num_hidden_layers
    assert c.syncs_per_layer <= 2, c.moe.ops
    assert c.moe.ops["sync:tensor_upload"] == 0
    experts = c.moe.ops["launch:triton.triton_dequantize"] / 3  # w1, w3, w2 each once per expert with tokens
    assert experts == c.moe_layers * model.config.num_local_experts  # 256 tokens reach every expert here
    assert c.launches_per_layer < 100  # main: ~630 (a dequantize was ~20 torch ops per matrix here)
