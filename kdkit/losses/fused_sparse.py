"""The teacher sides of the fused loss that are not a head: dense logits and a top-k SparseSignal.

Each side hands the chunk loop a tuple of tensors for the chunk's rows (see `fused_chunk`). The
sparse side buckets the teacher once for all N rows, (N, k + 1) fp32, with `sparse.teacher_buckets`
(the same tail and temperature conventions as `sparse_divergence`); the student's k + 1 buckets are
formed per chunk from its (c, V) logits. Small next to (N, V): k + 1 floats per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdkit.signal import DenseSignal, SparseSignal

from .sparse import teacher_buckets


@dataclass
class DenseTeacher:
    """Teacher logits given whole, (N, V_any); only chunk rows and the first `vocab` columns are read."""

    logits_all: Tensor  # (N, V_any)
    vocab: int

    def chunk(self, rows: Tensor | slice, chunk_size: int) -> tuple[Tensor]:
        return (self.logits_all[rows, : self.vocab],)  # (c, V); upcast inside the divergence


@dataclass
class SparseTeacher:
    """A top-k signal bucketed at T (and at T = 1, for the progress metrics)."""

    buckets: Tensor  # (N, k + 1) fp32 teacher log-probs at T: top k, then the tail
    buckets_1: Tensor  # (N, k + 1) the same at T = 1 (the same tensor when T = 1)
    ids: Tensor  # (N, k) int64
    valid: Tensor  # (N, k) bool: slots that are buckets (teacher log-prob > -inf)

    @classmethod
    def build(cls, signal: SparseSignal, *, vocab: int, temperature: float, capture_temperature: float | None,
              device) -> "SparseTeacher":
        signal.check_ids(vocab)  # a cache's ids were checked on the host: no device read here
        ids = signal.ids.to(device=device, dtype=torch.long)  # (N, k)
        buckets, valid = teacher_buckets(signal, temperature=temperature, capture_temperature=capture_temperature)
        buckets_1 = buckets
        if temperature != 1.0:
            buckets_1, _ = teacher_buckets(signal, temperature=1.0, capture_temperature=capture_temperature)
        return cls(buckets.to(device), buckets_1.to(device), ids, valid.to(device))

    def chunk(self, rows: Tensor | slice, chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.buckets[rows], self.buckets_1[rows], self.ids[rows], self.valid[rows]  # (c, k + 1) ×2, (c, k) ×2


def teacher_signal(signal, n: int) -> DenseSignal | SparseSignal | Tensor | None:
    """The `teacher_logits` argument validated: (N, V) logits, a DenseSignal or a SparseSignal of N rows."""
    if signal is None:
        return None
    if isinstance(signal, SparseSignal):
        if signal.num_tokens != n:
            raise ValueError(f"the SparseSignal has {signal.num_tokens} rows; the student hidden states {n}")
        return signal
    if not isinstance(signal, (DenseSignal, Tensor)):
        raise ValueError(
            f"teacher_logits must be (N, V) logits, a DenseSignal or a SparseSignal, got {type(signal).__name__}"
        )
    logits = signal.logits if isinstance(signal, DenseSignal) else signal  # (N, V)
    if logits.dim() != 2 or logits.shape[0] != n:
        raise ValueError(f"teacher logits {tuple(logits.shape)} must be (N, V) with N = {n}")
    return logits.detach()
