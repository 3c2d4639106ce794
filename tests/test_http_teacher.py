"""The served-teacher backend against a fault-injecting OpenAI-compatible server on 127.0.0.1.

The server answers each POST by the next entry of its script (429 with Retry-After, 500/503, a
connection reset, a hang, a slow drip, 401, ...) and then normally. Checked: only retryable errors
are retried, Retry-After is honoured, timeouts fire, 4xx fail fast, the output holds every id once,
kill -9 + rerun ends with the same ids, and the API key shows up nowhere but the request header.
"""

from __future__ import annotations

import email.utils
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from kdkit.data.sources import Example
from kdkit.errors import UserError
from kdkit.teacher.http import generate_answers_http, retry_after_seconds

SECRET = "sk-test-SECRET123"
HANG_S = 2.0  # longer than the client timeouts below; bounded so the server stops by itself


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, payload: dict, headers: dict = ()):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in dict(headers).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.record("GET", self.path, "ok", self.headers.get("Authorization"))
        self._send(200, {"object": "list", "data": [{"id": "fake-teacher", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        action = self.server.next_action()
        self.server.record("POST", self.path, action, self.headers.get("Authorization"))
        question = body["messages"][-1]["content"]
        ok = {"choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer to: {question}"},
                           "finish_reason": "stop"}], "usage": {"completion_tokens": 3}}
        try:
            if action == "ok":
                time.sleep(self.server.delay)
                self._send(200, ok)
            elif action.startswith("429"):  # "429:SECONDS" or "429:date+SECONDS"
                arg = action.split(":")[1]
                after = (email.utils.formatdate(time.time() + float(arg[5:]), usegmt=True)
                         if arg.startswith("date") else arg)
                self._send(429, {"error": "slow down"}, {"Retry-After": after})
            elif action == "reset":  # RST instead of an answer
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True
            elif action == "hang":
                time.sleep(HANG_S)
                self._send(200, ok)
            elif action == "drip":  # headers at once, then one byte every 50 ms: no single read times out
                data = json.dumps(ok).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                deadline = time.time() + HANG_S
                for i in range(len(data)):
                    if time.time() > deadline:
                        break
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.05)
                self.close_connection = True
            elif action == "401":  # echoes the key, as some real servers do: the client must scrub it
                self._send(401, {"error": f"invalid key {self.headers.get('Authorization')}"})
            else:
                self._send(int(action), {"error": f"fault {action}"})
        except OSError:
            self.close_connection = True  # the client gave up (timeout) and closed: expected


class FaultServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script=(), delay=0.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script, self.delay, self.log = list(script), delay, []
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"

    def next_action(self) -> str:
        with self.lock:
            return self.script.pop(0) if self.script else "ok"

    def record(self, method, path, action, auth):
        with self.lock:
            self.log.append((time.monotonic(), method, path, action, auth))

    def posts(self):
        return [x for x in self.log if x[1] == "POST"]

    def handle_error(self, request, client_address):
        pass  # resets and timeouts are the point here


@pytest.fixture()
def serve():
    servers = []

    def start(script=(), delay=0.0) -> FaultServer:
        srv = FaultServer(script, delay)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        srv.timer = threading.Timer(60, srv.shutdown)  # stops by itself even if a test hangs
        srv.timer.daemon = True
        srv.timer.start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.timer.cancel()
        srv.shutdown()
        srv.server_close()


def _examples(n):
    return [Example(id=f"q{i}", messages=[{"role": "user", "content": f"question {i}"}]) for i in range(n)]


def _run(srv, out, n, **kw):
    args = dict(base_urls=[srv.url], model="fake-teacher", api_key=None, max_new_tokens=8, temperature=0.0,
                top_p=1.0, concurrency=2, timeout=0.5, max_retries=6, backoff_s=0.01)
    return generate_answers_http(_examples(n), out, **{**args, **kw})


def _rows(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_retryable_faults_are_retried_and_every_row_written_once(serve, tmp_path):
    faults = ["429:0", "500", "502", "503", "504", "reset", "hang", "drip"]
    srv = serve(faults)
    out = _run(srv, tmp_path / "out.jsonl", 10)
    rows = _rows(out)
    assert sorted(r["id"] for r in rows) == sorted(f"q{i}" for i in range(10))  # none missing, none twice
    for r in rows:  # each answer belongs to its own prompt
        assert r["messages"][-1]["content"] == f"answer to: {r['messages'][0]['content']}"
    assert len(srv.posts()) == 10 + len(faults)  # every fault cost exactly one retry


def test_retry_after_is_honoured_in_seconds_and_as_a_date(serve, tmp_path):
    for header, at_least in (("429:1", 1.0), ("429:date+2", 1.0)):  # an HTTP date has 1 s resolution
        srv = serve([header])
        _run(srv, tmp_path / f"{header}.jsonl", 1, backoff_s=0.001)
        (t0, *_), (t1, *_) = srv.posts()
        assert t1 - t0 >= at_least, (header, t1 - t0)
    assert retry_after_seconds("7") == 7.0 and retry_after_seconds(None) == 0.0
    assert 9 <= retry_after_seconds(email.utils.formatdate(time.time() + 10, usegmt=True)) <= 10


@pytest.mark.parametrize("fault", ["hang", "drip"])
def test_a_hanging_or_dripping_server_times_out(serve, tmp_path, fault):
    srv = serve([fault])
    t0 = time.monotonic()
    with pytest.raises(UserError, match="timed out"):
        _run(srv, tmp_path / "out.jsonl", 1, max_retries=0, concurrency=1)
    assert time.monotonic() - t0 < 1.5  # the 0.5 s deadline, not the server's 2 s
    assert len(srv.posts()) == 1


@pytest.mark.parametrize("status,hint", [("400", "teacher.model"), ("401", "API key"), ("403", "not allowed"),
                                         ("404", "teacher.base_url")])
def test_client_errors_fail_fast_with_a_hint(serve, tmp_path, status, hint):
    srv = serve([status] * 5)
    with pytest.raises(UserError, match=hint) as err:
        _run(srv, tmp_path / "out.jsonl", 1, api_key=SECRET, concurrency=1)
    assert len(srv.posts()) == 1  # not retried
    assert SECRET not in str(err.value) and SECRET not in repr(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no request object rides along


def test_missing_key_names_the_variable_and_unreachable_names_the_url(serve, tmp_path):
    srv = serve(["401"])
    with pytest.raises(UserError, match="set the environment variable MY_TEACHER_KEY"):
        _run(srv, tmp_path / "a.jsonl", 1, api_key_env="MY_TEACHER_KEY")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions.*is the server running"):
        _run(srv, tmp_path / "b.jsonl", 1, base_urls=[f"http://127.0.0.1:{port}/v1"], max_retries=1)


# ---------------------------------------------------------------- through the real command


def _config(tmp_path, srv, prompts) -> Path:
    cfg = {"run": {"dir": str(tmp_path / "run")},
           "teacher": {"backend": "http", "base_url": srv.url, "api_key_env": "KDKIT_TEST_KEY",
                       "concurrency": 2, "timeout_s": 2, "max_retries": 2},
           "generate": {"prompts": str(prompts), "max_new_tokens": 8}}
    path = tmp_path / "http.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _kdkit(config, **popen):
    env = {**os.environ, "KDKIT_TEST_KEY": SECRET, "KDKIT_LOG": "DEBUG"}  # DEBUG: the most to leak into
    return subprocess.Popen([sys.executable, "-m", "kdkit.cli", "generate", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _assert_secret_nowhere(tmp_path, *texts):
    for text in texts:
        assert SECRET not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_kill_9_then_rerun_gives_every_id_once_and_the_key_leaks_nowhere(serve, tmp_path):
    n = 40
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"say {i}"}) + "\n" for i in range(n)))
    srv = serve(["503", "429:0"], delay=0.1)
    config = _config(tmp_path, srv, prompts)
    out = tmp_path / "run" / "data" / "train.jsonl"
    first = _kdkit(config)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 5):
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    written = out.read_text().count("\n")
    assert 5 <= written < n, "the kill came too late to test a resume"
    second = _kdkit(config)
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr[-2000:]
    ids = [r["id"] for r in _rows(out)]
    assert len(ids) == n and set(ids) == {f"p{i}" for i in range(n)}  # no duplicates, nothing missing
    manifest = json.loads((out.parent / "train.jsonl.manifest.json").read_text())
    assert manifest["rows"] == n and manifest["teacher"] == {"backend": "http", "base_url": srv.url,
                                                             "model": "fake-teacher"}  # asked /models
    assert {a for *_, a in srv.log} == {f"Bearer {SECRET}"}  # the key was sent, in the header only
    _assert_secret_nowhere(tmp_path, stdout, stderr, first.stdout.read(), first.stderr.read())


def test_a_rejected_key_exits_2_without_traceback_or_key(serve, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "prompt": "hello"}) + "\n")
    srv = serve(["401"])
    proc = _kdkit(_config(tmp_path, srv, prompts))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr[-2000:]
    assert "rejected the API key in $KDKIT_TEST_KEY" in stderr and "Traceback" not in stderr
    _assert_secret_nowhere(tmp_path, stdout, stderr)
