"""A served teacher: any OpenAI-compatible `/chat/completions` endpoint (vLLM, llama.cpp, OpenAI, ...).

Answers go to the same resumable `messages` jsonl as the local backend (`kdkit.teacher.generate`):
one line per answer, written and flushed as each request completes, ids already in the file skipped.

Several servers serving the same teacher (`teacher.base_urls`, replicas) share the work: one
`ChatClient` each, one queue of examples, `concurrency` threads per server taking the next example
when free (`map_servers`), so a faster server takes more. The output is the same as with one server.

Reliability, request by request:
- at most `concurrency` requests in flight per server;
- retried only when retrying can help (429, 408, 500, 502, 503, 504, connection errors, timeouts),
  with exponential backoff and jitter, never sooner than the server's `Retry-After`;
- 400/401/403/404 (and any other 4xx) fail at once with a `UserError` that says what to do;
- a hard deadline per request (`timeout`, connect + answer together): a server that hangs, or drips
  bytes slowly enough to dodge a per-read timeout, still times out.

The API key is passed in (read from an environment variable whose NAME the config holds), sent only
in the Authorization header, and scrubbed from every message this module raises or logs; errors
from `requests` are re-raised as plain messages (`from None`), so no request object travels on.
"""

from __future__ import annotations

import email.utils
import logging
import queue
import random
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import requests
from tqdm.auto import tqdm

from kdkit.data.sources import Example
from kdkit.errors import UserError
from kdkit.teacher.generate import answer_row, done_ids, prompt_messages

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 300.0  # a longer Retry-After is capped (and said so) rather than obeyed blindly


class _Retryable(Exception):
    """One attempt failed in a way another attempt may not; `wait` is the server's Retry-After."""

    def __init__(self, reason: str, wait: float = 0.0):
        super().__init__(reason)
        self.wait = wait


