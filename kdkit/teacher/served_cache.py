"""The offline cache from a served teacher: top-k log-probs from a vLLM/OpenAI-compatible server.

One request per example: POST {base_url}/completions with the example's token ids as the prompt
(exactly the ids the student trains on), `max_tokens` 1 and `prompt_logprobs` k. vLLM answers
`choices[0].prompt_logprobs`: one entry per prompt position, the first None (nothing predicts the
first token), entry t a dict {token id: {"logprob", "rank", "decoded_token"}} holding the top k
given tokens < t, plus the actual token t when it is not among them.

The off-by-one: the cache's row for position t (a supervised target labels[t + 1]) is the
distribution that predicts token t + 1, i.e. entry t + 1. The shards, manifest, checksums and
resume/repair are those of `kdkit.teacher.cache`; only the rows come from the server. Several
servers serving the same model (replicas) share the examples through `kdkit.teacher.http.map_servers`.

The served log-probs are vLLM's raw ones (`logprobs_mode` raw_logprobs): temperature 1, whatever
the request's sampling temperature. The manifest records the served model name as the teacher id
(not the URLs: the same model behind other addresses, or more of them, gives the same cache) and no
weights hash.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from kdkit.data.render import IGNORE, TokenizedData
from kdkit.errors import UserError
from kdkit.signal import Provenance
from kdkit.teacher.cache import build_with, dataset_hash, make_header, read_manifest, refill
from kdkit.teacher.http import ChatClient, common_model, map_servers

SERVED_WEIGHTS = "served"  # manifest weights_sha256 of a served cache: the server does not expose its weights
FLOOR = -9999.0  # vLLM clamps -inf log-probs to this in its JSON answers
_LIMIT = re.compile(r"max(?:imum)?[ _]?(?:allowed|logprobs)[^0-9]{0,20}(\d+)", re.IGNORECASE)


def row_topk(entry: dict | None, *, k: int, vocab: int) -> tuple[list[int], list[float]]:
    """One prompt_logprobs entry → the k most likely ids (< vocab) and their log-probs, best first;
    padded with (0, -inf) when the server sent fewer (the encoding stores -inf as an invalid slot)."""
    if not isinstance(entry, dict):
        raise ValueError(f"expected a dict of token log-probs, got {entry!r:.80}")
    pairs = []
    for tid, info in entry.items():
        lp = float(info["logprob"] if isinstance(info, dict) else info)
        if int(tid) < vocab:  # ids past the tokenizer (a padded head) go to the tail
            pairs.append((-(lp if lp > FLOOR else -math.inf), int(tid)))
    best = sorted(pairs)[:k]  # the extra actual token, when outside the top k, falls off here
    ids = [t for _, t in best] + [0] * (k - len(best))
    lps = [-n for n, _ in best] + [-math.inf] * (k - len(best))
    return ids, lps


def example_rows(prompt_logprobs: list, labels: list[int], *, k: int, vocab: int):
    """An example's rows in `supervised_positions` order: for each t with labels[t + 1] supervised,
    the distribution at entry t + 1 → ids (n, k) int64, logprobs (n, k) fp64, tail (n,) fp64."""
    if len(prompt_logprobs) != len(labels):
        raise ValueError(f"{len(prompt_logprobs)} prompt_logprobs entries for a {len(labels)}-token prompt")
    rows = [row_topk(prompt_logprobs[t + 1], k=k, vocab=vocab)
            for t in range(len(labels) - 1) if labels[t + 1] != IGNORE]
    ids = torch.tensor([r[0] for r in rows], dtype=torch.long).reshape(-1, k)  # (n, k)
    lp = torch.tensor([r[1] for r in rows], dtype=torch.float64).reshape(-1, k)  # (n, k)
    return ids, lp, tail_logmass(lp)


def tail_logmass(lp: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ exp(lp)) per row, -inf where the top k hold all the mass (up to rounding): (n,)."""
    top = torch.logsumexp(lp, dim=-1)  # (n,)
    rest = -torch.expm1(top.clamp(max=0.0))  # (n,) 1 − Σp, ≥ 0
    return torch.where(rest > 0, torch.log(rest), torch.full_like(rest, -math.inf))


