"""`kdkit generate CONFIG`: the teacher writes training data.

Two modes:
- `generate.tasks` (a list): elicitation tasks, each with its own strategy, templates and count
  (labelling, expansion, curation, feature, self_knowledge, chain_of_thought; see
  kdkit/teacher/elicit.py). Stage files go to RUN_DIR/data/stages (resumable); the result, parsed and
  filtered, is a directory of jsonl shards + manifest.json + a diversity report at `generate.output`
  (default RUN_DIR/data/train), which `kdkit sft` and `data.train` read.
- `generate.prompts`: the teacher answers a file of prompts, written as one `messages` jsonl (and
  `generate.eval_prompts` a held-out one); a pipeline then trains on the first and evaluates on the second.

`teacher.backend` picks who answers: `local` runs the teacher here (batched transformers generation),
`http` asks an OpenAI-compatible server (vLLM, ...) at `teacher.base_url`, with the API key read from
the environment variable `teacher.api_key_env`; `vllm` runs vLLM's offline engine here
(kdkit/teacher/vllm_engine.py, `teacher.engine_args` for tensor parallelism and the rest). Either way the teacher's licence is checked first
(`kdkit.models.license`), and manifests record the teacher, the licence decision, the sampling
settings and the counts (never the API key).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

from kdkit.config import Config, save_config
from kdkit.data.sources import load_examples
from kdkit.errors import UserError
from kdkit.models.license import gate_from_config, license_from_url
from kdkit.models.load import read_license, resolve
from kdkit.teacher.dataset import write_dataset
from kdkit.teacher.elicit import run_task
from kdkit.teacher.generate import done_ids, generate_answers, sampled_round
from kdkit.teacher.http import ChatClient, common_model, generate_answers_http
from kdkit.teacher.vllm_engine import generate_answers_vllm, hf_directory, load_engine, require_vllm
from kdkit.train.setup import forward_teacher, load_teacher, signal_vocab
from kdkit.utils import atomic_json

log = logging.getLogger(__name__)


def run(cfg: Config, *, teacher=None) -> dict[str, Path]:
    """Returns {"train": path, "eval": path (when eval_prompts is set)}."""
    gc, tc = cfg.generate, cfg.teacher
    if not gc.prompts and not gc.tasks:
        raise UserError("generate.prompts and generate.tasks are both unset: give a file of prompts "
                        "(e.g. `generate.prompts=prompts.jsonl`) or a list of tasks (see configs/generate-strategies.yaml)")
    if gc.top_logprobs and tc.backend == "local":
        raise UserError("generate.top_logprobs needs teacher.backend=http or vllm; "
                        "for a local teacher use `kdkit cache` or a task with strategy: feature")
    names = [t.name for t in gc.tasks]
    if len(set(names)) != len(names):
        raise UserError(f"generate.tasks: task names must be unique (they prefix the item ids), got {names}")
    run_dir = Path(cfg.run.dir)
    save_config(cfg, run_dir / "config.yaml")
    complete, source, teacher = _backend(cfg, teacher)
    license_id = tc.license or source.get("license") or license_from_url((tc.base_urls or [tc.base_url])[0])
    decision = gate_from_config(license_id, tc, teacher=source.get("teacher") or source.get("model") or "the teacher")
    if gc.tasks:
        out = Path(gc.output) if gc.output else run_dir / "data" / "train"
        return {"train": _run_tasks(cfg, complete, source=source, decision=decision, out=out)}
    sampled = None
    if gc.samples:  # the extra answers: the same backend, sampling
        alt = cfg.model_copy(deep=True)
        alt.generate.do_sample = True
        sampled = _backend(alt, teacher)[0]
    return _answer_prompts(cfg, complete, source=source, decision=decision, sampled=sampled)


def _backend(cfg: Config, teacher):
    """(complete(examples, out, top_logprobs=0, max_new_tokens=None) -> out, a description of the teacher, the local Teacher or None)."""
    gc, tc = cfg.generate, cfg.teacher
    if tc.backend == "vllm":
        return (*_vllm_backend(cfg), None)
    if tc.backend == "http":
        api_key = os.environ.get(tc.api_key_env) or None  # read here, passed on, never stored
        urls = tc.base_urls or [tc.base_url]  # several: replicas of one teacher, the requests spread over them
        model = common_model([ChatClient(url, api_key=api_key, api_key_env=tc.api_key_env, timeout=tc.timeout_s,
                                         max_retries=tc.max_retries) for url in urls], tc.model)

        def complete(examples, out, *, top_logprobs: int = gc.top_logprobs, max_new_tokens: int | None = None):
            return generate_answers_http(
                examples, out, base_urls=urls, model=model, api_key=api_key,
                api_key_env=tc.api_key_env, max_new_tokens=max_new_tokens or gc.max_new_tokens,
                temperature=gc.temperature if gc.do_sample else 0.0, top_p=gc.top_p,
                concurrency=tc.concurrency, timeout=tc.timeout_s, max_retries=tc.max_retries,
                seed=cfg.train.seed, top_logprobs=top_logprobs)
        where = {"base_urls": urls} if len(urls) > 1 else {"base_url": urls[0]}
        return complete, {"backend": "http", **where, "model": model}, None
    teacher = teacher or load_teacher(cfg)

    def complete(examples, out, *, top_logprobs: int = 0, max_new_tokens: int | None = None, signal: bool = False):
        return generate_answers(forward_teacher(cfg, teacher), teacher.tokenizer, examples, out,
                                max_new_tokens=max_new_tokens or gc.max_new_tokens, batch_size=gc.batch_size,
                                do_sample=gc.do_sample, temperature=gc.temperature, top_p=gc.top_p,
                                seed=cfg.train.seed, top_logprobs=top_logprobs,
                                signal=_signal_spec(cfg, teacher) if signal else None)
    return complete, {"backend": "local", "teacher": teacher.source.id, "license": teacher.license}, teacher


def _signal_spec(cfg: Config, teacher) -> dict:
    """What the cache stage will ask of the rows kept during generation (kdkit.teacher.gen_signal)."""
    return {"k": cfg.teacher.top_k, "temperature": cfg.loss.temperature, "vocab": signal_vocab(teacher),
            "weights": teacher.weights_hash()}


def _keeps_signal(cfg: Config) -> bool:
    """Whether the training answers also keep the teacher's top-k rows: a local teacher answering greedily
    for a run that reads its signal from the cache it is about to build."""
    tc, gc = cfg.teacher, cfg.generate
    return tc.cache_from_generation and tc.signal == "cache" and tc.backend == "local" and not gc.do_sample


def _vllm_backend(cfg: Config):
    """vLLM's offline engine on the teacher, loaded at the first call (after the licence gate)."""
    gc, tc = cfg.generate, cfg.teacher
    require_vllm()
    src = resolve(tc.path, gguf_file=tc.gguf_file)
    engine = None

    def complete(examples, out, *, top_logprobs: int = gc.top_logprobs, max_new_tokens: int | None = None):
        nonlocal engine
        if engine is None:
            directory = hf_directory(src, Path(cfg.run.dir), trust_remote_code=tc.trust_remote_code)
            k = max([gc.top_logprobs, *(t.top_logprobs for t in gc.tasks if t.strategy == "feature")])
            engine = load_engine(directory, engine_args=tc.engine_args, top_logprobs=k, seed=cfg.train.seed,
                                 trust_remote_code=tc.trust_remote_code)
        return generate_answers_vllm(engine, examples, out, max_new_tokens=max_new_tokens or gc.max_new_tokens,
                                     temperature=gc.temperature if gc.do_sample else 0.0, top_p=gc.top_p,
                                     seed=cfg.train.seed, top_logprobs=top_logprobs)
    return complete, {"backend": "vllm", "teacher": src.id, "license": read_license(src, tc.license),
                      "engine_args": tc.engine_args}


