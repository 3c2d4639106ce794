"""The distillation loop: plain functions, read top to bottom.

The loop never calls the teacher itself: it is handed `signal_fn(batch) -> DenseSignal` (online
teacher, offline cache or served teacher alike), so the same loop serves every training mode.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from kdkit.config import Config
from kdkit.data.collate import batch_order, collate, length_grouped
from kdkit.data.render import TokenizedData
from kdkit.losses import DIVERGENCES, distill_loss, forward_kl, fused_distill_loss, sparse_divergence
from kdkit.losses.scratch import reclaim, release
from kdkit.models.attention import train_attention
from kdkit.models.forward import (HOST_PLAN, compile_layers, decoder_hidden, decoder_mask,
                                  supervised_logits, supervised_rows, tied_embedding_backward, with_host_plan)
from kdkit.models.vocab_map import shared_vocab_metrics
from kdkit.signal import DenseSignal, HeadSignal, SparseSignal
from kdkit.train import dist as D
from kdkit.train.metrics import MetricsWriter
from kdkit.train.optim import build_optimizer
from kdkit.utils import atomic_json

log = logging.getLogger(__name__)


@dataclass
class Plugins:
    """What a training mode adds to the one loop (no new trainer). Every field is optional.

    - `prepare(batch, step) -> batch`: rewrites each micro-batch before the teacher and student see
      it (on-policy student samples, replay data).
    - `terms[name](batch, signal, num_tokens) -> scalar`: auxiliary losses computed after the student's
      forward of that micro-batch (hidden-state / attention distillation via hooks, KL to the original
      model); each already normalised by `num_tokens`, the supervised-token count of the whole step.
    - `combine(kd_total, {name: value}) -> (total, {name: weight})`: how the KD objective and the terms
      are weighted; default: plain sum (weights 1).
    - `trainable`: modules trained with the student (projectors, learned loss weights): optimised and
      checkpointed with it, never part of the saved student.
    - `after_step(step)`: called after every optimizer update (EMA teachers).
    """

    prepare: Callable | None = None
    terms: dict[str, Callable] = field(default_factory=dict)
    combine: Callable | None = None
    trainable: torch.nn.Module | None = None
    after_step: list[Callable] = field(default_factory=list)


def plain_sum(kd_total, values: dict):
    return kd_total + sum(values.values()), {name: 1.0 for name in values}


def trained_module(student, plugins: Plugins | None) -> torch.nn.Module:
    """What the optimizer and checkpoints hold: the student, plus the plugins' trainable modules."""
    if plugins is None or plugins.trainable is None:
        return student
    return torch.nn.ModuleDict({"student": student, "extras": plugins.trainable})


@dataclass
class TrainResult:
    """`student`: the trained student as a plain module (on rank 0; None on the other ranks of an
    FSDP2 run); `main`: whether this process evaluates and saves (rank 0)."""

    steps: int
    resumed_from: int
    history: list[dict]
    student: torch.nn.Module | None = None
    main: bool = True


def pick_device(name: str) -> torch.device:
    """auto: CUDA when there is one; under a launcher, each process takes the GPU of its LOCAL_RANK."""
    if name in ("auto", "cuda") and torch.cuda.is_available() and D.env_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 in hardware (CUDA Ampere+, CPUs with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:  # oneDNN's own check for native bf16 kernels on this CPU
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The run's one precision policy: bf16 where `train.precision` asks for it, or on 'auto' where the
    device multiplies bf16 natively; fp32 otherwise (a CPU without AVX512-BF16/AMX stays fp32 on 'auto').

    bf16 means: every GEMM of the step in bf16 with fp32 accumulation (the student and teacher
    forwards under autocast, the fused loss's head products, the teacher's weights held in bf16),
    while softmaxes, divergences, master weights and gradient accumulation stay fp32."""
    bf16 = precision == "bf16" or (precision == "auto" and native_bf16(device))
    return torch.bfloat16 if bf16 else torch.float32


def enable_tf32(device: torch.device) -> None:
    """fp32 matmuls on CUDA in TF32 (tensor cores, ~10 mantissa bits; fp32 accumulation). The one place it
    is set; CPUs are untouched (their fp32 runs stay bit-for-bit)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # = torch.set_float32_matmul_precision("high") for CUDA
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, precision: str):
    """bf16 autocast (fp32 master weights) where `compute_dtype` says bf16; fp32 otherwise."""
    if compute_dtype(device, precision) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """One permutation per epoch, computed once rather than at every step."""
    return tuple(batch_order(n, seed=seed, epoch=epoch))