def prompt_logprobs(client: ChatClient, input_ids: list[int], *, model: str, k: int) -> list:
    """The server's prompt_logprobs for one tokenized example (one entry per token)."""
    body = {"model": model, "prompt": input_ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k}
    try:
        out = client.request("POST", "completions", body)
    except UserError as e:
        raise _limit_error(e, k) from None
    try:
        entries = out["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        entries = None
    if not isinstance(entries, list):
        raise UserError(f"{client.base_url}/completions answered without choices[0].prompt_logprobs: is it a vLLM "
                        f"server (other OpenAI-compatible servers do not send prompt log-probs)? "
                        f"{client.scrub(str(out))[:200]}")
    return entries


def _limit_error(e: UserError, k: int) -> UserError:
    """A 400 about too many log-probs → what to change; any other refusal unchanged."""
    msg = str(e)
    found = _LIMIT.search(msg) if "HTTP 400" in msg and "logprobs" in msg.lower() else None
    if not found:
        return e
    return UserError(f"teacher.top_k={k} is more log-probs than the server allows (at most {found.group(1)}): "
                     f"lower teacher.top_k to {found.group(1)}, or restart vLLM with a larger --max-logprobs. "
                     f"The server said: {msg}")


Clients = ChatClient | Sequence[ChatClient]  # one server, or several replicas of it


def served_rows(clients: Clients, data: TokenizedData, header: dict, *, model: str, concurrency: int):
    """`compute(first, last)` for `kdkit.teacher.cache.build_with`: examples [first, last) asked of the
    servers, `concurrency` requests in flight on each, rows concatenated in example order."""
    clients = [clients] if isinstance(clients, ChatClient) else list(clients)
    model = common_model(clients, model)  # several servers: they must all serve `model`'s name
    k, vocab = header["k"], header["vocab"]

    def one(client: ChatClient, i: int):
        entries = prompt_logprobs(client, data.input_ids[i], model=model, k=k)
        try:
            return example_rows(entries, data.labels[i], k=k, vocab=vocab)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"example {data.ids[i]}: unexpected prompt_logprobs from {client.base_url}: {e}") from None

    def compute(first: int, last: int):
        parts = dict(map_servers(clients, range(first, last), one, concurrency=concurrency))  # any order
        return tuple(torch.cat([parts[i][j] for i in range(first, last)]) for j in range(3))  # (n, k), (n, k), (n,)

    return compute


def served_header(data: TokenizedData, provenance: Provenance, *, model: str, k: int, vocab: int,
                  shard_size: int) -> dict:
    """The manifest header of a served cache: temperature 1, teacher id = the served model name."""
    prov = Provenance(teacher_id=model, tokenizer_hash=provenance.tokenizer_hash,
                      chat_template_hash=provenance.chat_template_hash)
    return make_header(data, prov, k=k, temperature=1.0, vocab=vocab, shard_size=shard_size,
                       weights=SERVED_WEIGHTS, extra={"source": {"backend": "http", "model": model}})


def build_served_cache(clients: Clients, data: TokenizedData, out_dir, *, model: str, k: int,
                       provenance: Provenance, vocab: int, shard_size: int = 256, concurrency: int = 4,
                       progress: bool = True) -> dict:
    """Ask the server(s) for every example's prompt log-probs and store them as a verified cache;
    resumes a killed build like the local one (with any number of servers). Returns the manifest."""
    header = served_header(data, provenance, model=model, k=k, vocab=vocab, shard_size=shard_size)
    compute = served_rows(clients, data, header, model=model, concurrency=concurrency)
    return build_with(compute, data, out_dir, header, progress=progress)


def repair_served_cache(clients: Clients, data: TokenizedData, cache_dir, *, concurrency: int = 4,
                        progress: bool = True) -> list[str]:
    """Redo the damaged shards of a served cache by asking the server(s) again; returns the files rewritten."""
    manifest = read_manifest(cache_dir)
    model = (manifest.get("source") or {}).get("model")
    if manifest.get("weights_sha256") != SERVED_WEIGHTS or not model:
        raise UserError(f"{cache_dir} was not built from a served teacher: repair it with teacher.backend=local")
    if dataset_hash(data) != manifest["dataset_hash"]:
        raise UserError(f"{cache_dir} was built from other data (dataset hash {manifest['dataset_hash']}, "
                        f"given {dataset_hash(data)}): repair needs the same tokenized data")
    compute = served_rows(clients, data, manifest, model=model, concurrency=concurrency)
    return refill(compute, data, cache_dir, progress=progress)