def _run_tasks(cfg: Config, complete, *, source: dict, decision: dict, out: Path) -> Path:
    """Every task's stages, then one filtered, sharded dataset with its manifest."""
    gc, fc = cfg.generate, cfg.generate.filters
    want_confidence = fc.min_mean_logprob is not None or fc.max_mean_entropy is not None
    items, tasks = [], {}
    for task in gc.tasks:
        result = run_task(task, complete=complete, stage_dir=out.parent / "stages", seed=cfg.train.seed,
                          want_confidence=want_confidence)
        items += result["items"]
        tasks[task.name] = {"strategy": task.strategy, "templates": result["templates"],
                            "max_new_tokens": task.max_new_tokens or gc.max_new_tokens, **result["counts"]}
    manifest = {"teacher": source, "license": decision, "sampling": _sampling(cfg), "filters": fc.model_dump(),
                "tasks": tasks, "counts": {"accepted": len(items)}}
    write_dataset(items, out, filters=fc, shard_size=gc.shard_size, manifest=manifest,
                  systems={t.name: t.system for t in gc.tasks})
    return out


def _answer_prompts(cfg: Config, complete, *, source: dict, decision: dict, sampled=None) -> dict[str, Path]:
    """generate.prompts (and eval_prompts): one answer per prompt, one jsonl per split; `generate.samples`
    more per training prompt from `sampled` (the backend sampling), appended to the training file."""
    gc, run_dir = cfg.generate, Path(cfg.run.dir)
    jobs = {"train": (gc.prompts, gc.limit, Path(gc.output) if gc.output else run_dir / "data" / "train.jsonl")}
    if gc.eval_prompts:
        jobs["eval"] = (gc.eval_prompts, gc.eval_limit, run_dir / "data" / "eval.jsonl")
    examples = {}
    for split, (path, limit, _) in jobs.items():
        examples[split] = load_examples(path)[:limit]
        if not examples[split]:
            raise UserError(f"{path} holds no prompts")
    outputs = {}
    for split, (_, _, out) in jobs.items():
        keep = {"signal": True} if split == "train" and _keeps_signal(cfg) else {}
        if split == "train" and gc.max_seconds:  # a random subset, as many as the time allows
            examples[split] = _answer_in_spans(gc, complete, examples[split], out, seed=cfg.train.seed, **keep)
            outputs[split] = out
        else:
            outputs[split] = complete(examples[split], out, **keep)
        if split == "train" and gc.samples:
            _sample_rounds(gc, sampled, examples[split], out)
        _write_manifest(out, source=source, decision=decision, cfg=cfg, prompts=len(examples[split]))
    return outputs


