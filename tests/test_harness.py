"""lm-evaluation-harness on local task files and tiny local models: no hub, seconds on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdkit.errors import UserError
from kdkit.eval.harness import SHIPPED, run_harness, task_config
from kdkit.models.tiny import save_tiny_model

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("bpe"), bpe=True, seed=3)


def _three_row_task(tmp_path: Path) -> Path:
    """A user's own task YAML with its data file next to it (relative data_files)."""
    rows = [{"q": "Say red.", "choices": ["red", "blue"], "answer": 0},
            {"q": "Say dog.", "choices": ["cat", "dog"], "answer": 1},
            {"q": "Say sun.", "choices": ["sun", "moon"], "answer": 0}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"task": "tiny_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": "rows.jsonl"}},
           "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_target": "answer",
           "doc_to_choice": "choices", "metric_list": [{"metric": "acc"}]}
    path = tmp_path / "tiny_mc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_harness_on_a_tiny_model_dir_and_a_local_task(bpe_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # data files are found relative to the YAML, not the working directory
    out = run_harness(bpe_model, [str(_three_row_task(tmp_path)), "kdkit_arith"], limit=3, batch_size=4)
    assert set(out) == {"tiny_mc", "kdkit_arith"}
    assert 0.0 <= out["tiny_mc"]["acc"] <= 1.0 and 3 * out["tiny_mc"]["acc"] == pytest.approx(round(3 * out["tiny_mc"]["acc"]))
    assert 0.0 <= out["kdkit_arith"]["exact_match"] <= 1.0


def test_shipped_tasks_are_well_formed():
    assert set(SHIPPED) == {"kdkit_mc", "kdkit_arith"}
    counts = {"kdkit_mc": 30, "kdkit_arith": 20}
    for name, n in counts.items():
        cfg = task_config(name)
        data = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert data.is_absolute() and data.is_file()
        rows = [json.loads(x) for x in data.read_text().splitlines()]
        assert len(rows) == n
        if name == "kdkit_mc":
            assert all(len(r["choices"]) == 4 and 0 <= r["answer"] < 4 for r in rows)
            assert len({r["answer"] for r in rows}) == 4  # the right answer is not always in one place
        else:  # the stored answers are right
            assert all(str(eval(r["question"].removeprefix("What is ").rstrip("?"))) == r["answer"] for r in rows)


def test_unknown_task_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="kdkit_mc"):
        task_config("no_such_task")
    (tmp_path / "bad.yaml").write_text("dataset_path: json\n")
    with pytest.raises(UserError, match="task:"):
        task_config(str(tmp_path / "bad.yaml"))
