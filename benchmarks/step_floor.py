"""One `kdkit distill` step against the matmul floor of that same step, phase by phase (not a test).

    python benchmarks/step_floor.py                                  # quickstart shape, then the large one
    python benchmarks/step_floor.py --shape quickstart --repeats 3
    python benchmarks/step_floor.py --shape large --teacher-layers 2 --student-layers 1 --repeats 1
    python benchmarks/step_floor.py --run-dir runs/quickstart        # the quickstart's own step, as it trains
    python benchmarks/step_floor.py --device cuda --precision bf16 --shape large --teacher-layers 24 \
        --student-layers 12 --json $OUT/step.json                     # benchmarks/gpu_check.sh

The step is exactly what `kdkit distill` runs per optimizer step: `kdkit.train.loop.train_step`
(online teacher as a HeadSignal, the fused loss, the quickstart's loss and precision settings) then
`loop.optimizer_step` (clip + AdamW), on random-init models built from configs:

  quickstart  SmolLM2-135M-shaped teacher (30 layers, hidden 576, 9/3 heads, inter 1536, V 49,152, tied)
              and a 10-layer student; batch 8, sequences of ~160 tokens with ~96 supervised per row
  large       Qwen2.5-0.5B-shaped (hidden 896, 14/2 heads, inter 4864, V 151,936, tied); batch 16 × 320
              tokens with 256 supervised per row: N = 4,096 rows. 24/12 layers on a GPU; on a CPU the
              layer counts are scaled down (--teacher-layers/--student-layers; the head dominates anyway)

  --run-dir   the step a finished run trains, rebuilt from RUN_DIR as benchmarks/quickstart_step.py does
              (its config.yaml: the pruned student, the top-k cache as the signal, train.compile; one
              length-grouped batch of its data, the same every step). GEMMs and host syncs are recorded
              on the eager layers (the compiled ones issue the same GEMMs), the step is timed compiled.

The floor: one extra step runs under a dispatch mode that records every GEMM the step issues
(aten mm/addmm/addmm_/bmm/baddbmm, forward and backward, with shapes, strides and dtype; CPU flash
attention as its bmm equivalents, halved when causal), tagged with the phase it ran in. The floor
replays exactly those GEMMs on preallocated random tensors, in order, and is timed interleaved with
the step (step, floor, step, floor, ...; medians), so load drift on a shared machine hits both.

Phases: teacher forward (the teacher's decoder: signal_fn), student forward (the student's decoder),
loss (the fused loss: head forward GEMM, chunk divergence + gradient, and both head backward
products, which it forms right away), backward (autograd through the student's body), optimizer
(clip + AdamW), other (the rest: batch transfer, metrics, host syncs). On CUDA the phases come from a
separate step synchronised at each boundary; the ratio uses an unsynchronised step.

Host syncs: one more step runs under a function mode that counts calls which make the host wait for
the device (item/tolist/float/int/bool, nonzero, torch.equal, boolean-mask indexing, ...) on tensors
that would live on the device: the collated batch and the rows a cache reads from disk are host-side
until they are moved (`.to(device)`), and what is computed from host tensors alone stays host-side (as
on a CUDA run).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import random
import statistics
import sys
import time
import weakref
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kdkit  # noqa: E402,F401  first: its CPU settings (kdkit/__init__.py) must precede any torch op

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SHAPES = {
    "quickstart": dict(family="llama", hidden=576, heads=9, kv_heads=3, inter=1536, vocab=49152, teacher_layers=30,
                       student_layers=10, batch=8, prompt=(40, 90), answer=(72, 121)),
    "large": dict(family="qwen2", hidden=896, heads=14, kv_heads=2, inter=4864, vocab=151936, teacher_layers=24,
                  student_layers=12, batch=16, prompt=(64, 65), answer=(256, 257)),
}
# The large shape on a CPU: 2 teacher / 1 student layers and batch 4 (N = 1,024 rows, V kept): one full
# step there is ~4.5 TFLOP of head GEMMs alone, several minutes per step on 2 busy cores
CPU_LARGE = dict(teacher_layers=2, student_layers=1, batch=4)
PHASES = ["teacher forward", "student forward", "loss", "backward", "optimizer", "other"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- the step


def model_config(shape: dict, layers: int):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                  num_hidden_layers=layers, num_attention_heads=shape["heads"],
                  num_key_value_heads=shape["kv_heads"], tie_word_embeddings=True, max_position_embeddings=2048)
    if shape["family"] == "llama":
        return LlamaConfig(**common, rms_norm_eps=1e-5, rope_theta=100000.0)
    return Qwen2Config(**common, rms_norm_eps=1e-6, rope_theta=1000000.0)


def random_data(shape: dict, *, seed: int = 0):
    """TokenizedData of `batch` rows: a prompt (labels -100) then a supervised answer, random ids."""
    from kdkit.data.render import TokenizedData

    rng = random.Random(seed)
    ids, labels = [], []
    for _ in range(shape["batch"]):
        p, a = rng.randrange(*shape["prompt"]), rng.randrange(*shape["answer"])
        row = [rng.randrange(3, shape["vocab"]) for _ in range(p + a)]
        ids.append(row)
        labels.append([-100] * p + row[p:])
    return TokenizedData(ids=[f"row{i}" for i in range(len(ids))], input_ids=ids, labels=labels, dropped={},
                         total=len(ids))


class Bench:
    """The models, optimizer, config and micro-batches of one shape, and one step over them."""

    def __init__(self, shape: dict, *, teacher_layers: int, student_layers: int, device: torch.device,
                 precision: str, compiled: bool):
        from transformers import AutoModelForCausalLM

        from kdkit.config import load_config
        from kdkit.models.attention import train_attention
        from kdkit.models.forward import tied_embedding_backward
        from kdkit.signal import Provenance
        from kdkit.teacher.online import hold_in, online_signal_fn
        from kdkit.train import loop
        from kdkit.train.optim import build_optimizer
        from kdkit.train.setup import teacher_dtype

        self.loop, self.device = loop, device
        self.cfg = load_config(Path(__file__).parents[1] / "kdkit" / "configs" / "quickstart.yaml")
        self.cfg.train.precision, self.cfg.loss.compile = precision, compiled
        self.cfg.train.max_steps = 10_000  # a flat schedule: every timed step does the same work
        torch.manual_seed(0)
        with torch.device(device):
            teacher = AutoModelForCausalLM.from_config(model_config(shape, teacher_layers))
            self.student = AutoModelForCausalLM.from_config(model_config(shape, student_layers))
        teacher.requires_grad_(False).eval()
        hold_in(teacher, teacher_dtype(self.cfg, device))
        train_attention(self.student)  # as `kdkit distill` does (CPU bf16: kdkit.models.attention)
        if device.type == "cpu":
            tied_embedding_backward(self.student)  # as `kdkit distill` does on a CPU
        self.student.train()
        self.vocab = shape["vocab"]
        self.signal_fn = online_signal_fn(teacher, vocab=self.vocab, provenance=Provenance(),
                                          lazy=self.cfg.loss.implementation == "fused")
        self.opt, self.sched = build_optimizer(self.student, self.cfg.train)
        data = random_data(shape)
        self.batches = loop.micro_batches(data, 0, batch_size=shape["batch"], grad_accum=1, seed=0, pad_id=0)
        b = self.batches[0]
        self.tokens = int(b["attention_mask"].sum())
        self.rows = int((b["labels"][:, 1:] != -100).sum())
        self.seq = tuple(b["input_ids"].shape)
        self.lazy_metrics = "metrics" in inspect.signature(loop.train_step).parameters  # (older kdkit: always)

    def step(self, *, logging: bool) -> dict:
        """One optimizer step; `logging`: a step whose metrics are written (log_every)."""
        kwargs = {"metrics": logging, "settle": False} if self.lazy_metrics else {}  # as `loop.distill` calls it
        m = self.loop.train_step(self.student, self.batches, self.signal_fn, self.cfg, vocab=self.vocab,
                                 device=self.device, precision=self.cfg.train.precision, **kwargs)
        self.loop.optimizer_step(self.student, self.opt, self.sched, m, self.cfg.train, step=1, ids=[])
        sync(self.device)
        return m


class RunBench(Bench):
    """The step a finished `kdkit quickstart` / `kdkit distill` run trains: its config, pruned student,
    cache signal and data (benchmarks/quickstart_step.py `rebuild`); `eager()` undoes train.compile."""

    def __init__(self, run_dir: Path, overrides: list[str], *, device: torch.device):
        from kdkit.models.forward import compile_layers
        from kdkit.train import loop
        from kdkit.train.optim import build_optimizer
        from quickstart_step import rebuild

        self.loop, self.device = loop, device
        self.cfg, self.student, tok, train, self.signal_fn, self.vocab, self.undo = rebuild(run_dir, overrides)
        self.cfg.train.max_steps = 10_000  # a flat schedule: every timed step does the same work
        self._compile = lambda: compile_layers(self.student, device=device) if self.cfg.train.compile else None
        self.student.train()
        self.opt, self.sched = build_optimizer(self.student, self.cfg.train)
        tc = self.cfg.train
        self.batches = loop.micro_batches(train, 3, batch_size=tc.batch_size, grad_accum=1, seed=tc.seed,
                                          pad_id=tok.pad_token_id, group_by_length=tc.group_by_length)[:1]
        b = self.batches[0]
        self.tokens = int(b["attention_mask"].sum())
        self.rows = int((b["labels"][:, 1:] != -100).sum())
        self.seq = tuple(b["input_ids"].shape)
        self.lazy_metrics = True
        c = self.student.config
        self.shape = dict(vocab=self.vocab, hidden=c.hidden_size, layers=c.num_hidden_layers,
                          compiled=self.undo is not None)

    @contextlib.contextmanager
    def eager(self):
        """The layers' eager forwards meanwhile (recording GEMMs and syncs), compiled again after."""
        if self.undo is None:
            yield
            return
        self.undo()
        try:
            yield
        finally:
            self.undo = self._compile()