def micro_batches(data: TokenizedData, step: int, *, batch_size: int, grad_accum: int, seed: int, pad_id: int,
                  group_by_length: int = 0):
    """The micro-batches of optimizer step `step`: a pure function of (step, seed), so resuming
    at any step sees exactly the examples an uninterrupted run would, across epoch boundaries.

    `group_by_length` G > 1: the endless example stream is cut into spans of G micro-batches, each
    span's examples sorted by length, cut into micro-batches and those shuffled (`length_grouped`):
    a batch pads to little more than its own rows, the spans still a random mix."""
    n = len(data.input_ids)
    per_step = batch_size * grad_accum
    span = batch_size * group_by_length
    lengths = tuple(map(len, data.input_ids)) if group_by_length > 1 else ()
    batches = []
    for m in range(grad_accum):
        idx = []
        for j in range(batch_size):
            k = step * per_step + m * batch_size + j  # position in the endless example stream
            if group_by_length > 1:
                idx.append(_grouped_span(n, seed, k // span, batch_size, group_by_length, lengths)[k % span])
            else:
                idx.append(_epoch_order(n, seed, k // n)[k % n])
        batch = collate([data.input_ids[i] for i in idx], [data.labels[i] for i in idx], pad_id=pad_id)
        batch["ids"] = [data.ids[i] for i in idx]
        batches.append(batch)
    return batches


@lru_cache(maxsize=4)
def _grouped_span(n: int, seed: int, span_index: int, batch_size: int, group: int,
                  lengths: tuple[int, ...]) -> tuple[int, ...]:
    """Examples at stream positions [span_index · span, + span) (span = batch_size · group), length-grouped."""
    span = batch_size * group
    ks = range(span_index * span, (span_index + 1) * span)
    stream = [_epoch_order(n, seed, k // n)[k % n] for k in ks]
    return tuple(length_grouped(stream, lengths, batch_size=batch_size, seed=seed * 1000003 + span_index))


def train_step(student, batches, signal_fn: Callable, cfg: Config, *, vocab: int, device, precision: str,
               plugins: Plugins | None = None, step: int = 0, dist: D.DistContext | None = None,
               metrics: bool = True, settle: bool = True):
    """One optimizer step's forward/backward over its micro-batches; returns summed metrics.

    Every micro-batch loss is normalised by the supervised-token count of the WHOLE step (all
    micro-batches of all ranks), so the accumulated gradient, summed over ranks, equals the gradient
    of the full-batch mean (4×2 = 1×8 = 2 ranks × 4). Metrics come back summed over ranks.

    `metrics`: also the progress metrics `kl` and `top1` (a logging step); False: they are None and
    cost nothing. Sums stay on the device until `settle_metrics` reads them all at once; `settle=False`
    leaves that to `optimizer_step`, which reads them with the gradient norm: one host sync per step.
    """
    plugins = plugins or Plugins()
    dist = dist or D.DistContext()
    device = torch.device(device)
    if plugins.prepare is not None:  # before counting: a prepared batch may carry other labels
        batches = [plugins.prepare(b, step) for b in batches]
    batches = [with_host_plan(b) for b in batches]  # counts and row indices, on the host
    num_tokens = sum(b[HOST_PLAN]["count"] for b in batches)
    if dist.active:  # the global count: every rank's loss is its share of one mean
        num_tokens = int(D.all_sum(dist, [num_tokens])[0])
    # kl and top1 are summed over the tokens the metrics cover (`metric_tokens`), then divided by them
    out, sums = {"tokens": 0, "metric_tokens": 0}, {}  # host counts; device tensors, summed
    lc = cfg.loss
    for batch in [to_device(b, device) for b in batches]:  # all moved before the step's device work
        with autocast(device, precision):
            with torch.no_grad():
                signal = signal_fn(batch)
            if use_fused(lc, student, signal, vocab=vocab):
                parts = _fused_micro(student, batch, signal, lc, vocab=vocab, num_tokens=num_tokens,
                                     matmul_dtype=compute_dtype(device, precision), metrics=metrics)
                fused = True
            else:
                if isinstance(signal, HeadSignal):  # the online teacher's rows + head: its logits, whole
                    signal = signal.dense()
                s_logits, targets = supervised_logits(student, batch, vocab=vocab)  # (N, V), (N,)
                parts = distill_loss(s_logits, signal, targets, divergence=lc.divergence,
                                     temperature=lc.temperature, alpha=lc.alpha, num_tokens=num_tokens,
                                     **_div_kwargs(lc))
                fused = False
            total = parts.total
            if plugins.terms:
                values = {name: term(batch, signal, num_tokens) for name, term in plugins.terms.items()}
                total, weights = (plugins.combine or plain_sum)(parts.total, values)
                for name, value in values.items():
                    _add(sums, f"term/{name}", value.detach())
                    out[f"weight/{name}"] = weights[name].detach() if torch.is_tensor(weights[name]) else weights[name]
        scale = D.grad_scale(dist)
        (total * scale if scale != 1.0 else total).backward()
        if metrics:
            if fused:  # from the loss's own chunks; its kl is a share of the step's tokens
                kl, agree, counted = parts.kl * num_tokens, parts.top1, batch[HOST_PLAN]["count"]
            else:
                with torch.no_grad():
                    kl, agree, counted = agreement(s_logits.detach(), signal, parts, lc, num_tokens)
            _add(sums, "kl", kl)
            _add(sums, "top1", agree)
            out["metric_tokens"] += counted
        for name, value in batch.get("log", {}).items():  # what training modes report (kdkit/train/modes.py)
            out[f"mode/{name}"] = out.get(f"mode/{name}", 0.0) + value / len(batches)
        _add(sums, "loss", total.detach())
        _add(sums, "kd", parts.kd.detach())
        _add(sums, "ce", parts.ce.detach())
        out["tokens"] += batch[HOST_PLAN]["tokens"]
    out = {"loss": sums.pop("loss"), "kd": sums.pop("kd"), "ce": sums.pop("ce"), "kl": sums.pop("kl", None),
           "top1": sums.pop("top1", None), **out, **sums, "supervised_tokens": num_tokens}
    if settle or dist.active:  # ranks: read here, then summed over them (dist.all_sum)
        settle_metrics(out)
    out = D.reduce_metrics(dist, out)  # sums over ranks, the counts included
    counted = out.pop("metric_tokens")
    if metrics:
        out["kl"] /= max(counted, 1)
        out["top1"] /= max(counted, 1)
    return out


def _add(sums: dict, key: str, value) -> None:
    sums[key] = value if key not in sums else sums[key] + value


def settle_metrics(m: dict) -> dict:
    """Every tensor value of `m` read to a Python float, all in ONE host sync (one stacked .tolist()),
    in place; returns `m`."""
    keys = [k for k, v in m.items() if torch.is_tensor(v)]
    if not keys:
        return m
    dev = m[keys[0]].device
    dtype = torch.float32 if dev.type == "mps" else torch.float64
    values = torch.stack([m[k].detach().reshape(()).to(device=dev, dtype=dtype) for k in keys]).tolist()
    m.update(zip(keys, values))
    return m


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors, and its host plan's, on `device`; to CUDA from pinned memory without blocking
    (a copy from pageable memory first waits for the device's queue)."""

    def move(v):
        if not torch.is_tensor(v) or v.device == device:
            return v
        if device.type == "cuda" and v.device.type == "cpu":
            return v.pin_memory().to(device, non_blocking=True)
        return v.to(device)

    out = {k: move(v) for k, v in batch.items()}
    if HOST_PLAN in batch:
        out[HOST_PLAN] = {k: move(v) for k, v in batch[HOST_PLAN].items()}
    return out


def use_fused(lc, student, signal, *, vocab: int | None = None) -> bool:
    """Whether this micro-batch's loss runs fused (`loss.implementation=fused`, the default): chunked
    from the student's hidden rows and lm_head, never its (N, V) logits. Where fused cannot apply,
    the dense path runs instead and the reason is logged once."""
    if lc.implementation == "dense":
        return False
    reason = fused_unsupported(lc, student, signal, vocab=vocab)
    if reason is not None:
        _log_once(f"loss.implementation=fused falls back to the dense loss: {reason}")
        return False
    return True


def fused_unsupported(lc, student, signal, *, vocab: int | None = None) -> str | None:
    """Why the fused loss cannot serve this student and signal, or None when it can."""
    if lc.divergence not in DIVERGENCES:
        return f"divergence {lc.divergence!r} compares two vocabularies"
    if getattr(getattr(student, "config", None), "final_logit_softcapping", None):
        return "the student's head applies final-logit softcapping (not a plain linear head)"
    head = getattr(student, "get_output_embeddings", lambda: None)()
    weight = getattr(head, "weight", None)
    # fsdp2: the head is sharded at rest, gathered (a plain Parameter) from the student's forward on
    plain = type(weight) is torch.nn.Parameter or D.head_gathered(student)
    if not isinstance(head, torch.nn.Linear) or not plain:
        return "the student has no plain linear lm_head here (e.g. a sharded or wrapped head)"
    if isinstance(signal, (DenseSignal, HeadSignal)):
        columns = signal.head.shape[0] if isinstance(signal, HeadSignal) else signal.logits.shape[-1]
        if vocab is not None and columns < vocab:
            return f"the teacher's logits have {columns} columns, fewer than vocab={vocab}"
        return None
    if not isinstance(signal, SparseSignal):
        return f"no fused loss for a {type(signal).__name__} teacher"
    return None


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.warning(message)


def _fused_micro(student, batch, signal, lc, *, vocab: int, num_tokens: int, matmul_dtype=torch.float32,
                 metrics: bool = True):
    """The loss from the student's hidden rows and lm_head, chunk by chunk: never (N, V) of the
    student's logits. The progress metrics (KL at T = 1, top-1 agreement count) come from the
    same chunks (`metrics`), as `agreement` gives them on the dense path. `matmul_dtype` bf16:
    the head's forward and both backward products in bf16 (fp32 accumulation), as autocast runs
    the rest of the step; fp32: the inputs' own dtype, unchanged."""
    hidden = decoder_hidden(student, batch["input_ids"], decoder_mask(batch))  # (B, T, H)
    rows, targets = supervised_rows(hidden, batch)  # (N, H), (N,): supervised rows only
    head = student.get_output_embeddings()  # fsdp2: gathered by that forward; its gradient is reduce-scattered
    if type(head.weight) is not torch.nn.Parameter:
        raise RuntimeError(f"fused loss: the student's head weight is a {type(head.weight).__name__} after its forward")
    return fused_distill_loss(rows, head.weight, targets, teacher_logits=signal, student_bias=head.bias,
                              divergence=lc.divergence, temperature=lc.temperature, alpha=lc.alpha,
                              num_tokens=num_tokens, vocab=vocab, metrics=metrics, compiled=lc.compile,
                              matmul_dtype=None if matmul_dtype == torch.float32 else matmul_dtype,
                              all_supervised=True, **_div_kwargs(lc))


def agreement(s_logits, signal, parts, lc, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(this micro-batch's sum of KL(teacher ‖ student) at T = 1, count of top-1 agreements, count of
    the tokens both cover): the two sums as () tensors, read with the step's other metrics.

    For a top-k signal the KL is over the k + 1 buckets and the teacher's argmax is its first id. A
    cross-tokenizer signal (`vocab_map`) counts its aligned rows only (weight > 0), its KL and top-1
    taken through the vocabulary map (kdkit.models.vocab_map), never by id across vocabularies.
    """
    if isinstance(signal, DenseSignal) and signal.vocab_map is not None:
        keep = signal.weight > 0 if signal.weight is not None else slice(None)  # (N,) aligned rows
        kl, same = shared_vocab_metrics(s_logits[keep], signal.logits[keep], signal.vocab_map)
        return kl.sum(), same.sum().float(), int(same.numel())
    if lc.divergence == "forward_kl" and lc.temperature == 1:
        kl = parts.kd.detach() * num_tokens  # already this quantity, as a share of the step's tokens
    elif isinstance(signal, SparseSignal):
        kl = sparse_divergence("forward_kl", s_logits, signal).sum()
    else:
        kl = forward_kl(s_logits, signal.logits).sum()
    teacher_top = signal.ids[:, 0] if isinstance(signal, SparseSignal) else signal.logits.argmax(-1)
    return kl, (s_logits.argmax(-1) == teacher_top.to(s_logits.device)).sum().float(), int(s_logits.shape[0])


def _div_kwargs(lc) -> dict:
    if lc.divergence == "jsd":
        return {"beta": lc.beta}
    if lc.divergence.startswith("skew"):
        return {"skew": lc.skew}
    return {}


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next step boundary and exits 143."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers only install there
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class SaveCadence:
    """Whether step `step` ends with a checkpoint: every `train.save_every` steps and/or at the first step
    boundary `train.save_every_seconds` after the last checkpoint began (the same answer on every rank);
    never at the last step, whose checkpoint follows the loop."""

    clock = staticmethod(time.perf_counter)

    def __init__(self, tc, ctx=None):
        self.tc, self.ctx, self.last = tc, ctx, self.clock()

    def __call__(self, step: int) -> bool:
        tc = self.tc
        if step >= tc.max_steps:
            return False
        due = bool(tc.save_every) and step % tc.save_every == 0
        if not due and tc.save_every_seconds:
            late = self.clock() - self.last >= tc.save_every_seconds
            due = D.any_rank(self.ctx, late) if self.ctx is not None else late
        if due:
            self.last = self.clock()
        return due


def optimizer_step(model, opt, sched, m: dict, tc, *, step: int, ids: list[str]) -> bool:
    """Clip and step; a non-finite loss or gradient skips the update (parameters, optimizer and
    schedule untouched) or stops the run, as `train.nonfinite` says. Returns whether it stepped."""
    max_norm = tc.max_grad_norm if tc.max_grad_norm else float("inf")
    # FSDP2: sharded (DTensor) and replicated (plugins', per-head norms') gradients in one global norm
    # the clip itself is left to a fused optimizer's step (dist.clip_grad_norm): no pass of its own
    m["grad_norm"], m["lr"] = D.clip_grad_norm(model.parameters(), max_norm, fold_into=opt), sched.get_last_lr()[0]
    settle_metrics(m)  # the step's one host sync: its loss, metrics and gradient norm read together
    finite = math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
    if finite:
        opt.step()
        sched.step()
    opt.__dict__.pop("grad_scale", None)
    reclaim()  # the fused loss's (V, H) gradient buffer, kept for the next step (kdkit.losses.scratch)
    opt.zero_grad(set_to_none=True)
    if not finite:
        msg = f"step {step}: non-finite loss {m['loss']} or gradient norm {m['grad_norm']} (examples {ids})"
        if tc.nonfinite == "stop":
            raise FloatingPointError(msg + "; stopping (train.nonfinite=stop)")
        log.warning("%s; update skipped", msg)
    return finite


class TimeBudget:
    """`train.max_seconds`: how many steps fit the budget. Measured twice: over the steps after the first
    up to the end of the warm-up (PROBE to MAX_PROBE of them; the schedule has not moved yet, so fixing
    the count then changes no step already taken), then once more a third of the way through the rest,
    at the steady rate (the first steps of a CPU run are up to 30% slower while the allocator warms up:
    the warm-up's rate alone left 20% of a 4-minute budget unused), then half-way through each rest while
    that is at least REPLAN_MIN steps (a long CPU run slows by 5-10% as it goes: one measure at a third
    overran a 7-minute budget by 15 s). The count is written to
    RUN_DIR/budget.json each time; a resumed run reads it instead of measuring again."""

    PROBE, MAX_PROBE, REPLAN_MIN = 3, 20, 20

    @classmethod
    def probe_steps(cls, tc) -> int:
        """Steps timed after the first: the rest of the warm-up, at least PROBE and at most MAX_PROBE."""
        return min(max(cls.PROBE, tc.warmup_steps - 1), cls.MAX_PROBE)

    def __init__(self, tc, run_dir: Path, *, resume: bool):
        self.path, self.tc, self.started = run_dir / "budget.json", tc, None
        self.mark: tuple[int, float] | None = None  # (steps done, clock) where the current measurement began
        self.pending, self.probe = tc.max_seconds is not None, self.probe_steps(tc)
        self.replan_at, self.cap = None, tc.max_steps  # train.max_steps: no plan goes past it
        if self.pending and resume and self.path.exists():
            tc.max_steps, self.pending = min(tc.max_steps, json.loads(self.path.read_text())["max_steps"]), False

    def after_step(self, done: int, ctx, *, main: bool) -> None:
        """Called after each step; `done` steps of this run so far (the first one's time is not used)."""
        if not self.pending:
            return
        now = time.perf_counter()
        if done == 1:
            self.mark = (done, now)
        elif self.replan_at is None and (done == 1 + self.probe or done >= self.tc.max_steps):
            self._plan(done, now, ctx, main=main)
            self.replan_at = done + max(5, (self.tc.max_steps - done) // 3)
        elif done == self.replan_at or (self.replan_at is not None and done >= self.tc.max_steps):
            self._plan(done, now, ctx, main=main)
            left = self.tc.max_steps - done
            self.replan_at = done + left // 2  # again half-way through the rest, while that is worth a measure
            self.pending = left // 2 >= self.REPLAN_MIN

    def _plan(self, done: int, now: float, ctx, *, main: bool) -> None:
        """Steps that fit at the rate since the last mark (never fewer than done)."""
        since, then = self.mark
        per_step = (now - then) / (done - since)
        left = self.tc.max_seconds - (now - self.started)
        total = min(self.cap, done + max(0, int(left / per_step)))
        total = int(D.all_sum(ctx, [total])[0] / ctx.world)  # every rank the same count
        self.tc.max_steps = max(total, done)
        self.mark = (done, now)
        if main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_json(self.path, {"max_steps": self.tc.max_steps, "seconds_per_step": per_step,
                                    "measured_steps": done - since, "at_step": done,
                                    "max_seconds": self.tc.max_seconds})
        log.info("train.max_seconds=%s: %.2f s/step, %d steps", self.tc.max_seconds, per_step, self.tc.max_steps)

    def start(self) -> None:
        self.started = time.perf_counter()


def compiled_layers(student, tc, ctx, device) -> Callable[[], None] | None:
    """train.compile: the student's decoder layers through torch.compile (kdkit.models.forward.compile_layers);
    returns the undo. Single-process runs without gradient checkpointing only (not measured with DDP/FSDP2)."""
    if not tc.compile:
        return None
    if ctx.mode != "none" or tc.gradient_checkpointing:
        log.warning("train.compile: not applied with %s; training eagerly",
                    "train.gradient_checkpointing" if tc.gradient_checkpointing else f"distributed={ctx.mode}")
        return None
    return compile_layers(student, device=device)


def distill(student, signal_fn: Callable, data: TokenizedData, cfg: Config, *, run_dir: Path, vocab: int,
            pad_id: int, resume: bool = False, plugins: Plugins | None = None) -> TrainResult:
    """Train `student` against `signal_fn` for cfg.train.max_steps optimizer steps (on every rank of
    a torchrun / accelerate launch; rank 0 logs and its result carries the trained student);
    `train.max_seconds` may lower that count to what fits its budget (TimeBudget)."""
    tc = cfg.train.model_copy()  # its max_steps may follow the time budget; the schedule reads it live
    budget = TimeBudget(tc, run_dir, resume=resume)
    plugins = plugins or Plugins()
    ctx = D.init(tc.distributed)
    device = pick_device(tc.device)
    enable_tf32(device)
    train_attention(student)  # CPU bf16: a faster attention backward (kdkit.models.attention)
    eager = compiled_layers(student, tc, ctx, device)
    # CPU, one process: the tied embedding's gradient formed in an idle buffer of the loss (kdkit.models.forward)
    plain_embedding = tied_embedding_backward(student) if device.type == "cpu" and ctx.mode == "none" else None
    runner = D.prepare_student(student, ctx, tc, device)
    model = trained_module(runner, plugins)  # student (+ projectors, learned weights)
    model.to(device).train()
    D.broadcast_params(ctx, model)
    opt, sched = build_optimizer(model, tc)
    save, load = D.checkpointing(ctx, run_dir / "checkpoints", model=model, opt=opt, sched=sched,
                                keep=tc.keep_checkpoints)
    start = 0
    if resume:
        restored = load()
        if restored is None:
            log.warning("--resume: no checkpoint in %s, starting from step 0", run_dir / "checkpoints")
        else:
            start = restored[0]
    else:
        torch.manual_seed(tc.seed)
    writer = MetricsWriter(run_dir, start_step=start) if ctx.main else None
    history, bad_in_a_row, shown = [], 0, None
    checkpoint_due = SaveCadence(tc, ctx)
    bar = tqdm(initial=start, total=tc.max_steps, desc="distill", unit="step", disable=not ctx.main)
    budget.start()
    step = start
    with Preemption() as preempt:
        while step < tc.max_steps:
            t0 = time.perf_counter()
            batches = micro_batches(data, step, batch_size=tc.batch_size, grad_accum=tc.grad_accum,
                                    seed=tc.seed, pad_id=pad_id, group_by_length=tc.group_by_length)
            ids = [i for b in batches for i in b["ids"]]  # the global step's examples
            logged = (step + 1) % tc.log_every == 0 or step + 1 == tc.max_steps  # metrics on these steps only
            m = train_step(runner, [D.shard_batch(b, ctx) for b in batches], signal_fn, cfg, vocab=vocab,
                           device=device, precision=tc.precision, plugins=plugins, step=step, dist=ctx,
                           metrics=logged, settle=False)
            D.sync_grads(ctx, model)
            stepped = optimizer_step(model, opt, sched, m, tc, step=step + 1, ids=ids)
            for hook in plugins.after_step:
                hook(step + 1)
            bad_in_a_row = 0 if stepped else bad_in_a_row + 1
            if bad_in_a_row >= tc.max_bad_steps:
                raise FloatingPointError(f"{bad_in_a_row} non-finite steps in a row (train.max_bad_steps); "
                                         "lower train.lr or check the data")
            m.update(step=step + 1, skipped=not stepped, tokens_per_s=m["tokens"] / (time.perf_counter() - t0),
                     ids=ids)  # the examples of this step: a resumed run's stream can be audited
            history.append(m)
            shown = m if logged else shown  # the bar shows the last logged kl and top-1
            bar.set_postfix(loss=f"{m['loss']:.3f}", kl=f"{shown['kl']:.3f}" if shown else "-",
                            top1=f"{shown['top1']:.2f}" if shown else "-", tok_s=f"{m['tokens_per_s']:.0f}")
            if writer and logged:
                writer.write(m)
            if D.any_rank(ctx, preempt.requested):
                save(step + 1)
                if writer:
                    writer.close()
                log.warning("preempted: checkpoint at step %d written; rerun with --resume", step + 1)
                raise SystemExit(143)
            if checkpoint_due(step + 1):
                save(step + 1)
            step += 1
            budget.after_step(step - start, ctx, main=ctx.main)
            bar.total = tc.max_steps
            bar.update(1)
    bar.close()
    save(tc.max_steps)
    if eager:
        eager()  # evaluation and saving see the eager layers
    if plain_embedding:
        plain_embedding()
    release()  # the reclaimed (V, H) gradient is not needed past the last step
    if writer:
        writer.close()
    model.eval()
    trained = D.plain_student(ctx, student, runner)
    D.finish(ctx)  # from here rank 0 evaluates and saves alone
    return TrainResult(steps=tc.max_steps, resumed_from=start, history=history, student=trained, main=ctx.main)
