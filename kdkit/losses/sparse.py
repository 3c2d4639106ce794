"""Every divergence of `divergences.py` on a top-k `SparseSignal`, through k + 1 buckets.

No divergence is written again here. Both distributions are bucketed into the same k + 1 outcomes:
the teacher's top-k token ids (one bucket each) and one tail bucket (every other token):

    teacher:  log p_T(id_1) … log p_T(id_k),  log p_T(tail) = signal.tail
    student:  log p_S(id_1) … log p_S(id_k),  log p_S(tail) = log Σ_{v ∉ ids} p_S(v)

and the dense divergence runs on these (N, k + 1) rows of log-probabilities, passed as "logits" at
temperature 1 (log_softmax of normalised log-probs is the identity). With k = V the tail is empty
(log 0 on both sides) and the result is the dense divergence exactly. With k < V it is the
divergence between the two distributions coarsened to the k + 1 buckets (a lower bound of the
dense value for every f-divergence here, by the data-processing inequality).

Conventions (stated here once):

- Temperature. The student is softened by T over its full vocabulary, then bucketed. The teacher's
  log-probs were captured at `capture_temperature` T_c (default: `signal.provenance.temperature`).
  When T ≠ T_c the top-k part is re-normalised to T exactly as far as the top-k goes —
  p_T(id_i) ∝ p_Tc(id_i)^(T_c/T) within the top k — while the tail keeps its captured mass:
  p_T(id_i) = (1 − p(tail)) · softmax_k(r · log p_Tc)_i with r = T_c / T. The tail's true mass at T
  is unknowable from top-k data; keeping it fixed is exact for k = V and for T = T_c. A tail
  log-prob ≥ 0 (rounding) is read as log 1: the top k then hold no mass at T.
- Missing tail. When `signal.tail` is None it is derived as log(1 − Σ_k p_T), floored at log 0.
- Invalid slots. A slot whose teacher log-prob is -inf (padding of a short top-k, a padded
  vocabulary entry) is not a bucket: both sides get log 0 there, and the student's mass at that id
  (if the id is not also a valid slot) counts in the student's tail bucket. A row with no valid
  slot is all tail, on both sides, at every T (its divergence is 0 when its tail is log 1).
- Ids must be unique within a row among the valid slots.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdkit.signal import SparseSignal

from .divergences import DIVERGENCES, _check_temperature

NEG_INF = -math.inf


def student_buckets(student_logits: Tensor, ids: Tensor, valid: Tensor, *, temperature: float) -> Tensor:
    """Student log-probs at T bucketed: logits (N, V), ids (N, k), valid (N, k) bool → (N, k + 1) fp32."""
    x = student_logits.float()  # (N, V); fp32 softmax, as the dense path
    if temperature != 1.0:
        x = x / temperature  # (N, V)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (N, 1)
    # An all -inf student row would give lse = -inf and NaN log-probs; the dense path has the same limit.
    picked = x.gather(1, ids) - lse  # (N, k)
    picked = torch.where(valid, picked, NEG_INF)  # invalid slots are log 0
    # (N, V) ids of valid slots; a sum, not a bool scatter: an invalid slot may repeat a valid id
    in_top = torch.zeros_like(x, dtype=torch.int32).scatter_add_(1, ids, valid.int()) > 0
    rest = x.masked_fill(in_top, NEG_INF)  # (N, V): the tail's logits only
    has_rest = (rest > NEG_INF).any(dim=-1)  # (N,) bool: some mass lies outside the top k
    # Rows with an empty tail would give logsumexp(all -inf) = -inf with a NaN gradient: feed them a
    # constant 0 row instead (no gradient path) and put log 0 in by the outer where.
    rest = torch.where(has_rest.unsqueeze(1), rest, 0.0)  # (N, V)
    tail = torch.logsumexp(rest, dim=-1) - lse.squeeze(1)  # (N,) stable even when the top k hold ~all mass
    tail = torch.where(has_rest, tail, NEG_INF)  # (N,)
    return torch.cat([picked, tail.unsqueeze(1)], dim=1)  # (N, k + 1)


def _tail_from_top(logprobs: Tensor) -> Tensor:
    """log(1 − Σ exp(logprobs)) per row, log 0 when the top k hold all the mass: (N, k) → (N,)."""
    top = torch.logsumexp(logprobs, dim=-1)  # (N,) log Σ p
    # log(1 − e^top) = log(−expm1(top)); clamped: rounding can put Σ p a hair above 1.
    return torch.log(torch.clamp(-torch.expm1(top), min=0.0))


def teacher_buckets(
    signal: SparseSignal, *, temperature: float, capture_temperature: float | None = None
) -> tuple[Tensor, Tensor]:
    """Teacher log-probs re-normalised to T and bucketed: → (N, k + 1) fp32, and the valid mask (N, k)."""
    lp = signal.logprobs.float()  # (N, k) at T_c
    valid = lp > NEG_INF  # (N, k)
    tail = _tail_from_top(lp) if signal.tail is None else signal.tail.float()  # (N,)
    t_c = signal.provenance.temperature if capture_temperature is None else capture_temperature
    _check_temperature(t_c)
    if t_c != temperature:
        # log p(tail) ≤ 0: rounding (or a server) can put it a hair above, where 1 − p(tail) would be
        # < 0 and its log NaN; at 0 the top k hold no mass (log 0 below, all mass in the tail).
        tail = tail.clamp(max=0.0)  # (N,)
        log_top_mass = torch.log(-torch.expm1(tail))  # (N,) log(1 − p(tail)), the top k's mass as captured
        any_valid = valid.any(dim=-1, keepdim=True)  # (N, 1): a row with no valid slot is all tail
        # log_softmax of an all -inf row is NaN: such rows get a constant 0 row, then log 0 everywhere.
        scaled = torch.log_softmax(torch.where(any_valid, lp * (t_c / temperature), 0.0), dim=-1)  # (N, k)
        lp = torch.where(valid, scaled + log_top_mass.unsqueeze(1), NEG_INF)  # (N, k); invalid slots log 0
    return torch.cat([lp, tail.unsqueeze(1)], dim=1), valid  # (N, k + 1), (N, k)


def sparse_divergence(
    name: str,
    student_logits: Tensor,
    signal: SparseSignal,
    *,
    temperature: float = 1.0,
    capture_temperature: float | None = None,
    **divergence_kwargs,
) -> Tensor:
    """Divergence `name` (a key of DIVERGENCES) per token on the k + 1 buckets: (N, V), signal → (N,) fp32."""
    _check_temperature(temperature)
    if student_logits.dim() != 2 or student_logits.shape[0] != signal.num_tokens:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} must be (N, V) with N = {signal.num_tokens} "
            "(the signal's rows)"
        )
    signal.check_ids(student_logits.shape[1])  # where the ids lie, before they move
    ids = signal.ids.to(device=student_logits.device, dtype=torch.long)  # (N, k)
    teacher, valid = teacher_buckets(signal, temperature=temperature, capture_temperature=capture_temperature)
    teacher = teacher.to(student_logits.device)  # (N, k + 1)
    student = student_buckets(student_logits, ids, valid.to(ids.device), temperature=temperature)  # (N, k + 1)
    return DIVERGENCES[name](student, teacher, temperature=1.0, **divergence_kwargs)  # (N,)
