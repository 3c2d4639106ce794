"""`kdkit cache CONFIG`: the teacher's top-k log-probs for the training data, once, on disk.

`kdkit cache verify DIR [--repair]` checks every shard's checksum and redoes only damaged ones
(repair reruns the teacher from the config saved beside the cache).
"""

from __future__ import annotations

from pathlib import Path

from kdkit.config import Config, load_config, save_config
from kdkit.errors import UserError
from kdkit.models.load import head_rows, shared_vocab_size
from kdkit.teacher.cache import build_cache, repair_cache, verify_cache
from kdkit.train.setup import cache_dir, load_teacher, tokenize_file


def run(cfg: Config, *, teacher=None) -> Path:
    teacher = teacher or load_teacher(cfg)
    train = tokenize_file(cfg.data.train, teacher.tokenizer, cfg, key="data.train")
    out = cache_dir(cfg)
    vocab = shared_vocab_size(teacher.tokenizer, teacher.tokenizer, head_rows(teacher.model), len(teacher.tokenizer))
    build_cache(teacher.model, train, out, k=cfg.teacher.top_k, temperature=cfg.loss.temperature,
                provenance=teacher.provenance(cfg.loss.temperature), vocab=vocab,
                shard_size=cfg.teacher.cache_shard_size, batch_size=cfg.train.batch_size)
    save_config(cfg, out / "config.yaml")  # what `verify --repair` needs to recompute a shard
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
        repair_cache(teacher.model, train, directory, batch_size=cfg.train.batch_size)
        return [str(p) for p in verify_cache(directory)]
    return problems