# ---------------------------------------------------------------- phases


class Phases:
    """Seconds per phase of one step, from wrappers around the functions each phase runs in."""

    def __init__(self, bench: Bench, *, synchronise: bool):
        self.bench, self.synchronise = bench, synchronise
        self.seconds: dict[str, float] = defaultdict(float)
        self.current = "other"

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            outer = self.current
            if self.synchronise:
                sync(self.bench.device)
            t0 = time.perf_counter()
            self.current = name
            try:
                return fn(*args, **kwargs)
            finally:
                if self.synchronise:
                    sync(self.bench.device)
                self.seconds[name] += time.perf_counter() - t0
                self.current = outer
                if outer != "other":  # nested: the outer phase does not count the inner one's time
                    self.seconds[outer] -= time.perf_counter() - t0

        return timed

    @contextlib.contextmanager
    def installed(self):
        loop, b = self.bench.loop, self.bench
        saved = (loop.decoder_hidden, loop.fused_distill_loss, loop.optimizer_step, torch.Tensor.backward, b.signal_fn)
        loop.decoder_hidden = self.wrap("student forward", loop.decoder_hidden)  # the teacher calls online's own
        loop.fused_distill_loss = self.wrap("loss", loop.fused_distill_loss)
        loop.optimizer_step = self.wrap("optimizer", loop.optimizer_step)
        torch.Tensor.backward = self.wrap("backward", torch.Tensor.backward)
        b.signal_fn = self.wrap("teacher forward", b.signal_fn)
        try:
            yield self
        finally:
            loop.decoder_hidden, loop.fused_distill_loss, loop.optimizer_step, torch.Tensor.backward, b.signal_fn = saved


