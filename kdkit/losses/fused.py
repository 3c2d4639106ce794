"""The KD objective computed chunk by chunk from hidden states and lm_head weights: never (N, V) at once.

    total = alpha · T² · mean(divergence at T) + (1 − alpha) · mean(cross-entropy at T = 1)

exactly as `objective.distill_loss`, but from the student's hidden states (N, H) and head weight
(V, H) instead of its logits. The teacher is a hidden state + head (online) or dense logits. Only the
supervised rows (label != -100) are projected, a chunk of them at a time: the chunk's logits (c, V)
go through the SAME divergence functions as the dense path (`DIVERGENCES`), autograd gives
d objective / d logits (c, V) on the chunk, and the two student products

    grad_hidden[chunk] = g @ W    (c, V) @ (V, H)        grad_W += gᵀ @ h    (V, c) @ (c, H)

are formed right away, so the chunk's logits die with the chunk: extra memory is O(chunk × V).
The loss's backward only scales these stored gradients by the incoming gradient (as Liger does).

Matmul work: 2·N·H·V FLOPs per projection (teacher forward, student forward, the two products
above). The rest is O(N·V) element-wise work: ~20 passes over each chunk in eager mode, fused by
inductor into one loop nest with `compiled=True` (the fast path for training).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdkit.signal import DenseSignal

from .divergences import DIVERGENCES
from .objective import IGNORE_INDEX, LossParts, _check_args
from .reduce import masked_sum, normalize

DEFAULT_MEMORY_BUDGET = 256 * 2**20  # bytes for a chunk's (c, V) temporaries
# fp32 (c, V) tensors alive at once in an eager chunk step (logits of both, log-probs of both, p,
# the log ratio, autograd's buffers, the gradient): an upper estimate; the compiled step keeps ~4.
_TEMPORARIES = 8


def auto_chunk_size(vocab: int, *, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Rows per chunk such that ~`_TEMPORARIES` fp32 (c, V) tensors fit `memory_budget_bytes`.

    Rounded down to a multiple of 8 (matmul kernels prefer it) when that leaves at least 8 rows.
    """
    rows = max(1, int(memory_budget_bytes) // (vocab * 4 * _TEMPORARIES))
    return rows - rows % 8 if rows >= 8 else rows


@dataclass(frozen=True)
class _Spec:
    """Everything about the objective that is not a tensor (hashable: a compile cache key)."""

    divergence: str
    temperature: float
    alpha: float
    kwargs: tuple  # ((name, value), …) for the divergence
    need_grad: bool  # False: values only (no_grad, or nothing requires a gradient)


@dataclass
class _Head:
    """One side's projection: rows of `hidden` (N, H) @ `weight[:vocab]`ᵀ (+ bias) → (c, vocab) fp32."""

    hidden: Tensor  # (N, H)
    weight: Tensor  # (vocab, H), already in the matmul dtype
    bias: Tensor | None  # (vocab,), in the matmul dtype
    buffer: Tensor | None = None  # (chunk, V) fp32, reused by every chunk: no allocation (or page faults) per chunk

    def logits(self, rows: Tensor | slice, chunk_size: int) -> tuple[Tensor, Tensor]:
        """The chunk's hidden rows (c, H) in the matmul dtype and its logits (c, V) fp32."""
        h = self.hidden[rows].to(self.weight.dtype)  # (c, H)
        if self.buffer is None:
            self.buffer = h.new_empty((chunk_size, self.weight.shape[0]), dtype=torch.float32)
        out = self.buffer[: h.shape[0]]  # (c, V) contiguous view
        if self.weight.dtype != torch.float32:  # low-precision GEMM, then upcast into the buffer
            z = h @ self.weight.t() if self.bias is None else torch.addmm(self.bias, h, self.weight.t())
            return h, out.copy_(z)
        if self.bias is None:
            return h, torch.mm(h, self.weight.t(), out=out)
        return h, torch.addmm(self.bias, h, self.weight.t(), out=out)  # bias added inside the GEMM


@dataclass
class _DenseTeacher:
    """Teacher logits given whole, (N, V_any); only chunk rows and the first `vocab` columns are read."""

    logits_all: Tensor  # (N, V_any)
    vocab: int

    def logits(self, rows: Tensor | slice, chunk_size: int) -> tuple[None, Tensor]:
        return None, self.logits_all[rows, : self.vocab]  # (c, V); upcast inside the divergence


def _chunk_objective(z_s: Tensor, z_t: Tensor, labels: Tensor, spec: _Spec) -> tuple[Tensor, Tensor, Tensor]:
    """Un-normalised sums over one chunk: (objective to differentiate, Σ divergence, Σ CE).

    A part with weight 0 stays out of the objective (as in `distill_loss`: an inf in it must not
    turn the gradient into NaN through 0 · inf), but is still reported.
    """
    mask = labels != IGNORE_INDEX  # (c,) bool; False only on the padding rows of the compiled step
    per_token = DIVERGENCES[spec.divergence](z_s, z_t, temperature=spec.temperature, **dict(spec.kwargs))  # (c,)
    kd = masked_sum(per_token, mask)
    ce_rows = F.cross_entropy(z_s, labels, reduction="none", ignore_index=IGNORE_INDEX)  # (c,)
    ce = masked_sum(ce_rows, mask)
    alpha, t2 = spec.alpha, spec.temperature**2
    if alpha == 1.0:
        objective = t2 * kd
    elif alpha == 0.0:
        objective = ce
    else:
        objective = alpha * t2 * kd + (1.0 - alpha) * ce
    return objective, kd.detach(), ce.detach()


def _objective_and_sums(z_s: Tensor, z_t: Tensor, labels: Tensor, spec: _Spec):
    """`_chunk_objective` in the (value, aux) form `torch.func.grad_and_value` expects."""
    objective, kd, ce = _chunk_objective(z_s, z_t, labels, spec)
    return objective, (kd, ce)


def _chunk_grad(z_s: Tensor, z_t: Tensor, labels: Tensor, spec: _Spec) -> tuple[Tensor | None, Tensor, Tensor]:
    """d objective / d student logits (c, V) fp32 (None without grad), Σ divergence, Σ CE.

    Pure tensor code (torch.func, no autograd graph kept): the same function runs eagerly or
    compiled by `_compiled_chunk_grad`, where inductor fuses the ~20 element-wise passes of
    the divergence and its backward into a few loops over the chunk.
    """
    if not spec.need_grad:
        _, kd, ce = _chunk_objective(z_s, z_t, labels, spec)
        return None, kd, ce
    g, (_, (kd, ce)) = torch.func.grad_and_value(_objective_and_sums, has_aux=True)(z_s, z_t, labels, spec)
    return g, kd, ce  # (c, V), (), ()


@functools.cache
def _compiled_chunk_grad():
    # Static shapes: every chunk is padded to the same row count (`_padded_step`), so one kernel
    # serves all chunks of all steps; symbolic-shape kernels ran ~1.7x slower here on CPU.
    return torch.compile(_chunk_grad, dynamic=False)


def _pad_rows(x: Tensor, rows: int, fill) -> Tensor:
    """x (c, …) extended to `rows` rows filled with `fill`; x itself when already that long."""
    if x.shape[0] == rows:
        return x
    out = x.new_full((rows, *x.shape[1:]), fill)  # (rows, …)
    out[: x.shape[0]] = x
    return out


def _padded_step(rows: int):
    """The compiled chunk step on chunks padded to `rows` rows (label -100: they count for nothing)."""
    step = _compiled_chunk_grad()

    def run(z_s: Tensor, z_t: Tensor, labels: Tensor, spec: _Spec):
        c = labels.shape[0]
        z_s, z_t = _pad_rows(z_s, rows, 0.0), _pad_rows(z_t, rows, 0.0)  # (rows, V) each
        g, kd, ce = step(z_s, z_t, _pad_rows(labels, rows, IGNORE_INDEX), spec)
        return (None if g is None else g[:c]), kd, ce  # (c, V)

    return run


def _step_rows(n: int, chunk_size: int, compiled: bool) -> int:
    """Rows per chunk: at most `chunk_size`; compiled, a power of two for small n (few kernel shapes)."""
    if not compiled:
        return max(1, min(chunk_size, n))
    return min(chunk_size, 1 << max(0, n - 1).bit_length())


@dataclass
class _Grads:
    """Gradient accumulators for the student's hidden states, weight and bias (None: not wanted)."""

    hidden: Tensor | None  # (N, H) fp32: each row written once (masked rows stay 0)
    weight: Tensor | None  # (V_all, H) fp32, accumulated over chunks; rows < vocab uninitialised until `written`
    bias: Tensor | None  # (V_all,) fp32
    vocab: int
    written: bool = False

    @classmethod
    def allocate(cls, want: tuple, hidden: Tensor, weight: Tensor, bias: Tensor | None, vocab: int) -> "_Grads":
        grad_w = None
        if want[1]:
            grad_w = torch.empty_like(weight, dtype=torch.float32)  # (V_all, H): the first chunk overwrites
            grad_w[vocab:].zero_()  # padded rows past `vocab` get no gradient
        return cls(
            hidden=torch.zeros_like(hidden, dtype=torch.float32) if want[0] else None,
            weight=grad_w,
            bias=torch.zeros_like(bias, dtype=torch.float32) if want[2] else None,
            vocab=vocab,
        )

    def add_chunk(self, g: Tensor, h: Tensor, rows, head: _Head) -> None:
        """Fold one chunk's d/d logits g (c, V) fp32 into the accumulators; h (c, H) matmul dtype."""
        g_mm = g.to(head.weight.dtype)  # (c, V); no copy in fp32
        if self.hidden is not None:
            self.hidden[rows] = (g_mm @ head.weight).to(self.hidden.dtype)  # (c, H)
        if self.weight is not None:
            target = self.weight[: self.vocab]  # (V, H) view
            if g_mm.dtype == torch.float32:
                # += gᵀ @ h in place, (V, c) @ (c, H); beta = 0 on the first chunk (no zero fill)
                target.addmm_(g_mm.t(), h, beta=1.0 if self.written else 0.0)
            elif self.written:  # low-precision GEMM (fp32 accumulation inside it), summed in fp32
                target.add_(g_mm.t() @ h)
            else:
                target.copy_(g_mm.t() @ h)
        self.written = True
        if self.bias is not None:
            self.bias[: self.vocab].add_(g.sum(dim=0))  # (V,)

    def finish(self, scale: Tensor, like: tuple) -> tuple:
        """Scaled gradients in the inputs' dtypes."""
        if self.weight is not None and not self.written:  # no supervised row: zero gradient
            self.weight.zero_()
        out = []
        for grad, ref in zip((self.hidden, self.weight, self.bias), like):
            out.append(None if grad is None else grad.mul_(scale).to(ref.dtype))
        return tuple(out)


class _FusedDistill(torch.autograd.Function):
    """(total, kd, ce) of the chunked objective; gradients w.r.t. student hidden, weight, bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, student, teacher, count, spec, chunk_size, compiled):
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # (n,) supervised rows only cost FLOPs
        want = ctx.needs_input_grad[:3] if spec.need_grad else (False, False, False)
        grads = _Grads.allocate(want, hidden, weight, bias, student.weight.shape[0])
        kd_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        all_rows = rows.numel() == labels.numel()
        chunk_size = _step_rows(rows.numel(), chunk_size, compiled)
        step = _padded_step(chunk_size) if compiled else _chunk_grad
        for start in range(0, rows.numel(), chunk_size):
            # Contiguous slices when nothing is masked (views, no gather); else an index gather.
            idx = slice(start, start + chunk_size) if all_rows else rows[start : start + chunk_size]
            h, z_s = student.logits(idx, chunk_size)  # (c, H), (c, V)
            _, z_t = teacher.logits(idx, chunk_size)  # (c, V)
            g, kd, ce = step(z_s, z_t, labels[idx], spec)
            kd_sum += kd
            ce_sum += ce
            if g is not None:
                grads.add_chunk(g, h, idx, student)
        scale = normalize(torch.ones((), dtype=torch.float32, device=hidden.device), count)  # 1 / count
        ctx.save_for_backward(*grads.finish(scale, (hidden, weight, bias)))
        kd, ce = kd_sum * scale, ce_sum * scale
        ctx.mark_non_differentiable(kd, ce)
        return _total(kd, ce, spec), kd, ce

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        saved = ctx.saved_tensors
        if not torch.equal(grad_total, torch.ones_like(grad_total)):  # loss.backward(): skip a (V, H) pass
            saved = tuple(None if g is None else g * grad_total.to(g.dtype) for g in saved)
        return (*saved, None, None, None, None, None, None, None)


def _total(kd: Tensor, ce: Tensor, spec: _Spec) -> Tensor:
    """alpha · T² · kd + (1 − alpha) · ce, leaving out a part of weight 0 (it may be inf)."""
    if spec.alpha == 1.0:
        return spec.temperature**2 * kd
    if spec.alpha == 0.0:
        return ce.clone()  # a fresh tensor: `ce` is also returned, marked non-differentiable
    return spec.alpha * spec.temperature**2 * kd + (1.0 - spec.alpha) * ce


def _check_shapes(hidden: Tensor, weight: Tensor, labels: Tensor, vocab: int, teacher_vocab: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"student hidden {tuple(hidden.shape)} must be (N, H) and weight {tuple(weight.shape)} (V, H)"
        )
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} must be (N,) for hidden states {tuple(hidden.shape)}")
    if not 0 < vocab <= min(weight.shape[0], teacher_vocab):
        raise ValueError(
            f"vocab={vocab} must be in 1..{min(weight.shape[0], teacher_vocab)} (student head has "
            f"{weight.shape[0]} rows, the teacher {teacher_vocab} columns); pass vocab= for padded heads"
        )


def _dense_teacher_logits(teacher_logits: DenseSignal | Tensor | None, n: int) -> Tensor | None:
    if teacher_logits is None:
        return None
    if not isinstance(teacher_logits, (DenseSignal, Tensor)):
        raise ValueError(
            f"teacher_logits must be (N, V) logits or a DenseSignal, got {type(teacher_logits).__name__}; "
            "for a SparseSignal use distill_loss on the student's logits (the fused path is dense-only)"
        )
    logits = teacher_logits.logits if isinstance(teacher_logits, DenseSignal) else teacher_logits  # (N, V)
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(f"teacher logits {tuple(logits.shape)} must be (N, V) with N = {n}")
    return logits.detach()


def _teacher(hidden, weight, bias, logits, *, n: int, vocab: int, mm_dtype) -> _Head | _DenseTeacher:
    """The teacher side: a `_Head` (online) or `_DenseTeacher`, reading the first `vocab` logits."""
    if logits is not None:
        return _DenseTeacher(logits, vocab)
    if hidden.shape[0] != n or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"teacher hidden {tuple(hidden.shape)} must be (N, H_t) with N = {n}, "
            f"and teacher weight {tuple(weight.shape)} (V, H_t)"
        )
    dtype = mm_dtype or weight.dtype
    return _Head(
        hidden.detach(),
        weight.detach()[:vocab].to(dtype),  # (V, H_t)
        None if bias is None else bias.detach()[:vocab].to(dtype),
    )


@torch.compiler.disable  # an outer torch.compile runs this eagerly (its loop and autograd.grad break graphs)
def _apply(*args):
    return _FusedDistill.apply(*args)


def fused_distill_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_logits: DenseSignal | Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    num_tokens: int | Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    vocab: int | None = None,
    matmul_dtype: torch.dtype | None = None,
    compiled: bool = False,
    **divergence_kwargs,
) -> LossParts:
    """`distill_loss` on logits = hidden (N, H) @ weight[:vocab]ᵀ (+ bias), chunk by chunk over rows.

    The teacher is `teacher_hidden` (N, H_t) + `teacher_weight` (V, H_t) (+ `teacher_bias`), or
    `teacher_logits` (N, V) / DenseSignal; it gets no gradient. `labels` (N,) use -100 for
    unsupervised rows, which are skipped entirely. `num_tokens` is the global supervised count of
    the optimizer step (gradient accumulation, several ranks); default: this batch's count.
    `vocab` keeps the first `vocab` logits only (padded heads). `chunk_size` rows per chunk
    (default: from `memory_budget_bytes`). `matmul_dtype` (e.g. torch.bfloat16) runs the four
    products in that dtype (its GEMMs accumulate in fp32); softmaxes and sums are always fp32;
    default: the inputs' dtype. `compiled=True` runs each chunk's divergence and its gradient
    through torch.compile (fused element-wise loops: ~3x faster per chunk; the first call compiles
    for tens of seconds). Returns the same `LossParts` as `distill_loss`.
    """
    _check_args(divergence, alpha, temperature, divergence_kwargs)
    n = student_hidden.shape[0]
    dense = _dense_teacher_logits(teacher_logits, n)  # (N, V_t) or None
    if (dense is None) == (teacher_hidden is None or teacher_weight is None):
        raise ValueError("give the teacher either as teacher_hidden + teacher_weight, or as teacher_logits")
    teacher_vocab = teacher_weight.shape[0] if dense is None else dense.shape[1]
    vocab = min(student_weight.shape[0], teacher_vocab) if vocab is None else vocab
    _check_shapes(student_hidden, student_weight, labels, vocab, teacher_vocab)
    teacher = _teacher(teacher_hidden, teacher_weight, teacher_bias, dense, n=n, vocab=vocab, mm_dtype=matmul_dtype)
    mm_dtype = matmul_dtype or student_weight.dtype
    student = _Head(
        student_hidden.detach(),
        student_weight.detach()[:vocab].to(mm_dtype),  # (V, H); a view unless the dtype changes
        None if student_bias is None else student_bias.detach()[:vocab].to(mm_dtype),
    )
    inputs = (student_hidden, student_weight, student_bias)
    spec = _Spec(
        divergence, float(temperature), float(alpha), tuple(sorted(divergence_kwargs.items())),
        need_grad=torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs),
    )
    count = (labels != IGNORE_INDEX).sum() if num_tokens is None else num_tokens
    chunk = chunk_size or auto_chunk_size(vocab, memory_budget_bytes=memory_budget_bytes)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    total, kd, ce = _apply(*inputs, labels, student, teacher, count, spec, chunk, compiled)
    return LossParts(total=total, kd=kd, ce=ce)
