"""Offline (top-k cache) vs online distillation at equal steps, on the packaged teacher.

Uses the teacher-written data of a quickstart run:
    python benchmarks/offline_kd.py --data runs/quickstart/data --steps 60
Prints held-out KL to the teacher (dense, fp32) for online and offline k in {8, 32, 64}, the ratio
to online, seconds per training step (with and without the teacher forward), cache build time and
bytes per token — all measured side by side in this one process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from importlib.resources import files
from pathlib import Path

from kdkit.config import load_config
from kdkit.recipes import cache, distill
from kdkit.teacher.cache import read_manifest
from kdkit.train.setup import load_teacher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True, help="folder with train.jsonl and eval.jsonl")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--ks", default="64,32,8")
    args = ap.parse_args()
    preset = Path(str(files("kdkit") / "configs" / "quickstart.yaml"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        modes = [("online", None)] + [(f"cache k={k}", int(k)) for k in args.ks.split(",")]
        teacher = None
        for name, k in modes:
            over = [f"run.dir={tmp}/{name.replace(' ', '_')}", f"data.train={args.data / 'train.jsonl'}",
                    f"data.eval={args.data / 'eval.jsonl'}", f"train.max_steps={args.steps}",
                    "train.save_every=0", "eval.student_before=false"]
            if k:
                over += ["teacher.signal=cache", f"teacher.top_k={k}"]
            cfg = load_config(preset, over)
            teacher = teacher or load_teacher(cfg)
            build_s, bpt = 0.0, None
            if k:
                t0 = time.perf_counter()
                out = cache.run(cfg, teacher=teacher)
                build_s = time.perf_counter() - t0
                bpt = read_manifest(out)["bytes_per_token"]
            t0 = time.perf_counter()
            res = distill.run(cfg, teacher=teacher)
            step_s = statistics.median(h["tokens"] / h["tokens_per_s"] for h in res["history"])  # robust to noise
            rows.append((name, res["metrics"]["student_after"]["kl_to_teacher"], step_s, build_s, bpt))
    online_kl, online_step = rows[0][1], rows[0][2]
    print(f"\n{args.steps} steps each; held-out KL(teacher ‖ student), dense fp32")
    print("| mode | held-out KL | / online | median s/step | speed vs online | cache build s | bytes/token |")
    print("|---|---|---|---|---|---|---|")
    for name, kl, step_s, build_s, bpt in rows:
        print(f"| {name} | {kl:.3f} | {kl / online_kl:.3f} | {step_s:.2f} | {online_step / step_s:.2f}x | "
              f"{build_s:.0f} | {bpt if bpt is not None else '-'} |")


if __name__ == "__main__":
    main()
