"""Held-out evaluation of teacher and students side by side, from one teacher pass.

For each model: per-token cross-entropy and perplexity on the reference answers, KL(teacher ‖ model)
and top-1 agreement with the teacher, parameter count, and forward throughput (tokens/s).

A teacher with another tokenizer (modes.cross_tokenizer) comes as `teacher_signal`, the run's
cross-tokenizer signal function: its logits over its own vocabulary at the student's supervised
positions, `weight` > 0 on the aligned ones. KL and top-1 are then taken on the aligned tokens
only (`aligned_tokens`), through the vocabulary map (kdkit.models.vocab_map: the teacher's
probabilities moved to the student token each teacher token's text starts with); the
teacher's cross-entropy on the student's reference tokens is not defined (None, "–" in the table),
and its tokens/s counts the student's tokens of the same text (its pass re-tokenises them).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from kdkit.data.collate import collate
from kdkit.data.render import TokenizedData
from kdkit.losses import forward_kl
from kdkit.models.forward import supervised_logits, supervised_positions
from kdkit.models.load import count_parameters
from kdkit.models.vocab_map import shared_vocab_metrics


@torch.no_grad()
def evaluate_models(models: dict, teacher, data: TokenizedData, *, vocab: int, pad_id: int,
                    batch_size: int = 8, device="cpu", teacher_signal=None) -> dict[str, dict]:
    """Metrics for every model in `models` (name → model) against `teacher`, on `data`;
    `teacher_signal`: a cross-tokenizer teacher (see the module docstring)."""
    names = ["teacher", *models]
    sums = {n: {"ce": 0.0, "kl": 0.0, "top1": 0.0, "seconds": 0.0, "tokens": 0} for n in names}
    count = compared = 0  # supervised tokens; those compared with the teacher (cross-tokenizer: aligned)
    for start in range(0, len(data.input_ids), batch_size):
        batch = collate(data.input_ids[start : start + batch_size], data.labels[start : start + batch_size],
                        pad_id=pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        if teacher_signal is None:
            t_logits, targets = _timed(teacher, batch, vocab, sums["teacher"])
            keep, vmap = slice(None), None
        else:
            signal = _timed_signal(teacher_signal, batch, sums["teacher"])
            t_logits, targets = signal.logits, supervised_positions(batch["labels"])[1]  # (N, V_t), (N,)
            keep, vmap = signal.weight > 0, signal.vocab_map  # (N,) the aligned rows
        count += len(targets)
        compared += len(targets) if vmap is None else int(keep.sum())
        for name in names:
            logits = t_logits if name == "teacher" else _timed(models[name], batch, vocab, sums[name])[0]
            acc = sums[name]
            if name != "teacher" or vmap is None:  # the teacher's CE on the student's tokens: undefined
                acc["ce"] += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
            if vmap is None:
                acc["kl"] += float(forward_kl(logits, t_logits).sum())
                acc["top1"] += float((logits.argmax(-1) == t_logits.argmax(-1)).sum())
            elif name != "teacher":  # the teacher against itself: KL 0, top-1 1 (below)
                kl, same = shared_vocab_metrics(logits[keep], t_logits[keep], vmap)
                acc["kl"] += float(kl.sum())
                acc["top1"] += float(same.sum())
    all_models = {"teacher": teacher, **models}
    cross = teacher_signal is not None
    out = {}
    for name in names:
        acc = sums[name]
        ce = None if cross and name == "teacher" else acc["ce"] / max(count, 1)
        self_top1 = cross and name == "teacher"
        out[name] = {
            "ce": ce, "ppl": None if ce is None else math.exp(min(ce, 50.0)),
            "kl_to_teacher": acc["kl"] / max(compared, 1),
            "top1_agreement": 1.0 if self_top1 and compared else acc["top1"] / max(compared, 1),
            "params": count_parameters(all_models[name]),
            "tokens_per_s": acc["tokens"] / max(acc["seconds"], 1e-9), "eval_tokens": count,
            **({"aligned_tokens": compared} if cross else {}),
        }
    return out


def add_ce_gap(metrics: dict[str, dict], *, baseline: str = "baseline") -> dict[str, dict]:
    """`ce_gap_closed` for every model: the share of the cross-entropy gap between the `baseline`
    model and the teacher that it closes (0 = the baseline, 1 = the teacher's CE)."""
    ref, teacher = metrics[baseline]["ce"], metrics["teacher"]["ce"]
    for m in metrics.values():
        if m.get("ce") is not None and ref is not None and teacher is not None and ref != teacher:
            m["ce_gap_closed"] = (ref - m["ce"]) / (ref - teacher)
    return metrics


def _timed_signal(signal_fn, batch, acc):
    t0 = time.perf_counter()
    signal = signal_fn(batch)
    acc["seconds"] += time.perf_counter() - t0
    acc["tokens"] += int(batch["attention_mask"].sum())
    return signal


def _timed(model, batch, vocab, acc):
    model.eval()
    t0 = time.perf_counter()
    logits, targets = supervised_logits(model, batch, vocab=vocab)
    acc["seconds"] += time.perf_counter() - t0
    acc["tokens"] += int(batch["attention_mask"].sum())
    return logits, targets


ROWS = [  # (metric key, label, format, retention: higher is better?)
    ("params", "parameters", "{:,.0f}", None),
    ("ce", "cross-entropy on references", "{:.3f}", False),
    ("ppl", "perplexity", "{:.2f}", False),
    ("kl_to_teacher", "KL(teacher ‖ model)", "{:.3f}", None),
    ("top1_agreement", "top-1 agreement with teacher", "{:.1%}", None),
    ("ce_gap_closed", "CE gap closed (vs baseline)", "{:.1%}", None),
    ("tokens_per_s", "forward tokens/s", "{:,.0f}", True),
    # kdkit.eval.speed (eval.speed): batch 1, prefill of a prompt, then greedy decode on the KV cache
    ("prefill_tokens_per_s", "prefill tokens/s", "{:,.0f}", True),
    ("decode_tokens_per_s", "decode tokens/s", "{:,.1f}", True),
    ("ms_per_token", "decode latency per token (ms)", "{:.2f}", None),
    ("peak_memory_bytes", "peak memory (MB)", "{:,.1f}", None),
    ("disk_bytes", "size on disk (MB)", "{:,.1f}", None),
]
MEGABYTES = {"peak_memory_bytes", "disk_bytes"}  # shown in MB (10^6 bytes)


def harness_keys(metrics: dict[str, dict]) -> list[tuple[str, str]]:
    """(task, metric) pairs of the lm-evaluation-harness results held by any model, in first-seen order."""
    keys = {}
    for m in metrics.values():
        for task, scores in m.get("harness", {}).items():
            keys.update({(task, metric): None for metric in scores})
    return list(keys)


def _cell(value, fmt: str, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value / 1e6 if key in MEGABYTES else value)


def markdown_table(metrics: dict[str, dict]) -> str:
    """Teacher | student-before | student-after, one row per metric."""
    names = list(metrics)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label, fmt, _ in ROWS:
        if any(key in metrics[n] for n in names):  # speed rows only when measured
            lines.append(f"| {label} | " + " | ".join(_cell(metrics[n].get(key), fmt, key) for n in names) + " |")
    for task, metric in harness_keys(metrics):
        cells = (_cell(metrics[n].get("harness", {}).get(task, {}).get(metric), "{:.3f}", metric) for n in names)
        lines.append(f"| {task} {metric} (lm-eval) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(metrics: dict[str, dict], run_dir: Path, *, extra: dict | None = None) -> tuple[Path, Path]:
    """metrics.json (numbers), report.md and report.html (tables and plots) in the run directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = dict(metrics)
    if "student_before" in metrics and "student_after" in metrics:
        before, after = metrics["student_before"]["kl_to_teacher"], metrics["student_after"]["kl_to_teacher"]
        summary["kl_ratio_after_before"] = after / before if before else None
    summary.update(extra or {})
    path = run_dir / "metrics.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
    notes = []
    if summary.get("kl_ratio_after_before") is not None:
        notes.append(f"KL to the teacher after/before distillation: {summary['kl_ratio_after_before']:.3f}×")
    from kdkit.eval.report import render_report  # report imports this module

    report = render_report(run_dir, metrics, notes=notes)  # report.md + report.html + plots/
    return path, report["md"]
