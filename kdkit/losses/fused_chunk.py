"""One chunk of the fused objective: (c, V) student logits + a teacher chunk → gradient and sums.

The teacher chunk is a tuple of tensors, so the same pure function runs eagerly or under
torch.compile for every teacher kind:

    dense  (z_t,)                            z_t (c, V) logits (online head or DenseSignal rows)
    sparse (buckets, buckets_1, ids, valid)  teacher k + 1 buckets at T and at T = 1 (c, k + 1),
                                             top-k ids (c, k) int64, valid slots (c, k) bool

No divergence is written here: the dense chunk goes through `DIVERGENCES`, the sparse chunk through
`sparse.student_buckets` then `DIVERGENCES` at T = 1 (exactly what `sparse_divergence` does).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fused_fkl
from .divergences import DIVERGENCES, soft_scale
from .reduce import masked_sum
from .sparse import student_buckets

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Spec:
    """Everything about the objective that is not a tensor (hashable: a compile cache key)."""

    divergence: str
    temperature: float
    alpha: float
    kwargs: tuple  # ((name, value), …) for the divergence
    need_grad: bool  # False: values only (no_grad, or nothing requires a gradient)
    sparse: bool = False  # the teacher chunk is (buckets, buckets_1, ids, valid), not (z_t,)
    metrics: bool = False  # also Σ KL(teacher ‖ student) at T = 1 and the count of top-1 agreements


def _per_token(z_s: Tensor, teacher: tuple, spec: Spec, *, name: str, temperature: float, kwargs: dict) -> Tensor:
    """Divergence `name` per row of the chunk at `temperature`: (c, V), teacher chunk → (c,) fp32."""
    if not spec.sparse:
        return DIVERGENCES[name](z_s, teacher[0], temperature=temperature, **kwargs)  # (c,)
    buckets, buckets_1, ids, valid = teacher
    t_buckets = buckets if temperature == spec.temperature else buckets_1  # (c, k + 1)
    s_buckets = student_buckets(z_s, ids, valid, temperature=temperature)  # (c, k + 1)
    return DIVERGENCES[name](s_buckets, t_buckets, temperature=1.0, **kwargs)  # (c,)


def _metrics(z_s: Tensor, teacher: tuple, mask: Tensor, spec: Spec, kd: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ KL(teacher ‖ student) at T = 1, count of rows whose argmax is the teacher's top-1), both ()."""
    if spec.divergence == "forward_kl" and spec.temperature == 1.0:
        kl = kd  # already this quantity
    else:
        kl = masked_sum(_per_token(z_s, teacher, spec, name="forward_kl", temperature=1.0, kwargs={}), mask)
    # The sparse teacher's top-1 is its first id (as in the dense loop's `agreement`).
    teacher_top = teacher[2][:, 0] if spec.sparse else teacher[0].argmax(dim=-1)  # (c,)
    agree = (z_s.argmax(dim=-1) == teacher_top) & mask  # (c,) bool
    return kl.detach(), agree.sum().to(torch.float32)


def chunk_objective(z_s: Tensor, teacher: tuple, labels: Tensor, weight: Tensor | None, spec: Spec):
    """Un-normalised sums over one chunk: (objective to differentiate, (Σ divergence, Σ CE, Σ KL₁, #top-1)).

    `weight` (c,) scales each row's divergence (a signal's per-token KD weight; rows of weight 0 drop
    out of the KD sum, as in `distill_loss`); None: all 1.

    A part with weight 0 stays out of the objective (as in `distill_loss`: an inf in it must not
    turn the gradient into NaN through 0 · inf), but is still reported. Σ KL₁ and #top-1 are 0
    unless `spec.metrics`.
    """
    mask = labels != IGNORE_INDEX  # (c,) bool; False only on the padding rows of the compiled step
    kwargs = dict(spec.kwargs)
    per_token = _per_token(z_s, teacher, spec, name=spec.divergence, temperature=spec.temperature, kwargs=kwargs)
    if weight is None:
        kd = masked_sum(per_token, mask)
    else:  # weight-0 rows leave the mask: an inf there must not reach the sum (0 · inf = NaN)
        kd = masked_sum(per_token * weight, mask & (weight != 0))
    ce = masked_sum(F.cross_entropy(z_s, labels, reduction="none", ignore_index=IGNORE_INDEX), mask)
    alpha, t2 = spec.alpha, soft_scale(spec.divergence, spec.temperature)  # T²: the KL family only
    if alpha == 1.0:
        objective = t2 * kd
    elif alpha == 0.0:
        objective = ce
    else:
        objective = alpha * t2 * kd + (1.0 - alpha) * ce
    zero = kd.new_zeros(())
    kl, agree = _metrics(z_s.detach(), teacher, mask, spec, kd.detach()) if spec.metrics else (zero, zero)
    return objective, (kd.detach(), ce.detach(), kl, agree)