def timed_step(bench: Bench, *, logging: bool, phases: bool) -> tuple[float, dict]:
    """(seconds, {phase: seconds}) of one step; phases synchronised on CUDA only when asked."""
    p = Phases(bench, synchronise=bench.device.type == "cuda")
    ctx = p.installed() if phases else contextlib.nullcontext()
    with ctx:
        sync(bench.device)
        t0 = time.perf_counter()
        bench.step(logging=logging)
        total = time.perf_counter() - t0
    out = dict(p.seconds)
    out["other"] = total - sum(v for k, v in out.items() if k != "other")
    return total, out


# ---------------------------------------------------------------- the floor: the step's GEMMs alone


aten = torch.ops.aten
_AB = {aten.mm: (0, 1), aten.bmm: (0, 1), aten.addmm: (1, 2), aten.addmm_: (1, 2), aten.baddbmm: (1, 2)}
class GemmRecorder(TorchDispatchMode):
    """Every GEMM one step issues: (phase, a shape, a stride, b shape, b stride, dtype, time factor)."""

    def __init__(self, phases: Phases):
        super().__init__()
        self.phases, self.gemms = phases, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet, name = func.overloadpacket, func.overloadpacket.__name__
        if packet in _AB:
            i, j = _AB[packet]
            a, b = args[i], args[j]
            self._add(a.shape, a.stride(), b.shape, b.stride(), a.dtype, 1.0)
        elif name.startswith("_scaled_dot_product_") and "attention" in name:  # flash / efficient / cudnn
            named = {a.name: v for a, v in zip(func._schema.arguments, args)} | kwargs
            bsz, heads, t, d = named["query"].shape  # (B, heads, T, D): QKᵀ and PV, backward 4 products
            bh, factor = bsz * heads, 0.5 if named.get("is_causal") else 1.0
            dtype = named["query"].dtype
            for k in range(4 if name.endswith("_backward") else 2):  # alternately (T, D)@(D, T), (T, T)@(T, D)
                if k % 2 == 0:
                    self._add((bh, t, d), (t * d, d, 1), (bh, d, t), (t * d, 1, d), dtype, factor)
                else:
                    self._add((bh, t, t), (t * t, t, 1), (bh, t, d), (t * d, d, 1), dtype, factor)
        return func(*args, **kwargs)

    def _add(self, a_shape, a_stride, b_shape, b_stride, dtype, factor):
        self.gemms.append((self.phases.current, tuple(a_shape), tuple(a_stride), tuple(b_shape), tuple(b_stride),
                           dtype, factor))


