"""`kdkit generate CONFIG`: the teacher answers a file of prompts, written as `messages` jsonl.

With `generate.eval_prompts` it answers a held-out file too; a pipeline then trains on the first
and evaluates on the second.
"""

from __future__ import annotations

from pathlib import Path

from kdkit.config import Config, save_config
from kdkit.data.sources import load_examples
from kdkit.errors import UserError
from kdkit.teacher.generate import generate_answers
from kdkit.train.setup import load_teacher


def run(cfg: Config, *, teacher=None) -> dict[str, Path]:
    """Returns {"train": path, "eval": path (when eval_prompts is set)}."""
    gc = cfg.generate
    if not gc.prompts:
        raise UserError("generate.prompts is not set: give a file of prompts (e.g. `generate.prompts=prompts.jsonl`)")
    run_dir = Path(cfg.run.dir)
    save_config(cfg, run_dir / "config.yaml")
    jobs = {"train": (gc.prompts, gc.limit, Path(gc.output) if gc.output else run_dir / "data" / "train.jsonl")}
    if gc.eval_prompts:
        jobs["eval"] = (gc.eval_prompts, gc.eval_limit, run_dir / "data" / "eval.jsonl")
    examples = {}
    for split, (path, limit, _) in jobs.items():
        examples[split] = load_examples(path)[:limit]
        if not examples[split]:
            raise UserError(f"{path} holds no prompts")
    teacher = teacher or load_teacher(cfg)
    return {
        split: generate_answers(teacher.model, teacher.tokenizer, examples[split], out,
                                max_new_tokens=gc.max_new_tokens, batch_size=gc.batch_size,
                                do_sample=gc.do_sample, temperature=gc.temperature, top_p=gc.top_p,
                                seed=cfg.train.seed)
        for split, (_, _, out) in jobs.items()
    }
