"""Fault injection: repeated kill -9 at random points, and fuzzed config / data inputs."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from kdkit.config import build_config, load_config
from kdkit.data.sources import load_examples
from kdkit.errors import UserError

TRIALS = 10


def _distill(cfg, run_dir, *extra):
    return subprocess.Popen([sys.executable, "-m", "kdkit.cli", "distill", str(cfg), f"run.dir={run_dir}",
                             "data.eval=null", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _final_state(run_dir: Path):
    ckpt = sorted((run_dir / "checkpoints").glob("step-*[0-9]"))[-1]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return (load_file(run_dir / "student" / "model.safetensors"),
            torch.load(ckpt / "optim.pt", weights_only=True)["optimizer"], rows)


def _same_optimizer(a, b) -> bool:
    return all(torch.equal(x, y) if torch.is_tensor(x) else x == y
               for s1, s2 in zip(a["state"].values(), b["state"].values()) for x, y in zip(s1.values(), s2.values()))


def test_kill9_campaign_bitwise_identical(tiny_config, tmp_path):
    """10 kills at random moments (mid-accumulation, across epoch boundaries: 3 steps per epoch)."""
    ref = _distill(tiny_config, tmp_path / "ref")
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    weights, optim, rows = _final_state(tmp_path / "ref")
    rng = random.Random(1234)
    identical = 0
    for trial in range(TRIALS):
        run = tmp_path / f"t{trial}"
        kills = 0
        while kills < 2:  # two kills per trial at random step counts and random sub-step delays
            p = _distill(tiny_config, run, "--resume")
            target = min(11, _steps_logged(run) + rng.randint(1, 4))
            while _steps_logged(run) < target and p.poll() is None:
                time.sleep(0.01)
            time.sleep(rng.random() * 0.3)  # land anywhere inside a step: mid-accumulation too
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
        p = _distill(tiny_config, run, "--resume")
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
        w2, o2, r2 = _final_state(run)
        same = (all(torch.equal(weights[k], w2[k]) for k in weights) and _same_optimizer(optim, o2)
                and [r["loss"] for r in rows] == [r["loss"] for r in r2] and [r["ids"] for r in rows] == [r["ids"] for r in r2])
        identical += same
    print(f"\nkill -9 campaign: {identical}/{TRIALS} bitwise identical (weights, optimizer state, per-step losses, example ids)")
    assert identical == TRIALS
    # the example stream: every epoch is a permutation of the data, no repeats or skips
    ids = [i for r in rows for i in r["ids"]]
    per_epoch = 24
    for e in range(len(ids) // per_epoch):
        assert sorted(ids[e * per_epoch:(e + 1) * per_epoch]) == sorted(f"r{i}" for i in range(24))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_fuzzed_yaml_configs_fail_cleanly(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        load_config(path)
    except UserError:
        pass  # the only acceptable failure


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(["run", "train", "loss", "data", "teacher", "trian", "x"]),
                       st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                                    max_leaves=6), max_size=4))
def test_fuzzed_config_trees_fail_cleanly(tree):
    try:
        build_config(tree)
    except UserError:
        pass


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(max_size=40), st.builds(json.dumps, st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(
        ["text", "prompt", "completion", "messages", "role", "content", "conversations", "from", "value",
         "instruction", "input", "output", "id"]), c, max_size=4), max_leaves=8))), max_size=5))
def test_fuzzed_jsonl_rows_fail_cleanly(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(line.replace("\n", " ") for line in lines) + "\n")
    try:
        load_examples(path)
    except UserError:
        pass