def _answer_in_spans(gc, complete, examples: list, out: Path, *, seed: int, **keep) -> list:
    """generate.max_seconds: the prompts in a seeded random order, 4 batches at a time (the backend sorts
    each span by length), no span started after `max_seconds`, so what is answered is a random subset
    whatever the machine's speed. The number answered is written to OUT.answered.json; a rerun answers
    exactly those (the same data, so the same cache), resuming a span a kill cut short. Returns the
    examples answered."""
    record = out.with_name(out.name + ".answered.json")
    order = list(examples)
    random.Random(seed).shuffle(order)
    todo = json.loads(record.read_text())["prompts"] if record.exists() else len(order)
    span = 4 * gc.batch_size
    started, answered = time.perf_counter(), 0
    while answered < todo:
        if not record.exists() and time.perf_counter() - started >= gc.max_seconds:
            log.info("generate.max_seconds=%s: %d of %d prompts answered", gc.max_seconds, answered, len(order))
            break
        part = order[answered : min(answered + span, todo)]
        complete(part, out, **keep)  # a rerun skips the ids already written
        answered += len(part)
    if not record.exists():
        atomic_json(record, {"prompts": answered, "asked": len(order), "max_seconds": gc.max_seconds})
    return order[:answered]


def _sample_rounds(gc, sampled, examples: list, out: Path) -> int:
    """generate.samples rounds of sampled answers (round j: ids ID~sj), appended to `out`. With
    `samples_max_seconds` no round starts after that many seconds; the rounds done are written to
    OUT.samples.json, and a rerun does exactly those (the same data, so the same cache)."""
    record = out.with_name(out.name + ".samples.json")
    rounds = json.loads(record.read_text())["rounds"] if record.exists() else gc.samples
    started = time.perf_counter()
    for j in range(1, rounds + 1):
        if not record.exists() and gc.samples_max_seconds and time.perf_counter() - started >= gc.samples_max_seconds:
            rounds = j - 1  # this machine's share of sampled answers
            break
        sampled(sampled_round(examples, j), out)  # a rerun skips the ids already written
    if not record.exists():
        atomic_json(record, {"rounds": rounds, "asked": gc.samples, "max_seconds": gc.samples_max_seconds})
    return rounds


def _sampling(cfg: Config) -> dict:
    gc = cfg.generate
    return {"do_sample": gc.do_sample, "temperature": gc.temperature if gc.do_sample else 0.0, "samples": gc.samples,
            "top_p": gc.top_p, "max_new_tokens": gc.max_new_tokens, "seed": cfg.train.seed,
            "top_logprobs": gc.top_logprobs, "batch_size": gc.batch_size}


def _write_manifest(out: Path, *, source: dict, decision: dict, cfg: Config, prompts: int) -> None:
    """OUT.manifest.json: who answered, how, under which licence, and how many rows the file holds."""
    manifest = {
        "teacher": source,
        "license": decision,
        "sampling": _sampling(cfg),
        "prompts": prompts,
        "rows": len(done_ids(out)),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = out.with_name(out.name + ".manifest.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)
