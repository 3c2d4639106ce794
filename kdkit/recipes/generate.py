"""`kdkit generate CONFIG`: the teacher answers a file of prompts, written as `messages` jsonl.

With `generate.eval_prompts` it answers a held-out file too; a pipeline then trains on the first
and evaluates on the second. `teacher.backend` picks who answers: `local` runs the teacher here
(batched transformers generation), `http` asks an OpenAI-compatible server (vLLM, ...) at
`teacher.base_url`, with the API key read from the environment variable `teacher.api_key_env`.
Beside each output file a `.manifest.json` records the teacher, the sampling settings and the counts
(never the API key).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from kdkit.config import Config, save_config
from kdkit.data.sources import load_examples
from kdkit.errors import UserError
from kdkit.teacher.generate import done_ids, generate_answers
from kdkit.teacher.http import ChatClient, generate_answers_http
from kdkit.train.setup import load_teacher


def run(cfg: Config, *, teacher=None) -> dict[str, Path]:
    """Returns {"train": path, "eval": path (when eval_prompts is set)}."""
    gc, tc = cfg.generate, cfg.teacher
    if not gc.prompts:
        raise UserError("generate.prompts is not set: give a file of prompts (e.g. `generate.prompts=prompts.jsonl`)")
    if gc.top_logprobs and tc.backend != "http":
        raise UserError("generate.top_logprobs needs teacher.backend=http (a served teacher); "
                        "for a local teacher use `kdkit cache`")
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

    if tc.backend == "http":
        api_key = os.environ.get(tc.api_key_env) or None  # read here, passed on, never stored
        model = tc.model or ChatClient(tc.base_url, api_key=api_key, api_key_env=tc.api_key_env,
                                       timeout=tc.timeout_s, max_retries=tc.max_retries).served_model()

        def answer(split_examples, out):
            return generate_answers_http(
                split_examples, out, base_url=tc.base_url, model=model, api_key=api_key,
                api_key_env=tc.api_key_env, max_new_tokens=gc.max_new_tokens,
                temperature=gc.temperature if gc.do_sample else 0.0, top_p=gc.top_p,
                concurrency=tc.concurrency, timeout=tc.timeout_s, max_retries=tc.max_retries,
                seed=cfg.train.seed, top_logprobs=gc.top_logprobs)
        source = {"backend": "http", "base_url": tc.base_url, "model": model}
    else:
        teacher = teacher or load_teacher(cfg)

        def answer(split_examples, out):
            return generate_answers(teacher.model, teacher.tokenizer, split_examples, out,
                                    max_new_tokens=gc.max_new_tokens, batch_size=gc.batch_size,
                                    do_sample=gc.do_sample, temperature=gc.temperature, top_p=gc.top_p,
                                    seed=cfg.train.seed)
        source = {"backend": "local", "teacher": teacher.source.id, "license": teacher.license}

    outputs = {}
    for split, (_, _, out) in jobs.items():
        outputs[split] = answer(examples[split], out)
        _write_manifest(out, source=source, cfg=cfg, prompts=len(examples[split]))
    return outputs


def _write_manifest(out: Path, *, source: dict, cfg: Config, prompts: int) -> None:
    """OUT.manifest.json: who answered, how, and how many rows the file holds."""
    gc = cfg.generate
    manifest = {
        "teacher": source,
        "sampling": {"do_sample": gc.do_sample, "temperature": gc.temperature if gc.do_sample else 0.0,
                     "top_p": gc.top_p, "max_new_tokens": gc.max_new_tokens, "seed": cfg.train.seed,
                     "top_logprobs": gc.top_logprobs},
        "prompts": prompts,
        "rows": len(done_ids(out)),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = out.with_name(out.name + ".manifest.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