class _Stopped(Exception):
    """Another request failed for good; this one gives up instead of retrying."""


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date (0 when absent/bad)."""
    if not value:
        return 0.0
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return 0.0
    return max(0.0, when - (time.time() if now is None else now))


def backoff_seconds(attempt: int, *, base: float, cap: float, retry_after: float = 0.0) -> float:
    """Exponential backoff with jitter (half to all of base·2^attempt), never below Retry-After."""
    delay = min(cap, base * 2**attempt) * random.uniform(0.5, 1.0)
    return max(delay, min(retry_after, MAX_RETRY_AFTER_S))


class ChatClient:
    """Requests to one OpenAI-compatible server; thread-safe (one `requests.Session`, pooled)."""

    def __init__(self, base_url: str, *, api_key: str | None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, max_retries: int = 5, concurrency: int = 4,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self._key = api_key or None  # private, and left out of repr: never printed
        self.api_key_env = api_key_env
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.stop = threading.Event()  # set once any request fails for good
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=concurrency, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def __repr__(self) -> str:
        return f"ChatClient({self.base_url!r}, api_key={'set' if self._key else 'unset'})"

    def scrub(self, text: str) -> str:
        """`text` with the API key replaced (servers sometimes echo it in their error bodies)."""
        return text.replace(self._key, "***") if self._key else text

    # ------------------------------------------------------------ one request, retried

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """The JSON answer to METHOD base_url/path; retried on retryable failures, UserError otherwise."""
        url = f"{self.base_url}/{path.lstrip('/')}"
        for attempt in range(self.max_retries + 1):
            if self.stop.is_set():
                raise _Stopped()
            try:
                return self._attempt(method, url, body)
            except _Retryable as e:
                reason, wait = self.scrub(str(e)), e.wait
            if attempt == self.max_retries:
                break
            delay = backoff_seconds(attempt, base=self.backoff_s, cap=self.max_backoff_s, retry_after=wait)
            log.warning("%s %s: %s; retry %d/%d in %.1f s", method, url, reason, attempt + 1, self.max_retries, delay)
            if self.stop.wait(delay):  # wakes early when the run is being abandoned
                raise _Stopped()
        hint = ("is the server running, and is teacher.base_url right?" if "connection" in reason.lower()
                else "the server keeps failing; try again later, or lower teacher.concurrency")
        raise UserError(f"{method} {url} failed {self.max_retries + 1} times, last: {reason}. {hint}")

    def _attempt(self, method: str, url: str, body: dict | None) -> dict:
        """One try under a hard deadline; returns the JSON body or raises _Retryable / UserError."""
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        box: dict = {}

        def call():  # runs in its own thread so a dripping server cannot hold us past the deadline
            try:
                r = self._session.request(method, url, json=body, headers=headers, stream=True,
                                          timeout=(min(10.0, self.timeout), self.timeout))
                box["response"] = r
                box["content"] = r.content  # reads the whole body
            except Exception as e:  # reported below, after scrubbing; never re-raised with its request
                box["error"] = f"{type(e).__name__}: {e}"
                box["retryable"] = isinstance(e, (requests.ConnectionError, requests.Timeout,
                                                  requests.exceptions.ChunkedEncodingError))

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():  # the deadline passed: drop the connection and let the thread die
            _abort(box.get("response"))
            raise _Retryable(f"timed out after {self.timeout:g} s")
        if "error" in box:
            if box["retryable"]:
                kind = "connection error" if "Connection" in box["error"] else "error"
                raise _Retryable(f"{kind}: {box['error']}")
            raise UserError(f"{method} {url}: {self.scrub(box['error'])}") from None
        r = box["response"]
        if r.status_code in RETRYABLE_STATUS:
            raise _Retryable(f"HTTP {r.status_code}", wait=retry_after_seconds(r.headers.get("Retry-After")))
        if r.status_code >= 400:
            raise UserError(self._refusal(method, url, r.status_code, box["content"])) from None
        try:
            return r.json()
        except ValueError:
            raise UserError(f"{method} {url}: HTTP {r.status_code} but the body is not JSON: "
                            f"{self.scrub(box['content'][:200].decode(errors='replace'))!r}") from None

    def _refusal(self, method: str, url: str, status: int, content: bytes) -> str:
        """A fail-fast message for a 4xx: what the server said and what to do about it."""
        said = self.scrub(content[:300].decode(errors="replace")).strip()
        env = self.api_key_env
        todo = {
            401: (f"the server wants an API key: set the environment variable {env} (named by teacher.api_key_env)"
                  if not self._key else f"the server rejected the API key in ${env}: check it (teacher.api_key_env)"),
            403: f"the API key in ${env} is not allowed to use this model or endpoint",
            404: "check teacher.base_url (it usually ends in /v1) and teacher.model (the served model name)",
            400: "the server refused the request: check teacher.model and the generate.* sampling settings",
        }.get(status, "the server refused the request; retrying will not help")
        return f"{method} {url}: HTTP {status} ({said or 'no details'}); {todo}"

    # ------------------------------------------------------------ the API

    def served_model(self) -> str:
        """The first model the server lists (vLLM serves one)."""
        models = [m.get("id") for m in self.request("GET", "models").get("data", [])]
        if not models or not models[0]:
            raise UserError(f"{self.base_url}/models lists no model: set teacher.model")
        return models[0]

    def chat(self, messages: list[dict], *, model: str, max_tokens: int, temperature: float, top_p: float,
             seed: int | None = None, top_logprobs: int = 0) -> dict:
        """One chat completion → {"text", "tokens" (generated, when the server says), "logprobs"?}."""
        body = {"model": model, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p if temperature > 0 else 1.0}
        if seed is not None:
            body["seed"] = seed
        if top_logprobs:
            body.update(logprobs=True, top_logprobs=top_logprobs)
        out = self.request("POST", "chat/completions", body)
        try:
            choice = out["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{self.base_url}/chat/completions answered without choices[0].message.content: "
                            f"{self.scrub(str(out))[:200]}") from None
        result = {"text": text.strip(), "tokens": (out.get("usage") or {}).get("completion_tokens", 0)}
        if top_logprobs:
            result["logprobs"] = _token_logprobs(choice.get("logprobs"))
        return result


def _abort(response) -> None:
    """Cut a response's socket so a thread blocked reading it wakes up (close() would wait for it)."""
    sock = getattr(getattr(getattr(response, "raw", None), "_connection", None), "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _token_logprobs(lp: dict | None) -> list:
    """OpenAI logprobs → [[token, logprob, [[alt, logprob], ...]], ...] per generated token."""
    return [[t["token"], t["logprob"], [[a["token"], a["logprob"]] for a in t.get("top_logprobs") or []]]
            for t in (lp or {}).get("content") or []]


def common_model(clients: Sequence[ChatClient], model: str | None = None) -> str:
    """The model name to ask for: `model` as given with one server; with several, every server's
    /models must list the same first name (else a UserError naming the server that differs)."""
    if model and len(clients) == 1:
        return model
    names = [client.served_model() for client in clients]
    for client, name in zip(clients, names):
        if name != names[0]:
            raise UserError(f"{client.base_url} serves {name!r} but {clients[0].base_url} serves {names[0]!r}: "
                            "every server in teacher.base_urls must serve the same teacher under the same name "
                            "(vllm serve ... --served-model-name)")
    return model or names[0]


def map_servers(clients: Sequence[ChatClient], items: Sequence, fn: Callable, *, concurrency: int) -> Iterator:
    """Yield (item, fn(client, item)) for every item as each completes (any order), spread over the
    servers: one shared queue, `concurrency` threads per server taking the next item when free, so a
    faster server takes more. The first failure stops every server (requests still retrying give up,
    idle threads take nothing more) and is raised here; results that completed before it were yielded."""
    work, done = queue.SimpleQueue(), queue.SimpleQueue()
    for item in items:
        work.put(item)
    pending = work.qsize()

    def worker(client: ChatClient) -> None:
        while not client.stop.is_set():
            try:
                item = work.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((item, fn(client, item), None))
            except BaseException as e:  # handed over to the caller's thread, which raises it
                done.put((item, None, e))
                return

    for client in clients:
        for _ in range(concurrency):  # daemons: a failed run exits without waiting for requests in flight
            threading.Thread(target=worker, args=(client,), name="kdkit-http", daemon=True).start()
    try:
        for _ in range(pending):
            item, result, error = done.get()
            if error is not None:
                raise error
            yield item, result
    except BaseException:  # a failure, or the caller stopped early (GeneratorExit, Ctrl-C)
        for client in clients:
            client.stop.set()
        raise


def generate_answers_http(examples: list[Example], out_path: Path, *, base_urls: Sequence[str], model: str | None,
                          api_key: str | None, max_new_tokens: int, temperature: float, top_p: float,
                          concurrency: int, timeout: float, max_retries: int, api_key_env: str = "OPENAI_API_KEY",
                          seed: int = 0, top_logprobs: int = 0, backoff_s: float = 0.5) -> Path:
    """Ask the servers (`base_urls`: one, or replicas of one teacher) to answer every example; write
    {"id", "messages"[, "teacher_logprobs"]} lines.

    temperature 0 is greedy. Rows are written as requests complete (any order); a rerun skips the ids
    already in `out_path`. A request that fails for good stops the run with a UserError; the rows
    finished before it stay written."""
    clients = [ChatClient(url, api_key=api_key, api_key_env=api_key_env, timeout=timeout, max_retries=max_retries,
                          concurrency=concurrency, backoff_s=backoff_s) for url in base_urls]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out_path)
    todo = [e for e in examples if e.id not in done]
    if not todo:
        return out_path
    model = common_model(clients, model)

    def answer(client: ChatClient, example: Example) -> dict:
        # a seed per id: sampled answers do not depend on which server, or which requests ran first, or a resume
        return client.chat(prompt_messages(example), model=model, max_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, top_logprobs=top_logprobs,
                           seed=(seed + zlib.crc32(example.id.encode())) % 2**31)

    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc="generate", unit="answer")
    new_tokens, t0 = 0, time.perf_counter()
    try:
        with open(out_path, "a") as f:
            for example, result in map_servers(clients, todo, answer, concurrency=concurrency):
                extra = {"teacher_logprobs": result["logprobs"]} if top_logprobs else {}
                f.write(answer_row(example, result["text"], **extra))
                f.flush()  # a kill loses at most the line being written (cut off on resume)
                new_tokens += result["tokens"]
                bar.update(1)
                bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.0f}")
    finally:
        bar.close()
    return out_path
