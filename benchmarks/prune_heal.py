"""Pruning healed by distillation (issue 7): four students of the same size, equal training steps.

    python benchmarks/prune_heal.py --train RUN/data/train.jsonl --eval RUN/data/eval.jsonl \
        [--teacher smollm2-135m-instruct] [--target 0.5] [--method width] [--steps 20]

--train/--eval: teacher-written chat data (`kdkit generate`, or a quickstart run's RUN_DIR/data/).

(a) importance-pruned teacher (prune.method, ~target of the parameters) + KD from the teacher
(b) uniformly layer-dropped teacher of the nearest parameter count + KD
(c) randomly initialised model with (a)'s config + KD
(d) the same importance-pruned teacher as (a) + cross-entropy only (loss.alpha = 0)
Printed: held-out cross-entropy and KL(teacher ‖ student) before and after the same number of steps.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from kdkit.config import PruneConfig, build_config
from kdkit.data.render import tokenize_examples
from kdkit.data.sources import load_examples
from kdkit.eval.retention import evaluate_models
from kdkit.models.load import (count_parameters, freeze, load_model, load_tokenizer, resolve, student_from_layers,
                              uniform_layers)
from kdkit.prune import compute_importance, prune_model
from kdkit.prune.depth import layers_for_target
from kdkit.signal import Provenance
from kdkit.teacher.online import online_signal_fn
from kdkit.train.loop import distill


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--target", type=float, default=0.5, help="fraction of the teacher's parameters")
    ap.add_argument("--method", default="width", choices=["width", "depth", "both"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--calibration", type=int, default=16, help="training rows used for importance")
    ap.add_argument("--limit", type=int, default=24, help="held-out rows evaluated")
    ap.add_argument("--round-to", type=int, default=32)
    args = ap.parse_args()
    t0 = time.perf_counter()
    src = resolve(args.teacher)
    teacher, tok = freeze(load_model(src)), load_tokenizer(src)
    train = tokenize_examples(load_examples(args.train), tok, max_length=args.max_length)
    held = tokenize_examples(load_examples(args.eval)[: args.limit], tok, max_length=args.max_length)
    calib = copy.copy(train)
    calib.input_ids, calib.labels = train.input_ids[: args.calibration], train.labels[: args.calibration]
    vocab = teacher.config.vocab_size
    print(f"teacher loaded in {time.perf_counter() - t0:.0f}s; {len(train.input_ids)} train / "
          f"{len(held.input_ids)} held-out rows")

    t = time.perf_counter()
    imp = compute_importance(teacher, calib, pad_id=tok.pad_token_id, batch_size=4, layer_ppl=args.method != "width")
    pruned, summary = prune_model(teacher, imp, PruneConfig(method=args.method, target_params=args.target,
                                                            round_to=args.round_to))
    print(f"importance + pruning in {time.perf_counter() - t:.0f}s: {summary}")
    total = count_parameters(teacher)
    n = layers_for_target(teacher, summary["params_after"])
    uniform = student_from_layers(teacher, uniform_layers(teacher.config.num_hidden_layers, n))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        random = AutoModelForCausalLM.from_config(copy.deepcopy(pruned.config))
    students = {"(a) importance-pruned + KD": (pruned, 1.0), "(b) uniform layer drop + KD": (uniform, 1.0),
                "(c) random init + KD": (random, 1.0), "(d) importance-pruned + CE only": (copy.deepcopy(pruned), 0.0)}

    def evaluate(model):
        m = evaluate_models({"s": model}, teacher, held, vocab=vocab, pad_id=tok.pad_token_id, batch_size=8)["s"]
        return m["ce"], m["kl_to_teacher"]

    teacher_ce = evaluate_models({}, teacher, held, vocab=vocab, pad_id=tok.pad_token_id)["teacher"]["ce"]
    signal_fn = online_signal_fn(teacher, vocab=vocab, provenance=Provenance(teacher_id=src.id))
    rows = []
    for name, (model, alpha) in students.items():
        before = evaluate(model)
        cfg = build_config({"loss": {"alpha": alpha}, "train": {
            "max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": 2,
            "device": "cpu", "precision": "fp32"}})
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            distill(model, signal_fn, train, cfg, run_dir=Path(run_dir), vocab=vocab, pad_id=tok.pad_token_id)
        after = evaluate(model)
        rows.append((name, count_parameters(model), *before, *after, time.perf_counter() - t))
        print(f"{name}: {time.perf_counter() - t:.0f}s", flush=True)

    print(f"\nteacher: {total:,} parameters, held-out CE {teacher_ce:.3f}; {args.steps} steps × batch "
          f"{args.batch_size}, lr {args.lr}, max_length {args.max_length}, "
          f"{args.method} pruning to {args.target:.0%}\n")
    print("| student | params | CE before | KL before | CE after | KL after | train s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, p, ce0, kl0, ce1, kl1, s in rows:
        print(f"| {name} | {p / 1e6:.1f}M ({p / total:.0%}) | {ce0:.3f} | {kl0:.3f} | {ce1:.3f} | {kl1:.3f} "
              f"| {s:.0f} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
