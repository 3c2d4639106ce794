"""Per-token divergences between a student and a teacher distribution, on dense logits.

Every function takes `student_logits` (N, V) and `teacher_logits` (N, V) of any float dtype,
computes in fp32, softens BOTH with `temperature` (p = softmax(logits / T)) and returns the (N,)
fp32 per-token values: not scaled by T², not masked, not reduced (that is `reduce.py`'s job).

Logits of -inf (padded vocabulary, banned tokens) are probability 0: such terms contribute exactly
0, with no NaN in values or gradients. KL(p ‖ q) with p > 0 where q = 0 is +inf, as it should be,
and such a row carries no gradient (it would be NaN).

Conventions (stated here once):

- `forward_kl` = KL(p_T ‖ p_S) (mode covering); `reverse_kl` = KL(p_S ‖ p_T) (mode seeking).
- `jsd(beta)` follows TRL's `generalized_jsd_loss` (GKD, Agarwal et al., 2024) at every β: β = 0 is
  the forward KL(p_T ‖ p_S), β = 1 the reverse KL(p_S ‖ p_T), and 0 < β < 1 the generalized
  Jensen-Shannon divergence with the mixture M = β·p_T + (1−β)·p_S, valued
  β·KL(p_T ‖ M) + (1−β)·KL(p_S ‖ M) (β = 0.5 is the usual JSD). The interior formula tends to
  β·KL(p_T ‖ p_S) as β→0 and to (1−β)·KL(p_S ‖ p_T) as β→1, so the value jumps at the end points,
  by design (TRL's convention: the end points name the two KLs, not the vanishing limits).
- `skew_forward_kl(skew=α)` = KL(p_T ‖ α·p_T + (1−α)·p_S) and `skew_reverse_kl(skew=α)` =
  KL(p_S ‖ α·p_S + (1−α)·p_T), the skew KLs of DistiLLM (Ko et al., 2024); α in [0, 1): α = 0 is
  the plain KL; α = 1 would be KL(p ‖ p) = 0 for every input, and is refused.
- `tvd` = ½·Σ|p_T − p_S|.
- T² (`soft_scale`). The objective multiplies the KD term by T² for the KL family only (forward,
  reverse, jsd, skew_*): their logit gradients shrink as 1/T² at high T (Hinton et al., 2015), which
  T² undoes. TVD's (and ULD's) gradient is a sign times ∂p/∂z, shrinking as 1/T only, so T² would
  grow it with T: those are used unscaled.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

# Finite stand-in for log 0 inside a mixture (see `_log_mix`); exp(_FLOOR − x) is 0 for any x > _FLOOR.
_FLOOR = torch.finfo(torch.float32).min


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _check_skew(skew: float) -> None:
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew must be in [0, 1) (0: the plain KL; 1 would make the loss 0 for every input), "
                         f"got {skew!r}")


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(logits / T) in fp32: (N, V) → (N, V)."""
    x = logits.float()  # (N, V); upcast before softmax: bf16 log-probs keep ~3 significant digits
    if temperature != 1.0:
        x = x / temperature  # (N, V)
    return torch.log_softmax(x, dim=-1)  # (N, V)


