"""The online teacher: a frozen model run inside the training step, giving a DenseSignal."""

from __future__ import annotations

import torch

from kdkit.models.forward import supervised_logits
from kdkit.signal import DenseSignal, Provenance


def online_signal_fn(teacher, *, vocab: int, provenance: Provenance):
    """`signal_fn(batch) -> DenseSignal` for the training loop: teacher logits at supervised rows."""

    @torch.no_grad()
    def signal_fn(batch: dict) -> DenseSignal:
        logits, _ = supervised_logits(teacher, batch, vocab=vocab)  # (N, V)
        return DenseSignal(logits, provenance)

    return signal_fn
