"""Batches from tokenised examples: padding, naive packing, and a resumable shuffle order."""

from __future__ import annotations

import torch
from torch import Tensor

from kdkit.data.render import IGNORE, TokenizedData


def collate(
    input_ids: list[list[int]], labels: list[list[int]] | None, *, pad_id: int, side: str = "right"
) -> dict[str, Tensor]:
    """Pad a batch to its longest sequence.

    Returns input_ids (B, T), attention_mask (B, T) (1 on real tokens) and, when labels are given,
    labels (B, T) with IGNORE on padding. side="left" for generation, so every prompt ends at T.
    """
    if not input_ids:
        raise ValueError("collate got an empty batch")
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max(len(ids) for ids in input_ids)  # T

    def pad(row: list[int], value: int) -> list[int]:
        filler = [value] * (width - len(row))
        return filler + row if side == "left" else row + filler

    batch = {
        "input_ids": torch.tensor([pad(ids, pad_id) for ids in input_ids], dtype=torch.long),  # (B, T)
        "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids in input_ids], dtype=torch.long),  # (B, T)
    }
    if labels is not None:
        if [len(row) for row in labels] != [len(ids) for ids in input_ids]:
            raise ValueError("labels and input_ids differ in length")
        batch["labels"] = torch.tensor([pad(row, IGNORE) for row in labels], dtype=torch.long)  # (B, T)
    return batch


def pack(data: TokenizedData, *, max_length: int) -> TokenizedData:
    """Greedily concatenate consecutive examples into sequences of at most max_length tokens.

    Naive packing: attention is NOT masked between documents, so a token may attend to the
    previous documents in its sequence (cheap, and the usual trade-off for short documents). The
    first label of every document after the first is set to IGNORE, so no position learns to
    predict the start of an unrelated document; every label that the next-token shift uses within
    a document is kept. `ids` of a packed sequence are its documents' ids joined with "+".
    """
    packed = TokenizedData(ids=[], input_ids=[], labels=[], dropped=dict(data.dropped), total=data.total)
    ids: list[str] = []
    tokens: list[int] = []
    targets: list[int] = []
    for doc_id, doc_tokens, doc_labels in zip(data.ids, data.input_ids, data.labels):
        if len(doc_tokens) > max_length:
            raise ValueError(f"example {doc_id} has {len(doc_tokens)} tokens, over the packing max_length={max_length}")
        if tokens and len(tokens) + len(doc_tokens) > max_length:
            _flush(packed, ids, tokens, targets)
            ids, tokens, targets = [], [], []
        # labels[0] of a document is never a shifted target on its own; packed, it would be.
        first = doc_labels[0] if not tokens else IGNORE
        ids.append(doc_id)
        tokens += doc_tokens
        targets += [first] + doc_labels[1:]
    if tokens:
        _flush(packed, ids, tokens, targets)
    return packed


def _flush(packed: TokenizedData, ids: list[str], tokens: list[int], targets: list[int]) -> None:
    packed.ids.append("+".join(ids))
    packed.input_ids.append(tokens)
    packed.labels.append(targets)


def batch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n) fixed by (seed, epoch), so a resumed run sees the same order."""
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch)  # distinct stream per epoch
    return torch.randperm(n, generator=generator).tolist()


def length_grouped(order: list[int], lengths, *, batch_size: int, seed: int) -> list[int]:
    """`order` sorted by `lengths[i]`, cut into batches of `batch_size`, the batches shuffled (by `seed`):
    each batch holds rows of like length, so padding to its longest wastes little."""
    ranked = sorted(order, key=lambda i: lengths[i])
    batches = [ranked[j:j + batch_size] for j in range(0, len(ranked), batch_size)]
    generator = torch.Generator().manual_seed(seed)
    return [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]
