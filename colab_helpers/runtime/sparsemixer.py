"""Phi-3.5-MoE's sparsemixer router at inference, in 12 kernel launches instead of transformers' 21.

transformers' ``sparsemixer`` (eval mode) picks the top expert, masks the logits whose gap to it, relative
to ``max(|logit|, top)``, exceeds ``2 * jitter``, and weighs the pick by the masked softmax; then it does the
same for the runner-up with the top expert set to ``-inf``. The two rounds are independent once both picks
are known, so ``sparsemixer_eval`` finds the picks as transformers does (``max``, ``scatter``, ``max``) and
runs both rounds as the two rows of one ``[2, E]`` tensor: the same element-wise ops in the same dtype,
one launch each instead of two, and no ``cat`` of the results. Every value is computed by the same formula
on the same operands, so weights and experts equal transformers' bit for bit
(``tests/test_sparsemixer.py``, ties included).
"""

from __future__ import annotations

import torch


def sparsemixer_eval(scores: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [1, 2], experts [1, 2])`` for one token's router logits ``scores`` [1, E], as
    ``transformers...modeling_phimoe.sparsemixer(scores, jitter_eps, training=False)`` returns them."""
    top, first = scores.max(dim=-1, keepdim=True)  # the first pick (ties: the lowest index, as transformers)
    without_first = torch.scatter(scores, -1, first, float("-inf"))
    rows = torch.cat([scores, without_first])  # [2, E]: what each round masks and weighs
    bars, picks = rows.max(dim=-1, keepdim=True)  # [2, 1]: both thresholds, both picks (row 0 repeats ``top``)
    factor = scores.abs().clamp(min=bars)
    masked = rows.masked_fill(((bars - scores) / factor) > (2 * jitter_eps), float("-inf"))
    weights = torch.softmax(masked, dim=-1).gather(dim=-1, index=picks)
    return weights.view(1, 2), picks.view(1, 2)
