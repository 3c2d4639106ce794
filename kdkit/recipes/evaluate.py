"""`kdkit eval CONFIG`: teacher vs student-before vs student-after on held-out data.

Next-token metrics against the teacher (one teacher pass), then for every model: lm-evaluation-harness
tasks (eval.harness_tasks) and speed/memory/disk (eval.speed), both of which read the model from an
HF directory: the teacher is converted once into RUN_DIR/eval_models/teacher, the student before
distillation is saved to RUN_DIR/eval_models/student_before, the student after is the run's student.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from kdkit.config import Config
from kdkit.errors import UserError
from kdkit.eval.harness import run_harness
from kdkit.eval.report import retention_table
from kdkit.eval.retention import evaluate_models, markdown_table, write_report
from kdkit.eval.speculative import speed_report
from kdkit.eval.speed import disk_bytes, measure_dirs, measure_speed
from kdkit.models.load import head_rows, load_model, load_tokenizer, resolve, shared_vocab_size, tokenizer_hash
from kdkit.train.loop import pick_device
from kdkit.train.setup import build_student, load_teacher, tokenize_file


def run(cfg: Config, *, teacher=None) -> dict:
    run_dir = Path(cfg.run.dir)
    student_dir = Path(cfg.run.student_dir) if cfg.run.student_dir else run_dir / "student"
    if cfg.draft.path and not cfg.run.student_dir and not student_dir.is_dir():
        return _with_draft(cfg, teacher or load_teacher(cfg), {"table": ""})  # a draft alone: its speed-up only
    if not student_dir.is_dir():
        raise UserError(f"no student at {student_dir}: run `kdkit distill` first or set run.student_dir")
    teacher = teacher or load_teacher(cfg)
    src = resolve(str(student_dir))
    after, tok = load_model(src), load_tokenizer(src)
    before, before_tok = build_student(cfg, teacher)[:2] if cfg.eval.student_before else (None, None)
    vocab = shared_vocab_size(teacher.tokenizer, tok, head_rows(teacher.model), head_rows(after))
    held_out = tokenize_file(cfg.data.eval, tok, cfg, key="data.eval")
    if cfg.eval.limit:
        n = cfg.eval.limit  # ids, tokens and labels stay aligned
        held_out = replace(held_out, ids=held_out.ids[:n], input_ids=held_out.input_ids[:n], labels=held_out.labels[:n])
    device = pick_device(cfg.train.device)
    models = {**({"student_before": before.to(device)} if before is not None else {}), "student_after": after.to(device)}
    metrics = evaluate_models(models, teacher.model.to(device), held_out, vocab=vocab,
                              pad_id=tok.pad_token_id, batch_size=cfg.eval.batch_size, device=device)
    ec = cfg.eval
    if ec.harness_tasks or ec.speed:
        dirs = {"teacher": _teacher_dir(teacher, run_dir / "eval_models" / "teacher")}
        if before is not None:
            dirs["student_before"] = _save(before, before_tok, run_dir / "eval_models" / "student_before")
        dirs["student_after"] = student_dir
        for name, d in dirs.items():
            if ec.harness_tasks:
                metrics[name]["harness"] = run_harness(d, ec.harness_tasks, limit=ec.harness_limit,
                                                       batch_size=ec.batch_size, device=str(device))
        if ec.speed:
            for name, result in zip(dirs, _speed({"teacher": teacher.model, **models}, dirs, device, ec)):
                metrics[name].update(result)
    json_path, md_path = write_report(metrics, run_dir)
    table = markdown_table(metrics) + "\n\n" + retention_table(metrics)
    out = {"metrics": metrics, "table": table, "metrics_path": json_path, "report_path": md_path}
    return _with_draft(cfg, teacher, out) if cfg.draft.path else out


def _with_draft(cfg: Config, teacher, out: dict) -> dict:
    """eval with draft.path: the draft's measured speed-up for its target (draft.target, else the
    teacher), greedy, output checked identical; RUN_DIR/speculative.json + .md, appended to the table."""
    target_path = cfg.draft.target
    target_src = resolve(target_path) if target_path else teacher.source
    target = load_model(target_src) if target_path else teacher.model
    src = resolve(cfg.draft.path)
    draft, tok = load_model(src), load_tokenizer(src)
    target_tok = load_tokenizer(target_src) if target_path else teacher.tokenizer
    if tokenizer_hash(tok) != tokenizer_hash(target_tok):  # assisted generation compares token ids
        raise UserError(f"draft.path {cfg.draft.path}: its tokenizer differs from the target's ({target_src.id}); "
                        "a speculative draft must share the target's tokenizer (`kdkit draft` makes one)")
    measured, table = speed_report(cfg.draft, target, draft, tok, title=f"`{target_src.id}` with the draft "
                                   f"`{cfg.draft.path}`", device=pick_device(cfg.train.device))
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "speculative.json").write_text(json.dumps(measured, indent=1))
    (run_dir / "speculative.md").write_text(table + "\n")
    path = run_dir / "speculative.md"
    return {**out, "speculative": measured, "table": (out["table"] + "\n\n" + table).strip(),
            "metrics_path": out.get("metrics_path", run_dir / "speculative.json"), "report_path": out.get("report_path", path)}


def _speed(models: dict, dirs: dict, device: torch.device, ec) -> list[dict]:
    """Speed, peak memory and disk size of each model, in the order of `dirs`."""
    if device.type == "cuda":  # in process: torch.cuda.max_memory_allocated is each model's own peak
        return [{**measure_speed(models[name], prompt_tokens=ec.speed_prompt_tokens, new_tokens=ec.speed_new_tokens,
                                 device=device), "disk_bytes": disk_bytes(d)} for name, d in dirs.items()]
    # CPU: a fresh process, so that its peak resident memory is the models' alone
    return measure_dirs(list(dirs.values()), prompt_tokens=ec.speed_prompt_tokens, new_tokens=ec.speed_new_tokens,
                        threads=torch.get_num_threads())


def _save(model, tokenizer, out_dir: Path) -> Path:
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _teacher_dir(teacher, out_dir: Path) -> Path:
    """The teacher as an HF directory, written once per teacher (it may be a GGUF file or an alias)."""
    if teacher.source.gguf_file is None:
        return teacher.source.directory  # already an HF directory
    stamp = out_dir / "kdkit-source.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("source") == teacher.source.id:
        return out_dir
    _save(teacher.model, teacher.tokenizer, out_dir)
    stamp.write_text(json.dumps({"source": teacher.source.id}))
    return out_dir
