"""Scratch buffers the fused loss reuses from step to step.

A chunk's (c, V) temporaries are 35-100 MB at V = 49,152. Allocated afresh, each is a new mapping whose
pages fault in, zeroed, on first touch (glibc maps every block over 32 MiB and unmaps it when freed): on a
2-core CPU that cost a quickstart step about as much as the loss's arithmetic. The fused loss asks for
its large buffers by name here instead; each name keeps one tensor, grown when more rows are asked for
(the chunk size is fixed for a run, so it settles at once). Buffers never leave
the loss: what it returns (gradients, sums) is always freshly allocated, so a chunk step may overwrite
any of them once their values are used. Buffers used
one after the other within a chunk share a name: the bf16 (c, V) copies of both heads' logits and of
the gradient are one buffer.
"""

from __future__ import annotations

import torch

_BUFFERS: dict[str, torch.Tensor] = {}


def scratch(name: str, rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised (rows, cols) tensor: the leading rows of the buffer kept under `name` (a contiguous
    view), made anew only when it has too few rows, other columns, dtype or device."""
    buf = _BUFFERS.get(name)
    if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype or buf.device != torch.device(device):
        _BUFFERS.pop(name, None)  # the old one freed before the new one is made
        buf = _BUFFERS[name] = torch.empty((rows, cols), dtype=dtype, device=device)
    return buf[:rows]

