"""The distillation loop: plain functions, read top to bottom.

The loop never calls the teacher itself: it is handed `signal_fn(batch) -> DenseSignal` (online
teacher, offline cache or served teacher alike), so the same loop serves every training mode.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from kdkit.config import Config
from kdkit.data.collate import batch_order, collate
from kdkit.data.render import TokenizedData
from kdkit.losses import distill_loss, forward_kl, fused_distill_loss, normalize, sparse_divergence
from kdkit.models.forward import decoder_hidden, supervised_logits, supervised_positions
from kdkit.signal import DenseSignal, SparseSignal
from kdkit.train.checkpoint import load_latest, save_checkpoint
from kdkit.train.metrics import MetricsWriter
from kdkit.train.optim import build_optimizer

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
    steps: int
    resumed_from: int
    history: list[dict]


def pick_device(name: str) -> torch.device:
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


def autocast(device: torch.device, precision: str):
    """bf16 autocast (fp32 master weights) where asked for, or on 'auto' where the device does bf16
    natively; fp32 otherwise."""
    use = precision == "bf16" or (precision == "auto" and native_bf16(device))
    return torch.autocast(device.type, dtype=torch.bfloat16) if use else contextlib.nullcontext()


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """One permutation per epoch, computed once rather than at every step."""
    return tuple(batch_order(n, seed=seed, epoch=epoch))


def micro_batches(data: TokenizedData, step: int, *, batch_size: int, grad_accum: int, seed: int, pad_id: int):
    """The micro-batches of optimizer step `step`: a pure function of (step, seed), so resuming
    at any step sees exactly the examples an uninterrupted run would, across epoch boundaries."""
    n = len(data.input_ids)
    per_step = batch_size * grad_accum
    batches = []
    for m in range(grad_accum):
        idx = []
        for j in range(batch_size):
            k = step * per_step + m * batch_size + j  # position in the endless example stream
            epoch = k // n
            idx.append(_epoch_order(n, seed, epoch)[k % n])
        batch = collate([data.input_ids[i] for i in idx], [data.labels[i] for i in idx], pad_id=pad_id)
        batch["ids"] = [data.ids[i] for i in idx]
        batches.append(batch)
    return batches


def train_step(student, batches, signal_fn: Callable, cfg: Config, *, vocab: int, device, precision: str,
               plugins: Plugins | None = None, step: int = 0):
    """One optimizer step's forward/backward over its micro-batches; returns summed metrics.

    Every micro-batch loss is normalised by the supervised-token count of the WHOLE step, so the
    accumulated gradient equals the gradient of the full-batch mean (4×2 = 1×8).
    """
    plugins = plugins or Plugins()
    if plugins.prepare is not None:  # before counting: a prepared batch may carry other labels
        batches = [plugins.prepare(b, step) for b in batches]
    num_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    out = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "kl": 0.0, "top1": 0.0, "tokens": 0}
    lc = cfg.loss
    for batch in batches:
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        with autocast(device, precision):
            with torch.no_grad():
                signal = signal_fn(batch)
            if use_fused(lc, student, signal):
                parts, kl, agree = _fused_micro(student, batch, signal, lc, vocab=vocab, num_tokens=num_tokens)
            else:
                s_logits, targets = supervised_logits(student, batch, vocab=vocab)  # (N, V), (N,)
                parts = distill_loss(s_logits, signal, targets, divergence=lc.divergence,
                                     temperature=lc.temperature, alpha=lc.alpha, num_tokens=num_tokens,
                                     **_div_kwargs(lc))
                kl, agree = None, None
            total = parts.total
            if plugins.terms:
                values = {name: term(batch, signal, num_tokens) for name, term in plugins.terms.items()}
                total, weights = (plugins.combine or plain_sum)(parts.total, values)
                for name, value in values.items():
                    out[f"term/{name}"] = out.get(f"term/{name}", 0.0) + float(value.detach())
                    out[f"weight/{name}"] = float(weights[name])
        total.backward()
        if kl is None:
            with torch.no_grad():
                kl, agree = agreement(s_logits.detach(), signal, parts, lc, num_tokens)
        out["kl"] += kl
        out["top1"] += agree
        out["loss"] += float(total.detach())
        out["kd"] += float(parts.kd)
        out["ce"] += float(parts.ce)
        out["tokens"] += int(batch["attention_mask"].sum())
    out["top1"] /= max(num_tokens, 1)
    out["supervised_tokens"] = num_tokens
    return out


def use_fused(lc, student, signal) -> bool:
    """The fused path needs a dense teacher signal and a plain linear head (no logit softcapping)."""
    if lc.implementation == "dense":
        return False
    if getattr(student.config, "final_logit_softcapping", None) or not isinstance(signal, DenseSignal):
        raise ValueError("loss.implementation=fused needs a dense (online) teacher signal and a model "
                         "without final-logit softcapping; use loss.implementation=dense")
    return True


def _fused_micro(student, batch, signal, lc, *, vocab: int, num_tokens: int):
    """The loss from the student's hidden rows and lm_head, chunk by chunk: never (N, V) of the
    student's logits. The progress metrics then come from the loss itself: KL is the KD term when
    it is forward KL at T = 1 (else NaN) and top-1 agreement is not computed (NaN)."""
    hidden = decoder_hidden(student, batch["input_ids"], batch["attention_mask"])  # (B, T, H)
    mask, targets = supervised_positions(batch["labels"])
    head = student.get_output_embeddings()
    parts = fused_distill_loss(hidden[:, :-1][mask], head.weight, targets, teacher_logits=signal,
                               student_bias=head.bias, divergence=lc.divergence, temperature=lc.temperature,
                               alpha=lc.alpha, num_tokens=num_tokens, vocab=vocab, **_div_kwargs(lc))
    kl = float(parts.kd) if (lc.divergence == "forward_kl" and lc.temperature == 1) else math.nan
    return parts, kl, math.nan


def agreement(s_logits, signal, parts, lc, num_tokens: int) -> tuple[float, float]:
    """(this micro-batch's share of KL(teacher ‖ student) at T = 1, count of top-1 agreements).

    For a top-k signal the KL is over the k + 1 buckets and the teacher's argmax is its first id.
    """
    if lc.divergence == "forward_kl" and lc.temperature == 1:
        kl = parts.kd  # already this quantity
    elif isinstance(signal, SparseSignal):
        kl = normalize(sparse_divergence("forward_kl", s_logits, signal).sum(), num_tokens)
    else:
        kl = normalize(forward_kl(s_logits, signal.logits).sum(), num_tokens)
    teacher_top = signal.ids[:, 0] if isinstance(signal, SparseSignal) else signal.logits.argmax(-1)
    return float(kl), float((s_logits.argmax(-1) == teacher_top).sum())


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


def optimizer_step(model, opt, sched, m: dict, tc, *, step: int, ids: list[str]) -> bool:
    """Clip and step; a non-finite loss or gradient skips the update (parameters, optimizer and
    schedule untouched) or stops the run, as `train.nonfinite` says. Returns whether it stepped."""
    max_norm = tc.max_grad_norm if tc.max_grad_norm else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    m["grad_norm"], m["lr"] = float(grad_norm), sched.get_last_lr()[0]
    finite = math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
    if finite:
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    if not finite:
        msg = f"step {step}: non-finite loss {m['loss']} or gradient norm {m['grad_norm']} (examples {ids})"
        if tc.nonfinite == "stop":
            raise FloatingPointError(msg + "; stopping (train.nonfinite=stop)")
        log.warning("%s; update skipped", msg)
    return finite


def distill(student, signal_fn: Callable, data: TokenizedData, cfg: Config, *, run_dir: Path, vocab: int,
            pad_id: int, resume: bool = False, plugins: Plugins | None = None) -> TrainResult:
    """Train `student` against `signal_fn` for cfg.train.max_steps optimizer steps."""
    tc = cfg.train
    plugins = plugins or Plugins()
    device = pick_device(tc.device)
    model = trained_module(student, plugins)  # student (+ projectors, learned weights)
    model.to(device).train()
    opt, sched = build_optimizer(model, tc)
    ckpt_dir = run_dir / "checkpoints"
    save = partial(save_checkpoint, ckpt_dir, model=model, optimizer=opt, scheduler=sched,
                   keep=tc.keep_checkpoints)
    start = 0
    if resume:
        restored = load_latest(ckpt_dir, model=model, optimizer=opt, scheduler=sched)
        if restored is None:
            log.warning("--resume: no checkpoint in %s, starting from step 0", ckpt_dir)
        else:
            start = restored[0]
    else:
        torch.manual_seed(tc.seed)
    writer = MetricsWriter(run_dir, start_step=start)
    history, bad_in_a_row = [], 0
    bar = tqdm(range(start, tc.max_steps), initial=start, total=tc.max_steps, desc="distill", unit="step")
    with Preemption() as preempt:
        for step in bar:
            t0 = time.perf_counter()
            batches = micro_batches(data, step, batch_size=tc.batch_size, grad_accum=tc.grad_accum,
                                    seed=tc.seed, pad_id=pad_id)
            m = train_step(student, batches, signal_fn, cfg, vocab=vocab, device=device, precision=tc.precision,
                           plugins=plugins, step=step)
            ids = [i for b in batches for i in b["ids"]]
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
            bar.set_postfix(loss=f"{m['loss']:.3f}", kl=f"{m['kl']:.3f}", top1=f"{m['top1']:.2f}",
                            tok_s=f"{m['tokens_per_s']:.0f}")
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.max_steps:
                writer.write(m)
            if preempt.requested:
                save(step + 1)
                writer.close()
                log.warning("preempted: checkpoint at step %d written; rerun with --resume", step + 1)
                raise SystemExit(143)
            if tc.save_every and (step + 1) % tc.save_every == 0 and step + 1 < tc.max_steps:
                save(step + 1)
    save(tc.max_steps)
    writer.close()
    model.eval()
    return TrainResult(steps=tc.max_steps, resumed_from=start, history=history)
