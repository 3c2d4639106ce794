"""The KD objective computed chunk by chunk from hidden states and lm_head weights: never (N, V) at once.

    total = alpha · T² · mean(divergence at T) + (1 − alpha) · mean(cross-entropy at T = 1)

(T² for the KL family only, as `divergences.soft_scale`) exactly as `objective.distill_loss`, but from the student's hidden states (N, H) and head weight
(V, H) instead of its logits. The teacher is a hidden state + head (online), dense logits, or a
top-k SparseSignal (`fused_sparse.py`). Only the supervised rows (label != -100) are projected, a
chunk of them at a time: the chunk's logits (c, V) go through the SAME divergence functions as the
dense path (`DIVERGENCES`; for a SparseSignal `sparse.student_buckets` first), autograd gives
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
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from kdkit.signal import DenseSignal, HeadSignal, SparseSignal

from . import fused_fkl
from .divergences import DIVERGENCES, soft_scale
from .fused_chunk import Spec, chunk_grad, padded_step, step_rows
from .fused_sparse import DenseTeacher, SparseTeacher, teacher_signal
from .objective import IGNORE_INDEX, LossParts, _check_args
from .reduce import normalize
from .scratch import lend, scratch

# Bytes for a chunk's (c, V) temporaries: 336 rows at V = 49152. The student's forward GEMM
# (c, H) @ (H, V) re-reads the whole head each chunk; on CPU it ran ~1.5x slower per row at 168 rows
# than at >= 512 (benchmarks/fused_loss.py), so chunks should not be smaller than memory requires.
DEFAULT_MEMORY_BUDGET = 512 * 2**20
# ... and with the default budget a chunk has at least this many rows where the device's free memory
# holds their temporaries four times over: at V = 151,936 the budget alone gives 104-row chunks, which
# re-read the (V, H) head and the fp32 (V, H) grad_W accumulator every hundred rows.
MIN_CHUNK_ROWS = 512
# fp32 (c, V) tensors alive at once in an eager chunk step (logits of both, log-probs of both, p,
# the log ratio, autograd's buffers, the gradient): an upper estimate; the compiled step keeps ~4.
_TEMPORARIES = 8


def auto_chunk_size(vocab: int, *, memory_budget_bytes: int | None = None, free_bytes: int | None = None) -> int:
    """Rows per chunk such that ~`_TEMPORARIES` fp32 (c, V) tensors fit `memory_budget_bytes`.

    None: the default budget, raised to `MIN_CHUNK_ROWS` rows where a quarter of `free_bytes` (the
    device's free memory) holds them; an explicit budget is kept as given. Rounded down to a multiple
    of 8 (matmul kernels prefer it) when that leaves at least 8 rows.
    """
    per_row = vocab * 4 * _TEMPORARIES  # bytes of one row's temporaries
    rows = max(1, int(memory_budget_bytes or DEFAULT_MEMORY_BUDGET) // per_row)
    if memory_budget_bytes is None and rows < MIN_CHUNK_ROWS and free_bytes is not None:
        rows = max(rows, min(MIN_CHUNK_ROWS, free_bytes // 4 // per_row))
    return rows - rows % 8 if rows >= 8 else rows


def free_memory(device: torch.device) -> int | None:
    """Bytes the device could still give (CUDA: free + cached by torch; CPU: available RAM); None: unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


@dataclass
class _Head:
    """One side's projection: rows of `hidden` (N, H) @ `weight[:vocab]`ᵀ (+ bias) → (c, vocab) fp32."""

    hidden: Tensor  # (N, H)
    weight: Tensor  # (vocab, H), already in the matmul dtype
    bias: Tensor | None  # (vocab,), in the matmul dtype
    name: str = "student"  # its scratch buffers' names (kdkit.losses.scratch): reused by every chunk and step
    lowp_chunks: bool = False  # a teacher chunk in the matmul dtype, not upcast (the forward KL reads it per block)

    def chunk(self, rows: Tensor | slice, chunk_size: int) -> tuple[Tensor]:
        """The chunk's logits as a teacher chunk: (z (c, V) fp32,), or in the matmul dtype (`lowp_chunks`)."""
        if self.lowp_chunks and self.weight.dtype != torch.float32:
            h = self.hidden[rows].to(self.weight.dtype)  # (c, H)
            # the heads' shared buffer: the student's logits were upcast out of it before the teacher's chunk
            # is asked for, and its gradient goes in only once the chunk step is done with them
            return (self._project(h, scratch("logits-lowp", h.shape[0], self.weight.shape[0], self.weight.dtype,
                                             h.device)),)
        return (self.logits(rows, chunk_size)[1],)

    def _project(self, h: Tensor, out: Tensor) -> Tensor:
        """out (c, V) ← h @ weightᵀ (+ bias, added inside the GEMM)."""
        if self.bias is None:
            return torch.mm(h, self.weight.t(), out=out)
        return torch.addmm(self.bias, h, self.weight.t(), out=out)

    def logits(self, rows: Tensor | slice, chunk_size: int) -> tuple[Tensor, Tensor]:
        """The chunk's hidden rows (c, H) in the matmul dtype and its logits (c, V) fp32."""
        h = self.hidden[rows].to(self.weight.dtype)  # (c, H)
        c, v = h.shape[0], self.weight.shape[0]
        out = scratch(f"{self.name}-logits", chunk_size, v, torch.float32, h.device)[:c]  # (c, V) contiguous view
        if self.weight.dtype != torch.float32:  # low-precision GEMM, then upcast into the buffer
            z = scratch("logits-lowp", c, v, self.weight.dtype, h.device)  # (c, V), shared by both heads
            return h, out.copy_(self._project(h, z))
        return h, self._project(h, out)


_ADD_BLOCK_BYTES = 6 << 20  # CPU: the fp32 row block a low-precision partial gradient is upcast through


def _add_lowp(target: Tensor, part: Tensor) -> None:
    """target (fp32) += part (the matmul dtype), with the values of `target.add_(part)`. On a CPU, PyTorch's
    mixed-dtype add_ runs a scalar casting loop (24.6 ms at (49,152, 384) on 2 cores, against 2.4 ms here):
    the part is upcast a cache-sized row block at a time into an fp32 buffer and added in fp32."""
    if target.device.type != "cpu":
        target.add_(part)
        return
    rows = max(1, _ADD_BLOCK_BYTES // (4 * target.shape[1]))
    block = scratch("grad-weight-block", rows, target.shape[1], torch.float32, target.device)
    for lo in range(0, target.shape[0], rows):
        hi = min(target.shape[0], lo + rows)
        target[lo:hi].add_(block[: hi - lo].copy_(part[lo:hi]))


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
            # (V_all, H): the first chunk overwrites it. On a CPU, last step's (reclaimed by the training loop)
            grad_w = (lend("grad-weight", weight, torch.float32) if weight.device.type == "cpu" and weight.is_contiguous()
                      else torch.empty_like(weight, dtype=torch.float32))
            grad_w[vocab:].zero_()  # padded rows past `vocab` get no gradient
        return cls(
            hidden=torch.zeros_like(hidden, dtype=torch.float32) if want[0] else None,
            weight=grad_w,
            bias=torch.zeros_like(bias, dtype=torch.float32) if want[2] else None,
            vocab=vocab,
        )

    def add_chunk(self, g: Tensor, h: Tensor, rows, head: _Head) -> None:
        """Fold one chunk's d/d logits g (c, V) fp32 into the accumulators; h (c, H) matmul dtype."""
        g_mm = g  # (c, V); no copy in fp32
        if head.weight.dtype != g.dtype:
            g_mm = scratch("logits-lowp", *g.shape, head.weight.dtype, g.device).copy_(g)  # the heads' buffer: used by now
        if self.hidden is not None:
            self.hidden[rows] = (g_mm @ head.weight).to(self.hidden.dtype)  # (c, H)
        if self.weight is not None:
            target = self.weight[: self.vocab]  # (V, H) view
            if g_mm.dtype == torch.float32:
                # += gᵀ @ h in place, (V, c) @ (c, H); beta = 0 on the first chunk (no zero fill)
                target.addmm_(g_mm.t(), h, beta=1.0 if self.written else 0.0)
            else:  # low-precision GEMM (fp32 accumulation inside it), summed in fp32
                part = torch.mm(g_mm.t(), h, out=scratch("grad-weight-lowp", *target.shape, g_mm.dtype, g.device))
                if self.written:
                    _add_lowp(target, part)
                else:
                    target.copy_(part)
        self.written = True
        if self.bias is not None:
            self.bias[: self.vocab].add_(g.sum(dim=0))  # (V,)

    def finish(self) -> tuple:
        """The gradients of the un-normalised sums (fp32); the loss's backward scales them."""
        if self.weight is not None and not self.written:  # no supervised row: zero gradient
            self.weight.zero_()
        return self.hidden, self.weight, self.bias


class _FusedDistill(torch.autograd.Function):
    """(total, kd, ce) of the chunked objective; gradients w.r.t. student hidden, weight, bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weight, student, teacher, count, spec, chunk_size, compiled,
                all_supervised):
        # teacher: a `_Head`, `DenseTeacher` or `SparseTeacher`; `.chunk(rows)` gives its chunk tuple
        if all_supervised:  # the caller passes supervised rows only: no nonzero() (a host sync on a device)
            rows, n = None, labels.numel()
        else:
            rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # (n,) supervised rows only cost FLOPs
            n = rows.numel()
        want = ctx.needs_input_grad[:3] if spec.need_grad else (False, False, False)
        grads = _Grads.allocate(want, hidden, weight, bias, student.weight.shape[0])
        sums = torch.zeros(4, dtype=torch.float32, device=hidden.device)  # Σ kd, Σ ce, Σ KL₁, #top-1
        all_rows = n == labels.numel()
        chunk_size = step_rows(n, chunk_size, compiled)
        # eager: the student's logits buffer is the chunk step's scratch (recomputed for the next chunk)
        step = padded_step(chunk_size) if compiled else functools.partial(chunk_grad, overwrite=True)
        for start in range(0, n, chunk_size):
            # Contiguous slices when nothing is masked (views, no gather); else an index gather.
            idx = slice(start, start + chunk_size) if all_rows else rows[start : start + chunk_size]
            h, z_s = student.logits(idx, chunk_size)  # (c, H), (c, V)
            w_rows = None if token_weight is None else token_weight[idx]  # (c,)
            g, chunk_sums = step(z_s, teacher.chunk(idx, chunk_size), labels[idx], w_rows, spec)
            sums += torch.stack(chunk_sums)  # (4,)
            if g is not None:
                grads.add_chunk(g, h, idx, student)
        scale = normalize(torch.ones((), dtype=torch.float32, device=hidden.device), count)  # 1 / count
        # Scaled in backward, by 1/count and the incoming gradient at once: one pass over (V, H), and no
        # host-side look at the incoming gradient. Held on ctx (fresh tensors, no cycle); freed there.
        ctx.grads, ctx.scale, ctx.like = grads.finish(), scale, tuple(None if t is None else t.dtype for t in (hidden, weight, bias))
        kd, ce, kl = (sums[:3] * scale).unbind()  # normalised like the loss; #top-1 stays a count
        agree = sums[3].clone()
        ctx.mark_non_differentiable(kd, ce, kl, agree)
        return _total(kd, ce, spec), kd, ce, kl, agree

    @staticmethod
    def backward(ctx, grad_total, *_grad_reported):
        if ctx.grads is None:
            raise RuntimeError("the fused loss's backward ran twice; its gradients are formed once, in its forward")
        factor = ctx.scale * grad_total.to(torch.float32)  # ()
        grads = tuple(None if g is None else g.mul_(factor).to(dtype) for g, dtype in zip(ctx.grads, ctx.like))
        ctx.grads = None
        return (*grads, None, None, None, None, None, None, None, None, None)


def _total(kd: Tensor, ce: Tensor, spec: Spec) -> Tensor:
    """alpha · T² · kd + (1 − alpha) · ce (T² for the KL family only), leaving out a part of weight 0 (it may be inf)."""
    t2 = soft_scale(spec.divergence, spec.temperature)
    if spec.alpha == 1.0:
        return t2 * kd
    if spec.alpha == 0.0:
        return ce.clone()  # a fresh tensor: `ce` is also returned, marked non-differentiable
    return spec.alpha * t2 * kd + (1.0 - spec.alpha) * ce


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


def _teacher(hidden, weight, bias, signal, spec: Spec, *, n: int, vocab: int, mm_dtype, capture_temperature, device,
             compiled: bool):
    """The teacher side, reading the first `vocab` logits: a `_Head` (online), `DenseTeacher` or `SparseTeacher`."""
    if isinstance(signal, SparseSignal):
        return SparseTeacher.build(signal, vocab=vocab, temperature=spec.temperature,
                                   capture_temperature=capture_temperature, device=device)
    if capture_temperature is not None:
        raise ValueError("capture_temperature applies to a SparseSignal teacher only")
    if signal is not None:
        return DenseTeacher(signal, vocab)
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
        name="teacher",  # its own scratch buffers, apart from the student's
        # forward KL's closed form (eager) reads the teacher's logits a block at a time: they need no fp32 copy
        lowp_chunks=fused_fkl.applies(spec) and not compiled,
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
    teacher_logits: DenseSignal | SparseSignal | HeadSignal | Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    num_tokens: int | Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget_bytes: int | None = None,
    vocab: int | None = None,
    matmul_dtype: torch.dtype | None = None,
    compiled: bool = False,
    metrics: bool = False,
    capture_temperature: float | None = None,
    all_supervised: bool = False,
    **divergence_kwargs,
) -> LossParts:
    """`distill_loss` on logits = hidden (N, H) @ weight[:vocab]ᵀ (+ bias), chunk by chunk over rows.

    The teacher is `teacher_hidden` (N, H_t) + `teacher_weight` (V, H_t) (+ `teacher_bias`), or
    `teacher_logits`: (N, V) logits, a DenseSignal, a HeadSignal (the online teacher's rows and
    head, taken as teacher_hidden + teacher_weight), or a top-k SparseSignal of N rows (the k + 1
    buckets of `sparse.py`; `capture_temperature` as in `distill_loss`); it gets no gradient.
    `labels` (N,) use -100 for unsupervised rows, which are skipped entirely. `num_tokens` is the
    global supervised count of the optimizer step (gradient accumulation, several ranks); default:
    this batch's count. `vocab` keeps the first `vocab` logits only (padded heads). `chunk_size`
    rows per chunk (default: from `memory_budget_bytes`; None: `auto_chunk_size`'s default budget with
    its row floor). `all_supervised=True`: the caller vouches that no label is -100 (the training loop
    passes the supervised rows only), which skips finding them (a host sync on a device). `matmul_dtype` (e.g. torch.bfloat16) runs
    the four products in that dtype (its GEMMs accumulate in fp32); softmaxes and sums are always
    fp32; default: the inputs' dtype. `compiled=True` runs each chunk's divergence and its gradient
    through torch.compile (fused element-wise loops: ~3x faster per chunk; the first call compiles
    for tens of seconds). `metrics=True` also fills `LossParts.kl` (mean KL(teacher ‖ student) at
    T = 1, over the k + 1 buckets for a SparseSignal) and `LossParts.top1` (the count of rows whose
    student argmax is the teacher's top-1), per chunk, from the logits already in hand. A signal's
    `weight` (N,) scales each token's divergence, as in `distill_loss`.
    """
    _check_args(divergence, alpha, temperature, divergence_kwargs)
    if divergence not in DIVERGENCES:  # cross-vocabulary losses (uld) need both full distributions
        raise ValueError(f"the fused loss has no {divergence!r}; use distill_loss, or one of {sorted(DIVERGENCES)}")
    given = teacher_logits  # its per-token `weight`, if any, is read below
    if isinstance(teacher_logits, HeadSignal):  # the online teacher's rows and head: its logits per chunk
        teacher_hidden, teacher_weight, teacher_bias = teacher_logits.rows, teacher_logits.head, teacher_logits.head_bias
        vocab = teacher_logits.vocab if vocab is None else vocab
        teacher_logits = None
    n = student_hidden.shape[0]
    signal = teacher_signal(teacher_logits, n)  # (N, V_t) logits, a SparseSignal, or None
    if (signal is None) == (teacher_hidden is None or teacher_weight is None):
        raise ValueError("give the teacher either as teacher_hidden + teacher_weight, or as teacher_logits")
    if signal is None:
        teacher_vocab = teacher_weight.shape[0]
    else:  # a top-k signal fits any vocabulary its ids lie in (checked when it is bucketed)
        teacher_vocab = student_weight.shape[0] if isinstance(signal, SparseSignal) else signal.shape[1]
    vocab = min(student_weight.shape[0], teacher_vocab) if vocab is None else vocab
    _check_shapes(student_hidden, student_weight, labels, vocab, teacher_vocab)
    inputs = (student_hidden, student_weight, student_bias)
    spec = Spec(
        divergence, float(temperature), float(alpha), tuple(sorted(divergence_kwargs.items())),
        need_grad=torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs),
        sparse=isinstance(signal, SparseSignal), metrics=bool(metrics),
    )
    teacher = _teacher(teacher_hidden, teacher_weight, teacher_bias, signal, spec, n=n, vocab=vocab,
                       mm_dtype=matmul_dtype, capture_temperature=capture_temperature,
                       device=student_hidden.device, compiled=compiled)
    mm_dtype = matmul_dtype or student_weight.dtype
    w = student_weight.detach()[:vocab]  # (V, H) view
    if w.dtype != mm_dtype:  # cast into a buffer kept from step to step
        w = scratch("student-weight-lowp", *w.shape, mm_dtype, w.device).copy_(w)
    student = _Head(student_hidden.detach(), w,
                    None if student_bias is None else student_bias.detach()[:vocab].to(mm_dtype))
    count = (labels != IGNORE_INDEX).sum() if num_tokens is None else num_tokens
    free = free_memory(student_hidden.device) if chunk_size is None and memory_budget_bytes is None else None
    chunk = chunk_size or auto_chunk_size(vocab, memory_budget_bytes=memory_budget_bytes, free_bytes=free)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    token_weight = getattr(given, "weight", None)  # (N,) a signal's per-token KD weight, or None
    if token_weight is not None:
        token_weight = token_weight.detach().to(device=student_hidden.device, dtype=torch.float32)
    total, kd, ce, kl, top1 = _apply(*inputs, labels, token_weight, student, teacher, count, spec, chunk, compiled,
                                     all_supervised)
    return LossParts(total=total, kd=kd, ce=ce, kl=kl if metrics else None, top1=top1 if metrics else None)