def flops(g) -> float:
    _, a, _, b, _, _, factor = g
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1] * factor


def _extent(shape, stride) -> int:
    return 1 + sum((n - 1) * s for n, s in zip(shape, stride))


class Floor:
    """The recorded GEMMs replayed in order on preallocated random tensors (one pool per operand)."""

    def __init__(self, gemms: list, device: torch.device):
        self.gemms, self.device = gemms, device
        self.ops = []
        need = defaultdict(lambda: [0, 0, 0])  # dtype -> numel of the a, b, out pools
        for _, a, sa, b, sb, dtype, _ in gemms:
            out = (*a[:-1], b[-1])
            for k, n in enumerate((_extent(a, sa), _extent(b, sb), _numel(out))):
                need[dtype][k] = max(need[dtype][k], n)
        g = torch.Generator(device=device).manual_seed(0)
        pools = {dt: [torch.randn(n, generator=g, device=device).to(dt) for n in sizes] for dt, sizes in need.items()}
        for phase, a, sa, b, sb, dtype, factor in gemms:
            pa, pb, po = pools[dtype]
            out = (*a[:-1], b[-1])
            self.ops.append((phase, torch.as_strided(pa, a, sa), torch.as_strided(pb, b, sb),
                             po[: _numel(out)].view(out), factor))

    def run(self, *, phases: bool = False) -> tuple[float, dict]:
        """(seconds, {phase: seconds}); causal attention's products count half their time (factor)."""
        per = defaultdict(float)
        sync(self.device)
        t_all = time.perf_counter()
        for phase, a, b, out, factor in self.ops:
            if phases:
                sync(self.device)
                t0 = time.perf_counter()
            (torch.bmm if a.dim() == 3 else torch.mm)(a, b, out=out)
            if phases:
                sync(self.device)
                per[phase] += (time.perf_counter() - t0) * factor
        sync(self.device)
        total = time.perf_counter() - t_all
        if phases:
            total = sum(per.values())
        return total, dict(per)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------- host syncs


