"""`kdkit prune` on the real packaged teacher (SmolLM2-135M: llama, 9 heads / 3 KV heads, hidden 576):
width, depth and both at 47% of its parameters give a loadable model that generates, within 3% of the target.
One CLI run per method (module-scoped), on a few calibration examples, to keep the suite short."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.47


@pytest.fixture(scope="module", params=["width", "depth", "both"])
def pruned(request, tmp_path_factory):
    """(method, RUN_DIR/pruned, prune.json) of one `kdkit prune` run."""
    run = tmp_path_factory.mktemp(f"prune-{request.param}")
    cfg = {"run": {"dir": str(run / "run")}, "teacher": {"path": "smollm2-135m-instruct"},
           "data": {"train": str(ROOT / "configs" / "data" / "smollm2_answers.jsonl"), "max_length": 128},
           "prune": {"method": request.param, "target_params": TARGET, "calibration_samples": 8,
                     "ppl_tokens": 128}}  # the skip perplexities are the cost: a short budget here
    path = run / "prune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "kdkit.cli", "prune", str(path)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = run / "run" / "pruned"
    return request.param, out, json.loads((out / "prune.json").read_text())


def test_pruned_teacher_hits_the_target_loads_and_generates(pruned):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdkit.models.load import count_parameters

    method, out, summary = pruned
    assert abs(summary["params_after"] / summary["target_params"] - 1) <= 0.03, summary
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert count_parameters(model) == summary["params_after"]
    c = model.config
    assert c.hidden_size % c.num_attention_heads == 0 and c.hidden_size % 32 == 0 and c.intermediate_size % 32 == 0
    assert (c.num_hidden_layers < 30) == (method != "width")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
