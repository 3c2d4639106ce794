"""The quickstart's own training step, timed phase by phase over many steps (not a test).

    python benchmarks/quickstart_step.py runs/quickstart              # after a `kdkit quickstart`
    python benchmarks/quickstart_step.py runs/quickstart --steps 40 --every 10
    python benchmarks/quickstart_step.py runs/quickstart train.compile=false     # eager (the quickstart compiles)
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/quickstart_step.py runs/quickstart

It rebuilds exactly what `kdkit distill` trains in RUN_DIR (its config.yaml, its pruned student, its
top-k cache and data) and runs `train_step` + `optimizer_step` as the loop does, printing seconds per step,
the resident memory and the page faults so far every `--every` steps (a step that allocates fresh memory
faults its pages in: the number to watch on a CPU), then one step split into phases (teacher signal,
student forward, fused loss, backward, optimizer). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kdkit  # noqa: E402,F401  first: its CPU settings (kdkit/__init__.py) must precede any torch op

import torch  # noqa: E402


def rss_gb() -> float:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1e6


def rebuild(run_dir: Path, overrides: list[str]):
    """What `kdkit distill` trains in RUN_DIR: (cfg, student, tokenizer, data, signal_fn, vocab, undo), the
    student switched to kdkit's CPU attention and, with train.compile, its layers compiled (`undo`: eager
    again, else None). benchmarks/step_floor.py --run-dir times the same step."""
    from kdkit.config import load_config
    from kdkit.models.attention import train_attention
    from kdkit.models.forward import compile_layers, tied_embedding_backward
    from kdkit.recipes.distill import signal_source
    from kdkit.train.setup import build_student, load_teacher, tokenize_file

    cfg = load_config(run_dir / "config.yaml", [f"run.dir={run_dir / 'bench'}",
                                                f"teacher.cache_dir={run_dir / 'cache'}", *overrides])
    teacher = load_teacher(cfg)
    student, tok, _ = build_student(cfg, teacher)
    train = tokenize_file(cfg.data.train, tok, cfg, key="data.train")
    signal_fn, vocab = signal_source(cfg, teacher, tok, student, train)
    train_attention(student)  # as `kdkit distill` does
    tied_embedding_backward(student)  # as `kdkit distill` does on a CPU
    undo = compile_layers(student, device=torch.device("cpu")) if cfg.train.compile else None  # as distill does
    return cfg, student, tok, train, signal_fn, vocab, undo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.group_by_length=16")
    args = ap.parse_intermixed_args()

    from kdkit.losses import fused_distill_loss
    from kdkit.models.forward import decoder_hidden, decoder_mask, supervised_rows, with_host_plan
    from kdkit.train.loop import autocast, compute_dtype, micro_batches, optimizer_step, train_step
    from kdkit.train.optim import build_optimizer

    cfg, student, tok, train, signal_fn, vocab, _ = rebuild(args.run_dir, args.overrides)
    student.train()
    opt, sched = build_optimizer(student, cfg.train)
    tc, device = cfg.train, torch.device("cpu")
    print(f"precision {compute_dtype(device, tc.precision)}, batch {tc.batch_size}, {len(train.ids)} examples")

    def batches(i):
        return micro_batches(train, i, batch_size=tc.batch_size, grad_accum=1, seed=tc.seed, pad_id=tok.pad_token_id,
                            group_by_length=tc.group_by_length)

    t0, tokens = time.perf_counter(), 0
    for i in range(args.steps):
        m = train_step(student, batches(i), signal_fn, cfg, vocab=vocab, device=device, precision=tc.precision,
                       metrics=(i + 1) % tc.log_every == 0, settle=False)
        optimizer_step(student, opt, sched, m, tc, step=i + 1, ids=[])
        tokens += m["tokens"]
        if (i + 1) % args.every == 0:
            t1 = time.perf_counter()
            print(f"steps {i + 2 - args.every}-{i + 1}: {(t1 - t0) / args.every:.3f} s/step, "
                  f"{tokens / (t1 - t0):.0f} tokens/s, RSS {rss_gb():.2f} GB, "
                  f"page faults so far {resource.getrusage(resource.RUSAGE_SELF).ru_minflt:,}", flush=True)
            t0, tokens = t1, 0

    phases = {}
    b = with_host_plan(batches(args.steps)[0])
    t = [time.perf_counter()]
    with autocast(device, tc.precision):
        signal = signal_fn(b)
        t.append(time.perf_counter())
        hidden = decoder_hidden(student, b["input_ids"], decoder_mask(b))  # (B, T, H)
        t.append(time.perf_counter())
        rows, targets = supervised_rows(hidden, b)  # (N, H), (N,)
        out = fused_distill_loss(rows, student.get_output_embeddings().weight, targets, teacher_logits=signal,
                                 matmul_dtype=None if compute_dtype(device, tc.precision) == torch.float32
                                 else torch.bfloat16, all_supervised=True, num_tokens=len(targets))
        t.append(time.perf_counter())
    out.total.backward()
    t.append(time.perf_counter())
    opt.step()
    opt.zero_grad(set_to_none=True)
    t.append(time.perf_counter())
    for name, a, z in zip(["signal", "student forward", "fused loss", "backward", "optimizer"], t, t[1:]):
        phases[name] = z - a
    print("one step: " + ", ".join(f"{k} {v:.3f} s" for k, v in phases.items()) + f"; total {sum(phases.values()):.3f} s")


if __name__ == "__main__":
    main()