_SYNC = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__,
         torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.equal, torch.Tensor.equal,
         torch.masked_select, torch.Tensor.masked_select, torch.Tensor.numpy, torch.unique, torch.Tensor.unique,
         torch.Tensor.cpu, torch.argwhere, torch.Tensor.argwhere}
_INDEX = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


class SyncAudit(TorchFunctionMode):
    """Counts calls that wait for the device, on tensors that would be on it (see the module doc)."""

    def __init__(self, host: list):
        super().__init__()
        self.host: dict[int, weakref.ref] = {}
        self.where = Counter()
        for t in host:
            self._mark(t)

    def _mark(self, t):
        self.host[id(t)] = weakref.ref(t)

    def _is_host(self, t) -> bool:
        ref = self.host.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        host_in = bool(tensors) and all(self._is_host(t) for t in tensors)
        if tensors and not host_in and (func in _SYNC or (func in _INDEX and _bool_index(args))):
            self.where[_caller(func)] += 1
        out = func(*args, **kwargs)
        moved = func in (torch.Tensor.to, torch.Tensor.cuda) and _moves(args, kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            if moved:
                self.host.pop(id(t), None)
            elif (tensors and host_in) or (not tensors and "device" not in kwargs):  # factories: CPU by default
                self._mark(t)
        return out


def _bool_index(args) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1:2]))


def _moves(args, kwargs) -> bool:
    leaves = list(args[1:]) + list(kwargs.values())
    return any(isinstance(x, (torch.device, str)) or (isinstance(x, torch.Tensor)) for x in leaves)


def _caller(func) -> str:
    """file:line of the first frame outside torch and this script (what asked for the sync)."""
    f = sys._getframe(2)
    here = os.path.abspath(__file__)
    while f is not None:
        path = f.f_code.co_filename
        if "/torch/" not in path and os.path.abspath(path) != here:
            rel = path.split("site-packages/")[-1]
            rel = rel.split("/work/main/")[-1]
            return f"{rel}:{f.f_lineno} {getattr(func, '__name__', func)}"
        f = f.f_back
    return "?"


def audit_syncs(bench: Bench, *, logging: bool) -> Counter:
    host = [v for b in bench.batches for v in b.values() if torch.is_tensor(v)]
    host += [s["step"] for s in bench.opt.state.values() if torch.is_tensor(s.get("step"))]  # CPU scalars
    from kdkit.teacher.cache import CacheReader

    read = CacheReader.signal

    def host_read(self, *args, **kwargs):  # a cache's rows are read into host memory, then moved
        signal = read(self, *args, **kwargs)
        for t in (signal.ids, signal.logprobs, signal.tail):
            if t is not None:
                audit._mark(t)
        return signal

    audit = SyncAudit(host)
    CacheReader.signal = host_read
    try:
        with audit:
            bench.step(logging=logging)
    finally:
        CacheReader.signal = read
    return audit.where


