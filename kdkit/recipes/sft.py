"""`kdkit sft CONFIG`: sequence-level KD — the student learns the teacher-written data (`kdkit generate`).

Cross-entropy on the teacher's tokens (the assistant turns of data.train), through the same loop,
checkpoints and outputs as `kdkit distill`: the signal is the data itself (`sequence_signal_fn`, one-hot
on the written tokens) and loss.alpha is 0, so no teacher model is loaded unless the student is made
from its layers (student.init: teacher_layers). The licence of the teacher that wrote the data (from
the dataset's manifest, or teacher.license) passes the same gate as the other recipes; the decision
goes into the student's model card.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kdkit.config import Config, save_config
from kdkit.models.license import gate_from_config, license_card_lines
from kdkit.models.load import count_parameters, head_rows
from kdkit.signal import Provenance
from kdkit.teacher.dataset import read_manifest
from kdkit.teacher.sequence import sequence_signal_fn
from kdkit.train.loop import distill
from kdkit.train.setup import build_student, load_teacher, save_student, tokenize_file


def run(cfg: Config, *, resume: bool = False, teacher=None) -> dict:
    # ---- setup
    cfg = cfg.model_copy(deep=True)
    cfg.loss.alpha, cfg.loss.implementation = 0.0, "dense"  # pure CE on the teacher's tokens
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.run.dir)
    save_config(cfg, run_dir / "config.yaml")
    manifest = read_manifest(cfg.data.train) or {}
    writer = _teacher_name(manifest) or cfg.teacher.path
    licence_id = cfg.teacher.license or (manifest.get("license") or {}).get("license")
    licence = gate_from_config(licence_id, cfg.teacher, teacher=writer)
    if cfg.student.init == "teacher_layers":
        teacher = teacher or load_teacher(cfg)
    student, tok, init = build_student(cfg, teacher)
    train = tokenize_file(cfg.data.train, tok, cfg, key="data.train")
    signal_fn = sequence_signal_fn(provenance=Provenance(teacher_id=writer, top_k=1))

    # ---- loop
    result = distill(student, signal_fn, train, cfg, run_dir=run_dir, vocab=head_rows(student),
                     pad_id=tok.pad_token_id, resume=resume)
    if result.student is not None:  # the trained module the loop hands back (FSDP2: gathered)
        student = result.student

    # ---- save
    card = _card(cfg, writer=writer, licence=licence, init=init, params=count_parameters(student),
                 steps=result.steps, rows=len(train.input_ids), history=result.history)
    student_dir = save_student(student, tok, run_dir / "student", card=card)
    return {"run_dir": run_dir, "student_dir": student_dir, "history": result.history, "license": licence}


def _teacher_name(manifest: dict) -> str | None:
    source = manifest.get("teacher") or {}
    return source.get("teacher") or source.get("model")


def _card(cfg: Config, *, writer: str, licence: dict, init: str, params: int, steps: int, rows: int,
          history: list[dict]) -> str:
    tc = cfg.train
    last = f", final loss {history[-1]['loss']:.3f}" if history else ""
    lines = [
        "---", f"license: {licence['license']}", "library_name: transformers",
        "tags: [kdkit, distillation, sequence-level-kd]", "---", "",
        "# Student trained with kdkit on teacher-written data", "",
        f"- **Teacher (wrote the data):** `{writer}` (licence: {licence['license']})",
        *license_card_lines(licence),
        f"- **Student initialisation:** {init}; {params:,} parameters",
        "- **Objective:** sequence-level KD: cross-entropy on the teacher's tokens (assistant turns)",
        f"- **Training:** {steps} steps, batch {tc.batch_size} × accumulation {tc.grad_accum}, AdamW lr {tc.lr} "
        f"(warm-up {tc.warmup_steps}, cosine), seed {tc.seed}{last}",
        f"- **Data:** {cfg.data.train} ({rows} rows)", "",
    ]
    return "\n".join(lines)
