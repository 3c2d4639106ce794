"""Forward KL on one fused chunk with its gradient in closed form, in place, on a top-k or dense teacher.

`chunk_grad` in general differentiates the divergence with torch.func: ~20 element-wise passes over
the chunk's (c, V) logits, each allocating a fresh (c, V) fp32 tensor. On a CPU those allocations
dominate the step (glibc maps and unmaps every block over 32 MiB: a page fault per 4 KiB each time;
an op that runs in 7 ms in place took 30 ms allocating), and forward KL, the default objective,
needs none of it. Its gradient at temperature T, with q = softmax(z / T) and p the teacher's
distribution, is (q − p) / T. On the k + 1 buckets of a top-k signal (`sparse.py`), with
e = exp(z / T − max), S = Σ e, R = Σ_{v ∉ top k} e (the student's tail, summed directly:
no 1 − Σ top cancellation), P = Σ of the teacher's bucket masses and p_tail its tail:

    d KL / d (z_v / T) = e_v · (P / S − p_tail / R)      v outside the top k
                       = e_v · P / S − p_v                v one of the top k

So the chunk costs a handful of passes over a buffer it overwrites (the student's logits buffer,
which the fused loss recomputes for every chunk). The KL's VALUE is still the one divergence of
`divergences.py`, taken on the (c, k + 1) buckets or from the two log-normalisers, with its
conventions: a p = 0 term is 0; a row where p > 0 but q = 0 is +inf and sends no gradient.
The one difference from autograd: a student tail below fp32's exp range (every non-top-k logit over
103 nats under the row's max) counts as empty here, where the log-space sum keeps a finite value.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .divergences import _kl
from .objective import IGNORE_INDEX
from .reduce import masked_sum
from .scratch import scratch


def applies(spec) -> bool:
    """Whether `fkl_chunk_grad` serves this objective: forward KL with a gradient, where the CE part
    (if any) shares the softmax (T = 1), or there is none (alpha = 1)."""
    return spec.divergence == "forward_kl" and spec.need_grad and (spec.alpha == 1.0 or spec.temperature == 1.0)


def fkl_chunk_grad(z_s: Tensor, teacher: tuple, labels: Tensor, weight: Tensor | None, spec, *, metrics_fn):
    """`chunk_grad` for forward KL: (d objective / d z_s (c, V) fp32, written INTO z_s), and the
    chunk's sums (Σ kd, Σ ce, Σ KL₁, #top-1). `z_s` must be an fp32 buffer the caller gives up.
    `metrics_fn(z_s, teacher, mask, spec, kd)`: the generic progress metrics, called before z_s is
    overwritten when they are not the KD value itself (T ≠ 1)."""
    t, alpha = spec.temperature, spec.alpha
    mask = labels != IGNORE_INDEX  # (c,) bool
    zero = z_s.new_zeros(())
    agree = None
    if spec.metrics:  # before z_s is overwritten; the top-1 needs the raw logits only
        teacher_top = teacher[2][:, 0] if spec.sparse else teacher[0].argmax(dim=-1)  # (c,)
        agree = ((z_s.argmax(dim=-1) == teacher_top) & mask).sum().to(torch.float32)
    kl1 = None
    if spec.metrics and t != 1.0:  # the generic divergence, on fp32 teacher logits (a head's may be bf16)
        kl1 = metrics_fn(z_s, teacher if spec.sparse else (teacher[0].float(),), mask, spec, None)[0]
    safe = torch.where(mask, labels, 0)[:, None]  # (c, 1) label column (0 on unsupervised rows)
    picked_label = z_s.gather(1, safe)[:, 0]  # (c,) the label's logit: CE is reported at any alpha
    lse_1 = torch.logsumexp(z_s, dim=-1) if t != 1.0 else None  # (c,) CE's log-normaliser at T = 1
    x = z_s.div_(t) if t != 1.0 else z_s  # (c, V) z / T, in place
    m = x.amax(dim=-1, keepdim=True)  # (c, 1); an all -inf row gives NaN, as the dense path
    # d KL / d(z / T) = e ⊙ coef (c,) with e = exp(z / T − m), plus `fix`: (ids, values) at the top-k slots
    # (sparse: x becomes e in place), or −p over the whole row (dense: x becomes z / T − m, and `fix` writes
    # the gradient)
    per_row, coef, fix, total = (_sparse if spec.sparse else _dense)(x, m, teacher, t)
    if lse_1 is None:  # T = 1: the same normaliser, log S + max
        lse_1 = m[:, 0] + torch.log(total)
    ce = masked_sum(lse_1 - picked_label, mask)
    rows = mask if weight is None else mask & (weight != 0)  # rows in the KD sum
    kd = masked_sum(per_row if weight is None else per_row * weight, rows)
    finite = torch.isfinite(per_row)  # an inf row (p > 0 where q = 0) sends no gradient
    w = torch.where(rows & finite, 1.0 if weight is None else weight, 0.0)  # (c,)
    kd_scale = alpha * t * w  # α · T² · (1/T): the objective's factor on d KL / d(z / T), per row
    row = kd_scale * coef  # (c,)
    if alpha != 1.0:  # (1 − α)(softmax − onehot) on supervised rows; T = 1 here
        row = row + (1.0 - alpha) * mask.float() / total
    if spec.sparse:  # x holds e: the row factor, then the top-k slots' own terms
        x.mul_(row[:, None])
        ids, values = fix
        x.scatter_add_(1, ids, values * kd_scale[:, None])
    else:  # x holds z / T − m: e · row − α·T·w · p, block by block
        fix.gradient(x, row, kd_scale)
    if alpha != 1.0:
        x.scatter_add_(1, safe, -(1.0 - alpha) * mask.float()[:, None])
    if spec.metrics:
        return x, (kd, ce, kd if t == 1.0 else kl1, agree)
    return x, (kd, ce, zero, zero)


def _sparse(x: Tensor, m: Tensor, teacher: tuple, t: float):
    """Top-k teacher: (KL per row (c,), row coefficient (c,), (ids, per-slot correction)); x → e in place."""
    buckets, _, ids, valid = teacher  # (c, k + 1) teacher log-probs at T, (c, k) ids, (c, k) valid
    picked = x.gather(1, ids)  # (c, k) z / T at the teacher's ids, before exp
    x.sub_(m).exp_()  # (c, V) e
    e_top = torch.where(valid, x.gather(1, ids), 0.0)  # (c, k) the very e values summed below (ids unique among valid slots)
    rest = _tail_sum(x, ids, valid).double()  # (c,) R, summed directly: no 1 − Σ top cancellation
    total = rest + e_top.sum(dim=-1, dtype=torch.float64)  # (c,) S in fp64
    log_s = torch.log(total)  # (c,) fp64
    log_q_top = torch.where(valid, picked - m - log_s.float()[:, None], -math.inf)  # (c, k)
    log_q_tail = torch.where(rest > 0, torch.log(rest) - log_s, -math.inf).float()  # (c,)
    s_buckets = torch.cat([log_q_top, log_q_tail[:, None]], dim=1)  # (c, k + 1), as `student_buckets`
    # as `sparse_divergence`: both bucket rows through log_softmax (the teacher's need not sum to 1, e.g.
    # an invalid slot's mass is in neither its top k nor its tail), then the divergence itself
    log_p = torch.log_softmax(buckets, dim=-1)  # (c, k + 1)
    per_row = _kl(log_p, torch.log_softmax(s_buckets, dim=-1))  # (c,)
    p = log_p.exp()  # (c, k + 1) teacher masses, Σ = 1
    mass, p_tail = p.sum(dim=-1), p[:, -1]  # (c,)
    tail_ratio = torch.where(rest > 0, p_tail.double() / rest.clamp(min=1e-300), 0.0)  # (c,) p_tail / R
    coef = (mass.double() / total - tail_ratio).float()  # (c,) e_v · coef outside the top k
    fix = torch.where(valid, e_top * tail_ratio.float()[:, None] - p[:, :-1], 0.0)  # (c, k): top-k slots
    return per_row, coef, (ids, fix), total.float()


def _tail_sum(e: Tensor, ids: Tensor, valid: Tensor) -> Tensor:
    """Σ_{v ∉ top k} e_v per row (c,) fp32: the top-k entries zeroed, the row summed, then put back.
    The terms are positive, so an fp32 sum is accurate to rounding (an fp64 reduction over (c, V) cost
    30× the fp32 one on a CPU). Invalid slots point at the row's first valid id, so every write to an
    id in a row carries the same value; a row with no valid slot writes its own values back."""
    any_valid = valid.any(dim=-1, keepdim=True)  # (c, 1)
    first = ids.gather(1, valid.to(torch.uint8).argmax(dim=-1, keepdim=True))  # (c, 1) first valid id
    where = torch.where(valid, ids, torch.where(any_valid, first, ids))  # (c, k)
    kept = e.gather(1, where)  # (c, k) e at those ids, to put back
    e.scatter_(1, where, torch.where(any_valid, 0.0, kept))
    rest = e.sum(dim=-1)
    e.scatter_(1, where, kept)
    return rest


_BLOCK_BYTES = 2 << 20  # CPU: one row block of a (c, V) fp32 temporary, cache-sized (at least _BLOCK_ROWS rows)
_BLOCK_ROWS = 16  # fewer rows per op cost more in per-op overhead than the cache gives back


def _blocks(c: int, v: int, device: torch.device):
    """Row blocks (lo, hi) of a chunk: cache-sized on a CPU; elsewhere the whole chunk (a GPU pays a kernel
    launch per op and block, and its chunk's temporaries are what the chunk size was budgeted for)."""
    if device.type != "cpu":
        return [(0, c)]
    rows = max(_BLOCK_ROWS, _BLOCK_BYTES // (4 * v))
    return [(lo, min(c, lo + rows)) for lo in range(0, c, rows)]


def _dense(x: Tensor, m: Tensor, teacher: tuple, t: float):
    """Dense teacher logits z_t (c, V), any dtype, read only: (KL per row (c,), 1 / S (c,), a `_DenseGrad`,
    S (c,)); x → z / T − m in place. Everything else runs row block by row block in two cache-sized fp32
    temporaries, so no (c, V) buffer beyond the student's own exists: the teacher's logits are upcast a block
    at a time (a bf16 head's logits stay bf16), and p is recomputed for the gradient instead of kept. The
    value is Σ p·(log p − log q) term by term (accurate for small KL; a difference of log-normalisers would
    lose it to rounding); the gradient is e / S − p."""
    (z_t,) = teacher
    c, v = x.shape
    blocks = _blocks(c, v, x.device)
    a = scratch("fkl-block-a", blocks[0][1], v, torch.float32, x.device)
    b = scratch("fkl-block-b", blocks[0][1], v, torch.float32, x.device)
    m_t = z_t.amax(dim=-1).float()  # (c,) the teacher's max: max(z_t / T) = max(z_t) / T
    if t != 1.0:
        m_t = m_t / t
    s, s_t, per_row = (x.new_empty(c) for _ in range(3))  # (c,) S, S_t, KL
    for lo, hi in blocks:
        xb, e, y = x[lo:hi].sub_(m[lo:hi]), a[: hi - lo], b[: hi - lo]  # (n, V) z / T − m, two temporaries
        s[lo:hi] = torch.exp(xb, out=e).sum(dim=-1)
        _teacher_block(y, z_t[lo:hi], m_t[lo:hi], t)  # (n, V) z_t / T − m_t
        st = s_t[lo:hi] = torch.exp(y, out=e).sum(dim=-1)  # e holds e_t from here
        y.sub_(xb).sub_((torch.log(st) - torch.log(s[lo:hi]))[:, None])  # (n, V) log p − log q
        # p = 0 terms are 0 (0 · ±inf is NaN here); p > 0 where q = 0 stays +inf
        per_row[lo:hi] = y.mul_(e).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf).sum(dim=-1) / st
    return per_row, 1.0 / s, _DenseGrad(z_t, m_t, s_t, t, blocks, a), s


def _teacher_block(y: Tensor, z_t: Tensor, m_t: Tensor, t: float) -> Tensor:
    """y (n, V) fp32 ← z_t / T − m_t for one block of the teacher's rows."""
    y.copy_(z_t)
    if t != 1.0:
        y.div_(t)
    return y.sub_(m_t[:, None])


class _DenseGrad:
    """The dense teacher's gradient, written block by block over the student's buffer: x ← e · row − scale · p,
    with e = exp(x) and p = exp(z_t / T − m_t) / S_t recomputed a block at a time."""

    def __init__(self, z_t: Tensor, m_t: Tensor, s_t: Tensor, t: float, blocks: list, tmp: Tensor):
        self.z_t, self.m_t, self.s_t, self.t, self.blocks, self.tmp = z_t, m_t, s_t, t, blocks, tmp

    def gradient(self, x: Tensor, row: Tensor, scale: Tensor) -> None:
        """row, scale (c,): the factors on e and on p (kd_scale · coef, and kd_scale, in `fkl_chunk_grad`)."""
        p_scale = scale / self.s_t  # (c,)
        for lo, hi in self.blocks:
            p = _teacher_block(self.tmp[: hi - lo], self.z_t[lo:hi], self.m_t[lo:hi], self.t).exp_()
            x[lo:hi].exp_().mul_(row[lo:hi, None]).sub_(p.mul_(p_scale[lo:hi, None]))
