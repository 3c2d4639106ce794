"""The one place that masks per-token loss values and normalises them.

Normalisation is by the GLOBAL number of supervised tokens of the optimizer step (every
gradient-accumulation micro-batch, every rank), not by each micro-batch's own count: then the sum
of the micro-batch losses is exactly the full-batch loss, and so are the accumulated gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Σ values[mask]: values (N,), mask (N,) bool → scalar."""
    if values.shape != mask.shape or values.dim() != 1:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must both be (N,)")
    # where, not values * mask: a masked row holding inf or NaN must not reach the value (inf·0 is
    # NaN) nor the gradient (where's backward sends exactly 0 to the masked rows).
    return torch.where(mask, values, 0.0).sum()


def normalize(total: Tensor, num_tokens: int | Tensor) -> Tensor:
    """total / max(num_tokens, 1); `num_tokens` is the global supervised-token count of the step.

    With no supervised token anywhere the total is 0, so the loss is 0 and its gradients are 0.
    """
    if isinstance(num_tokens, Tensor):
        denom = num_tokens.clamp(min=1).to(total.dtype)  # () ; may come from an all-reduce
    else:
        denom = max(int(num_tokens), 1)
    return total / denom


def token_mean(values: Tensor, mask: Tensor, num_tokens: int | Tensor | None = None) -> Tensor:
    """Masked mean of per-token values (N,), over `num_tokens` (default: this batch's mask.sum())."""
    return normalize(masked_sum(values, mask), mask.sum() if num_tokens is None else num_tokens)


def masked_row_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of each row of values (N, M) over the columns where mask (M,) is True → (N,); 0 with none."""
    if values.dim() != 2 or mask.shape != values.shape[1:]:
        raise ValueError(f"values {tuple(values.shape)} must be (N, M) and mask {tuple(mask.shape)} (M,)")
    return torch.where(mask, values, 0.0).sum(-1) / max(int(mask.sum()), 1)
