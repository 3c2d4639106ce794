"""Cross-tokenizer distillation: a teacher whose tokenizer differs from the student's.

The student's batch is turned back into text (token by token, so every student token keeps its
character span), the teacher tokenizes that text with character offsets, and the two tokenisations
are aligned on token STARTS: a student target token starting at character c is paired with the
teacher token starting at c. Both models then predict "what follows text[:c]" from the same
context, so their next-token distributions are comparable; the loss compares them with `uld`
(sorted probabilities: defined across vocabularies).

Student targets with no teacher token starting at the same character (a student token that begins
inside a teacher token) get KD weight 0: the signal has a row for every supervised student token,
as the contract wants, and `weight` says which rows count. The share aligned is logged. The signal
also carries the vocabulary map (kdkit.models.vocab_map): progress metrics and the held-out
comparison (KL and top-1 through that map) are taken on the aligned rows only.

The text is the student's rendering (its chat template); the teacher reads it as plain text after
its own BOS, if it has one.
"""

from __future__ import annotations

from typing import Callable

import torch

from kdkit.data.collate import collate
from kdkit.models.forward import decoder_hidden, project, supervised_positions
from kdkit.models.vocab_map import vocab_map
from kdkit.signal import DenseSignal, Provenance

from .modes import report


def token_spans(ids: list[int], tokenizer) -> tuple[str, list[int]]:
    """(text, start character of every token) from decoding the tokens one by one."""
    pieces = [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]
    starts, at = [], 0
    for piece in pieces:
        starts.append(at)
        at += len(piece)
    return "".join(pieces), starts


def align_row(student_starts: list[int], targets: list[int], teacher_starts: list[int]) -> list[int]:
    """For each supervised student target index j (token j is predicted at position j − 1): the
    teacher position predicting the teacher token that starts where token j starts, or −1."""
    where = {}
    for i, start in enumerate(teacher_starts):
        if i > 0:  # token 0 is never predicted
            where.setdefault(start, i - 1)
    return [where.get(student_starts[j], -1) for j in targets]


def teacher_rows(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """Teacher ids of `text` (its BOS first when its tokenizer adds one) and each token's start."""
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    starts = [start if end > start else -1 for start, end in enc["offset_mapping"]]  # specials: no span
    return enc["input_ids"], starts


def cross_tokenizer_signal_fn(teacher, *, teacher_tokenizer, student_tokenizer, provenance: Provenance,
                              teacher_vocab: int) -> Callable:
    """`signal_fn(batch) -> DenseSignal` of teacher logits (N, V_teacher) aligned to the student's
    supervised tokens, with `weight` 0 on the unaligned ones and the teacher ↔ student `vocab_map`."""
    pad = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else 0
    shared = vocab_map(teacher_tokenizer, student_tokenizer)  # once: one decode per id of each vocabulary

    @torch.no_grad()
    def signal_fn(batch: dict) -> DenseSignal:
        mask, _ = supervised_positions(batch["labels"])  # (B, T-1)
        t_ids, pairs = [], []
        for b in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][b].sum())
            ids = batch["input_ids"][b, :n].tolist()
            text, s_starts = token_spans(ids, student_tokenizer)
            row_ids, t_starts = teacher_rows(text, teacher_tokenizer)
            targets = (mask[b].nonzero()[:, 0] + 1).tolist()  # supervised target token indices
            t_ids.append(row_ids)
            pairs.append(align_row(s_starts, targets, t_starts))
        tb = collate(t_ids, None, pad_id=pad)
        device = batch["input_ids"].device
        hidden = decoder_hidden(teacher, tb["input_ids"].to(device), tb["attention_mask"].to(device))  # (B, Tt, H)
        rows = torch.tensor([(b, max(p, 0)) for b, row in enumerate(pairs) for p in row], dtype=torch.long)
        aligned = torch.tensor([p >= 0 for row in pairs for p in row], dtype=torch.bool)  # (N,)
        if rows.numel():
            logits = project(teacher, hidden[rows[:, 0].to(device), rows[:, 1].to(device)], vocab=teacher_vocab)
        else:
            logits = hidden.new_zeros(0, teacher_vocab)
        report(batch, "aligned_fraction", aligned.float().mean() if aligned.numel() else 1.0)
        return DenseSignal(logits, provenance, weight=aligned.float().to(device), vocab_map=shared)  # (N, V_t), (N,)

    return signal_fn