def cuda_sync_count(bench: Bench) -> int:
    """Synchronising CUDA calls torch itself reports in one (not-logging) step."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bench.step(logging=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


# ---------------------------------------------------------------- one shape


def run_shape(name: str, args) -> dict:
    device = torch.device(args.device)
    t_build = time.perf_counter()
    if name == "run":
        bench = RunBench(Path(args.run_dir), args.overrides, device=device)
        shape, tl, sl = bench.shape, 0, bench.shape["layers"]
        dtype = bench.loop.compute_dtype(device, bench.cfg.train.precision)
        print(f"\n== {args.run_dir}: the run's own step (cache signal, no teacher), student {sl} layers, hidden "
              f"{shape['hidden']}, V {shape['vocab']:,}; batch {tuple(bench.seq)}, {bench.tokens:,} tokens, "
              f"N = {bench.rows:,} supervised rows; {str(dtype).removeprefix('torch.')} on {device}, threads "
              f"{torch.get_num_threads()}, train.compile={shape['compiled']} (built in "
              f"{time.perf_counter() - t_build:.0f}s)", flush=True)
    else:
        shape = dict(SHAPES[name])
        if name == "large" and device.type == "cpu":
            shape.update(CPU_LARGE)
        shape["batch"] = args.batch or shape["batch"]
        tl, sl = args.teacher_layers or shape["teacher_layers"], args.student_layers or shape["student_layers"]
        bench = Bench(shape, teacher_layers=tl, student_layers=sl, device=device, precision=args.precision,
                      compiled=args.compiled)
        dtype = bench.loop.compute_dtype(device, args.precision)
        print(f"\n== {name}: teacher {tl} layers, student {sl} layers, hidden {shape['hidden']}, "
              f"V {shape['vocab']:,}; batch {tuple(bench.seq)}, {bench.tokens:,} tokens, N = {bench.rows:,} "
              f"supervised rows; {str(dtype).removeprefix('torch.')} on {device}, threads "
              f"{torch.get_num_threads()}, loss.compile={args.compiled} (built in "
              f"{time.perf_counter() - t_build:.0f}s)", flush=True)
    eager = bench.eager if isinstance(bench, RunBench) else contextlib.nullcontext
    with eager():  # GEMMs and syncs on the eager layers: compiled ones issue the same GEMMs
        bench.step(logging=True)
        recorder_phases = Phases(bench, synchronise=False)
        with recorder_phases.installed(), GemmRecorder(recorder_phases) as rec:
            bench.step(logging=True)
        syncs = {lg: audit_syncs(bench, logging=lg) if args.sync_audit else Counter() for lg in (False, True)}
    for _ in range(args.warmup + (2 if isinstance(bench, RunBench) else 0)):  # a compiled run: its first steps
        bench.step(logging=True)
    floor = Floor(rec.gemms, device)
    floor.run()  # warm
    gflop = sum(flops(g) for g in rec.gemms) / 1e9
    cuda_syncs = cuda_sync_count(bench) if device.type == "cuda" else None
    load = [open("/proc/loadavg").read().split()[0]] if os.path.exists("/proc/loadavg") else []
    rows = defaultdict(list)
    for r in range(args.repeats):
        for logging in (False, True):
            if logging and not args.logging_step:
                continue
            s, ph = timed_step(bench, logging=logging, phases=device.type == "cpu")
            rows["step_log" if logging else "step"].append(s)
            if device.type == "cpu":
                for k, v in ph.items():
                    rows[("phase", logging, k)].append(v)
            f, fph = floor.run(phases=False)
            rows["floor"].append(f)
            rows["ratio_log" if logging else "ratio"].append(s / f)
        if load:
            load.append(open("/proc/loadavg").read().split()[0])
    if device.type == "cuda":  # phases from one synchronised step (on CPU the timed steps carry them)
        for logging in ((False, True) if args.logging_step else (False,)):
            _, ph = timed_step(bench, logging=logging, phases=True)
            for k, v in ph.items():
                rows[("phase", logging, k)].append(v)
    _, floor_phases = floor.run(phases=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    result = dict(shape=name, teacher_layers=tl, student_layers=sl, vocab=shape["vocab"], hidden=shape["hidden"],
                  batch=list(bench.seq), tokens=bench.tokens, rows=bench.rows, dtype=str(dtype), device=str(device),
                  threads=torch.get_num_threads(), repeats=args.repeats, gemms=len(rec.gemms), gemm_gflop=gflop,
                  step_s=med["step"], floor_s=med["floor"], ratio=med["ratio"],
                  step_log_s=med.get("step_log"), ratio_log=med.get("ratio_log"),
                  tokens_per_s=bench.tokens / med["step"], gemm_tflops=gflop / 1e3 / med["step"],
                  floor_tflops=gflop / 1e3 / med["floor"],
                  phases={lg: {k: med.get(("phase", lg, k)) for k in PHASES} for lg in (False, True)},
                  floor_phases=floor_phases, syncs={lg: sum(c.values()) for lg, c in syncs.items()},
                  sync_sites={lg: dict(c) for lg, c in syncs.items()}, cuda_syncs=cuda_syncs, loadavg=load,
                  lazy_metrics=bench.lazy_metrics)
    if args.peak_tflops:
        result["mfu"] = result["gemm_tflops"] / args.peak_tflops
    print_shape(result)
    return result


def print_shape(r: dict) -> None:
    print(f"{r['gemms']} GEMMs, {r['gemm_gflop']:.0f} GFLOP per step; floor {r['floor_tflops'] * 1e3:.0f} GFLOP/s, "
          f"step {r['gemm_tflops'] * 1e3:.0f} GFLOP/s" + (f" (MFU {r['mfu']:.1%})" if "mfu" in r else ""))
    print(f"{'':26}{'step s':>9}{'floor s':>9}{'ratio':>8}")
    print(f"{'step (not logging)':26}{r['step_s']:9.3f}{r['floor_s']:9.3f}{r['ratio']:7.2f}x")
    if r["step_log_s"] is not None:
        print(f"{'step (logging: metrics)':26}{r['step_log_s']:9.3f}{r['floor_s']:9.3f}{r['ratio_log']:7.2f}x")
    for lg in (False, True):
        ph = r["phases"][lg]
        if ph["other"] is None:
            continue
        print(f"  phases, {'logging' if lg else 'not logging'} step:")
        for k in PHASES:
            fl = r["floor_phases"].get(k, 0.0)
            ratio = f"{ph[k] / fl:7.2f}x" if fl > 1e-4 else ""
            label = "signal (cache read)" if r["shape"] == "run" and k == "teacher forward" else k
            print(f"    {label:22}{ph[k]:9.3f}{fl:9.3f}{ratio}")
    print(f"host syncs per optimizer step (1 micro-batch): {r['syncs'][False]} not logging, {r['syncs'][True]} logging")
    if r["cuda_syncs"] is not None:
        print(f"CUDA syncs per step (torch.cuda.set_sync_debug_mode, a not-logging step): {r['cuda_syncs']}")
    for site, n in sorted(r["sync_sites"][True].items(), key=lambda kv: -kv[1]):
        print(f"    {n:3d}  {site}")
    print(f"tokens/s {r['tokens_per_s']:.0f}; loadavg (1 min) over the run: {' '.join(r['loadavg'])}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=[*SHAPES, "both"], default="both")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--compiled", action="store_true", help="loss.compile=true (the quickstart's default: false)")
    ap.add_argument("--teacher-layers", type=int)
    ap.add_argument("--student-layers", type=int)
    ap.add_argument("--batch", type=int, help="rows per step (default: the shape's; large on a CPU: 4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-sync-audit", dest="sync_audit", action="store_false", help="skip the sync count (2 steps)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--no-logging-step", dest="logging_step", action="store_false",
                    help="time only the steps whose metrics are not written")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (H200 bf16 dense: 989)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--run-dir", help="the step of this finished run instead of a shape (see the module doc)")
    ap.add_argument("overrides", nargs="*", help="with --run-dir: config overrides, e.g. train.compile=false")
    args = ap.parse_intermixed_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    names = ["run"] if args.run_dir else list(SHAPES) if args.shape == "both" else [args.shape]
    results = [run_shape(n, args) for n in names]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
