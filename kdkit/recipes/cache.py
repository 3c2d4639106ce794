"""`kdkit cache CONFIG`: the teacher's top-k log-probs for the training data, once, on disk.

`kdkit cache verify DIR [--repair]` checks every shard's checksum and redoes only damaged ones
(repair reruns the teacher from the config saved beside the cache).

With `teacher.backend: http` the log-probs come from a vLLM server's `prompt_logprobs` (the
tokenizer still comes from `teacher.path`, which must be the served model's); they are at T = 1.
`teacher.base_urls` spreads the requests over several servers of the same model.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdkit.config import Config, load_config, save_config
from kdkit.errors import UserError
from kdkit.models.license import gate_from_config
from kdkit.teacher.cache import build_cache, read_manifest, repair_cache, verify_cache
from kdkit.teacher.gen_signal import load_captured, signal_dir
from kdkit.teacher.http import ChatClient, common_model
from kdkit.teacher.served_cache import build_served_cache, repair_served_cache
from kdkit.train.setup import cache_dir, forward_teacher, load_teacher, signal_vocab, tokenize_file


def run(cfg: Config, *, teacher=None) -> Path:
    teacher = teacher or load_teacher(cfg)
    gate_from_config(teacher.license, cfg.teacher, teacher=teacher.source.id)  # may its outputs train a student?
    train = tokenize_file(cfg.data.train, teacher.tokenizer, cfg, key="data.train")
    out = cache_dir(cfg)
    if cfg.teacher.backend == "http":
        return _run_served(cfg, teacher, train, out)
    vocab = signal_vocab(teacher)
    weights = teacher.weights_hash()  # the weight files' content hash: what distill compares
    captured = load_captured(signal_dir(Path(cfg.data.train)), k=cfg.teacher.top_k,
                             temperature=cfg.loss.temperature, weights=weights)  # rows kept by `generate`
    build_cache(forward_teacher(cfg, teacher), train, out, k=cfg.teacher.top_k, temperature=cfg.loss.temperature,
                provenance=teacher.provenance(cfg.loss.temperature), vocab=vocab,
                shard_size=cfg.teacher.cache_shard_size, batch_size=cfg.teacher.cache_batch_size,
                weights=weights, captured=captured)
    save_config(cfg, out / "config.yaml")  # what `verify --repair` needs to recompute a shard
    return out


def _clients(cfg: Config) -> list[ChatClient]:
    """One client per server (`teacher.base_urls`, else `teacher.base_url`)."""
    tc = cfg.teacher
    return [ChatClient(url, api_key=os.environ.get(tc.api_key_env) or None, api_key_env=tc.api_key_env,
                       timeout=tc.timeout_s, max_retries=tc.max_retries, concurrency=tc.concurrency)
            for url in tc.base_urls or [tc.base_url]]


def _run_served(cfg: Config, teacher, train, out: Path) -> Path:
    """The cache from a served teacher's prompt_logprobs (T = 1; the model is never loaded here)."""
    if cfg.loss.temperature != 1.0:
        raise UserError(f"loss.temperature={cfg.loss.temperature}: a served teacher's prompt_logprobs are at "
                        "temperature 1, so a cache from teacher.backend=http needs loss.temperature=1 "
                        "(or build it with teacher.backend=local)")
    clients = _clients(cfg)
    model = common_model(clients, cfg.teacher.model)  # several servers: the same model on each, or a UserError
    build_served_cache(clients, train, out, model=model, k=cfg.teacher.top_k, provenance=teacher.provenance(),
                       vocab=len(teacher.tokenizer), shard_size=cfg.teacher.cache_shard_size,
                       concurrency=cfg.teacher.concurrency)
    save_config(cfg, out / "config.yaml")
    return out


def verify(directory: Path, *, repair: bool = False) -> list[str]:
    """Problems found (after repair: those that remain)."""
    problems = [str(p) for p in verify_cache(directory)]
    if problems and repair:
        saved = directory / "config.yaml"
        if not saved.is_file():
            raise UserError(f"{saved} is missing: rebuild the cache with `kdkit cache CONFIG`")
        cfg = load_config(saved)
        teacher = load_teacher(cfg)
        train = tokenize_file(cfg.data.train, teacher.tokenizer, cfg, key="data.train")
        if cfg.teacher.backend == "http":
            repair_served_cache(_clients(cfg), train, directory, concurrency=cfg.teacher.concurrency)
            return [str(p) for p in verify_cache(directory)]
        like = read_manifest(directory)["weights_sha256"]  # the teacher's hash of the cache's kind
        repair_cache(teacher.model, train, directory, batch_size=cfg.teacher.cache_batch_size,
                     weights=teacher.weights_hash(like))
        return [str(p) for p in verify_cache(directory)]
    return problems
