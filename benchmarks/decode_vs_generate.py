"""The teacher's greedy answers: kdkit's decode loop (finished rows leave the batch) against transformers'
generate() (every row computed until the longest one ends), on the packaged teacher (not a test).

    python benchmarks/decode_vs_generate.py [--prompts 192] [--batch 96] [--max-new-tokens 96]

The quickstart's training prompts, its teacher as the run holds it (bf16 where the CPU has it), left-padded
batches sorted by prompt length as `generate_answers` makes them. Interleaved batch by batch in this process,
so the machine's drift hits all alike: generate() greedy, `decode` plain, and `decode` keeping the top-64 rows
(what the quickstart runs). Prints answers/s of each, the ratio to generate(), how many answers are identical
to generate()'s token for token, and the share of row-steps generate() spent on rows that had ended."""

from __future__ import annotations

import argparse
import time
from importlib.resources import files
from pathlib import Path

import torch

from kdkit.config import load_config
from kdkit.data.collate import collate
from kdkit.data.render import render_prompt
from kdkit.data.sources import load_examples
from kdkit.teacher.gen_signal import Recorder
from kdkit.teacher.generate import decode
from kdkit.train.setup import forward_teacher, load_teacher, signal_vocab


def _rows(tokens: torch.Tensor, eos: int) -> list[list[int]]:
    """Each row up to and including its first end of sequence."""
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=192)
    parser.add_argument("--batch", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    cfg = load_config(Path(str(files("kdkit") / "configs" / "quickstart.yaml")), [])
    teacher = load_teacher(cfg)
    model = forward_teacher(cfg, teacher).eval()
    tok = teacher.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompts = load_examples(str(files("kdkit") / "assets" / "instructions" / "train.jsonl"))[: args.prompts]
    rendered = sorted((render_prompt(e, tok) for e in prompts), key=len)
    seconds = {"generate()": 0.0, "decode": 0.0, "decode + top-k rows": 0.0}
    answers = {name: [] for name in seconds}
    wasted = total = 0
    for start in range(0, len(rendered), args.batch):
        chunk = rendered[start:start + args.batch]
        batch = collate(chunk, chunk, pad_id=pad, side="left")
        width = batch["input_ids"].shape[1]
        for name in seconds:
            t0 = time.perf_counter()
            with torch.no_grad():
                if name == "generate()":
                    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         max_new_tokens=args.max_new_tokens, do_sample=False, top_k=None,
                                         pad_token_id=pad, eos_token_id=eos)[:, width:]
                else:
                    recorder = (Recorder(batch=len(chunk), max_new_tokens=args.max_new_tokens, k=cfg.teacher.top_k,
                                         temperature=cfg.loss.temperature, vocab=signal_vocab(teacher), eos_id=eos)
                                if "rows" in name else None)
                    out = decode(model, batch["input_ids"], batch["attention_mask"],
                                 max_new_tokens=args.max_new_tokens, pad_id=pad, eos_id=eos, recorder=recorder)
            seconds[name] += time.perf_counter() - t0
            rows = _rows(out, eos)
            if "rows" in name:  # cut answers: the forced end of turn is not generate()'s
                rows = [r[: args.max_new_tokens] for r in rows]
            answers[name] += rows
            if name == "generate()":
                steps = out.shape[1]
                total += steps * len(chunk)
                wasted += sum(steps - len(r) for r in rows)
    base = seconds["generate()"]
    print(f"{len(rendered)} prompts, batch {args.batch}, {args.max_new_tokens} new tokens, teacher in {model.dtype}, "
          f"{torch.get_num_threads()} threads; generate() spent {wasted / total:.0%} of its row-steps on ended rows")
    print("| | answers/s | × generate() | identical to generate() |")
    print("|---|---|---|---|")
    for name, s in seconds.items():
        same = sum(a == b for a, b in zip(answers[name], answers["generate()"]))
        print(f"| {name} | {len(rendered) / s:.2f} | {base / s:.2f}× | {same}/{len(rendered)} |")


if __name__ == "__main__":
    main()
