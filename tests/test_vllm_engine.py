"""teacher.backend=vllm without a GPU or vLLM here: the clear refusal, the GGUF → directory step and
the log-prob conversion. The engine itself runs in tests/test_vllm.py (in the vLLM environment)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from kdkit.teacher.vllm_engine import _token_logprobs, hf_directory


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_backend_vllm_without_vllm_is_a_clear_user_error(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run": {"dir": str(tmp_path / "run")}, "teacher": {"backend": "vllm"},
                                      "generate": {"prompts": str(prompts)}}))
    r = subprocess.run([sys.executable, "-m", "kdkit.cli", "generate", str(config)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "teacher.backend=vllm" in r.stderr and "pip install vllm" in r.stderr


def test_token_logprobs_orders_alternatives_by_rank_and_keeps_the_chosen_token():
    lp = lambda v, rank, tok: SimpleNamespace(logprob=v, rank=rank, decoded_token=tok)  # noqa: E731
    answer = SimpleNamespace(token_ids=[7, 3], logprobs=[
        {7: lp(-0.1, 1, "a"), 9: lp(-2.5, 2, "b")},
        {3: lp(-3.0, 3, "c"), 1: lp(-0.5, 1, "d"), 2: lp(-1.0, 2, "e")},  # sampled token outside the top 2
    ])
    assert _token_logprobs(answer, 2) == [["a", -0.1, [["a", -0.1], ["b", -2.5]]],
                                          ["c", -3.0, [["d", -0.5], ["e", -1.0]]]]


@pytest.mark.integration
def test_a_gguf_teacher_is_converted_once_for_vllm(tmp_path):
    from transformers import AutoConfig

    from kdkit.models.load import resolve

    src = resolve("smollm2-135m-instruct")
    out = hf_directory(src, tmp_path)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 30
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert hf_directory(src, tmp_path) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert not (tmp_path / "teacher-hf.tmp").exists()
