"""`kdkit distill CONFIG`: logit distillation (online teacher or signal cache), evaluation, saved student."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from kdkit.config import Config, save_config
from kdkit.eval.retention import add_ce_gap, evaluate_models, markdown_table, write_report
from kdkit.models.license import gate_from_config
from kdkit.models.load import count_parameters, head_rows, shared_vocab_size, student_from_layers, uniform_layers
from kdkit.models.lora import apply_lora, merge_lora
from kdkit.signal import Provenance
from kdkit.teacher.cache import CacheReader, cache_signal_fn, dataset_hash
from kdkit.teacher.cross_tokenizer import cross_tokenizer_signal_fn
from kdkit.teacher.modes import mode_signal
from kdkit.teacher.online import online_signal_fn
from kdkit.train.dist import init as dist_init
from kdkit.train.dist import prepare_teacher
from kdkit.train.features import feature_plugins
from kdkit.train.loop import Plugins, distill, pick_device
from kdkit.train.modes import add_mode_plugins, self_distill_teacher
from kdkit.train.setup import build_student, cache_dir, load_teacher, model_card, save_student, teacher_dtype, tokenize_file

log = logging.getLogger(__name__)


def signal_source(cfg: Config, teacher, tok, student, train):
    """(signal_fn, vocab): the online teacher, or the verified top-k cache built for this run."""
    if cfg.modes.cross_tokenizer.enabled:  # vocab: the student's; the signal holds the teacher's own
        teacher.model.to(pick_device(cfg.train.device))
        return cross_tokenizer_signal_fn(teacher.model, teacher_tokenizer=teacher.tokenizer, student_tokenizer=tok,
                                         provenance=teacher.provenance(cfg.loss.temperature),
                                         teacher_vocab=len(teacher.tokenizer)), head_rows(student)
    if cfg.teacher.signal == "cache":
        reader = CacheReader(cache_dir(cfg), verify=True)  # checksums first: a damaged shard is named, not read
        vocab = shared_vocab_size(teacher.tokenizer, tok, reader.manifest["vocab"], head_rows(student))
        # local: the weights' content hash, not the path; served: the model's name (no local weights;
        # unknown offline when teacher.model is unset: not compared)
        served = cfg.teacher.backend == "http"
        weights = "" if served else teacher.weights_hash(reader.provenance.teacher_revision)
        expected = Provenance(tokenizer_hash=teacher.provenance().tokenizer_hash,
                              teacher_id=(cfg.teacher.model or "") if served else "", teacher_revision=weights,
                              chat_template_hash=teacher.provenance().chat_template_hash,
                              temperature=cfg.loss.temperature)
        return cache_signal_fn(reader, expected=expected, data_hash=dataset_hash(train)), vocab
    vocab = shared_vocab_size(teacher.tokenizer, tok, head_rows(teacher.model), head_rows(student))
    device = pick_device(cfg.train.device)
    # bf16 runs: a bf16 copy, cast once (not every step); teacher.model stays as loaded, for evaluation
    held = teacher.held(teacher_dtype(cfg, device), device)
    model = prepare_teacher(held, dist_init(cfg.train.distributed), cfg.train, device)
    return online_signal_fn(model, vocab=vocab, provenance=teacher.provenance(cfg.loss.temperature),
                            lazy=cfg.loss.implementation == "fused"), vocab


def _hooked_teacher(cfg: Config, teacher):
    """What hidden/attention distillation hooks: the module the online signal runs (`Teacher.held`, a bf16
    copy in bf16 runs), else the Teacher itself (loaded only if needed)."""
    if cfg.features.enabled and cfg.teacher.signal == "online" and not cfg.modes.cross_tokenizer.enabled:
        device = pick_device(cfg.train.device)
        return teacher.held(teacher_dtype(cfg, device), device)
    return teacher


def with_modes(cfg: Config, plugins: Plugins, signal_fn, *, teacher, tok, student, vocab: int):
    """The signal function and plugins of the training modes in `cfg.modes` (all off by default)."""
    self_teacher = self_distill_teacher(cfg, student, plugins)  # before any hook lands on the student
    signal_fn, extras = mode_signal(cfg, signal_fn, tokenizer=tok, student=student, vocab=vocab,
                                    provenance=teacher.provenance(cfg.loss.temperature), self_teacher=self_teacher,
                                    device=pick_device(cfg.train.device))
    replay = tokenize_file(cfg.modes.replay.data, tok, cfg, key="modes.replay.data") if cfg.modes.replay.ratio else None
    add_mode_plugins(plugins, cfg, student, vocab=vocab, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                     replay=replay, extra_signals=extras)
    return signal_fn


def run_progressive(cfg: Config, *, resume: bool = False, teacher=None) -> dict:
    """modes.progressive: stage i distils stage i−1's saved student (stage 0: the teacher) into
    num_layers[i] of its layers, each stage a full distill run (evaluated, saved) in RUN_DIR/stage-i."""
    stages, current = [], teacher or load_teacher(cfg)
    licence = cfg.teacher.license or current.license
    for i, layers in enumerate(cfg.modes.progressive.num_layers):
        stage = cfg.model_copy(deep=True)
        stage.modes.progressive.num_layers = []
        stage.run.dir = str(Path(cfg.run.dir) / f"stage-{i}")
        stage.student.init, stage.student.num_layers, stage.student.layers = "teacher_layers", layers, None
        if i:  # the previous stage's student is this stage's teacher
            stage.teacher.path, stage.teacher.gguf_file, stage.teacher.license = str(stages[-1]["student_dir"]), None, licence
            current = load_teacher(stage)
        stages.append(run(stage, resume=resume, teacher=current))
    return {**stages[-1], "stages": stages}


def run(cfg: Config, *, resume: bool = False, teacher=None) -> dict:
    if cfg.modes.progressive.num_layers:
        return run_progressive(cfg, resume=resume, teacher=teacher)
    # ---- setup
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.run.dir)
    rank0 = dist_init(cfg.train.distributed).main  # under torchrun: rank 0 writes, evaluates, saves
    if rank0:
        save_config(cfg, run_dir / "config.yaml")
    teacher = teacher or load_teacher(cfg)
    licence = gate_from_config(teacher.license, cfg.teacher, teacher=teacher.source.id)  # before any training
    student, tok, init = build_student(cfg, teacher)
    train = tokenize_file(cfg.data.train, tok, cfg, key="data.train")
    held_out = tokenize_file(cfg.data.eval, tok, cfg, key="data.eval") if cfg.data.eval else None
    signal_fn, vocab = signal_source(cfg, teacher, tok, student, train)
    before = copy.deepcopy(student).eval() if held_out and cfg.eval.student_before and rank0 else None
    general = tokenize_file(cfg.modes.replay.eval, tok, cfg, key="modes.replay.eval") if cfg.modes.replay.eval else None
    initial = copy.deepcopy(student).eval() if general is not None and rank0 else None
    if cfg.student.lora:  # only the adapters train; merged back into the weights before saving
        student = apply_lora(student, cfg.student.lora)
    plugins = Plugins()  # training modes and auxiliary objectives add themselves here
    signal_fn = with_modes(cfg, plugins, signal_fn, teacher=teacher, tok=tok, student=student, vocab=vocab)
    signal_fn, features = feature_plugins(cfg, _hooked_teacher(cfg, teacher), student, signal_fn, plugins)  # hidden/attention KD

    # ---- loop
    if cfg.teacher.signal == "online" and teacher.release_loaded():  # evaluation loads them again
        log.info("the teacher's weights as loaded freed for training: its %s copy computes the signal",
                 str(teacher_dtype(cfg, pick_device(cfg.train.device))).removeprefix("torch."))
    result = distill(student, signal_fn, train, cfg, run_dir=run_dir, vocab=vocab, pad_id=tok.pad_token_id,
                     resume=resume, plugins=plugins)
    if features:  # unhook both models; RUN_DIR/projector.safetensors, never part of the student
        features.finish(run_dir, save=result.main)
    if not result.main:  # another rank of a distributed run: rank 0 evaluates and saves
        return {"run_dir": run_dir, "history": result.history}
    if cfg.train.distributed == "fsdp2":  # the teacher's shards went with the process group: evaluate a reloaded one
        teacher.reload()
    student = merge_lora(result.student)  # a plain HF model again (FSDP2: gathered; LoRA: merged)

    # ---- evaluate and save
    device = pick_device(cfg.train.device)
    table, metrics = None, None
    general_metrics = None
    if general is not None:  # forgetting: the student on general data, before and after
        general_metrics = evaluate_models({"student_before": initial.to(device), "student_after": student},
                                          initial, general, vocab=vocab, pad_id=tok.pad_token_id,
                                          batch_size=cfg.eval.batch_size, device=device)
    if held_out:
        models = {**({"student_before": before.to(device)} if before else {}), "student_after": student}
        if cfg.eval.baseline_layers:  # the untrained uniform student: the CE gap's far end
            layers = uniform_layers(teacher.model.config.num_hidden_layers, cfg.eval.baseline_layers)
            models = {"baseline": student_from_layers(teacher.model, layers).to(device), **models}
        cross = cfg.modes.cross_tokenizer.enabled  # compared on aligned tokens, through the vocabulary map
        teacher_signal = signal_source(cfg, teacher, tok, student, train)[0] if cross else None
        metrics = evaluate_models(models, teacher.model.to(device), held_out, vocab=vocab,
                                  pad_id=tok.pad_token_id, batch_size=cfg.eval.batch_size, device=device,
                                  teacher_signal=teacher_signal)
        if cfg.eval.baseline_layers:
            metrics = add_ce_gap(metrics)
        table = markdown_table(metrics)
        write_report(metrics, run_dir, extra={"train_steps": result.steps, "general": general_metrics})
    card = model_card(teacher=teacher, init=init, student_params=count_parameters(student),
                      teacher_params=teacher.num_parameters, cfg=cfg, eval_table=table, steps=result.steps,
                      license_decision=licence)
    student_dir = save_student(student, tok, run_dir / "student", card=card)
    return {"run_dir": run_dir, "student_dir": student_dir, "metrics": metrics, "table": table,
            "history": result.history, "general": general_metrics}
