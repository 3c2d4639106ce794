"""Forward passes that produce logits only where a loss needs them.

A causal LM's lm_head is the biggest matmul of a small model (SmolLM2: 576 × 49152 per token, a
fifth of the teacher's FLOPs). Training and evaluation only read logits at supervised positions,
so we run the decoder, pick those rows of the hidden states, and project just them.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def decoder_hidden(model: PreTrainedModel, input_ids, attention_mask) -> torch.Tensor:
    """Final (normed) hidden states (B, T, H) from the model's decoder stack."""
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def project(model: PreTrainedModel, hidden: torch.Tensor, *, vocab: int | None = None) -> torch.Tensor:
    """lm_head on selected rows: (N, H) → (N, V); softcapping applied where the model has it."""
    logits = model.get_output_embeddings()(hidden)  # (N, V)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # gemma-style: the head's output is squashed before softmax
        logits = torch.tanh(logits / cap) * cap
    return logits if vocab is None else logits[:, :vocab]


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets: position t predicts labels[t + 1].

    Returns the mask (B, T-1) of positions whose target is supervised, and those targets (N,).
    """
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != -100
    return mask, targets[mask]


def supervised_logits(model: PreTrainedModel, batch: dict, *, vocab: int | None = None):
    """Logits (N, V) at supervised positions and their targets (N,), never the full (B, T, V)."""
    hidden = decoder_hidden(model, batch["input_ids"], batch["attention_mask"])  # (B, T, H)
    mask, targets = supervised_positions(batch["labels"])
    rows = hidden[:, :-1][mask]  # (N, H)
    return project(model, rows, vocab=vocab), targets
