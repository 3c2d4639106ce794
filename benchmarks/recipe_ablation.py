"""The quickstart's ingredients switched one at a time, each row at the same wall-clock budget (not a test).

    python benchmarks/recipe_ablation.py [--budget 600] [--rows default init=uniform ...] [--threads 2]
                                         [--train runs/exp/data/train.jsonl --eval runs/exp/data/eval.jsonl]

Every row is the quickstart recipe (kdkit/configs/quickstart.yaml) with ONE change, run in its own
process, alone, from a cold compile cache: a named row (ROWS) or one written as overrides
(`--rows default train.lr=7e-4 loss.alpha=0.9,train.weight_decay=0.1`; commas join several). The teacher's answers (the data) are generated once and shared (or read from --train and
--eval: answers the quickstart recipe generated before); a row's budget covers
everything after that: pruning (importance included), the top-k cache when the row reads one, and
training, whose step count is what fits the rest of the budget (`train.max_seconds`: the loop times
its first steps). Printed per row: held-out KL(teacher ‖ student), top-1 agreement, the share of the
cross-entropy gap closed (relative to the untrained uniform 10-of-30-layer student, as the quickstart
reports it), steps trained and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

BY_TARGET = ["prune.target_params=0.494", "prune.hidden_size=null", "prune.intermediate_size=null"]
ROWS = {  # name → overrides of the quickstart recipe
    "default": [],
    "init=uniform": ["prune.method=none", "student.init=teacher_layers", "student.num_layers=10"],
    # the default prunes to explicit widths (49.4% of the teacher); depth and both prune to that size by target
    "init=depth": ["prune.method=depth", *BY_TARGET],
    "init=width": ["prune.method=width"],  # = default (the quickstart prunes width); not run unless named
    "init=both": ["prune.method=both", *BY_TARGET],
    "data=160": ["@rows=160"],  # the first N of the teacher's answers (one per prompt, in the file's order)
    "data=320": ["@rows=320"],  # the 320 instructions the quickstart shipped before the 1,583
    "signal=online": ["teacher.signal=online"],
    "signal=top64": ["teacher.top_k=64"],  # the cache's top 64 log-probs instead of the default's 256
    "loss=reverse_kl": ["loss.divergence=reverse_kl"],
    "loss=jsd": ["loss.divergence=jsd", "loss.beta=0.5"],
    "+hidden": ["teacher.signal=online", "features.hidden.weight=1.0"],  # hidden states need the online teacher
}


def row_overrides(name: str) -> list[str]:
    """A named row's overrides, or the row itself when it is written as overrides: `train.lr=7e-4,loss.alpha=0.9`."""
    if name in ROWS:
        return ROWS[name]
    changes = name.split(",")
    if not all("=" in c and "." in c.split("=")[0] for c in changes):
        raise SystemExit(f"row {name!r}: not one of {', '.join(ROWS)}, nor overrides such as train.lr=7e-4")
    return changes


def quickstart_config(run_dir: Path, overrides: list[str]):
    from kdkit.config import load_config

    preset = Path(str(files("kdkit") / "configs" / "quickstart.yaml"))
    cfg = load_config(preset, [f"run.dir={run_dir}", *overrides])
    assets = files("kdkit") / "assets" / "instructions"
    cfg.generate.prompts = cfg.generate.prompts or str(assets / "train.jsonl")
    cfg.generate.eval_prompts = cfg.generate.eval_prompts or str(assets / "heldout.jsonl")
    return cfg


def generate_once(work: Path) -> tuple[Path, Path, float]:
    """The quickstart's teacher answers, generated once for every row (resumable)."""
    from kdkit.recipes import generate

    cfg = quickstart_config(work / "data-run", [])
    t0 = time.perf_counter()
    paths = generate.run(cfg)
    return paths["train"], paths["eval"], time.perf_counter() - t0


def reference_ce(work: Path, eval_path: Path) -> dict:
    """Held-out CE of the teacher and of the untrained uniform 10-layer student: the gap's two ends."""
    from kdkit.eval.retention import evaluate_models
    from kdkit.models.load import head_rows
    from kdkit.train.setup import build_student, load_teacher, tokenize_file

    cache = work / "reference.json"
    if cache.exists():
        return json.loads(cache.read_text())
    cfg = quickstart_config(work / "ref-run", ["prune.method=none", "student.init=teacher_layers",
                                               "student.num_layers=10", f"data.eval={eval_path}"])
    teacher = load_teacher(cfg)
    student, tok, _ = build_student(cfg, teacher)
    held = tokenize_file(cfg.data.eval, tok, cfg, key="data.eval")
    m = evaluate_models({"uniform": student}, teacher.model, held, vocab=head_rows(student),
                        pad_id=tok.pad_token_id, batch_size=cfg.eval.batch_size)
    out = {"teacher_ce": m["teacher"]["ce"], "untrained_ce": m["uniform"]["ce"]}
    cache.write_text(json.dumps(out))
    return out