def chunk_grad(z_s: Tensor, teacher: tuple, labels: Tensor, weight: Tensor | None, spec: Spec, *,
               overwrite: bool = False):
    """d objective / d student logits (c, V) fp32 (None without grad), and the chunk's sums.

    `overwrite=True`: z_s is a scratch fp32 buffer the caller gives up; forward KL then runs in closed
    form in place on it (`fused_fkl`: a few passes, no (c, V) allocation), and the gradient is z_s itself.

    Pure tensor code (torch.func, no autograd graph kept): the same function runs eagerly or
    compiled by `compiled_step`, where inductor fuses the ~20 element-wise passes of the
    divergence and its backward into a few loops over the chunk. JSD(β) on dense teacher chunks
    has its gradient in closed form (`jsd_chunk_grad`): autograd through the mixture's log-sum-exp
    costs ~50% more element-wise work.
    """
    if not spec.need_grad:
        return None, chunk_objective(z_s, teacher, labels, weight, spec)[1]
    if overwrite and fused_fkl.applies(spec) and z_s.dtype == torch.float32:
        return fused_fkl.fkl_chunk_grad(z_s, teacher, labels, weight, spec, metrics_fn=_metrics)
    if spec.divergence == "jsd" and not spec.sparse and 0.0 < dict(spec.kwargs).get("beta", 0.5) < 1.0:
        return jsd_chunk_grad(z_s, teacher, labels, weight, spec)
    g, (_, sums) = torch.func.grad_and_value(chunk_objective, has_aux=True)(z_s, teacher, labels, weight, spec)
    return g, sums  # (c, V), (Σ kd, Σ ce, Σ kl₁, #top-1)


def jsd_chunk_grad(z_s: Tensor, teacher: tuple, labels: Tensor, weight: Tensor | None, spec: Spec):
    """`chunk_grad` for JSD(β), 0 < β < 1, on a dense teacher chunk, with the gradient in closed form.

    With p_S, p_T at temperature T, M = β·p_T + (1−β)·p_S and a = log p_S − log M (0 where p_S = 0),
    d JSD / d z_S = (1−β)/T · p_S ⊙ (a − Σ_v p_S·a): the terms through M cancel. M > 0 wherever
    either side is, so every log ratio used is finite (no inf rows, unlike the KLs).
    """
    beta, t = dict(spec.kwargs).get("beta", 0.5), spec.temperature
    mask = labels != IGNORE_INDEX  # (c,) bool
    log_s = torch.log_softmax(z_s.float() / t if t != 1.0 else z_s.float(), dim=-1)  # (c, V)
    log_t = torch.log_softmax(teacher[0].float() / t if t != 1.0 else teacher[0].float(), dim=-1)  # (c, V)
    p_s, p_t = log_s.exp(), log_t.exp()  # (c, V)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))  # (c, V)
    a_s = torch.where(p_s > 0, log_s - log_m, 0.0)  # (c, V)
    a_t = torch.where(p_t > 0, log_t - log_m, 0.0)  # (c, V)
    kl_s = (p_s * a_s).sum(-1)  # (c,) KL(p_S ‖ M)
    per_token = beta * (p_t * a_t).sum(-1) + (1.0 - beta) * kl_s  # (c,)
    rows = mask if weight is None else mask & (weight != 0)  # (c,) rows in the KD sum
    w = rows.float() if weight is None else torch.where(rows, weight, 0.0)  # (c,)
    kd = masked_sum(per_token if weight is None else per_token * weight, rows)
    if t == 1.0:  # CE on the raw logits: the same log-probs
        log_ce = log_s
    else:
        log_ce = torch.log_softmax(z_s.float(), dim=-1)  # (c, V)
    safe = torch.where(mask, labels, 0)[:, None]  # (c, 1)
    ce = masked_sum(-log_ce.gather(1, safe)[:, 0], mask)
    alpha = spec.alpha
    g = torch.zeros_like(log_s)  # (c, V)
    if alpha != 0.0:  # α·T²·(1−β)/T · w · p_S ⊙ (a − KL(p_S ‖ M))
        g = g + (alpha * t * (1.0 - beta)) * w[:, None] * p_s * (a_s - kl_s[:, None])
    if alpha != 1.0:  # (1 − α) · (softmax(z) − onehot(label)) on supervised rows
        onehot = torch.zeros_like(log_ce).scatter_(1, safe, 1.0)  # (c, V)
        g = g + (1.0 - alpha) * torch.where(mask[:, None], log_ce.exp() - onehot, 0.0)
    zero = kd.new_zeros(())
    kl, agree = _metrics(z_s, teacher, mask, spec, kd) if spec.metrics else (zero, zero)
    return g, (kd, ce, kl, agree)


