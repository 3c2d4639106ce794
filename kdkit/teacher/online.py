"""The online teacher: a frozen model run inside the training step, giving a DenseSignal (or, for the
fused loss, a HeadSignal: its hidden rows and lm_head)."""

from __future__ import annotations

import logging

import torch

from kdkit.models.forward import decoder_hidden, decoder_mask, project, supervised_rows
from kdkit.signal import DenseSignal, HeadSignal, Provenance

log = logging.getLogger(__name__)


def online_signal_fn(teacher, *, vocab: int, provenance: Provenance, lazy: bool = False):
    """`signal_fn(batch) -> DenseSignal | HeadSignal` for the training loop: the teacher at supervised rows.

    `lazy` (the fused loss): a HeadSignal, the teacher's last hidden rows + its lm_head, whose logits
    the loss forms chunk by chunk; where the head is not a plain linear layer here (softcapped, or
    sharded by FSDP2) the logits are formed at once, as without `lazy`: a DenseSignal.
    When the teacher's head has more rows than the shared vocabulary (padded embeddings), the
    extra columns are dropped; the teacher probability mass they held is logged once.
    """
    reported = False
    head = teacher.get_output_embeddings()
    lazy = lazy and plain_head(teacher)

    @torch.no_grad()
    def signal_fn(batch: dict) -> DenseSignal | HeadSignal:
        nonlocal reported
        hidden = decoder_hidden(teacher, batch["input_ids"], decoder_mask(batch))  # (B, T, H)
        rows = supervised_rows(hidden, batch)[0]  # (N, H)
        if lazy and (reported or head.weight.shape[0] <= vocab):
            return HeadSignal(rows, head.weight, head.bias, vocab=vocab, provenance=provenance)
        logits = project(teacher, rows)  # (N, V_teacher)
        if logits.shape[-1] > vocab and not reported:
            dropped = torch.softmax(logits.float(), -1)[:, vocab:].sum(-1).mean()
            log.warning("teacher logits have %d rows beyond the shared vocabulary of %d; they held %.2e "
                        "of the teacher's probability mass (dropped)", logits.shape[-1] - vocab, vocab, dropped)
            reported = True
        return DenseSignal(logits[:, :vocab], provenance)

    return signal_fn


def hold_in(teacher: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The frozen teacher with its floating-point weights cast to `dtype` once, in place (bf16: no per-step
    re-cast of fp32 weights under autocast, half the memory). Before any sharding (FSDP2 shards what it is given)."""
    if any(p.is_floating_point() and p.dtype != dtype for p in teacher.parameters()):
        log.info("online teacher weights held in %s", str(dtype).removeprefix("torch."))
        teacher.to(dtype)
    return teacher


def plain_head(model) -> bool:
    """Whether the model's logits are exactly its lm_head's linear map (no softcapping, not sharded)."""
    head = model.get_output_embeddings()
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None):
        return False
    return isinstance(head, torch.nn.Linear) and type(head.weight) is torch.nn.Parameter
