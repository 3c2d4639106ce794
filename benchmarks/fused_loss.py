"""Fused chunked distillation loss vs dense baselines, side by side, each case in a fresh subprocess.

    python benchmarks/fused_loss.py                                  # the full grid (hours on 2 cores)
    python benchmarks/fused_loss.py --quick                          # N=1024, V=49152, H_t=576 only
    python benchmarks/fused_loss.py --n 8192 --v 49152 --teacher-h 576 --repeats 3

For every (N, V, teacher H) it runs, each in its own process (so peak memory is its own):
  floor          the four fp32 matmuls alone (teacher forward, student forward, gᵀ·h, g·W), in
                 row blocks of <= 2048 rows: the roofline every time is compared with
  dense          kdkit distill_loss on full (N, V) logits, forward + backward (the baseline: 1.00)
  trl            TRL-style dense generalized JSD (GKDTrainer.generalized_jsd_loss), JSD only
  liger          Liger-Kernel's LigerFusedLinearJSDLoss (compiled, chunk 1024): JSD, and forward KL
                 as its beta = 0 case; Liger has no reverse/skew KL or TVD
  fused          kdkit fused_distill_loss, eager chunk step
  fused_c        the same, compiled chunk step (compiled=True)
  fused_c_bf16   compiled, bf16 matmuls with fp32 accumulation (matmul_dtype=torch.bfloat16)
Time is the median of --repeats runs after one warm-up (compilation excluded); memory is the
peak RSS growth (ru_maxrss) over the inputs, after the warm-up. `/dense` is the time ratio to
`dense` of the same divergence (separate processes); `/floor` is the ratio to the matmul floor
timed interleaved with the method in the same process (robust to load drift on a shared machine).
GFLOP/s counts 2·N·V·(H_t + 3·H) per forward + backward. A case whose estimated memory exceeds 85%
of the available RAM is not run: "skipped (would need ~X GB)". After each shape, `jsd/kl` is each
method's JSD time over its forward-KL time (the issue's target: <= 1.2 for fused).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time

METHODS = ["floor", "dense", "trl", "liger", "fused", "fused_c", "fused_c_bf16"]
ONLY = {"trl": {"jsd"}, "liger": {"jsd", "forward_kl"}}  # divergences a baseline has
QUICK = dict(n=[1024], v=[49152], teacher_h=[576])


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _inputs(n: int, v: int, h: int, ht: int):
    import torch

    g = torch.Generator().manual_seed(0)
    hs = torch.randn(n, h, generator=g).requires_grad_(True)  # (N, H)
    ws = (torch.randn(v, h, generator=g) / math.sqrt(h)).requires_grad_(True)  # (V, H)
    hts = torch.randn(n, ht, generator=g)  # (N, H_t)
    wt = torch.randn(v, ht, generator=g) / math.sqrt(ht)  # (V, H_t)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[: n // 16] = -100  # a prompt's worth of unsupervised rows
    return hs, ws, hts, wt, labels


def _trl_generalized_jsd(student_logits, teacher_logits, labels, beta=0.5, temperature=1.0):
    """TRL's GKDTrainer.generalized_jsd_loss (dense, batchmean over supervised tokens), as written there."""
    import torch
    import torch.nn.functional as F

    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)
    beta_t = torch.tensor(beta, dtype=student_log_probs.dtype)
    mixture = torch.logsumexp(
        torch.stack([student_log_probs + torch.log(1 - beta_t), teacher_log_probs + torch.log(beta_t)]), dim=0
    )
    kl_teacher = F.kl_div(mixture, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture, student_log_probs, reduction="none", log_target=True)
    jsd = beta * kl_teacher + (1 - beta) * kl_student
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


def _runner(method: str, divergence: str, hs, ws, hts, wt, labels, chunk_size=None):
    """A zero-argument callable doing one forward + backward of `method`."""
    import torch

    kw = {"beta": 0.5} if divergence == "jsd" else {}
    if method == "floor":
        def run():
            with torch.no_grad():
                for s in range(0, hs.shape[0], 2048):
                    h, t = hs[s : s + 2048], hts[s : s + 2048]
                    t @ wt.t()  # teacher forward (c, V)
                    z = h @ ws.t()  # student forward (c, V), stands in for d/d logits below
                    z @ ws  # grad hidden (c, H)
                    z.t() @ h  # grad weight (V, H)
        return run
    if method in ("dense", "trl"):
        from kdkit.losses import distill_loss

        def run():
            hs.grad = ws.grad = None
            logits, t_logits = hs @ ws.t(), hts @ wt.t()  # (N, V) each
            if method == "trl":
                loss = _trl_generalized_jsd(logits, t_logits, labels)
            else:
                loss = distill_loss(logits, t_logits, labels, divergence=divergence, **kw).total
            loss.backward()
        return run
    if method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        beta = 0.0 if divergence == "forward_kl" else 0.5  # Liger's beta = 0 is KL(teacher ‖ student)
        fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, compiled=True)

        def run():
            hs.grad = ws.grad = None
            fn(hs, ws, hts, wt, labels).backward()
        return run
    from kdkit.losses import fused_distill_loss

    opts = dict(compiled=method != "fused", matmul_dtype=torch.bfloat16 if method.endswith("bf16") else None,
                chunk_size=chunk_size)

    def run():
        hs.grad = ws.grad = None
        fused_distill_loss(hs, ws, labels, teacher_hidden=hts, teacher_weight=wt, divergence=divergence,
                           **opts, **kw).total.backward()
    return run


