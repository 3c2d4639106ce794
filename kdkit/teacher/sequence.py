"""Sequence-level KD: the teacher's written tokens as the signal (no teacher model in the loop).

The signal at each supervised position is one-hot on the token the teacher wrote: a `SparseSignal`
with k = 1, log-prob 0 and an empty tail. Every divergence against it is then the cross-entropy on
the teacher's tokens (forward KL to a one-hot = −log p_S(token)), and the loop's top-1 agreement is
the student's next-token accuracy on the teacher's text — the same loop, losses and metrics serve
`kdkit sft` unchanged.
"""

from __future__ import annotations

import math

import torch

from kdkit.models.forward import supervised_positions
from kdkit.signal import Provenance, SparseSignal


def sequence_signal_fn(*, provenance: Provenance | None = None):
    """`signal_fn(batch) -> SparseSignal`: one-hot rows on the batch's own next-token targets."""
    provenance = provenance or Provenance(top_k=1)

    def signal_fn(batch: dict) -> SparseSignal:
        _, targets = supervised_positions(batch["labels"])  # (N,)
        ids = targets.unsqueeze(1)  # (N, 1)
        logprobs = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)  # (N, 1): p = 1
        tail = torch.full((ids.shape[0],), -math.inf, device=ids.device)  # (N,): no mass elsewhere
        return SparseSignal(ids=ids, logprobs=logprobs, tail=tail, provenance=provenance)

    return signal_fn
