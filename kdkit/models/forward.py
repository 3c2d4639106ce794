"""Forward passes that produce logits only where a loss needs them.

A causal LM's lm_head is the biggest matmul of a small model (SmolLM2: 576 × 49152 per token, a
fifth of the teacher's FLOPs). Training and evaluation only read logits at supervised positions,
so we run the decoder, pick those rows of the hidden states, and project just them.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from transformers import PreTrainedModel

from kdkit.losses.scratch import borrow

log = logging.getLogger(__name__)


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


HOST_PLAN = "host_plan"  # the batch key of `host_plan`'s result


def host_plan(batch: dict) -> dict:
    """What the step needs to know about a batch, computed on the host from its CPU tensors before they
    move to the device (read from a device tensor, each would make the host wait for the device):

    - `index` (N,) int64: the supervised positions as rows of the flattened (B·T, H) hidden states,
      in `supervised_positions` order; `targets` (N,): their next-token labels
    - `count`: N; `tokens`: the batch's non-pad tokens
    - `causal`: every row is right-padded (ones, then zeros), so a plain causal forward (no mask)
      gives every real position exactly what the padded mask gives it (pads come after them)
    """
    labels, attn = batch["labels"], batch["attention_mask"]
    mask, targets = supervised_positions(labels)  # (B, T-1), (N,)
    b, t = mask.nonzero(as_tuple=True)  # (N,) each, row-major: the order of hidden[:, :-1][mask]
    right_padded = bool((attn.cumprod(dim=1) == attn).all())  # (B, T): no 1 after a 0
    return {"index": b * labels.shape[1] + t, "targets": targets, "count": int(targets.numel()),
            "tokens": int(attn.sum()), "causal": right_padded}


def with_host_plan(batch: dict) -> dict:
    """The batch with its `host_plan` (kept when already there)."""
    if HOST_PLAN in batch:
        return batch
    return {**batch, HOST_PLAN: host_plan(batch)}


def decoder_mask(batch: dict):
    """The attention mask to hand the decoder: None where the host plan says the batch is right-padded
    (a plain causal forward: the same values at every real position, SDPA's causal kernel, and no
    host-side check of the mask inside transformers), else the batch's mask."""
    plan = batch.get(HOST_PLAN)
    return None if plan is not None and plan["causal"] else batch["attention_mask"]


def supervised_rows(hidden: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (B, T, H) at the batch's supervised positions (N, H) and their targets (N,): by the host
    plan's index when the batch has one (an index_select: no host sync), else by the boolean mask."""
    plan = batch.get(HOST_PLAN)
    if plan is None:
        mask, targets = supervised_positions(batch["labels"])
        return hidden[:, :-1][mask], targets  # (N, H), (N,)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B·T, H)
    return flat.index_select(0, plan["index"].to(hidden.device)), plan["targets"].to(hidden.device)


def supervised_logits(model: PreTrainedModel, batch: dict, *, vocab: int | None = None):
    """Logits (N, V) at supervised positions and their targets (N,), never the full (B, T, V)."""
    hidden = decoder_hidden(model, batch["input_ids"], decoder_mask(batch))  # (B, T, H)
    rows, targets = supervised_rows(hidden, batch)  # (N, H), (N,)
    return project(model, rows, vocab=vocab), targets


class _TiedEmbedding(torch.autograd.Function):
    """`F.embedding` whose weight gradient is written into an idle buffer of the fused loss's
    (`kdkit.losses.scratch.borrow`), where the default backward zero-fills a fresh (V, H) tensor."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight_shape, ctx.weight_dtype, ctx.padding_idx = weight.shape, weight.dtype, padding_idx
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        rows, g = ids.reshape(-1), grad.reshape(-1, ctx.weight_shape[1]).to(ctx.weight_dtype)
        if ctx.padding_idx is not None:  # as the default backward: the padding row gets no gradient
            g = g.masked_fill((rows == ctx.padding_idx).unsqueeze(1), 0)
        out = borrow(ctx.weight_shape, ctx.weight_dtype, grad.device)
        out = torch.zeros(ctx.weight_shape, dtype=ctx.weight_dtype, device=grad.device) if out is None else out.zero_()
        return None, out.index_add_(0, rows, g), None


def tied_embedding_backward(model) -> Callable[[], None] | None:
    """For CPU training of a model whose `nn.Embedding` is tied to its output head: the embedding's
    gradient is formed in an idle buffer of the fused loss (its (chunk, V) logits, unused during the
    student's backward) and added in place into the head's gradient, instead of in a fresh zero-filled
    (V, H) tensor whose pages fault in (with the loss's reclaimed accumulator, the quickstart's step
    0.871 → 0.830 s, interleaved). The same values as the default backward; a buffer too small, and it makes a
    fresh one. Returns the undo, or None where it does not apply (untied, frozen, a subclass such as
    Gemma's scaled embedding, max_norm or scale_grad_by_freq set)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if (type(emb) is not torch.nn.Embedding or head is None or emb.weight is not getattr(head, "weight", None)
            or not emb.weight.requires_grad or emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse):
        return None
    emb.forward = lambda ids: _TiedEmbedding.apply(ids, emb.weight, emb.padding_idx)

    def undo() -> None:
        emb.__dict__.pop("forward", None)

    return undo


def compile_layers(model: PreTrainedModel, *, device: torch.device) -> Callable[[], None] | None:
    """torch.compile each decoder layer's forward in place, with dynamic shapes (batches of every length
    share one graph; parameters are graph inputs, so the same compiled code serves all layers): the
    norms, rotary, SiLU and casts around the GEMMs fuse. Returns the undo (the eager forwards back, e.g.
    before evaluation), or None where it cannot run: inductor on CPU needs a C++ compiler."""
    import shutil

    from kdkit.models.capture import decoder_layers

    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        log.warning("train.compile: no C++ compiler on PATH (torch.compile's CPU backend needs one); training eagerly")
        return None
    layers = list(decoder_layers(model))
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)

    def undo() -> None:
        for layer in layers:
            layer.__dict__.pop("forward", None)

    return undo