def _pair(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Validated student and teacher log-probs at `temperature`, each (N, V) fp32."""
    _check_temperature(temperature)
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must both be (N, V) with the same shape"
        )
    return _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Σ_v p·(log p − log q) per row: (N, V), (N, V) → (N,).

    Terms with p = 0 are exactly 0. A row where p > 0 but q = 0 is +inf and carries no gradient:
    its gradient would be inf − inf = NaN, and even a masked row would leak it (0 · inf = NaN).
    """
    p = log_p.exp()  # (N, V)
    support = p > 0  # (N, V) bool
    finite = support & (log_q > -math.inf)  # (N, V) bool: terms with a finite log ratio
    # Double where: off `finite`, log p − log q is NaN (-inf − -inf) or ±inf; the where replaces it
    # by 0 in the value, and its backward sends exactly 0 (never 0·NaN) into that branch.
    log_ratio = torch.where(finite, log_p - log_q, 0.0)  # (N, V)
    # Off `finite` log_ratio is 0, so each such term and its gradient w.r.t. p are 0 already: no
    # second (N, V) where on the product (memory: V is 49k-152k).
    kl = (p * log_ratio).sum(dim=-1)  # (N,)
    infinite = (support & ~finite).any(dim=-1)  # (N,) bool: q misses some of p's mass
    # The second where, at row level: +inf as a constant, so no gradient flows out of such rows.
    return torch.where(infinite, math.inf, kl)  # (N,)


def _log_mix(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """log(w·a + (1−w)·b) from log a, log b (N, V), in log space (no underflow of small a, b)."""
    if weight == 0.0:  # exact end points, with a true log 0 (not the floor) where b = 0
        return log_b
    if weight == 1.0:
        return log_a
    term_a = log_a + math.log(weight)  # (N, V)
    term_b = log_b + math.log1p(-weight)  # (N, V); log1p keeps log(1 − w) exact for small w
    # logaddexp(-inf, -inf) (a = b = 0: padded vocab) has a NaN gradient. A finite floor on one
    # operand removes it and changes nothing where the mixture is > 0, since exp(floor − x) == 0.
    return torch.logaddexp(term_a.clamp(min=_FLOOR), term_b)  # (N, V)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """KL(p_T ‖ p_S) per token: (N, V), (N, V) → (N,) fp32."""
    log_s, log_t = _pair(student_logits, teacher_logits, temperature)
    return _kl(log_t, log_s)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """KL(p_S ‖ p_T) per token: (N, V), (N, V) → (N,) fp32."""
    log_s, log_t = _pair(student_logits, teacher_logits, temperature)
    return _kl(log_s, log_t)


def jsd(
    student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5, temperature: float = 1.0
) -> Tensor:
    """Generalized JSD (TRL's convention): β = 0 forward KL, β = 1 reverse KL, else
    β·KL(p_T ‖ M) + (1−β)·KL(p_S ‖ M), M = β·p_T + (1−β)·p_S: (N, V), (N, V) → (N,) fp32."""
    _check_unit("beta", beta)
    log_s, log_t = _pair(student_logits, teacher_logits, temperature)
    if beta == 0.0:  # M would be p_S: the interior formula is 0 here; TRL's end point is KL(p_T ‖ p_S)
        return _kl(log_t, log_s)
    if beta == 1.0:  # KL(p_S ‖ p_T)
        return _kl(log_s, log_t)
    log_m = _log_mix(log_t, log_s, beta)  # (N, V)
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def skew_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, skew: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """KL(p_T ‖ α·p_T + (1−α)·p_S), α = skew: (N, V), (N, V) → (N,) fp32."""
    _check_skew(skew)
    log_s, log_t = _pair(student_logits, teacher_logits, temperature)
    return _kl(log_t, _log_mix(log_t, log_s, skew))


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, skew: float = 0.1, temperature: float = 1.0
) -> Tensor:
    """KL(p_S ‖ α·p_S + (1−α)·p_T), α = skew: (N, V), (N, V) → (N,) fp32."""
    _check_skew(skew)
    log_s, log_t = _pair(student_logits, teacher_logits, temperature)
    return _kl(log_s, _log_mix(log_s, log_t, skew))


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """½·Σ|p_T − p_S| per token: (N, V), (N, V) → (N,) fp32."""
    log_s, log_t = _pair(student_logits, teacher_logits, temperature)
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(dim=-1)  # (N,)


KL_FAMILY = frozenset({"forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"})


def soft_scale(divergence: str, temperature: float) -> float:
    """The factor on the KD term: T² for the KL family (gradients ∝ 1/T²), 1 for tvd and uld (∝ 1/T)."""
    return temperature**2 if divergence in KL_FAMILY else 1.0


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}
