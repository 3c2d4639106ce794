"""The teacher's top-k signal kept while it writes its answers, so the cache needs no second teacher pass.

Greedy (or Gumbel-max) generation computes the teacher's logits at every answer position already: the
logits of step t are the teacher's distribution over answer token t given the prompt and tokens < t,
exactly the row a signal cache computes for that supervised position with a forward over the rendered
chat. `Recorder` keeps their top-k log-probs as they go by (before any sampling processor), and two
more steps than the answer needs are run so that every supervised position of the rendered turn has
its row: the end-of-turn token (forced where the answer was cut at `max_new_tokens`, so its row is the
teacher's distribution after the cut, as in the rendered data) and the position after it (the
template's trailing "\\n"). The cache stage (`kdkit.teacher.cache.build_cache(captured=...)`) takes
an example's rows from here when its rendered tokens start with the tokens generated, and runs the
teacher only on the examples where they do not (an answer whose text re-tokenises differently).

On disk: one `batch-*.safetensors` per generation batch under `OUT.topk/`, written atomically before
the batch's answers are appended to OUT, so an answer on disk has its rows unless a kill fell between
the two (then the cache computes it). Tensors: ids (R, k) int32, top (R, k) and tail (R,) float32,
row_offsets and token_offsets (n + 1,) int64, tokens (the prompt + answer + end-of-turn ids of each
example, concatenated); metadata: example_ids, k, temperature, weights (the teacher's weights hash).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

log = logging.getLogger(__name__)


def signal_dir(out_path: Path) -> Path:
    """Where the rows captured while writing `out_path` are kept."""
    return out_path.with_name(out_path.name + ".topk")


class Recorder:
    """Keeps the top-k log-probs at `temperature` of every row's step logits until the row has all the rows
    its rendered turn needs; at step `max_new_tokens` forces the end of turn on rows that had not ended.

    Driven by `kdkit.teacher.generate.decode` step by step: `record` sees the raw logits of the rows still
    decoding (before any other processor), `note` the tokens they chose; `complete` tells which rows have
    every row they need (their end of turn and the step after it), so they leave the batch."""

    def __init__(self, *, batch: int, max_new_tokens: int, k: int, temperature: float, vocab: int, eos_id: int):
        from kdkit.teacher.cache import topk_rows  # the one top-k/tail computation of every cache

        self.topk_rows, self.k, self.temperature, self.vocab, self.eos_id = topk_rows, k, temperature, vocab, eos_id
        self.max_new = max_new_tokens
        self.steps = max_new_tokens + 2  # the end of turn of a cut answer and the step after an end of turn
        self.ids = torch.zeros(batch, self.steps, k, dtype=torch.int32)  # (B, S, k)
        self.top = torch.zeros(batch, self.steps, k)  # (B, S, k)
        self.tail = torch.zeros(batch, self.steps)  # (B, S)
        self.ended = torch.full((batch,), -1, dtype=torch.long)  # (B,) step of each row's end of turn, -1: not yet
        self.step = 0

    def record(self, rows: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """rows (b,) of the batch whose step logits are scores (b, V): keep their top-k rows; returns the
        scores to choose from (the end of turn forced on cut rows at step max_new_tokens)."""
        t = self.step
        ids, top, tail = self.topk_rows(scores[:, : self.vocab], k=self.k, temperature=self.temperature)
        self.ids[rows, t], self.top[rows, t], self.tail[rows, t] = ids.int().cpu(), top.cpu(), tail.cpu()
        self.step += 1
        if t == self.max_new:  # cut answers end here, as their rendered turn does
            cut = (self.ended[rows] < 0).to(scores.device)
            scores = scores.clone()
            scores[cut] = -torch.inf
            scores[cut, self.eos_id] = 0.0
        return scores

    def note(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """The tokens (b,) rows chose at the step just recorded: an end of turn ends its row there."""
        new = (self.ended[rows] < 0) & (tokens.cpu() == self.eos_id)
        self.ended[rows[new]] = self.step - 1

    def complete(self, rows: torch.Tensor) -> torch.Tensor:
        """(b,) whether each row has its rows through the step after its end of turn."""
        ended = self.ended[rows]
        return (ended >= 0) & (ended <= self.step - 2)


def answer_length(recorder: Recorder, b: int) -> int:
    """Answer tokens of row b, its end of turn excluded (the forced one of a cut answer included)."""
    ended = int(recorder.ended[b])
    return ended if ended >= 0 else recorder.max_new


def save_batch(directory: Path, example_ids: list[str], prompts: list[list[int]], answers: list[list[int]],
               recorder: Recorder, *, weights: str) -> Path:
    """One generation batch's rows: example b keeps steps 0 … len(answer) + 1 (answer, end of turn, after)."""
    directory.mkdir(parents=True, exist_ok=True)
    ids, top, tail, tokens, rows, lens = [], [], [], [], [0], [0]
    for b, (prompt, answer) in enumerate(zip(prompts, answers)):
        n = len(answer) + 2
        ids.append(recorder.ids[b, :n].numpy())
        top.append(recorder.top[b, :n].numpy())
        tail.append(recorder.tail[b, :n].numpy())
        tokens.append(np.asarray(prompt + answer + [recorder.eos_id], dtype=np.int64))
        rows.append(rows[-1] + n)
        lens.append(lens[-1] + len(tokens[-1]))
    name = "batch-" + hashlib.sha256("\n".join(example_ids).encode()).hexdigest()[:16] + ".safetensors"
    final = directory / name
    tmp = final.with_name(name + ".tmp")
    save_file({"ids": np.concatenate(ids), "top": np.concatenate(top), "tail": np.concatenate(tail),
               "tokens": np.concatenate(tokens), "row_offsets": np.asarray(rows, dtype=np.int64),
               "token_offsets": np.asarray(lens, dtype=np.int64)}, str(tmp),
              metadata={"example_ids": json.dumps(example_ids), "k": str(recorder.k),
                        "temperature": repr(float(recorder.temperature)), "weights": weights})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def load_captured(directory: Path, *, k: int, temperature: float, weights: str) -> dict[str, tuple]:
    """example id → (tokens (L,) int64, ids (R, k), top (R, k), tail (R,)) from every batch file whose teacher
    weights, k and temperature are the cache's; others are skipped (their examples are computed)."""
    captured, skipped = {}, 0
    for path in sorted(Path(directory).glob("batch-*.safetensors")) if Path(directory).is_dir() else []:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata()
            if (meta.get("weights") != weights or int(meta.get("k", -1)) != k
                    or float(meta.get("temperature", "nan")) != float(temperature)):
                skipped += 1
                continue
            t = {name: f.get_tensor(name) for name in f.keys()}
        rows, lens = t["row_offsets"], t["token_offsets"]
        for j, ex_id in enumerate(json.loads(meta["example_ids"])):
            r = slice(rows[j], rows[j + 1])
            captured[ex_id] = (t["tokens"][lens[j]:lens[j + 1]], t["ids"][r], t["top"][r], t["tail"][r])
    if skipped:
        log.info("%s: %d batch file(s) from another teacher, k or temperature not used", directory, skipped)
    return captured
