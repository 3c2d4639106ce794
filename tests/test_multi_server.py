"""Several servers serving one teacher (`teacher.base_urls`): generation and the served cache spread
their requests over every server (kdkit.teacher.http.map_servers) and must give exactly what one
server gives: the same ids once each, the same greedy text, the same cache tensors. Servers serving
other model names are refused up front; a server failing for good stops the run, keeps the rows
written, and a rerun resumes to the full set.
"""

from __future__ import annotations

import json
import threading

import pytest
import yaml

from kdkit.config import build_config
from kdkit.errors import UserError
from kdkit.recipes import generate
from kdkit.teacher.cache import CacheReader, verify_cache
from kdkit.teacher.http import ChatClient, generate_answers_http
from kdkit.teacher.served_cache import build_served_cache, repair_served_cache
from test_cache import make_data
from test_http_teacher import _Handler, _examples, _rows, serve  # noqa: F401  (the fault-injecting server fixture)
from test_served_cache import FakeVllm, _cli, _prov, _VllmHandler, teacher  # noqa: F401  (module fixture)


class _OtherModel(_Handler):
    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "another-teacher", "object": "model"}]})


class _OtherVllm(_VllmHandler):
    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "another-model", "object": "model"}]})


def _run(urls, out, n, **kw):
    args = dict(model=None, api_key=None, max_new_tokens=8, temperature=0.0, top_p=1.0, concurrency=2,
                timeout=5, max_retries=2, backoff_s=0.01)
    return generate_answers_http(_examples(n), out, base_urls=urls, **{**args, **kw})


def test_two_servers_write_what_one_writes_and_the_faster_takes_more(serve, tmp_path):
    n = 30
    one = serve()
    slow, fast = serve(delay=0.1), serve()
    single = {r["id"]: r for r in _rows(_run([one.url], tmp_path / "one.jsonl", n))}
    rows = _rows(_run([slow.url, fast.url], tmp_path / "two.jsonl", n))
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == n and set(ids) == set(single)  # every id once
    assert all(r == single[r["id"]] for r in rows)  # greedy: the same row, line for line
    assert len(slow.posts()) + len(fast.posts()) == n  # one request per example, none twice
    assert len(slow.posts()) > 0 and len(fast.posts()) > len(slow.posts())  # both asked; the faster took more
    assert [x[2] for x in slow.log if x[1] == "GET"] == ["/v1/models"]  # each asked for its model once


def test_served_model_names_must_agree(serve, tmp_path, monkeypatch, capsys):
    good, other = serve(), serve()
    other.RequestHandlerClass = _OtherModel
    with pytest.raises(UserError, match=rf"{other.url} serves 'another-teacher' but {good.url} serves 'fake-teacher'"):
        _run([good.url, other.url], tmp_path / "direct.jsonl", 2)
    assert good.posts() == other.posts() == []  # refused before any work
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "prompt": "hello"}) + "\n")
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"dir": str(tmp_path / "run")}, "generate": {"prompts": str(prompts), "max_new_tokens": 8},
        "teacher": {"backend": "http", "base_urls": [good.url, other.url], "max_retries": 0}}))
    code, err = _cli(monkeypatch, capsys, "generate", config)
    assert code == 2 and other.url in err and "same teacher" in err and "Traceback" not in err, err


def test_a_server_failing_for_good_stops_the_run_and_a_rerun_resumes(serve, tmp_path):
    n = 20
    healthy, failing = serve(delay=0.05), serve(["ok", "ok"] + ["400"] * 4)
    out = tmp_path / "out.jsonl"
    with pytest.raises(UserError, match=rf"{failing.url}/chat/completions: HTTP 400"):
        _run([healthy.url, failing.url], out, n)
    kept = [r["id"] for r in _rows(out)]
    assert 1 <= len(kept) < n and len(set(kept)) == len(kept)  # the rows before the failure stay written
    failing.script.clear()  # the server is fixed
    _run([healthy.url, failing.url], out, n)
    ids = [r["id"] for r in _rows(out)]
    assert ids[: len(kept)] == kept and len(ids) == len(set(ids)) == n  # resumed: nothing redone, nothing missing


def test_the_recipe_records_every_server(serve, tmp_path):
    a, b = serve(delay=0.02), serve(delay=0.02)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"say {i}"}) + "\n" for i in range(12)))
    cfg = build_config({"run": {"dir": str(tmp_path / "run")}, "generate": {"prompts": str(prompts)},
                        "teacher": {"backend": "http", "base_urls": [a.url, b.url], "concurrency": 2}})
    out = generate.run(cfg)["train"]
    assert sorted(r["id"] for r in _rows(out)) == sorted(f"p{i}" for i in range(12))
    assert a.posts() and b.posts()
    manifest = json.loads(out.with_name(out.name + ".manifest.json").read_text())
    assert manifest["teacher"] == {"backend": "http", "base_urls": [a.url, b.url], "model": "fake-teacher"}
    assert manifest["rows"] == 12


# ---------------------------------------------------------------- the served cache


@pytest.fixture()
def fakes(teacher):
    servers = []

    def start(handler=None) -> FakeVllm:
        srv = FakeVllm(teacher[0])
        if handler:
            srv.RequestHandlerClass = handler
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _client(srv):
    return ChatClient(srv.url, api_key=None, max_retries=0, timeout=30)


def test_served_cache_over_two_servers_equals_one_server(teacher, fakes, tmp_path):
    _, tok = teacher
    data = make_data(tok, n=9)
    one, a, b = fakes(), fakes(), fakes()
    args = dict(model="fake-vllm", k=8, provenance=_prov(tok), vocab=len(tok), shard_size=4, concurrency=2,
                progress=False)
    m1 = build_served_cache(_client(one), data, tmp_path / "one", **args)
    m2 = build_served_cache([_client(a), _client(b)], data, tmp_path / "two", **args)
    assert m1 == m2 and verify_cache(tmp_path / "two") == []  # the same manifest, checksums included
    assert a.requests and b.requests and len(a.requests) + len(b.requests) == len(data.ids)
    r1, r2 = CacheReader(tmp_path / "one"), CacheReader(tmp_path / "two")
    for ex_id in data.ids:
        s1, s2 = r1.signal([ex_id]), r2.signal([ex_id])
        assert s1.ids.equal(s2.ids) and s1.logprobs.equal(s2.logprobs) and s1.tail.equal(s2.tail), ex_id
    (tmp_path / "two" / "shard-00001.safetensors").write_bytes(b"damaged")  # repair over both servers too
    assert repair_served_cache([_client(a), _client(b)], data, tmp_path / "two", progress=False) == [
        "shard-00001.safetensors"]
    assert verify_cache(tmp_path / "two") == []
    other = fakes(_OtherVllm)
    with pytest.raises(UserError, match=rf"{other.url} serves 'another-model'"):
        build_served_cache([_client(a), _client(other)], data, tmp_path / "three", **args)
