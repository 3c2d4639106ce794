"""`kdkit distill CONFIG`: logit distillation (online teacher or signal cache), evaluation, saved student."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from kdkit.config import Config, save_config
from kdkit.eval.retention import evaluate_models, markdown_table, write_report
from kdkit.models.load import count_parameters, head_rows, shared_vocab_size
from kdkit.signal import Provenance
from kdkit.teacher.cache import CacheReader, cache_signal_fn, dataset_hash
from kdkit.teacher.online import online_signal_fn
from kdkit.train.loop import Plugins, distill, pick_device
from kdkit.train.setup import build_student, cache_dir, load_teacher, model_card, save_student, tokenize_file

log = logging.getLogger(__name__)


def signal_source(cfg: Config, teacher, tok, student, train):
    """(signal_fn, vocab): the online teacher, or the verified top-k cache built for this run."""
    if cfg.teacher.signal == "cache":
        reader = CacheReader(cache_dir(cfg))
        vocab = shared_vocab_size(teacher.tokenizer, tok, reader.manifest["vocab"], head_rows(student))
        expected = Provenance(tokenizer_hash=teacher.provenance().tokenizer_hash, teacher_id=teacher.source.id,
                              chat_template_hash=teacher.provenance().chat_template_hash,
                              temperature=cfg.loss.temperature)
        return cache_signal_fn(reader, expected=expected, data_hash=dataset_hash(train)), vocab
    vocab = shared_vocab_size(teacher.tokenizer, tok, head_rows(teacher.model), head_rows(student))
    teacher.model.to(pick_device(cfg.train.device))
    return online_signal_fn(teacher.model, vocab=vocab, provenance=teacher.provenance(cfg.loss.temperature)), vocab


def run(cfg: Config, *, resume: bool = False, teacher=None) -> dict:
    # ---- setup
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.run.dir)
    save_config(cfg, run_dir / "config.yaml")
    teacher = teacher or load_teacher(cfg)
    student, tok, init = build_student(cfg, teacher)
    train = tokenize_file(cfg.data.train, tok, cfg, key="data.train")
    held_out = tokenize_file(cfg.data.eval, tok, cfg, key="data.eval") if cfg.data.eval else None
    signal_fn, vocab = signal_source(cfg, teacher, tok, student, train)
    before = copy.deepcopy(student).eval() if held_out and cfg.eval.student_before else None
    plugins = Plugins()  # training modes and auxiliary objectives add themselves here

    # ---- loop
    result = distill(student, signal_fn, train, cfg, run_dir=run_dir, vocab=vocab, pad_id=tok.pad_token_id,
                     resume=resume, plugins=plugins)

    # ---- evaluate and save
    device = pick_device(cfg.train.device)
    table, metrics = None, None
    if held_out:
        models = {**({"student_before": before.to(device)} if before else {}), "student_after": student}
        metrics = evaluate_models(models, teacher.model.to(device), held_out, vocab=vocab,
                                  pad_id=tok.pad_token_id, batch_size=cfg.eval.batch_size, device=device)
        table = markdown_table(metrics)
        write_report(metrics, run_dir, extra={"train_steps": result.steps})
    card = model_card(teacher=teacher, init=init, student_params=count_parameters(student),
                      teacher_params=count_parameters(teacher.model), cfg=cfg, eval_table=table, steps=result.steps)
    student_dir = save_student(student, tok, run_dir / "student", card=card)
    return {"run_dir": run_dir, "student_dir": student_dir, "metrics": metrics, "table": table,
            "history": result.history}
