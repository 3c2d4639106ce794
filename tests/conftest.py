"""Shared fixtures: a tiny teacher on disk, tiny chat data, and a tiny distill config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdkit.models.tiny import save_tiny_model

# 2-core machines: one torch thread per test process keeps parallel work from thrashing
torch.set_num_threads(1)

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain", "snow"]


def chat_rows(n: int, *, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        a, b, c = (WORDS[int(j)] for j in torch.randint(len(WORDS), (3,), generator=g))
        rows.append({"id": f"r{i}", "messages": [
            {"role": "user", "content": f"Say {a} and {b}."},
            {"role": "assistant", "content": f"{a} {b} {c}, {b} {a}."},
        ]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("teacher"), num_layers=4, hidden_size=32, seed=1)


@pytest.fixture()
def tiny_config(tmp_path, tiny_teacher) -> Path:
    """A distill config on tiny models that runs in a few seconds."""
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    held = write_jsonl(tmp_path / "eval.jsonl", chat_rows(6, seed=1))
    cfg = {
        "run": {"dir": str(tmp_path / "run")},
        "teacher": {"path": str(tiny_teacher)},
        "student": {"init": "teacher_layers", "num_layers": 2},
        "data": {"train": str(train), "eval": str(held), "max_length": 64},
        "train": {"max_steps": 12, "batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 2,
                  "save_every": 1, "threads": 1},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
