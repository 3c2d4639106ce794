"""`kdkit feedback CONFIG`: preference pairs from the teacher's feedback on the student's answers.

The student samples `preference.samples_per_prompt` answers to every prompt; the teacher scores
them (`preference.scorer`: its mean log-likelihood per token, or a judge prompt whose score is
parsed); the best and worst answers become a (chosen, rejected) pair, and with
`preference.teacher_pairs` the teacher's own answer (the prompts file's assistant turn, else one it
writes greedily) is paired as chosen against the worst student answer. Writes
`PAIRS.scored.jsonl` (resumable, one row per prompt), `PAIRS` and `PAIRS.manifest.json`.
"""

from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path

import torch

from kdkit.config import Config, save_config
from kdkit.data.sources import load_examples
from kdkit.errors import UserError
from kdkit.teacher.feedback import (HttpTeacher, LocalTeacher, load_judge_template, sample_answers,
                                    score_prompts, scored_path_for, write_pairs)
from kdkit.teacher.generate import done_ids
from kdkit.teacher.http import ChatClient, common_model
from kdkit.train.loop import pick_device
from kdkit.train.preference import default_pairs_path
from kdkit.train.setup import build_student, load_teacher


def _judge(cfg: Config, teacher, template):
    """The teacher that scores: its weights here, or the served one."""
    pc, tc = cfg.preference, cfg.teacher
    if tc.backend == "http":
        api_key = os.environ.get(tc.api_key_env) or None  # read here, passed on, never stored
        urls = tc.base_urls or [tc.base_url]
        clients = [ChatClient(url, api_key=api_key, api_key_env=tc.api_key_env, timeout=tc.timeout_s,
                              max_retries=tc.max_retries) for url in urls]
        model = common_model(clients, tc.model)  # several servers: the same model on each, or a UserError
        # scoring asks one request at a time (score_prompts is sequential): the first server answers them all
        return HttpTeacher(clients[0], model=model, template=template,
                           judge_max_new_tokens=pc.judge_max_new_tokens), {"backend": "http", "base_url": urls[0]}
    model = teacher.model.to(pick_device(cfg.train.device))
    return (LocalTeacher(model, teacher.tokenizer, scorer=pc.scorer, template=template,
                         judge_max_new_tokens=pc.judge_max_new_tokens, max_length=cfg.data.max_length),
            {"backend": "local", "teacher": teacher.source.id, "license": teacher.license})


def run(cfg: Config, *, teacher=None) -> dict:
    """Returns {"pairs": path, "scored": path, "num_pairs": int}."""
    pc, tc = cfg.preference, cfg.teacher
    prompts = pc.prompts or cfg.data.train
    if not prompts:
        raise UserError("preference.prompts (or data.train) is not set: give a file of prompts for the student")
    if pc.scorer == "loglik" and tc.backend == "http":
        raise UserError("preference.scorer=loglik needs the teacher's weights (teacher.backend=local); "
                        "with a served teacher use preference.scorer=judge")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    template = load_judge_template(pc.judge_template) if pc.scorer == "judge" else None
    examples = load_examples(prompts)[: pc.limit]
    if not examples:
        raise UserError(f"{prompts} holds no prompts")
    run_dir = Path(cfg.run.dir)
    save_config(cfg, run_dir / "config.yaml")
    needs_local = tc.backend == "local" or cfg.student.init == "teacher_layers"
    teacher = teacher or (load_teacher(cfg) if needs_local else None)
    student, tok, init = build_student(cfg, teacher)
    student.to(pick_device(cfg.train.device)).eval()
    judge, source = _judge(cfg, teacher, template)
    sample_fn = partial(sample_answers, student, tok, n=pc.samples_per_prompt, max_new_tokens=pc.max_new_tokens,
                        temperature=pc.temperature, top_p=pc.top_p, seed=cfg.train.seed)
    out = default_pairs_path(cfg)
    scored = score_prompts(examples, scored_path_for(out), sample_fn=sample_fn, teacher=judge, scorer=pc.scorer,
                           teacher_pairs=pc.teacher_pairs, max_new_tokens=pc.max_new_tokens)
    num_pairs = write_pairs(scored, out, min_margin=pc.min_margin, student_pairs=pc.student_pairs)
    _write_manifest(out, cfg=cfg, source=source, student=init, template=template, prompts=len(examples),
                    scored_rows=len(done_ids(scored)), num_pairs=num_pairs)
    return {"pairs": out, "scored": scored, "num_pairs": num_pairs}


def _write_manifest(out: Path, *, cfg: Config, source: dict, student: str, template, prompts: int,
                    scored_rows: int, num_pairs: int) -> None:
    """PAIRS.manifest.json: who answered and judged, how, and the counts (never an API key)."""
    pc = cfg.preference
    manifest = {
        "teacher": source, "student": student,
        "scorer": pc.scorer,
        "judge_template": {"ref": template.ref, "sha256": template.sha256} if template else None,
        "sampling": {"samples_per_prompt": pc.samples_per_prompt, "temperature": pc.temperature, "top_p": pc.top_p,
                     "max_new_tokens": pc.max_new_tokens, "seed": cfg.train.seed},
        "teacher_pairs": pc.teacher_pairs, "student_pairs": pc.student_pairs, "min_margin": pc.min_margin,
        "prompts": prompts, "scored_rows": scored_rows, "pairs": num_pairs,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = out.with_name(out.name + ".manifest.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