def one_row(name: str, *, work: Path, train: Path, eval_path: Path, budget: float) -> dict:
    """One row in this process: setup stages timed, training fills the rest of the budget."""
    from kdkit.recipes import cache, distill, prune
    from kdkit.train.setup import load_teacher

    changes = row_overrides(name)
    overrides = [o for o in changes if not o.startswith("@")]
    rows = next((int(o.split("=")[1]) for o in changes if o.startswith("@rows=")), None)
    if rows:  # the first N of the shared answers
        subset = work / f"train-{rows}.jsonl"
        subset.write_text("".join(train.read_text().splitlines(keepends=True)[:rows]))
        train = subset
    run_dir = work / "rows" / name.replace("=", "-").replace("+", "plus-").replace(",", "_")
    cfg = quickstart_config(run_dir, [*overrides, f"data.train={train}", f"data.eval={eval_path}",
                                      "eval.speed=false", "eval.student_before=false", "train.save_every=0"])
    teacher = load_teacher(cfg)  # loading the teacher is not part of the budget (every row does it alike)
    t0 = time.perf_counter()
    if cfg.prune.method != "none":
        prune.run(cfg, teacher=teacher)
        prune.use_pruned(cfg)
    if cfg.teacher.signal == "cache":
        cache.run(cfg, teacher=teacher)
    setup = time.perf_counter() - t0
    cfg.train.max_steps = 10_000
    cfg.train.max_seconds = max(budget - setup, 1.0)
    out = distill.run(cfg, teacher=teacher)
    seconds = time.perf_counter() - t0
    after = out["metrics"]["student_after"]
    return {"row": name, "kl": after["kl_to_teacher"], "top1": after["top1_agreement"], "ce": after["ce"],
            "params": after["params"], "steps": out["history"][-1]["step"], "setup_s": setup, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=600.0, help="seconds per row after data generation")
    ap.add_argument("--rows", nargs="*", default=[r for r in ROWS if r != "init=width"],
                    help=f"named rows ({', '.join(ROWS)}) or rows written as overrides (train.lr=7e-4,loss.alpha=0.9)")
    ap.add_argument("--train", type=Path, help="the teacher's answers to train on (default: generate them once)")
    ap.add_argument("--eval", type=Path, help="the held-out answers (with --train)")
    ap.add_argument("--work", type=Path, default=Path("runs/recipe_ablation"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if (args.train is None) != (args.eval is None):
        ap.error("--train and --eval go together")
    args.work.mkdir(parents=True, exist_ok=True)
    for name in args.rows:
        row_overrides(name)  # an unknown row fails before any work
    if args.train:
        train, eval_path, gen_s = args.train.resolve(), args.eval.resolve(), 0.0
    else:
        train, eval_path, gen_s = generate_once(args.work)
    if args.one:
        print("ROW " + json.dumps(one_row(args.one, work=args.work, train=train, eval_path=eval_path,
                                            budget=args.budget)))
        return
    ref = reference_ce(args.work, eval_path)
    print(f"data: {train} ({gen_s:.0f} s to generate or resume); teacher CE {ref['teacher_ce']:.3f}, "
          f"untrained uniform 10-layer CE {ref['untrained_ce']:.3f}; budget {args.budget:.0f} s per row")
    results = []
    for name in args.rows:  # each row alone, in its own process
        cmd = [sys.executable, __file__, "--one", name, "--budget", str(args.budget), "--work", str(args.work),
               "--threads", str(args.threads), *(["--train", str(train), "--eval", str(eval_path)] if args.train else [])]
        with tempfile.TemporaryDirectory() as inductor:  # a cold compile cache for every row alike
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "TQDM_DISABLE": "1", "TORCHINDUCTOR_CACHE_DIR": inductor})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("ROW ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            continue
        r = json.loads(line[4:])
        r["gap"] = (ref["untrained_ce"] - r["ce"]) / (ref["untrained_ce"] - ref["teacher_ce"])
        results.append(r)
        print(f"  {name}: KL {r['kl']:.3f}, top-1 {r['top1']:.1%}, gap {r['gap']:.1%}, {r['steps']} steps, "
              f"{r['seconds']:.0f} s", flush=True)
    print("\n| row | held-out KL | top-1 | CE gap closed | params | steps | setup s | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['kl']:.3f} | {r['top1']:.1%} | {r['gap']:.1%} | {r['params']:,} | {r['steps']} | "
              f"{r['setup_s']:.0f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
