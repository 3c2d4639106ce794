"""The cache from a served teacher's prompt_logprobs (kdkit/teacher/served_cache.py) against a fake
vLLM server on 127.0.0.1 that runs the tiny teacher and answers exactly as vLLM does: entry 0 None,
entry t the top k given tokens < t plus the actual token t. The served cache must then equal the
local one: the off-by-one (row t ↔ entry t + 1) and the extra actual token are where it could go wrong.
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import yaml

from conftest import chat_rows, write_jsonl
from kdkit.cli import main
from kdkit.data.collate import collate
from kdkit.data.render import IGNORE
from kdkit.errors import UserError
from kdkit.models import load as M
from kdkit.signal import Provenance
from kdkit.teacher.cache import CacheReader, build_cache, cache_signal_fn, dataset_hash, verify_cache
from kdkit.teacher.http import ChatClient
from kdkit.teacher.served_cache import build_served_cache, example_rows, repair_served_cache, row_topk
from test_cache import make_data

MAX_LOGPROBS = 16  # the fake server's --max-logprobs


class _VllmHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _send(self, status: int, payload: dict):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "fake-vllm", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.server.status:  # a scripted refusal
            return self._send(self.server.status, {"error": {"message": "no", "code": self.server.status}})
        k = body["prompt_logprobs"]
        if k > MAX_LOGPROBS:  # vLLM's words (sampling_params.py)
            return self._send(400, {"error": {"message": f"Requested prompt logprobs of {k}, which is greater than "
                                              f"max allowed: {MAX_LOGPROBS}", "type": "BadRequestError",
                                              "param": "prompt_logprobs", "code": 400}})
        self._send(200, {"choices": [{"index": 0, "text": "x", "prompt_logprobs": self.server.answer(body["prompt"], k)}]})


class FakeVllm(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, model):
        super().__init__(("127.0.0.1", 0), _VllmHandler)
        self.model, self.requests, self.status = model, [], 0
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"

    @torch.no_grad()
    def answer(self, prompt: list[int], k: int) -> list:
        with self.lock:
            logits = self.model(torch.tensor([prompt])).logits[0]  # (T, V)
        lp = torch.log_softmax(logits.float(), -1)  # (T, V)
        out = [None]
        for t in range(1, len(prompt)):
            top, ids = lp[t - 1].topk(k)  # the distribution of token t given tokens < t
            entry = {str(int(i)): {"logprob": float(v), "rank": r + 1, "decoded_token": "?"}
                     for r, (v, i) in enumerate(zip(top, ids))}
            actual = prompt[t]
            if str(actual) not in entry:  # vLLM adds the prompt token itself, with its true rank
                rank = int((lp[t - 1] > lp[t - 1, actual]).sum()) + 1
                entry[str(actual)] = {"logprob": float(lp[t - 1, actual]), "rank": rank, "decoded_token": "?"}
            out.append(entry)
        return out


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    src = M.resolve(str(tiny_teacher))
    return M.freeze(M.load_model(src)), M.load_tokenizer(src)


@pytest.fixture()
def fake(teacher):
    srv = FakeVllm(teacher[0])
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _prov(tok):
    return Provenance(teacher_id="tiny", tokenizer_hash=M.tokenizer_hash(tok), chat_template_hash=M.chat_template_hash(tok))


def test_rows_come_from_the_next_entry_and_the_extra_token_is_dropped():
    entries = [None,
               {"7": {"logprob": -0.1}, "3": {"logprob": -2.5}},
               {"4": {"logprob": -0.2}, "9": {"logprob": -1.9}, "2": {"logprob": -6.0}},  # 2: the actual, outside top 2
               {"5": {"logprob": -0.3}, "1": {"logprob": -1.5}}]
    ids, lp, tail = example_rows(entries, [IGNORE, IGNORE, 2, 5], k=2, vocab=10)
    # labels[2] and labels[3] are supervised: rows t = 1, 2 ← entries 2, 3 (never entry 1 or a shifted one)
    assert ids.tolist() == [[4, 9], [5, 1]]
    assert lp.tolist() == [[-0.2, -1.9], [-0.3, -1.5]]
    want = [math.log(1 - math.exp(-0.2) - math.exp(-1.9)), math.log(1 - math.exp(-0.3) - math.exp(-1.5))]
    assert torch.allclose(tail, torch.tensor(want, dtype=torch.float64))
    # ids past the vocabulary go to the tail, short answers are padded with invalid (-inf) slots, -9999 is -inf
    assert row_topk({"12": {"logprob": -0.1}, "3": {"logprob": -9999.0}}, k=3, vocab=10) == (
        [3, 0, 0], [-math.inf, -math.inf, -math.inf])
    with pytest.raises(ValueError, match="entries"):
        example_rows(entries[:3], [IGNORE, IGNORE, 2, 5], k=2, vocab=10)


def test_served_cache_equals_the_local_cache(teacher, fake, tmp_path):
    model, tok = teacher
    data = make_data(tok, n=7)
    client = ChatClient(fake.url, api_key=None, max_retries=0, timeout=30)
    k = 8
    manifest = build_served_cache(client, data, tmp_path / "served", model="fake-vllm", k=k, provenance=_prov(tok),
                                  vocab=len(tok), shard_size=3, concurrency=2, progress=False)
    build_cache(model, data, tmp_path / "local", k=k, temperature=1.0, provenance=_prov(tok), vocab=len(tok),
                shard_size=3, batch_size=2, progress=False)
    assert manifest["complete"] and verify_cache(tmp_path / "served") == []
    assert manifest["provenance"]["teacher_id"] == "fake-vllm" and manifest["temperature"] == 1.0
    asked = sorted(r["prompt"] for r in fake.requests)  # concurrent: any order
    assert asked == sorted(data.input_ids)  # one request per example, with the student's exact ids
    served, local = CacheReader(tmp_path / "served"), CacheReader(tmp_path / "local")
    for ex_id in data.ids:
        a, b = served.signal([ex_id]), local.signal([ex_id])
        assert torch.equal(a.ids, b.ids), ex_id
        assert (a.logprobs - b.logprobs).abs().max() < 1e-3
        assert (a.tail - b.tail).abs().max() < 1e-2
    # what distill checks: the served cache fits this data and tokenizer
    fn = cache_signal_fn(served, expected=Provenance(tokenizer_hash=M.tokenizer_hash(tok)), data_hash=dataset_hash(data))
    batch = collate([data.input_ids[i] for i in (4, 1)], [data.labels[i] for i in (4, 1)], pad_id=0)
    assert fn({**batch, "ids": [data.ids[4], data.ids[1]]}).num_tokens == int((batch["labels"][:, 1:] != IGNORE).sum())
    # a served cache has no weights hash: a local teacher's is refused, naming the field and the way out
    assert served.provenance.teacher_revision == "served"
    with pytest.raises(UserError, match=r"(?s)teacher weights hash.*teacher\.backend=http"):
        cache_signal_fn(served, expected=Provenance(teacher_revision="files:0123456789abcdef"))
    # repair asks the server again for the damaged shard only
    (tmp_path / "served" / "shard-00001.safetensors").write_bytes(b"damaged")
    assert repair_served_cache(client, data, tmp_path / "served", progress=False) == ["shard-00001.safetensors"]
    assert verify_cache(tmp_path / "served") == [] and len(fake.requests) == 10


def test_k_above_the_server_limit_names_top_k_and_the_limit(teacher, fake, tmp_path):
    _, tok = teacher
    client = ChatClient(fake.url, api_key=None, max_retries=0, timeout=30)
    with pytest.raises(UserError, match=r"teacher\.top_k=17 .*at most 16.*--max-logprobs"):
        build_served_cache(client, make_data(tok, n=2), tmp_path / "c", model="fake-vllm", k=MAX_LOGPROBS + 1,
                           provenance=_prov(tok), vocab=len(tok), shard_size=3, progress=False)
    fake.status = 404  # other refusals keep their own advice
    with pytest.raises(UserError, match="teacher.base_url"):
        build_served_cache(ChatClient(fake.url, api_key=None, max_retries=0), make_data(tok, n=2), tmp_path / "d",
                           model="fake-vllm", k=4, provenance=_prov(tok), vocab=len(tok), progress=False)


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """Run the console entry point in-process: (exit code, stderr). Any exception but SystemExit
    (i.e. a traceback) propagates and fails the test."""
    monkeypatch.setattr("sys.argv", ["kdkit", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code or 0, capsys.readouterr().err


def test_kdkit_cache_with_backend_http_then_distill_from_it(fake, tiny_teacher, tmp_path, monkeypatch, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows(8))
    config = tmp_path / "served.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"dir": str(tmp_path / "run")},
        "teacher": {"path": str(tiny_teacher), "backend": "http", "base_url": fake.url, "top_k": 8,
                    "signal": "cache", "max_retries": 0, "concurrency": 2},
        "student": {"init": "teacher_layers", "num_layers": 2},
        "data": {"train": str(train), "max_length": 64},
        "train": {"max_steps": 3, "batch_size": 4, "save_every": 0, "threads": 1},
    }))
    assert _cli(monkeypatch, capsys, "cache", config)[0] == 0
    assert json.loads((tmp_path / "run" / "cache" / "manifest.json").read_text())["source"]["model"] == "fake-vllm"
    code, err = _cli(monkeypatch, capsys, "cache", config, "teacher.top_k=40",
                     f"teacher.cache_dir={tmp_path / 'c40'}")
    assert code == 2 and "teacher.top_k=40" in err and "at most 16" in err and "Traceback" not in err
    code, err = _cli(monkeypatch, capsys, "cache", config, "loss.temperature=2")
    assert code == 2 and "temperature 1" in err
    n_requests = len(fake.requests)
    assert _cli(monkeypatch, capsys, "distill", config)[0] == 0
    assert len(fake.requests) == n_requests  # trained from the cache, the server not asked again
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
