"""Held-out evaluation of teacher and students side by side, from one teacher pass.

For each model: per-token cross-entropy and perplexity on the reference answers, KL(teacher ‖ model)
and top-1 agreement with the teacher, parameter count, and forward throughput (tokens/s).
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
from kdkit.models.forward import supervised_logits
from kdkit.models.load import count_parameters


@torch.no_grad()
def evaluate_models(models: dict, teacher, data: TokenizedData, *, vocab: int, pad_id: int,
                    batch_size: int = 8, device="cpu") -> dict[str, dict]:
    """Metrics for every model in `models` (name → model) against `teacher`, on `data`."""
    names = ["teacher", *models]
    sums = {n: {"ce": 0.0, "kl": 0.0, "top1": 0.0, "seconds": 0.0, "tokens": 0} for n in names}
    count = 0
    for start in range(0, len(data.input_ids), batch_size):
        batch = collate(data.input_ids[start : start + batch_size], data.labels[start : start + batch_size],
                        pad_id=pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        t_logits, targets = _timed(teacher, batch, vocab, sums["teacher"])
        count += len(targets)
        for name in names:
            logits = t_logits if name == "teacher" else _timed(models[name], batch, vocab, sums[name])[0]
            acc = sums[name]
            acc["ce"] += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
            acc["kl"] += float(forward_kl(logits, t_logits).sum())
            acc["top1"] += float((logits.argmax(-1) == t_logits.argmax(-1)).sum())
    all_models = {"teacher": teacher, **models}
    out = {}
    for name in names:
        acc = sums[name]
        ce = acc["ce"] / max(count, 1)
        out[name] = {
            "ce": ce, "ppl": math.exp(min(ce, 50.0)), "kl_to_teacher": acc["kl"] / max(count, 1),
            "top1_agreement": acc["top1"] / max(count, 1), "params": count_parameters(all_models[name]),
            "tokens_per_s": acc["tokens"] / max(acc["seconds"], 1e-9), "eval_tokens": count,
        }
    return out


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
