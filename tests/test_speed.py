"""Speed, memory and disk size of a model (kdkit.eval.speed) and their place in the report table."""

from __future__ import annotations

import pytest

from kdkit.eval.report import retention
from kdkit.eval.retention import markdown_table
from kdkit.eval.speed import disk_bytes, measure_dir, measure_speed
from kdkit.models.load import load_model, resolve


def test_speed_memory_and_disk_of_a_tiny_model(tiny_teacher):
    model = load_model(resolve(str(tiny_teacher)))
    r = measure_speed(model, prompt_tokens=16, new_tokens=4, repeats=1)
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert r["ms_per_token"] == pytest.approx(1000 / r["decode_tokens_per_s"])
    assert disk_bytes(tiny_teacher) == (tiny_teacher / "model.safetensors").stat().st_size
    m = measure_dir(tiny_teacher, prompt_tokens=16, new_tokens=4)  # a fresh process: its peak RSS growth
    assert m["disk_bytes"] == disk_bytes(tiny_teacher) and m["decode_tokens_per_s"] > 0
    assert 0 < m["peak_memory_bytes"] < 2e9


def test_speed_rows_and_harness_rows_in_the_table():
    base = {"ce": 1.0, "ppl": 2.7, "kl_to_teacher": 0.0, "top1_agreement": 1.0, "params": 10, "tokens_per_s": 5.0}
    metrics = {"teacher": {**base, "decode_tokens_per_s": 10.0, "disk_bytes": 2_000_000, "harness": {"t": {"acc": 0.5}}},
               "student": {**base, "decode_tokens_per_s": 20.0, "disk_bytes": 1_000_000},
               "other": {**base, "harness": {"t": {"acc": 0.25}}}}
    table = markdown_table(metrics)
    assert "| decode tokens/s | 10.0 | 20.0 | – |" in table
    assert "| size on disk (MB) | 2.0 | 1.0 | – |" in table
    assert "| t acc (lm-eval) | 0.500 | – | 0.250 |" in table
    assert "prefill" not in table  # not measured: no row
    ret = retention(metrics)
    assert ret["other"]["t/acc"] == 0.5 and "t/acc" not in ret["student"]  # retention = student / teacher
    assert ret["student"]["decode_tokens_per_s"] == 2.0
