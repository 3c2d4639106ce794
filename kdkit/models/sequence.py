"""Sequence-level log-likelihoods and sampling: what preference learning and feedback scoring share.

A completion's log-probability under a model is the sum of its tokens' log-probs, read only where
the labels say the completion is (labels != -100, the prompt masked as in `kdkit.data.render`).
Logits are projected only at those positions (`kdkit.models.forward`), never (B, T, V) at once.
"""

from __future__ import annotations

import zlib

import torch

from kdkit.models.forward import decoder_hidden, project, supervised_positions


def token_logps(model, batch: dict, *, vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the supervised next tokens (N,) and the row each belongs to (N,)."""
    hidden = decoder_hidden(model, batch["input_ids"], batch["attention_mask"])  # (B, T, H)
    mask, targets = supervised_positions(batch["labels"])  # (B, T-1), (N,)
    logits = project(model, hidden[:, :-1][mask], vocab=vocab).float()  # (N, V)
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]  # (N,)
    return logps, rows


def sequence_logps(model, batch: dict, *, vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of completion token log-probs per row (B,), completion token count per row (B,))."""
    logps, rows = token_logps(model, batch, vocab=vocab)
    size = batch["labels"].shape[0]
    sums = torch.zeros(size, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)  # (B,)
    counts = torch.bincount(rows, minlength=size)  # (B,)
    return sums, counts


def mean_logps(model, batch: dict, *, vocab: int | None = None) -> torch.Tensor:
    """Mean log-prob per completion token (B,): a length-fair likelihood score (0 tokens → -inf)."""
    sums, counts = sequence_logps(model, batch, vocab=vocab)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, -float("inf")))


def id_seed(key: str, seed: int = 0) -> int:
    """A seed from a stable key (a prompt id): the same samples whatever the order or a resume."""
    return (seed + zlib.crc32(key.encode())) % 2**31


@torch.no_grad()
def sample_completions(model, prompt: list[int], *, n: int, max_new_tokens: int, temperature: float,
                       top_p: float, pad_id: int, eos_id: int, seed: int) -> list[list[int]]:
    """n sampled completions of one prompt (token ids, stopped at and including eos, no padding)."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt] * n, device=device)  # (n, P): one prompt, no padding needed
    with torch.random.fork_rng(devices=[]):  # seeded here without moving the caller's RNG
        torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                             top_p=top_p, top_k=None, pad_token_id=pad_id, eos_token_id=eos_id)
    return [strip_completion(row.tolist(), eos_id=eos_id) for row in out[:, len(prompt):]]


def strip_completion(tokens: list[int], *, eos_id: int) -> list[int]:
    """Tokens up to and including the first eos (what follows it is padding)."""
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens
