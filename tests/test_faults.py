"""Fault injection: repeated kill -9 at random points, and fuzzed config / data inputs."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from kdkit.config import build_config, load_config
from kdkit.data.sources import load_examples
from kdkit.errors import UserError
from test_http_teacher import serve  # noqa: F401  (the fault-injecting server fixture)

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


# ---------------------------------------------------------------- preemption by SIGUSR1


def test_sigusr1_checkpoints_at_the_next_step_boundary_exits_143_and_resumes(tiny_config, tmp_path):
    """SLURM's pre-timeout signal (SIGTERM has its own test in test_train.py)."""
    run = tmp_path / "usr1"
    p = _distill(tiny_config, run, "train.save_every=0")
    deadline = time.monotonic() + 300
    while _steps_logged(run) < 3 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGUSR1)
    assert p.wait(timeout=120) == 143, p.stderr.read()[-2000:]
    saved = [int(c.name.split("-")[1]) for c in (run / "checkpoints").glob("step-*[0-9]")]
    logged = _steps_logged(run)
    assert saved == [logged] and 3 <= logged < 12  # save_every=0: the only checkpoint is the preemption's
    assert "preempted" in p.stderr.read()
    p = _distill(tiny_config, run, "train.save_every=0", "--resume")
    assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))


# ---------------------------------------------------------------- bad inputs through the command
# Each ends with exit code 2, a message naming the problem, and no traceback. Covered elsewhere:
# rows without an assistant turn and a misspelled override (test_cli.py), top-k larger than the
# server allows (test_served_cache.py, and test_vllm.py against real vLLM).


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """The console entry point in-process → (exit code, stderr). An exception other than SystemExit
    (what would print a traceback) propagates and fails the test."""
    from kdkit.cli import main

    monkeypatch.setattr("sys.argv", ["kdkit", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return e.value.code or 0, err


def _rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _teacher_copy(tiny_teacher: Path, dest: Path, edit=None) -> Path:
    """A copy of the tiny teacher whose tokenizer `edit(tok)` changed (then saved over the copy's)."""
    from kdkit.models import load as M

    shutil.copytree(tiny_teacher, dest)
    if edit:
        tok = M.load_tokenizer(M.resolve(str(dest)))
        edit(tok)
        for f in ("chat_template.jinja", "tokenizer_config.json", "tokenizer.json"):
            (dest / f).unlink(missing_ok=True)
        tok.save_pretrained(dest)
    return dest


def _no_template(tok):
    tok.chat_template = None


def _extra_token(tok):
    tok.add_tokens(["<kdkit-extra>"])


CHAT = [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "red"}]


@pytest.mark.parametrize("case", ["empty dataset", "all rows over-long", "missing chat template",
                                  "tokenizer mismatch", "unknown config key", "temperature <= 0",
                                  "beta outside [0, 1]"])
def test_bad_input_exits_2_with_a_clear_message(case, tiny_config, tiny_teacher, tmp_path, monkeypatch, capsys):
    base = ("distill", tiny_config, f"run.dir={tmp_path / 'run'}", "data.eval=null", "train.max_steps=1")
    if case == "empty dataset":
        args, want = (*base, f"data.train={_rows(tmp_path / 'empty.jsonl', [])}"), r"no usable rows .*0 rows"
    elif case == "all rows over-long":
        long = [{"messages": [{"role": "user", "content": "x " * 100}, {"role": "assistant", "content": "ok"}]}] * 3
        args = (*base, f"data.train={_rows(tmp_path / 'long.jsonl', long)}", "data.max_length=16")
        want = r"no usable rows .*3 over-long \(max_length=16\).*raise data.max_length"
    elif case == "missing chat template":
        teacher = _teacher_copy(tiny_teacher, tmp_path / "plain", _no_template)
        args, want = (*base, f"teacher.path={teacher}"), r"has no chat template"
    elif case == "tokenizer mismatch":
        student = _teacher_copy(tiny_teacher, tmp_path / "other", _extra_token)
        args = (*base, "student.init=pretrained", f"student.path={student}")
        want = r"teacher and student use different tokenizers"
    elif case == "unknown config key":
        bad = tmp_path / "bad.yaml"
        bad.write_text(tiny_config.read_text() + "trian:\n  lr: 0.1\n")
        args, want = ("config", "validate", bad), r"trian.*did you mean 'train'"
    elif case == "temperature <= 0":
        args, want = ("config", "validate", tiny_config, "loss.temperature=0"), r"loss.temperature"
    else:
        args, want = ("config", "validate", tiny_config, "loss.beta=1.5"), r"loss.beta"
    code, err = _cli(monkeypatch, capsys, *args)
    assert code == 2 and re.search(want, err, re.S), err


def _cached_config(tiny_config, tmp_path, monkeypatch, capsys) -> list[str]:
    """A distill config reading a freshly built cache of the tiny teacher (kdkit cache)."""
    args = [str(tiny_config), f"run.dir={tmp_path / 'run'}", "data.eval=null", "train.max_steps=2",
            "teacher.signal=cache", "teacher.top_k=4", "teacher.cache_shard_size=8"]
    assert _cli(monkeypatch, capsys, "cache", *args)[0] == 0
    return args


def test_a_damaged_or_foreign_cache_is_refused(tiny_config, tiny_teacher, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    args = _cached_config(tiny_config, tmp_path, monkeypatch, capsys)
    cache = tmp_path / "run" / "cache"
    same = _teacher_copy(tiny_teacher, tmp_path / "same-teacher")  # the same weights at another path
    assert _cli(monkeypatch, capsys, "distill", *args, f"teacher.path={same}")[0] == 0
    other = _teacher_copy(tiny_teacher, tmp_path / "other-teacher")  # same tokenizer, other weights
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-3
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    code, err = _cli(monkeypatch, capsys, "distill", *args, f"teacher.path={other}")
    assert code == 2 and "does not match this run" in err and "teacher weights hash" in err, err
    assert "Traceback" not in err and "kdkit cache CONFIG" in err
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "../../outside.safetensors"  # a path escaping the cache
    (cache / "manifest.json").write_text(json.dumps(manifest))
    code, err = _cli(monkeypatch, capsys, "distill", *args)
    assert code == 2 and "'../../outside.safetensors'" in err and "never followed" in err, err
    assert _cli(monkeypatch, capsys, "cache", *args)[0] == 0  # a rerun rebuilds that shard under its name
    shard = cache / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7] + b"garbage")
    code, err = _cli(monkeypatch, capsys, "distill", *args)
    assert code == 2 and "shard-00001.safetensors: checksum mismatch" in err and "--repair" in err, err
    assert _cli(monkeypatch, capsys, "cache", "verify", cache, "--repair")[0] == 0  # the teacher's files hash matches
    assert _cli(monkeypatch, capsys, "distill", *args)[0] == 0


def test_unsafe_checkpoints_are_refused_on_resume(tiny_config, tmp_path, monkeypatch, capsys):
    import hashlib

    from test_checkpoint import _Evil

    args = ("distill", tiny_config, f"run.dir={tmp_path / 'run'}", "data.eval=null", "train.max_steps=2",
            "train.save_every=1")
    assert _cli(monkeypatch, capsys, *args)[0] == 0
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sha256"]["../../../outside"] = "0" * 64  # a path escaping the checkpoint (and the run dir)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    code, err = _cli(monkeypatch, capsys, *args, "--resume")
    assert code == 2 and "unsafe file name '../../../outside'" in err, err
    del meta["sha256"]["../../../outside"]
    torch.save({"optimizer": _Evil(), "scheduler": {}}, ckpt / "optim.pt")  # a pickle that runs code
    meta["sha256"]["optim.pt"] = hashlib.sha256((ckpt / "optim.pt").read_bytes()).hexdigest()
    (ckpt / "meta.json").write_text(json.dumps(meta))
    code, err = _cli(monkeypatch, capsys, *args, "--resume")
    assert code == 2 and "refusing to load" in err and "optim.pt" in err, err


def test_missing_api_key_and_unreachable_endpoint(serve, tiny_config, tmp_path, monkeypatch, capsys):
    prompts = _rows(tmp_path / "prompts.jsonl", [{"id": "p0", "prompt": "hi"}])
    monkeypatch.delenv("KDKIT_NO_SUCH_KEY", raising=False)
    srv = serve(["401"])
    base = ("generate", tiny_config, f"run.dir={tmp_path / 'run'}", f"generate.prompts={prompts}",
            "teacher.backend=http", "teacher.api_key_env=KDKIT_NO_SUCH_KEY", "teacher.max_retries=0")
    code, err = _cli(monkeypatch, capsys, *base, f"teacher.base_url={srv.url}")
    assert code == 2 and "set the environment variable KDKIT_NO_SUCH_KEY" in err, err
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, err = _cli(monkeypatch, capsys, *base, f"teacher.base_url=http://127.0.0.1:{port}/v1", "teacher.model=m")
    assert code == 2 and f"127.0.0.1:{port}" in err and "is the server running" in err, err
