"""Preference pairs: reading `{"id", "prompt", "chosen", "rejected", ...}` rows and tokenising them.

A row's `prompt` is chat turns (OpenAI `messages`) or a plain string (one user turn); `chosen` and
`rejected` are the two answers, as strings or as TRL's conversational lists of assistant turns. Each
answer is rendered with the chat template after the prompt, exactly as SFT data is
(`kdkit.data.render`): labels are -100 on the prompt, so only the answer's tokens are scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kdkit.data.collate import collate
from kdkit.data.render import IGNORE, render_example
from kdkit.data.sources import Example
from kdkit.errors import UserError


@dataclass
class PairData:
    """Tokenised pairs aligned by index; labels are IGNORE outside the answer."""

    ids: list[str] = field(default_factory=list)
    chosen: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (input_ids, labels)
    rejected: list[tuple[list[int], list[int]]] = field(default_factory=list)
    dropped: int = 0


def _answer(value, *, key: str, where: str) -> str:
    """An answer given as a string or as a list of turns (the last assistant turn's content)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        return str(value[-1]["content"])
    raise UserError(f"{where}: '{key}' must be a string or a list of {{role, content}} turns")


def prompt_turns(value, *, where: str) -> list[dict]:
    """A row's prompt as chat turns."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return [{"role": m["role"], "content": m.get("content", "")} for m in value]
    raise UserError(f"{where}: 'prompt' must be a string or a list of {{role, content}} turns")


def read_pairs(path: str | Path) -> list[dict]:
    """Rows of a pairs jsonl, validated: each has id, prompt, chosen, rejected."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"pairs file {path} does not exist: run `kdkit feedback CONFIG` first, "
                        "or set preference.pairs to a jsonl of {id, prompt, chosen, rejected} rows")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where}: not valid JSON ({e})") from None
        missing = [k for k in ("id", "prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise UserError(f"{where}: missing {', '.join(missing)} (a pair row is {{id, prompt, chosen, rejected}})")
        row["prompt"] = prompt_turns(row["prompt"], where=where)
        row["chosen"] = _answer(row["chosen"], key="chosen", where=where)
        row["rejected"] = _answer(row["rejected"], key="rejected", where=where)
        rows.append(row)
    if not rows:
        raise UserError(f"pairs file {path} holds no pairs")
    return rows


def _render(row: dict, answer: str, tokenizer, max_length: int):
    example = Example(id=str(row["id"]), messages=row["prompt"] + [{"role": "assistant", "content": answer}])
    return render_example(example, tokenizer, max_length=max_length)


def tokenize_pairs(rows: list[dict], tokenizer, *, max_length: int, source: str = "pairs") -> PairData:
    """Render both answers of every pair; a pair whose answers fall past max_length is dropped."""
    data = PairData()
    for row in rows:
        chosen = _render(row, row["chosen"], tokenizer, max_length)
        rejected = _render(row, row["rejected"], tokenizer, max_length)
        if isinstance(chosen, str) or isinstance(rejected, str):  # a drop reason (empty, over-long)
            data.dropped += 1
            continue
        data.ids.append(str(row["id"]))
        data.chosen.append(chosen)
        data.rejected.append(rejected)
    if not data.ids:
        raise UserError(f"no usable pairs in {source} ({data.dropped} dropped): raise data.max_length "
                        "or check that the answers are not empty")
    return data


def pair_batch(data: PairData, idx: list[int], *, pad_id: int) -> dict:
    """Chosen rows then rejected rows, right-padded together: input_ids/labels (2B, T)."""
    rows = [data.chosen[i] for i in idx] + [data.rejected[i] for i in idx]
    return collate([r[0] for r in rows], [r[1] for r in rows], pad_id=pad_id)


def completion_batch(prompts: list[list[int]], completions: list[list[int]], *, pad_id: int) -> dict:
    """Right-padded prompt+completion rows with labels only on the completion (B, T)."""
    ids = [p + c for p, c in zip(prompts, completions)]
    labels = [[IGNORE] * len(p) + list(c) for p, c in zip(prompts, completions)]
    return collate(ids, labels, pad_id=pad_id)
