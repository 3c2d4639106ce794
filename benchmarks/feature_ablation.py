"""White-box ablation at equal steps: logits only vs + hidden states vs + hidden + attention vs hidden only.

Packaged teacher (smollm2-135m-instruct, 30 layers) → the quickstart student (10 of its layers), trained on
configs/data/smollm2_answers.jsonl and evaluated on configs/data/smollm2_heldout.jsonl:
    python benchmarks/feature_ablation.py --steps 30 --batch-size 4 --max-length 128
Prints, per mode, held-out KL(teacher ‖ student) and CE (kdkit.eval.retention.evaluate_models, dense fp32),
their ratio to logits-only, and the median seconds per training step, all measured side by side in this
one process (machines are shared: compare ratios, not absolute times). Defaults run in ~10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import statistics
import tempfile
import time
from importlib.resources import files
from pathlib import Path

from kdkit.config import load_config
from kdkit.eval.retention import evaluate_models
from kdkit.models.load import head_rows, load_model, resolve, shared_vocab_size
from kdkit.recipes import distill
from kdkit.train.setup import build_student, load_teacher, tokenize_file

DATA = Path(__file__).resolve().parents[1] / "configs" / "data"


def modes(args) -> list[tuple[str, list[str]]]:
    """(name, config overrides) of each arm; the auxiliary arms balance each term to the KD magnitude."""
    hidden = [f"features.hidden.weight={args.beta}", f"features.hidden.distance={args.distance}",
              f"features.hidden.layers={args.hidden_layers}", f"features.hidden.position={args.position}"]
    attention = [f"features.attention.weight={args.gamma}", f"features.attention.layers={args.attention_layers}",
                 f"features.attention.loss={args.attention_loss}"]
    return [
        ("logits only", []),
        ("logits + hidden", hidden + [f"features.weighting={args.weighting}"]),
        ("logits + hidden + attention", hidden + attention + [f"features.weighting={args.weighting}"]),
        ("hidden only", hidden + ["features.kd_weight=0", "features.weighting=static"]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train", type=Path, default=DATA / "smollm2_answers.jsonl")
    ap.add_argument("--eval", type=Path, default=DATA / "smollm2_heldout.jsonl")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N held-out rows only")
    ap.add_argument("--distance", default="cosine", help="features.hidden.distance")
    ap.add_argument("--position", default="pre", help="features.hidden.position (pre|post)")
    ap.add_argument("--hidden-layers", type=int, default=2)
    ap.add_argument("--attention-layers", type=int, default=2)
    ap.add_argument("--attention-loss", default="kl")
    ap.add_argument("--weighting", default="balanced", help="weighting of the logits + feature arms")
    ap.add_argument("--beta", type=float, default=0.5, help="hidden-state weight β")
    ap.add_argument("--gamma", type=float, default=0.5, help="attention weight γ")
    args = ap.parse_args()
    preset = Path(str(files("kdkit") / "configs" / "quickstart.yaml"))
    t_all = time.perf_counter()
    students, step_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(modes(args)):
            over = [f"run.dir={tmp}/{i}", f"data.train={args.train}", f"data.max_length={args.max_length}",
                    f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
                    f"train.threads={args.threads}", "train.save_every=0",
                    f"train.warmup_steps={min(10, args.steps // 5)}", *extra]
            cfg = load_config(preset, over)  # no data.eval: every student is evaluated below, in one teacher pass
            if not students:
                teacher = load_teacher(cfg)
                held_out = tokenize_file(str(args.eval), teacher.tokenizer, cfg, key="data.eval")
                if args.eval_limit:
                    n = args.eval_limit
                    held_out = replace(held_out, ids=held_out.ids[:n], input_ids=held_out.input_ids[:n],
                                       labels=held_out.labels[:n])
                students["student before"] = build_student(cfg, teacher)[0].eval()
            res = distill.run(cfg, teacher=teacher)
            students[name] = load_model(resolve(str(res["student_dir"]))).eval()
            step_s[name] = statistics.median(h["tokens"] / h["tokens_per_s"] for h in res["history"])  # robust to noise
    vocab = shared_vocab_size(teacher.tokenizer, teacher.tokenizer, head_rows(teacher.model),
                              head_rows(students["student before"]))
    metrics = evaluate_models(students, teacher.model, held_out, vocab=vocab, pad_id=teacher.tokenizer.pad_token_id,
                              batch_size=8)
    rows = [(name, metrics[name]["kl_to_teacher"], metrics[name]["ce"], step_s[name]) for name in step_s]
    teacher_ce, before = metrics["teacher"]["ce"], metrics["student before"]
    base_kl, base_ce, base_s = rows[0][1], rows[0][2], rows[0][3]
    print(f"\n{args.steps} steps each, batch {args.batch_size}, max_length {args.max_length}, {args.threads} threads; "
          f"hidden: {args.distance} ({args.position}-norm, {args.hidden_layers} pairs, β={args.beta}); attention: "
          f"{args.attention_loss} ({args.attention_layers} pairs, γ={args.gamma}); weighting {args.weighting}")
    print(f"held-out ({args.eval.name}, {metrics['teacher']['eval_tokens']} tokens): teacher CE {teacher_ce:.3f}; "
          f"student before KL {before['kl_to_teacher']:.3f}, CE {before['ce']:.3f}")
    print("| mode | held-out KL | / logits only | held-out CE | / logits only | median s/step | vs logits only |")
    print("|---|---|---|---|---|---|---|")
    for name, kl, ce, secs in rows:
        print(f"| {name} | {kl:.3f} | {kl / base_kl:.3f} | {ce:.3f} | {ce / base_ce:.3f} | {secs:.2f} | "
              f"{secs / base_s:.2f}x |")
    print(f"total wall time {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
