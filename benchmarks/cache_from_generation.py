"""The quickstart's cache with and without the rows kept during generation, on the packaged teacher.

The same prompts are answered twice, interleaved batch by batch in this process: plain greedy generation,
and generation that keeps the teacher's top-k rows (`teacher.cache_from_generation`). Then the cache is
built twice from the same answers: by a teacher pass over every example (`cache_from_generation: false`)
and from the kept rows. Prints answers/s of both generations (and whether the answers are identical),
the seconds of both cache builds, how many examples each source gave, and how close the two caches are:
top-1 id agreement, max |Δ log-prob| of the top-1, and the mean KL between their top-k distributions.

Run: python benchmarks/cache_from_generation.py [--prompts 192] [--batch 96]"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from kdkit.data.render import tokenize_examples
from kdkit.data.sources import load_examples
from kdkit.teacher.cache import CacheReader, build_cache
from kdkit.teacher.gen_signal import load_captured, signal_dir
from kdkit.teacher.generate import generate_answers
from kdkit.config import load_config
from kdkit.train.setup import forward_teacher, load_teacher, signal_vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=192)
    parser.add_argument("--batch", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    cfg = load_config(Path(str(files("kdkit") / "configs" / "quickstart.yaml")), [])
    teacher = load_teacher(cfg)
    model = forward_teacher(cfg, teacher)
    tok = teacher.tokenizer
    vocab = signal_vocab(teacher)
    weights = teacher.weights_hash()
    spec = {"k": cfg.teacher.top_k, "temperature": cfg.loss.temperature, "vocab": vocab, "weights": weights}
    prompts = load_examples(str(files("kdkit") / "assets" / "instructions" / "train.jsonl"))[: args.prompts]
    work = Path(tempfile.mkdtemp(prefix="kdkit-cfg-"))
    seconds = {"plain": 0.0, "kept": 0.0}
    for start in range(0, len(prompts), args.batch):  # interleaved: the machine's drift hits both alike
        chunk = prompts[start:start + args.batch]
        for name, signal in (("plain", None), ("kept", spec)):
            t0 = time.perf_counter()
            generate_answers(model, tok, chunk, work / f"{name}.jsonl", max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch, signal=signal)
            seconds[name] += time.perf_counter() - t0
    answers = {name: [json.loads(line)["messages"][-1]["content"] for line in open(work / f"{name}.jsonl")]
               for name in seconds}
    same = sum(a == b for a, b in zip(answers["plain"], answers["kept"]))
    data = tokenize_examples(load_examples(str(work / "kept.jsonl")), tok, max_length=cfg.data.max_length)
    captured = load_captured(signal_dir(work / "kept.jsonl"), **{k: spec[k] for k in ("k", "temperature", "weights")})
    build = {}
    for name, rows in (("teacher pass", None), ("kept rows", captured)):
        t0 = time.perf_counter()
        build_cache(model, data, work / name.replace(" ", "_"), k=spec["k"], temperature=spec["temperature"],
                    provenance=teacher.provenance(spec["temperature"]), vocab=vocab, weights=weights,
                    batch_size=cfg.teacher.cache_batch_size, captured=rows, progress=False)
        build[name] = time.perf_counter() - t0
    a, b = (CacheReader(work / n).signal(data.ids) for n in ("teacher_pass", "kept_rows"))
    top1 = float((a.ids[:, 0] == b.ids[:, 0]).float().mean())
    dtop = float((a.logprobs[:, 0] - b.logprobs[:, 0]).abs().max())
    kl = float(_topk_kl(a, b).mean())
    matched = sum(1 for r in range(len(data.ids)) if data.ids[r] in captured)
    print(f"{len(prompts)} prompts, batch {args.batch}, {args.max_new_tokens} new tokens, teacher in {model.dtype}")
    print("| | plain generation | generation keeping rows |")
    print("|---|---|---|")
    print(f"| answers/s | {len(prompts) / seconds['plain']:.2f} | {len(prompts) / seconds['kept']:.2f} |")
    print(f"| identical answers | | {same}/{len(prompts)} |")
    print(f"\ncache build: teacher pass {build['teacher pass']:.1f} s, from kept rows {build['kept rows']:.1f} s "
          f"({matched} examples had kept rows)")
    print(f"kept rows against the teacher pass, {a.num_tokens} positions: top-1 id agreement {top1:.4f}, "
          f"max |Δ top-1 log-prob| {dtop:.4f}, mean KL(pass ‖ kept) over the top-k {kl:.5f} nats")


def _topk_kl(a, b) -> torch.Tensor:
    """(N,) KL between two sparse signals' distributions over a's top-k ids (b's log-prob of an id it lacks:
    its tail spread evenly over the vocabulary it did not list, a bound that only matters if ids differ)."""
    floor = np.log(1e-12)
    out = []
    for i in range(a.num_tokens):
        pb = dict(zip(b.ids[i].tolist(), b.logprobs[i].tolist()))
        la = a.logprobs[i]
        lb = torch.tensor([pb.get(t, floor) for t in a.ids[i].tolist()])
        out.append(float((la.exp() * (la - lb)).sum()))
    return torch.tensor(out)


if __name__ == "__main__":
    main()
