"""The online teacher: a frozen model run inside the training step, giving a DenseSignal."""

from __future__ import annotations

import logging

import torch

from kdkit.models.forward import decoder_hidden, project, supervised_positions
from kdkit.signal import DenseSignal, Provenance

log = logging.getLogger(__name__)


def online_signal_fn(teacher, *, vocab: int, provenance: Provenance):
    """`signal_fn(batch) -> DenseSignal` for the training loop: teacher logits at supervised rows.

    When the teacher's head has more rows than the shared vocabulary (padded embeddings), the
    extra columns are dropped; the teacher probability mass they held is logged once.
    """
    reported = False

    @torch.no_grad()
    def signal_fn(batch: dict) -> DenseSignal:
        nonlocal reported
        hidden = decoder_hidden(teacher, batch["input_ids"], batch["attention_mask"])  # (B, T, H)
        mask, _ = supervised_positions(batch["labels"])
        logits = project(teacher, hidden[:, :-1][mask])  # (N, V_teacher)
        if logits.shape[-1] > vocab and not reported:
            dropped = torch.softmax(logits.float(), -1)[:, vocab:].sum(-1).mean()
            log.warning("teacher logits have %d rows beyond the shared vocabulary of %d; they held %.2e "
                        "of the teacher's probability mass (dropped)", logits.shape[-1] - vocab, vocab, dropped)
            reported = True
        return DenseSignal(logits[:, :vocab], provenance)

    return signal_fn
