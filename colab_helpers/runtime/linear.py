"""``QuantLinear``: the ``nn.Module`` that stands in for ``nn.Linear`` with a low-bit weight.

Its own module because it joins the two halves: ``quant.py`` (the stored format, dequantization) and
``kernels.py`` (the compute, which imports ``quant``). Keeping it in either made an import circle.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..weights.quant import SUFFIXES, QuantizedWeight
from .kernels import quant_linear


class QuantLinear(nn.Module):
    """A linear whose weight is stored low-bit; stands in for ``nn.Linear`` in attention (and the shared
    expert and dense-layer MLPs of some families). ``bias`` (compute dtype) is added after the matmul.

    With ``dense_on_cpu`` a CPU run dequantizes once and keeps the dense copy (CPUs have no fused
    low-bit kernel; on CUDA the packed bytes are read directly every call).
    """

    def __init__(self, weight: QuantizedWeight, dense_on_cpu: bool = True, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.spec = weight.spec
        self.out_features, self.in_features = weight.shape
        self.dense_on_cpu = dense_on_cpu
        for name, tensor in weight.tensors().items():
            self.register_buffer(name.replace(".", "_"), tensor)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._weight: QuantizedWeight | None = None

    @property
    def weight_q(self) -> QuantizedWeight:
        """The buffers as a ``QuantizedWeight``; rebuilt only after ``.to()`` replaced them."""
        if self._weight is None or self._weight.W_q is not self.W_q:
            tensors = {s: getattr(self, s.replace(".", "_")) for s in SUFFIXES}
            self._weight = QuantizedWeight.from_tensors(self.spec, (self.out_features, self.in_features), tensors)
        return self._weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_q
        if self.dense_on_cpu and x.device.type == "cpu" and (w.dense is None or w.dense.dtype != x.dtype):
            w.dense = w.dequantize(x.dtype)
        y = quant_linear(x, w)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        s = self.spec
        bias = ", bias" if self.bias is not None else ""
        return f"in={self.in_features}, out={self.out_features}, bits={s.nbits}, group={s.group_size}{bias}"