def worker(case: dict) -> dict:
    """Runs one case in this (fresh) process; returns its median time and peak memory growth."""
    import torch

    torch.manual_seed(0)
    inputs = _inputs(case["n"], case["v"], case["h"], case["ht"])
    base = _rss_mb()
    run = _runner(case["method"], case["divergence"], *inputs, chunk_size=case.get("chunk"))
    t0 = time.perf_counter()
    run()  # warm-up (and compilation)
    warm = time.perf_counter() - t0
    peak = _rss_mb() - base  # before the interleaved floor runs below can add to it
    floor = _runner("floor", "-", *inputs)
    times, floors = [], []
    for _ in range(case["repeats"]):
        # The floor, interleaved with the method in this process: load on a shared machine drifts
        # over minutes, and a ratio of neighbouring runs stays meaningful when absolute times do not.
        for fn, out in ((run, times), (floor, floors)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return {"time": statistics.median(times), "floor": statistics.median(floors), "warmup": warm,
            "peak_mb": max(peak, _rss_mb() - base) if case["method"] == "floor" else peak}


def _spawn(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(case)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout:.0f}s"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        return {"error": f"rc={out.returncode}: {last[:90]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _needs_gb(method: str, case: dict) -> float:
    """A generous estimate of a case's peak memory in GB (inputs, weights, gradients, temporaries)."""
    from kdkit.losses.fused import auto_chunk_size

    n, v, h, ht = case["n"], case["v"], case["h"], case["ht"]
    fixed = 4 * (n * (h + ht) + v * (2 * h + ht) + n * h)  # inputs, weights, their gradients
    rows = {"dense": 10 * n, "trl": 14 * n, "liger": 10 * min(n, 1024), "floor": 2 * min(n, 2048)}
    chunk = case.get("chunk") or auto_chunk_size(v)
    return (fixed + 4 * v * rows.get(method, 10 * min(n, chunk))) / 1e9


def _fits(method: str, case: dict) -> str | None:
    """None when the case fits 85% of the available memory, else the skip message."""
    import psutil

    need = _needs_gb(method, case)
    if need < 0.85 * psutil.virtual_memory().available / 1e9:
        return None
    return f"skipped (would need ~{need:.0f} GB)"


def _row(case: dict, res: dict, dense: dict) -> str:
    head = f"{case['n']:>5} {case['v']:>6} {case['ht']:>4} {case['divergence']:<10} {case['method']:<12}"
    if "error" in res:
        return f"{head} {res['error']}"
    flops = 2 * case["n"] * case["v"] * (case["ht"] + 3 * case["h"])
    vs_dense = f"{res['time'] / dense['time']:6.2f}x" if "time" in dense else "     -"
    mem_dense = f"{res['peak_mb'] / dense['peak_mb']:6.3f}x" if dense.get("peak_mb", 0) > 0 else "     -"
    vs_floor = f"{res['time'] / res['floor']:6.2f}x"  # the floor timed alongside, in the same process
    return (f"{head} {res['time']:8.3f} {vs_dense} {vs_floor} {res['peak_mb']:9.0f} {mem_dense} "
            f"{flops / res['time'] / 1e9:8.1f}")


def _shape_cases(args, shape: dict):
    """(method, divergence) pairs of one shape, in print order: the floor, then per divergence."""
    cases = [("floor", "-")] if "floor" in args.methods else []
    for div in args.divergence:
        for method in [m for m in args.methods if m != "floor"]:
            if div in ONLY.get(method, {div}):
                cases.append((method, div))
    return cases


def _jsd_over_kl(results: dict) -> str:
    """Each method's JSD time over its forward-KL time, where both ran."""
    out = []
    for method in METHODS:
        kl, js = results.get((method, "forward_kl"), {}), results.get((method, "jsd"), {})
        if "time" in kl and "time" in js:
            out.append(f"{method} {js['time'] / kl['time']:.2f}x")
    return "      jsd/kl time: " + (", ".join(out) or "-")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--v", type=int, nargs="+", default=[49152, 151936])
    p.add_argument("--h", type=int, default=576, help="student hidden size")
    p.add_argument("--teacher-h", type=int, nargs="+", default=[576, 896])
    p.add_argument("--divergence", nargs="+", default=["forward_kl", "jsd"])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=None, help="fused rows per chunk (default: automatic)")
    p.add_argument("--quick", action="store_true", help="only N=1024, V=49152, H_t=576 (minutes, not hours)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.n, args.v, args.teacher_h = QUICK["n"], QUICK["v"], QUICK["teacher_h"]
    print(f"{'N':>5} {'V':>6} {'H_t':>4} {'divergence':<10} {'method':<12} {'time_s':>8} {'/dense':>7} "
          f"{'/floor':>7} {'peak_MB':>9} {'mem/dense':>7} {'GFLOP/s':>8}", flush=True)
    for n in args.n:
        for v in args.v:
            for ht in args.teacher_h:
                shape = dict(n=n, v=v, h=args.h, ht=ht, repeats=args.repeats, chunk=args.chunk_size)
                results = {}
                for method, div in _shape_cases(args, shape):
                    case = dict(shape, method=method, divergence=div)
                    skip = _fits(method, case)
                    res = {"error": skip} if skip else _spawn(case, args.timeout)
                    results[(method, div)] = res
                    print(_row(case, res, results.get(("dense", div), {})), flush=True)
                print(_jsd_over_kl(results), flush=True)


if __name__ == "__main__":
    main()
