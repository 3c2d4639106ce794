"""Interop with axolotl's KD plugin: rows with `target_token_ids`, `target_logprobs`, `target_mask`.

Axolotl's layout (integrations/kd/chat_template.py): per example, three lists as long as input_ids,
each entry a list of k values. Entry p is the teacher's top-k for the token AT position p (the
label; axolotl's trainer shifts for causal models), so entry p = our supervised row of position
p − 1. Entries without a signal (unsupervised, position 0) hold ids 0 … k−1, mask 0 and log-prob
`MASKED_LOGPROB`; so does a -inf slot of a supervised row. JSON has no -inf, hence a finite stand-in.
Axolotl keeps no tail mass: it is dropped on export and re-derived (log(1 − Σp)) on import.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from kdkit.data.render import IGNORE, TokenizedData
from kdkit.signal import Provenance, SparseSignal

MASKED_LOGPROB = -1e4  # ~ log 0; only ever written under mask 0


def to_axolotl_row(input_ids: list[int], labels: list[int], signal: SparseSignal) -> dict:
    """One example with its signal (rows = its supervised positions, in order) → an axolotl KD row."""
    k = signal.ids.shape[1]
    empty = (list(range(k)), [MASKED_LOGPROB] * k, [0] * k)
    ids, lps, masks = [list(empty[0])], [list(empty[1])], [list(empty[2])]  # position 0: no signal
    r = 0
    for p in range(1, len(input_ids)):
        if labels[p] == IGNORE:
            ids.append(list(empty[0])), lps.append(list(empty[1])), masks.append(list(empty[2]))
            continue
        row_lp = signal.logprobs[r].tolist()
        ids.append(signal.ids[r].tolist())
        lps.append([x if math.isfinite(x) else MASKED_LOGPROB for x in row_lp])
        masks.append([int(math.isfinite(x)) for x in row_lp])
        r += 1
    if r != signal.num_tokens:
        raise ValueError(f"signal has {signal.num_tokens} rows for {r} supervised positions")
    return {"input_ids": list(input_ids), "labels": list(labels), "attention_mask": [1] * len(input_ids),
            "target_token_ids": ids, "target_logprobs": lps, "target_mask": masks}


def from_axolotl_row(row: dict, *, provenance: Provenance | None = None) -> tuple[list[int], list[int], SparseSignal]:
    """An axolotl KD row → (input_ids, labels, SparseSignal over its supervised positions, tail None).

    A supervised position whose entry is all mask 0 gets k slots of -inf (no teacher information).
    """
    input_ids, labels = list(row["input_ids"]), list(row["labels"])
    picked = [p for p in range(1, len(input_ids)) if labels[p] != IGNORE]
    ids = torch.tensor([row["target_token_ids"][p] for p in picked], dtype=torch.long)  # (N, k)
    lp = torch.tensor([row["target_logprobs"][p] for p in picked], dtype=torch.float32)  # (N, k)
    mask = torch.tensor([row["target_mask"][p] for p in picked], dtype=torch.bool)  # (N, k)
    if not picked:
        k = len(row["target_token_ids"][0]) if row["target_token_ids"] else 0
        ids, lp = torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
        mask = torch.zeros(0, k, dtype=torch.bool)
    return input_ids, labels, SparseSignal(ids, torch.where(mask, lp, -torch.inf), None, provenance or Provenance())


def export_axolotl(reader, data: TokenizedData, path: str | Path) -> int:
    """Write every example of `data` with its cached signal (a `CacheReader`) as axolotl KD jsonl."""
    with open(path, "w") as f:
        for ex_id, input_ids, labels in zip(data.ids, data.input_ids, data.labels):
            row = to_axolotl_row(input_ids, labels, reader.signal([ex_id]))
            f.write(json.dumps({"id": ex_id, **row}) + "\n")
    return len(data.ids)


def import_axolotl(path: str | Path, *, provenance: Provenance | None = None) -> tuple[TokenizedData, list[SparseSignal]]:
    """Read axolotl KD jsonl → the tokenized data (ids from an "id" column, else "row{i}") and one
    SparseSignal per example, aligned by index."""
    data = TokenizedData(ids=[], input_ids=[], labels=[], dropped={}, total=0)
    signals = []
    with open(path) as f:
        for i, line in enumerate(x for x in f if x.strip()):
            row = json.loads(line)
            input_ids, labels, signal = from_axolotl_row(row, provenance=provenance)
            data.ids.append(str(row.get("id", f"row{i}")))
            data.input_ids.append(input_ids)
            data.labels.append(labels)
            signals.append(signal)
    data.total = len(data.ids)
    return data, signals
