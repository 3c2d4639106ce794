"""The knowledge-distillation objective on dense logits: divergence to the teacher + hard-label CE.

    total = alpha · T² · mean(divergence at T) + (1 − alpha) · mean(cross-entropy at T = 1)

T² keeps the divergence's gradient scale independent of T (Hinton et al., 2015); it applies to the
KL family only, tvd and uld are unscaled (`divergences.soft_scale` says why). Means run over
supervised tokens (label != -100) and divide by `num_tokens`, the global supervised count of the
optimizer step when given (see `reduce.py`), else this batch's count.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.signal import DenseSignal, SparseSignal

from .divergences import DIVERGENCES, _check_temperature, soft_scale
from .reduce import token_mean
from .sparse import sparse_divergence
from .uld import CROSS_VOCAB

IGNORE_INDEX = -100


@dataclass
class LossParts:
    total: Tensor  # scalar to backprop
    kd: Tensor  # detached scalar: mean per-token divergence (unscaled by T², normalised like total)
    ce: Tensor  # detached scalar: mean hard-label cross-entropy (T = 1)
    # Progress metrics, filled only by the fused path with metrics=True (None otherwise):
    kl: Tensor | None = None  # detached scalar: mean KL(teacher ‖ student) at T = 1, normalised like total
    top1: Tensor | None = None  # detached scalar: count of rows whose student argmax is the teacher's top-1


def _check_args(divergence: str, alpha: float, temperature: float, divergence_kwargs: dict) -> None:
    known = {**DIVERGENCES, **CROSS_VOCAB}
    if divergence not in known:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {sorted(known)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (1 = pure KD, 0 = pure CE), got {alpha!r}")
    _check_temperature(temperature)
    accepted = set(inspect.signature(known[divergence]).parameters) - {
        "student_logits", "teacher_logits", "temperature"
    }
    unknown = set(divergence_kwargs) - accepted
    if unknown:
        raise ValueError(
            f"divergence {divergence!r} takes no {sorted(unknown)}; it accepts {sorted(accepted) or 'none'}"
        )


def _dense_divergence(name: str, student_logits: Tensor, teacher_logits: Tensor, **kwargs) -> Tensor:
    return {**DIVERGENCES, **CROSS_VOCAB}[name](student_logits, teacher_logits, **kwargs)  # (N,)


def distill_loss(
    student_logits: Tensor,
    teacher: DenseSignal | SparseSignal | Tensor,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    num_tokens: int | Tensor | None = None,
    capture_temperature: float | None = None,
    **divergence_kwargs,
) -> LossParts:
    """KD loss for student logits (N, V), teacher logits (N, V) and labels (N,) int64 (-100 = ignore).

    The teacher may also be a `SparseSignal` (N rows of top-k): the divergence then runs on the
    k + 1 buckets of `sparse.py` (its docstring states the tail and temperature conventions);
    `capture_temperature` overrides the signal's `provenance.temperature` (sparse teachers only).
    The teacher is not detached here: a frozen teacher carries no gradient anyway.

    A signal's `weight` (N,) scales each token's divergence in the KD term (0 drops it); the KD sum is
    still divided by the full supervised count, so dropping tokens shrinks the KD term rather than
    re-weighting the kept ones. The CE term is never weighted.
    """
    _check_args(divergence, alpha, temperature, divergence_kwargs)
    weight = getattr(teacher, "weight", None)  # (N,) or None
    if isinstance(teacher, SparseSignal) and divergence in CROSS_VOCAB:
        raise ValueError(f"divergence {divergence!r} needs dense teacher logits, not a top-k signal")
    if isinstance(teacher, SparseSignal):
        divergence_fn = partial(sparse_divergence, capture_temperature=capture_temperature)
    elif capture_temperature is not None:
        raise ValueError("capture_temperature applies to a SparseSignal teacher only")
    else:
        divergence_fn = _dense_divergence
        teacher = teacher.logits if isinstance(teacher, DenseSignal) else teacher  # (N, V)
    if labels.shape != student_logits.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be (N,) for logits {tuple(student_logits.shape)}")
    mask = labels != IGNORE_INDEX  # (N,) bool
    count = mask.sum() if num_tokens is None else num_tokens

    # A part with weight 0 is still reported, but computed without a graph (no memory, and an inf
    # in it cannot turn the total into NaN through 0 · inf).
    with nullcontext() if alpha > 0 else torch.no_grad():
        per_token = divergence_fn(
            divergence, student_logits, teacher, temperature=temperature, **divergence_kwargs
        )  # (N,)
        if weight is None:
            kd = token_mean(per_token, mask, count)
        else:  # weight-0 rows leave the mask: an inf there must not reach the sum (0 · inf = NaN)
            weight = weight.to(per_token.device, per_token.dtype)  # (N,)
            kd = token_mean(per_token * weight, mask & (weight != 0), count)
    with nullcontext() if alpha < 1 else torch.no_grad():
        # F.cross_entropy gives 0 on ignored rows; the mask in token_mean is what makes them not count.
        ce_rows = F.cross_entropy(
            student_logits.float(), labels, reduction="none", ignore_index=IGNORE_INDEX
        )  # (N,)
        ce = token_mean(ce_rows, mask, count)

    t2 = soft_scale(divergence, temperature)  # T² for the KL family, 1 for tvd / uld
    if alpha == 1.0:
        total = t2 * kd
    elif alpha == 0.0:
        total = ce
    else:
        total = alpha * t2 * kd + (1.0 - alpha) * ce
    return LossParts(total=total, kd=kd.detach(), ce=ce.detach())


def sparse_distill_loss(
    student_logits: Tensor,
    signal: SparseSignal,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    num_tokens: int | Tensor | None = None,
    capture_temperature: float | None = None,
    **divergence_kwargs,
) -> LossParts:
    """`distill_loss` against a top-k `SparseSignal` (N, k) rather than dense logits; same `LossParts`."""
    if not isinstance(signal, SparseSignal):
        raise TypeError(f"sparse_distill_loss needs a SparseSignal, got {type(signal).__name__}")
    return distill_loss(
        student_logits, signal, labels, divergence=divergence, temperature=temperature, alpha=alpha,
        num_tokens=num_tokens, capture_temperature=capture_temperature, **divergence_kwargs,
    )