@functools.cache
def _compiled_chunk_grad():
    # Static shapes: every chunk is padded to the same row count (`padded_step`), so one kernel
    # serves all chunks of all steps; symbolic-shape kernels ran ~1.7x slower here on CPU.
    return torch.compile(chunk_grad, dynamic=False)


def pad_rows(x: Tensor, rows: int, fill) -> Tensor:
    """x (c, …) extended to `rows` rows filled with `fill`; x itself when already that long."""
    if x.shape[0] == rows:
        return x
    out = x.new_full((rows, *x.shape[1:]), fill)  # (rows, …)
    out[: x.shape[0]] = x
    return out


def pad_teacher(teacher: tuple, rows: int, spec: Spec) -> tuple:
    """A teacher chunk padded to `rows` rows whose values keep every term finite (and 0)."""
    if not spec.sparse:
        return (pad_rows(teacher[0], rows, 0.0),)  # (rows, V)
    buckets, buckets_1, ids, valid = teacher
    c = ids.shape[0]
    out = [pad_rows(b, rows, float("-inf")) for b in (buckets, buckets_1)]  # (rows, k + 1)
    for b in out:
        if b.shape[0] > c:
            b[c:, -1] = 0.0  # padding rows: all mass in the tail, on both sides (the student's too)
    return (*out, pad_rows(ids, rows, 0), pad_rows(valid, rows, False))


def padded_step(rows: int):
    """The compiled chunk step on chunks padded to `rows` rows (label -100: they count for nothing)."""
    step = _compiled_chunk_grad()

    def run(z_s: Tensor, teacher: tuple, labels: Tensor, weight: Tensor | None, spec: Spec):
        c = labels.shape[0]
        z_s = pad_rows(z_s, rows, 0.0)  # (rows, V)
        weight = None if weight is None else pad_rows(weight, rows, 0.0)  # (rows,)
        g, sums = step(z_s, pad_teacher(teacher, rows, spec), pad_rows(labels, rows, IGNORE_INDEX), weight, spec)
        return (None if g is None else g[:c]), sums  # (c, V)

    return run


def step_rows(n: int, chunk_size: int, compiled: bool) -> int:
    """Rows per chunk: at most `chunk_size`; compiled, a power of two for small n (few kernel shapes).

    Eager, the n rows are split evenly over the chunks `chunk_size` needs (a multiple of 8 where
    that stays within it): 739 rows at 512 run as 376 + 363, not 512 + 227; a last sliver of a chunk
    re-reads the whole head for a few rows."""
    if not compiled:
        size = max(1, min(chunk_size, n))
        chunks = -(-n // size)
        even = -(-n // chunks) if n else size  # ceil(n / chunks) <= size
        rounded = -(-even // 8) * 8
        return rounded if rounded <= size else even
    return min(chunk_size, 1 << max(0, n - 1).bit_length())
