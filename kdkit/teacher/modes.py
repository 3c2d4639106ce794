"""Teacher-side training modes: signal functions built from other signal functions.

Each builder takes `signal_fn(batch) -> DenseSignal | SparseSignal` (or several) and returns one of
the same kind, so the loop and the losses are untouched: several teachers mixed into one
distribution (multi-teacher), a per-token KD `weight` on the signal (selective distillation), a
frozen copy of the student as the teacher (self-distillation).

What a mode measures per micro-batch goes into `batch["log"]` ({name: float}); the loop averages it
over the step's micro-batches and writes it as `mode/NAME`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

from kdkit.config import SelectiveConfig
from kdkit.errors import UserError
from kdkit.models import load as M
from kdkit.models.forward import supervised_logits, supervised_positions
from kdkit.signal import DenseSignal, HeadSignal, Provenance, SparseSignal

from .online import online_signal_fn

log = logging.getLogger(__name__)


def report(batch: dict, name: str, value: float) -> None:
    """Record one of this micro-batch's mode metrics (logged as `mode/NAME`)."""
    batch.setdefault("log", {})[name] = float(value)


# ---------------------------------------------------------------- multi-teacher


def load_extra_teachers(specs, *, tokenizer, device) -> list[tuple[str, torch.nn.Module]]:
    """(id, frozen model) of every `modes.teachers.extra` entry; each must share the main tokenizer."""
    out = []
    for i, spec in enumerate(specs):
        src = M.resolve(spec.path, gguf_file=spec.gguf_file)
        tok = M.load_tokenizer(src)
        if M.tokenizer_hash(tok) != M.tokenizer_hash(tokenizer):
            raise UserError(f"modes.teachers.extra[{i}] ({spec.path}) has another tokenizer than teacher.path: "
                            "multi-teacher distillation mixes distributions over one vocabulary; use teachers "
                            "that share the tokenizer")
        out.append((src.id, M.freeze(M.load_model(src)).to(device)))
    return out


def mixture_signal_fn(signal_fns: list[Callable], weights: list[float], *, combine: str,
                      provenance: Provenance) -> Callable:
    """One dense signal from several teachers: log Σ_i w_i(t) · p_i(t) as logits (N, V).

    `combine`: "mixture" uses the static weights (normalised); "confidence" scales teacher i's weight
    per token by its max probability, then normalises per token. A weight-0 teacher contributes
    log 0 = −inf to the log-sum-exp: no effect at all. The mixture is formed at T = 1; the loss then
    softens it by loss.temperature like any teacher's logits.
    """
    if combine not in ("mixture", "confidence"):
        raise ValueError(f"combine must be 'mixture' or 'confidence', got {combine!r}")
    static = torch.tensor(weights, dtype=torch.float32)
    if static.sum() <= 0:
        raise UserError("modes.teachers: every teacher has weight 0; give at least one a positive weight")
    static = static / static.sum()  # (M,)

    @torch.no_grad()
    def signal_fn(batch: dict) -> DenseSignal:
        logp = torch.stack([_dense(fn(batch)).float().log_softmax(-1) for fn in signal_fns])  # (M, N, V)
        w = static.to(logp.device)[:, None].expand(logp.shape[:2])  # (M, N)
        if combine == "confidence":
            w = w * logp.max(-1).values.exp()  # (M, N): weight × teacher confidence
            w = w / w.sum(0, keepdim=True).clamp(min=1e-12)
        for i in range(len(signal_fns)):
            report(batch, f"teacher{i}_weight", w[i].mean())
        mixed = torch.logsumexp(w.log()[..., None] + logp, dim=0)  # (N, V); log 0 = -inf drops a teacher
        return DenseSignal(mixed, provenance)

    return signal_fn


def _dense(signal) -> torch.Tensor:
    if not isinstance(signal, (DenseSignal, HeadSignal)):
        raise UserError("multi-teacher mixing needs online teachers (dense logits): set teacher.signal=online")
    return signal.logits


def scaled_signal_fn(signal_fn: Callable, weight: float) -> Callable:
    """The same signal with every token's KD weight multiplied by `weight` (teachers.combine=sum)."""

    def fn(batch: dict):
        signal = signal_fn(batch)
        base = signal.weight if signal.weight is not None else torch.ones(signal.num_tokens)
        return dataclasses.replace(signal, weight=base.to(torch.float32) * weight)

    return fn


# ---------------------------------------------------------------- self-distillation


def self_signal_fn(model: torch.nn.Module, *, vocab: int, kind: str) -> Callable:
    """The student's frozen copy (initial weights, or an EMA updated by the loop) as the teacher."""
    inner = online_signal_fn(model, vocab=vocab, provenance=Provenance(teacher_id=f"self:{kind}"))

    def fn(batch: dict):
        model.eval()  # the loop's .train() reaches an EMA copy held among the trained modules
        return inner(batch)

    return fn


