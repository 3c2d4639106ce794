"""`kdkit prune CONFIG`: importance on calibration data → depth/width-pruned teacher in RUN_DIR/pruned.

RUN_DIR/pruned is a Hugging Face directory (the teacher's architecture with a smaller config, its
tokenizer, a model card) plus importance.json, importance.png (layer scores) and prune.json (the
dimensions and parameter counts). `kdkit pipeline` then distills it from the unpruned teacher.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from kdkit.config import Config, save_config
from kdkit.errors import UserError
from kdkit.prune import compute_importance, plan_prune, plot_layer_importance, prune_model
from kdkit.train.loop import pick_device
from kdkit.train.setup import load_teacher, save_student, tokenize_file

log = logging.getLogger(__name__)


def pruned_dir(cfg: Config) -> Path:
    return Path(cfg.run.dir) / "pruned"


def use_pruned(cfg: Config) -> Config:
    """Point the student at RUN_DIR/pruned (student.init=pretrained), for distill and eval."""
    out = pruned_dir(cfg)
    if not (out / "config.json").is_file():
        raise UserError(f"prune.method is {cfg.prune.method} but {out} holds no pruned model: run `kdkit prune` "
                        "first, or set prune.method=none")
    cfg.student.path = str(out)
    cfg.student.init = "pretrained"
    return cfg


def _card(teacher, summary: dict) -> str:
    d = summary["dims"]
    return "\n".join([
        "---", f"license: {teacher.license}", "library_name: transformers", "tags: [kdkit, pruning]", "---", "",
        "# Pruned with kdkit (not yet distilled)", "",
        f"- **From:** `{teacher.source.id}`, {summary['params_before']:,} parameters",
        f"- **Method:** {summary['method']}; {summary['params_after']:,} parameters "
        f"({summary['params_after'] / summary['params_before']:.0%})",
        f"- **Layers kept:** {summary['layers_kept']}",
        "- **Dimensions:** " + ", ".join(f"{k} {v}" for k, v in d.items()), "",
    ])


def finished(cfg: Config) -> dict | None:
    """The summary of a pruning already written to RUN_DIR/pruned by the same prune config (prune.json
    is written last, so its presence means the directory is whole), else None."""
    path = pruned_dir(cfg) / "prune.json"
    summary = json.loads(path.read_text()) if path.is_file() else None
    if summary and summary.get("config") == cfg.prune.model_dump(mode="json") and summary.get("teacher") == cfg.teacher.path:
        return {"pruned_dir": pruned_dir(cfg), **summary}
    return None


def run(cfg: Config, *, teacher=None, resume: bool = False) -> dict:
    """`resume`: a pruning already done with the same config is reused (a rerun of a pipeline)."""
    # ---- setup
    pc = cfg.prune
    if pc.method == "none":
        raise UserError("prune.method is none: set it to depth, width or both (e.g. `prune.method=width`)")
    if resume and (done := finished(cfg)):
        log.info("prune: %s already holds this pruning, reused", done["pruned_dir"])
        return done
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.run.dir)
    save_config(cfg, run_dir / "config.yaml")
    teacher = teacher or load_teacher(cfg)
    tok = teacher.tokenizer
    data = tokenize_file(pc.calibration or cfg.data.train, tok, cfg, key="prune.calibration")
    data.input_ids, data.labels = data.input_ids[: pc.calibration_samples], data.labels[: pc.calibration_samples]

    # ---- the dims first (a size the architecture rejects fails here), then importance, then pruning
    model = teacher.model.to(pick_device(cfg.train.device))
    plan = plan_prune(model, pc)
    # the per-layer perplexity scores cost ~L/2 passes per token: only when depth pruning ranks by them
    layer_ppl = plan["num_layers"] is not None and pc.layer_metric == "ppl"
    t0 = time.perf_counter()
    imp = compute_importance(model, data, pad_id=tok.pad_token_id, batch_size=pc.batch_size, layer_ppl=layer_ppl,
                             ppl_tokens=pc.ppl_tokens)
    seconds = time.perf_counter() - t0
    pruned, summary = prune_model(model, imp, pc, plan)
    summary["importance_seconds"] = round(seconds, 1)
    summary.update(config=pc.model_dump(mode="json"), teacher=cfg.teacher.path)  # what `finished` compares
    log.info("pruned %s: %s", pc.method, summary)

    # ---- save
    out = save_student(pruned.cpu(), tok, pruned_dir(cfg), card=_card(teacher, summary))
    imp.save(out / "importance.json")
    plot_layer_importance(imp, out / "importance.png")
    (out / "prune.json").write_text(json.dumps(summary, indent=2))
    return {"pruned_dir": out, **summary}
