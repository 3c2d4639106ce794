"""`kdkit eval CONFIG`: teacher vs student-before vs student-after on held-out data."""

from __future__ import annotations

from pathlib import Path

from kdkit.config import Config
from kdkit.errors import UserError
from kdkit.eval.retention import evaluate_models, markdown_table, write_report
from kdkit.models.load import head_rows, load_model, load_tokenizer, resolve, shared_vocab_size
from kdkit.train.loop import pick_device
from kdkit.train.setup import build_student, load_teacher, tokenize_file


def run(cfg: Config, *, teacher=None) -> dict:
    run_dir = Path(cfg.run.dir)
    student_dir = Path(cfg.run.student_dir) if cfg.run.student_dir else run_dir / "student"
    if not student_dir.is_dir():
        raise UserError(f"no student at {student_dir}: run `kdkit distill` first or set run.student_dir")
    teacher = teacher or load_teacher(cfg)
    src = resolve(str(student_dir))
    after, tok = load_model(src), load_tokenizer(src)
    before = build_student(cfg, teacher)[0] if cfg.eval.student_before else None
    vocab = shared_vocab_size(teacher.tokenizer, tok, head_rows(teacher.model), head_rows(after))
    held_out = tokenize_file(cfg.data.eval, tok, cfg, key="data.eval")
    if cfg.eval.limit:
        held_out.input_ids, held_out.labels = held_out.input_ids[: cfg.eval.limit], held_out.labels[: cfg.eval.limit]
    device = pick_device(cfg.train.device)
    models = {**({"student_before": before.to(device)} if before is not None else {}), "student_after": after.to(device)}
    metrics = evaluate_models(models, teacher.model.to(device), held_out, vocab=vocab,
                              pad_id=tok.pad_token_id, batch_size=cfg.eval.batch_size, device=device)
    json_path, md_path = write_report(metrics, run_dir)
    return {"metrics": metrics, "table": markdown_table(metrics), "metrics_path": json_path, "report_path": md_path}