# ---------------------------------------------------------------- selective distillation


def token_scores(signal, by: str, *, student_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token score (N,): the teacher's max prob, its entropy (nats), or 1.0 where teacher and
    student top-1 disagree (0.0 where they agree)."""
    if isinstance(signal, SparseSignal):
        logp = signal.logprobs.float()  # (N, k); the tail bucket joins for the entropy
        tail = signal.tail if signal.tail is not None else torch.log1p(-logp.exp().sum(-1).clamp(max=1 - 1e-7))
        buckets = torch.cat([logp, tail.float()[:, None]], dim=1)  # (N, k + 1)
        top_id = signal.ids.gather(1, logp.argmax(-1, keepdim=True))[:, 0]  # (N,)
    else:
        buckets = signal.logits.float().log_softmax(-1)  # (N, V)
        top_id = buckets.argmax(-1)  # (N,)
    if by == "max_prob":
        return buckets.max(-1).values.exp()
    if by == "entropy":
        p = buckets.exp()
        return -(torch.where(p > 0, p * buckets, 0.0)).sum(-1)
    if by == "disagreement":
        return (student_logits.argmax(-1) != top_id.to(student_logits.device)).float()
    raise ValueError(f"unknown selection {by!r}")


def keep_mask(scores: torch.Tensor, sc: SelectiveConfig, *, rows: torch.Tensor) -> torch.Tensor:
    """Tokens kept (N,) bool; at sequence level each token follows its sequence's mean score.

    `rows` (N,) is the batch row of every supervised token.
    """
    if sc.level == "sequence":
        n_rows = int(rows.max()) + 1 if rows.numel() else 0
        total = torch.zeros(n_rows, device=scores.device).index_add_(0, rows, scores)  # (B,)
        count = torch.bincount(rows, minlength=n_rows).clamp(min=1)  # (B,)
        scores = (total / count)[rows]  # (N,) the sequence mean at every token
    if sc.by == "entropy":
        return scores <= sc.threshold
    if sc.by == "disagreement" and sc.level == "token":
        return scores > 0
    return scores >= sc.threshold


def selective_signal_fn(signal_fn: Callable, sc: SelectiveConfig, *, student=None, vocab: int) -> Callable:
    """The signal with KD weight 0 on the tokens not selected; logs `kept_fraction`."""

    def fn(batch: dict):
        signal = signal_fn(batch)
        student_logits = None
        if sc.by == "disagreement":
            with torch.no_grad():
                student_logits, _ = supervised_logits(student, batch, vocab=vocab)  # (N, V)
        scores = token_scores(signal, sc.by, student_logits=student_logits)  # (N,)
        mask, _ = supervised_positions(batch["labels"])  # (B, T-1)
        rows = mask.nonzero()[:, 0].to(scores.device)  # (N,) batch row of each supervised token
        keep = keep_mask(scores, sc, rows=rows)  # (N,)
        report(batch, "kept_fraction", keep.float().mean() if keep.numel() else 1.0)
        base = signal.weight if signal.weight is not None else torch.ones_like(scores)
        return dataclasses.replace(signal, weight=base.to(scores.device) * keep.float())

    return fn


# ---------------------------------------------------------------- builder (called by recipes/distill.py)


def mode_signal(cfg, signal_fn: Callable, *, tokenizer, student, vocab: int, provenance: Provenance,
                self_teacher=None, device="cpu") -> tuple[Callable, list]:
    """The run's signal function with modes.self_distill / teachers / selective applied, and the
    extra teachers' (signal_fn, weight) pairs that teachers.combine=sum trains as loop terms."""
    m = cfg.modes
    extras = []
    if self_teacher is not None:
        signal_fn = self_signal_fn(self_teacher, vocab=vocab, kind=m.self_distill.teacher)
    if m.teachers.extra:
        loaded = load_extra_teachers(m.teachers.extra, tokenizer=tokenizer, device=device)
        fns = [signal_fn] + [online_signal_fn(model, vocab=vocab, provenance=Provenance(teacher_id=tid))
                             for tid, model in loaded]
        weights = [m.teachers.weight] + [spec.weight for spec in m.teachers.extra]
        total = sum(weights)
        if total <= 0:
            raise UserError("modes.teachers: every teacher has weight 0; give at least one a positive weight")
        if m.teachers.combine == "sum":
            signal_fn = scaled_signal_fn(fns[0], weights[0] / total)
            extras = [(fn, w / total) for fn, w in zip(fns[1:], weights[1:])]
        else:
            signal_fn = mixture_signal_fn(fns, weights, combine=m.teachers.combine, provenance=provenance)
    if m.selective.by != "off":
        signal_fn = selective_signal_fn(signal_fn, m.selective, student=student, vocab=vocab)
    return signal_fn, extras
