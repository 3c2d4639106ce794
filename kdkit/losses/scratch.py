"""Scratch buffers the fused loss reuses from step to step.

A chunk's (c, V) temporaries are 35-100 MB at V = 49,152. Allocated afresh, each is a new mapping whose
pages fault in, zeroed, on first touch (glibc maps every block over 32 MiB and unmaps it when freed): on a
2-core CPU that cost a quickstart step about as much as the loss's arithmetic. The fused loss asks for
its large buffers by name here instead; each name keeps one tensor, grown when more rows are asked for
(the chunk size is fixed for a run, so it settles at once). Buffers never leave
the loss: what it returns (gradients, sums) is never one of them, so a chunk step may overwrite
any of them once their values are used. Buffers used
one after the other within a chunk share a name: the bf16 (c, V) copies of both heads' logits and of
the gradient are one buffer.

Gradients are the exception, and lent rather than kept: `lend` gives the loss a tensor to return as the
head's weight gradient (the autograd engine, its sole owner, keeps it as `.grad` without a copy and adds a
tied embedding's gradient into it in place), and `reclaim`, called by the training loop just before
`zero_grad(set_to_none=True)`, takes back the parameter's gradient, so the next step's (V, H) accumulator is memory
already paged in; `release` drops what is held once training ends. What is not reclaimed is simply
freed: a caller with its own loop gets a fresh tensor every step. `borrow` lends a view of an idle
buffer (kdkit.models.forward's tied-embedding gradient): with both, the quickstart's step went from
0.871 to 0.830 s (median, interleaved in one process; README "Speed on a CPU").
"""

from __future__ import annotations

import math
import weakref

import torch

_BUFFERS: dict[str, torch.Tensor] = {}
_RETURNED: dict[str, torch.Tensor] = {}  # lent, then reclaimed: the next `lend` of the name hands it out again
_LENT_VIEW: list[torch.Tensor] = []  # the view `borrow` last gave out, held until the loss runs again
_OUT: dict[str, weakref.ref] = {}  # the parameter each name was last lent for, until reclaimed


def scratch(name: str, rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised (rows, cols) tensor: the leading rows of the buffer kept under `name` (a contiguous
    view), made anew only when it has too few rows, other columns, dtype or device."""
    buf = _BUFFERS.get(name)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype or buf.device != torch.device(device):
        _BUFFERS.pop(name, None)  # the old one freed before the new one is made
        buf = _BUFFERS[name] = torch.empty((rows, cols), dtype=dtype, device=device)
    return buf[:rows]


def lend(name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor shaped like the parameter `like`, in `dtype`, for the caller to return as its
    gradient: that parameter's `.grad` as reclaimed under `name` where it matches, else a new one. The pool
    keeps no reference to it meanwhile, and only a weak one to the parameter."""
    buf = _RETURNED.pop(name, None)
    if buf is None or buf.shape != like.shape or buf.dtype != dtype or buf.device != like.device:
        buf = None  # freed before the new one is made
        buf = torch.empty(like.shape, dtype=dtype, device=like.device)
    _OUT[name] = weakref.ref(like)
    return buf


def reclaim() -> None:
    """Take back, under each name, the `.grad` of the parameter last lent for (the lent tensor itself, or the
    sum the autograd engine made of it), about to be dropped by `zero_grad(set_to_none=True)`; its values
    are overwritten by the next `lend`. Only for a caller that drops every other reference to it."""
    for name, ref in _OUT.items():
        param = ref()
        grad = None if param is None else param.grad
        if grad is not None and type(grad) is torch.Tensor and grad.layout == torch.strided and grad.is_contiguous():
            _RETURNED[name] = grad
    _OUT.clear()


def release() -> None:
    """Drop the reclaimed gradient and the borrowed view (the end of training); kept buffers stay."""
    _RETURNED.clear()
    _OUT.clear()
    _LENT_VIEW.clear()


def borrow(shape: tuple, dtype: torch.dtype, device) -> torch.Tensor | None:
    """A view, shaped `shape`, into the largest kept buffer of that dtype and device, or None if none has room:
    for a gradient formed while the loss is idle (the student's backward; the loss computes its own
    gradients in its forward). The pool holds a reference to the view until the loss next asks for a
    buffer, so the autograd engine never keeps it as a parameter's `.grad` (it copies a gradient someone
    else holds) and never writes into it in place; it may add it into another gradient."""
    device = torch.device(device)
    numel = math.prod(shape)
    kept = [b for b in _BUFFERS.values() if b.dtype == dtype and b.device == device and b.is_contiguous()]
    buf = max(kept, key=torch.Tensor.numel, default=None)
    if buf is None or buf.numel() < numel:
        return None
    view = buf.view(-1)[:numel].view(shape)
    _LENT_VIEW[:] = [view]
    return view
