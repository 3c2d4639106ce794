"""The offline teacher: top-k signals computed once, stored as verified shards, read back per batch.

A cache directory holds `shard-00000.safetensors`, … and `manifest.json`. Shard i covers examples
[i·shard_size, (i+1)·shard_size) of the TokenizedData it was built from, and holds, row-major over
(example, supervised position) — the order of `supervised_positions(labels)` rows — the arrays of
`encoding.py` (ids, codes, top, range, tail), `offsets` (n_examples + 1,) int64 (each example's
first row), and the example ids (metadata "example_ids", a JSON list).

The manifest records the provenance (teacher id and weights hash, tokenizer and chat-template
hashes, temperature, k), the dataset hash, the encoding and a SHA-256 per shard; it holds no
timestamps, so two builds of the same cache have equal manifests. The teacher weights hash
(`weights_sha256`, also the provenance's `teacher_revision`) is a content hash
(kdkit.models.fingerprint): a run reading the cache compares it, not the teacher's path.

Format versions: v2 packs token ids into 2, 3 or 4 bytes (encoding.py) and prefixes the weights hash
with its kind; v1 caches (uint32 ids above 2^16 entries, a bare state_dict hash) are still read, and
compared against the teacher's state_dict hash, but never repaired or resumed: rebuild them.

Crash safety: a shard is written to `*.tmp`, fsync'ed and renamed (os.replace), then the manifest is
rewritten the same way with the shard's checksum. A rerun after kill -9 keeps every shard the
manifest lists whose checksum holds and redoes the rest (a torn `*.tmp` is deleted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from kdkit.data.collate import collate
from kdkit.data.render import IGNORE, TokenizedData
from kdkit.errors import UserError
from kdkit.models.fingerprint import TENSORS, tensors_hash
from kdkit.models.forward import decoder_hidden, project, supervised_positions
from kdkit.signal import FIELD_LABELS, Provenance, SparseSignal
from kdkit.teacher import encoding
from kdkit.utils import atomic_json, fsync_dir, sha256_file

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT, VERSION = "kdkit-topk-cache", 2
READABLE = (1, 2)  # versions a CacheReader reads; only VERSION is written, resumed or repaired
_HANDLES = 64  # open shard files kept by a CacheReader


# ---------------------------------------------------------------- hashes and files



def dataset_hash(data: TokenizedData) -> str:
    """SHA-256 (16 hex) of the example ids, input_ids and labels, in order: what a cache was made from."""
    h = hashlib.sha256()
    for ex_id, ids, labels in zip(data.ids, data.input_ids, data.labels):
        h.update(json.dumps([ex_id, ids, labels], separators=(",", ":")).encode())
    return h.hexdigest()[:16]


def cached_weights(manifest: dict) -> str:
    """The cache's teacher weights hash with its kind's prefix (v1 stored a state_dict hash bare)."""
    weights = manifest.get("weights_sha256") or ""
    if manifest.get("version") == 1 and re.fullmatch(r"[0-9a-f]{16}", weights):
        return TENSORS + weights
    return weights


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def read_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is missing or unreadable ({e}): is {cache_dir} a kdkit cache?") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} manifest: is {cache_dir} a kdkit cache?")
    if manifest.get("version") not in READABLE:
        raise UserError(f"{path} is a {FORMAT} of format version {manifest.get('version')!r}, which this kdkit "
                        f"does not read (it reads {', '.join(map(str, READABLE))}): rebuild the cache with "
                        "`kdkit cache CONFIG` (delete the directory first)")
    return manifest


def _current(manifest: dict, cache_dir, *, action: str) -> None:
    """Refuse to `action` a cache of an older format: its shards and header would mix two encodings."""
    if manifest["version"] != VERSION:
        raise UserError(f"{cache_dir} is a format v{manifest['version']} cache (an older kdkit), which cannot be "
                        f"{action}: delete it and rebuild it with `kdkit cache CONFIG`")


# ---------------------------------------------------------------- computing shards


@torch.no_grad()
def teacher_topk(model, batch: dict, *, k: int, temperature: float, vocab: int):
    """Top-k log-probs at T for a batch's supervised rows: → ids (N, k), logprobs (N, k), tail (N,)."""
    hidden = decoder_hidden(model, batch["input_ids"], batch["attention_mask"])  # (B, T, H)
    mask, _ = supervised_positions(batch["labels"])  # (B, T-1)
    logits = project(model, hidden[:, :-1][mask], vocab=vocab)  # (N, V)
    return topk_rows(logits, k=k, temperature=temperature)


def topk_rows(logits: torch.Tensor, *, k: int, temperature: float, chunk: int = 32):
    """(N, V) logits → ids (N, k), log-probs at T (N, k), sorted, and the log mass outside them (N,).

    Row by row the same numbers as over the whole (N, V) at once, in chunks of rows whose fp32 copies
    (chunk × V) stay in the CPU's cache through the four passes (softmax, top-k, mask, tail)."""
    parts = []
    for z in logits.split(chunk):
        lp = torch.log_softmax(z.float() / temperature, dim=-1)  # (c, V)
        top, ids = lp.topk(k, dim=-1)  # (c, k), sorted: column 0 is the teacher's argmax
        tail = torch.logsumexp(lp.scatter(1, ids, -torch.inf), dim=-1)  # (c,) stable log mass outside
        parts.append((ids, top, tail))
    if not parts:
        empty = logits.new_empty((0, k), dtype=torch.float32)
        return empty.long(), empty, empty[:, 0]
    return tuple(torch.cat(x) for x in zip(*parts))


def _supervised_counts(labels: list[list[int]]) -> list[int]:
    """Rows each example contributes: positions t < T-1 whose target labels[t + 1] is supervised."""
    return [sum(label != IGNORE for label in row[1:]) for row in labels]


def local_rows(model, data: TokenizedData, header: dict, *, batch_size: int, captured: dict | None = None):
    """`compute(first, last)` → ids (n, k), logprobs (n, k), tail (n,): the local teacher's rows for
    examples [first, last), in `supervised_positions` order. The examples run in batches of like length
    (sorted within the shard: little padding), their rows put back in example order. `captured` (example
    id → rows kept while the teacher wrote the answers, `gen_signal.load_captured`) supplies the rows of
    every example whose tokens are the ones generated; only the others run through the teacher."""
    device = next(model.parameters()).device
    captured = captured or {}
    used = {"captured": 0, "computed": 0}

    def compute(first: int, last: int):
        counts = dict(zip(range(first, last), _supervised_counts(data.labels[first:last])))
        rows = {r: got for r in range(first, last) if (got := _captured_rows(data, r, captured, counts[r]))}
        order = sorted((r for r in range(first, last) if r not in rows), key=lambda r: len(data.input_ids[r]))
        for start in range(0, len(order), batch_size):
            part = order[start:start + batch_size]
            batch = collate([data.input_ids[r] for r in part], [data.labels[r] for r in part], pad_id=0)
            batch = {key: v.to(device) for key, v in batch.items()}  # right padding: pad tokens never precede a row
            out = teacher_topk(model, batch, k=header["k"], temperature=header["temperature"], vocab=header["vocab"])
            for r, *pieces in zip(part, *(x.split([counts[r] for r in part]) for x in out)):
                rows[r] = [p.cpu() for p in pieces]
        used["captured"] += (last - first) - len(order)
        used["computed"] += len(order)
        return tuple(torch.cat([rows[r][j] for r in range(first, last)]) for j in range(3))  # (n, k), (n, k), (n,)

    compute.used = used  # how many examples came from each source, for the log
    return compute


def _captured_rows(data: TokenizedData, r: int, captured: dict, count: int):
    """Example r's captured rows when its rendered tokens begin with the generated prompt + answer + end of
    turn and its supervised positions are exactly the generated ones; None otherwise (it is computed)."""
    got = captured.get(data.ids[r])
    if got is None:
        return None
    tokens, ids, top, tail = got  # (L,), (R, k), (R, k), (R,)
    labels, n_rows = data.labels[r], len(ids)
    first = len(tokens) - n_rows + 1  # the prompt's length: its last position predicts the first answer token
    if count != n_rows or list(data.input_ids[r][:len(tokens)]) != tokens.tolist():
        return None
    supervised = [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE]
    if supervised != list(range(first - 1, first - 1 + n_rows)):
        return None
    return [torch.from_numpy(ids).long(), torch.from_numpy(top), torch.from_numpy(tail)]


def _write_shard(compute, data: TokenizedData, out_dir: Path, i: int, header: dict) -> dict:
    """Compute shard i with `compute(first, last)`, write it atomically, and return its manifest entry."""
    first = i * header["shard_size"]
    last = min(first + header["shard_size"], header["num_examples"])
    ids, lp, tail = compute(first, last)  # (n, k), (n, k), (n,)
    counts = _supervised_counts(data.labels[first:last])
    if ids.shape[0] != sum(counts):
        raise RuntimeError(f"shard {i}: {ids.shape[0]} teacher rows for {sum(counts)} supervised positions")
    arrays = encoding.encode(ids, lp, tail, vocab=header["vocab"])
    arrays["offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (n_ex + 1,)
    final = out_dir / _shard_name(i)
    tmp = final.with_name(final.name + ".tmp")
    save_file(arrays, str(tmp), metadata={"example_ids": json.dumps(data.ids[first:last])})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)  # the commit point: a kill before it leaves only a .tmp, which is redone
    fsync_dir(out_dir)
    return {"file": final.name, "first": first, "count": last - first, "tokens": sum(counts),
            "bytes": final.stat().st_size, "sha256": sha256_file(final)}


# ---------------------------------------------------------------- building, verifying, repairing


def make_header(data: TokenizedData, provenance: Provenance, *, k: int, temperature: float, vocab: int,
                shard_size: int, weights: str, extra: dict | None = None) -> dict:
    """The manifest minus its shard list; `weights` identifies the teacher's weights (a hash, or a
    served model's identity), `extra` adds source-specific fields."""
    if not 1 <= k <= vocab:
        raise UserError(f"cache k={k} must be in 1..{vocab} (the vocabulary)")
    if shard_size < 1:
        raise UserError(f"cache shard_size={shard_size} must be >= 1")
    prov = dataclasses.replace(provenance, temperature=float(temperature), top_k=k, teacher_revision=weights)
    n = len(data.input_ids)
    return {
        "format": FORMAT, "version": VERSION, "provenance": prov.to_dict(), "weights_sha256": weights,
        "k": k, "temperature": float(temperature), "vocab": vocab, "encoding": encoding.DESCRIPTION,
        "id_bytes": encoding.id_bytes(vocab), "bytes_per_token": encoding.bytes_per_token(k, vocab),
        "dataset_hash": dataset_hash(data), "num_examples": n,
        "num_tokens": sum(_supervised_counts(data.labels)), "shard_size": shard_size,
        "num_shards": -(-n // shard_size), **(extra or {}),
    }


def _good_entries(out_dir: Path, manifest: dict) -> dict[int, dict]:
    """Manifest entries whose shard file exists and matches its checksum, by shard index."""
    good = {}
    for entry in manifest.get("shards", []):
        i = entry["first"] // manifest["shard_size"]
        if entry.get("file") != _shard_name(i):  # never follow a path from the manifest (../ escapes)
            continue
        path = out_dir / entry["file"]
        if path.is_file() and sha256_file(path) == entry["sha256"]:
            good[i] = entry
    return good


def _fill(compute, data: TokenizedData, out_dir: Path, header: dict, good: dict[int, dict], *,
          progress: bool) -> list[str]:
    """Write every shard not in `good`, rewriting the manifest after each; returns the files written."""
    for stale in out_dir.glob("*.tmp"):
        stale.unlink()  # torn writes of a killed run
    written = []
    todo = [i for i in range(header["num_shards"]) if i not in good]
    done = sum(e["count"] for e in good.values())
    bar = tqdm(total=header["num_examples"], initial=done, desc="cache", unit="ex", disable=not progress)
    for i in todo:
        good[i] = _write_shard(compute, data, out_dir, i, header)
        written.append(good[i]["file"])
        shards = [good[j] for j in sorted(good)]
        atomic_json(out_dir / MANIFEST, {**header, "shards": shards, "complete": len(good) == header["num_shards"]})
        bar.update(good[i]["count"])
    bar.close()
    if not todo:  # nothing to write, but the manifest may predate the last shard's entry
        atomic_json(out_dir / MANIFEST, {**header, "shards": [good[j] for j in sorted(good)], "complete": True})
    return written


def build_cache(teacher_model, data: TokenizedData, out_dir: str | Path, *, k: int, temperature: float,
                provenance: Provenance, vocab: int, shard_size: int = 256, batch_size: int = 8,
                weights: str | None = None, progress: bool = True, captured: dict | None = None) -> dict:
    """Run the teacher over `data` once and store its top-k signals in `out_dir`; returns the manifest.

    `weights`: the teacher's weights hash, `files_hash` of the files it was loaded from (what a run
    compares without loading it); None: `tensors_hash(teacher_model)`. Resumes a killed build
    (finished shards kept after their checksum is checked) and redoes damaged shards of a finished
    one. Refuses an `out_dir` holding a cache built with other settings. `captured`: rows the teacher's
    generation kept (`local_rows`), used instead of a teacher forward where they match the data.
    """
    header = make_header(data, provenance, k=k, temperature=temperature, vocab=vocab, shard_size=shard_size,
                         weights=weights or tensors_hash(teacher_model))
    compute = local_rows(teacher_model, data, header, batch_size=batch_size, captured=captured)
    manifest = build_with(compute, data, out_dir, header, progress=progress)
    if captured:
        log.info("cache %s: %d examples from the rows kept during generation, %d through the teacher",
                 out_dir, compute.used["captured"], compute.used["computed"])
    return manifest


def build_with(compute, data: TokenizedData, out_dir: str | Path, header: dict, *, progress: bool = True) -> dict:
    """Any source's build: `compute(first, last)` gives the rows of examples [first, last). Keeps the
    verified shards of an earlier build with the same header, refuses one with another."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    good = {}
    if (out_dir / MANIFEST).exists():
        old = read_manifest(out_dir)
        _current(old, out_dir, action="resumed")
        differ = sorted(key for key in header if old.get(key) != header[key])
        if differ:
            lines = "; ".join(f"{key}: on disk {old.get(key)!r}, now {header[key]!r}" for key in differ)
            raise UserError(f"{out_dir} holds a cache built with other settings ({lines}). "
                            "Delete it or choose another output directory.")
        good = _good_entries(out_dir, old)
    _fill(compute, data, out_dir, header, good, progress=progress)
    return read_manifest(out_dir)


@dataclass(frozen=True)
class CacheProblem:
    """One thing wrong with a cache: the file concerned and what is wrong with it."""

    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


def verify_cache(cache_dir: str | Path) -> list[CacheProblem]:
    """Every missing, unfinished or damaged shard (checksums recomputed); empty when the cache is whole."""
    cache_dir = Path(cache_dir)
    try:
        manifest = read_manifest(cache_dir)
    except UserError as e:
        return [CacheProblem(MANIFEST, str(e))]
    listed = {e["first"] // manifest["shard_size"]: e for e in manifest.get("shards", [])}
    problems = []
    for i in range(manifest["num_shards"]):
        name = _shard_name(i)
        if i not in listed:
            problems.append(CacheProblem(name, "not written yet (the build was interrupted; rerun it to resume)"))
        elif listed[i].get("file") != name:  # never followed; named so a tampered manifest is noticed
            problems.append(CacheProblem(name, f"the manifest names it {listed[i].get('file')!r} (a path outside "
                                               "the cache is never followed); rebuild or repair the cache"))
        elif not (cache_dir / name).is_file():
            problems.append(CacheProblem(name, "missing"))
        elif sha256_file(cache_dir / name) != listed[i]["sha256"]:
            problems.append(CacheProblem(name, "checksum mismatch: the file is damaged"))
    return problems


def repair_cache(teacher_model, data: TokenizedData, cache_dir: str | Path, *, batch_size: int = 8,
                 weights: str | None = None, progress: bool = True) -> list[str]:
    """Redo only the shards `verify_cache` finds wrong, with the teacher and data the cache was built
    from (both checked against the manifest; `weights` as in `build_cache`); returns the shard files
    rewritten."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    _current(manifest, cache_dir, action="repaired")
    if dataset_hash(data) != manifest["dataset_hash"]:
        raise UserError(f"{cache_dir} was built from other data (dataset hash {manifest['dataset_hash']}, "
                        f"given {dataset_hash(data)}): repair needs the same tokenized data")
    given = weights or tensors_hash(teacher_model)
    if given != manifest["weights_sha256"]:
        raise UserError(f"{cache_dir} was built with another teacher (teacher weights hash "
                        f"{manifest['weights_sha256']}, given {given}): repair needs the same teacher's weights, "
                        "or rebuild the cache with `kdkit cache CONFIG`")
    header = {key: v for key, v in manifest.items() if key not in ("shards", "complete")}
    return refill(local_rows(teacher_model, data, header, batch_size=batch_size), data, cache_dir, progress=progress)


def refill(compute, data: TokenizedData, cache_dir: str | Path, *, progress: bool = True) -> list[str]:
    """Any source's repair: recompute the shards that are missing or fail their checksum."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    _current(manifest, cache_dir, action="repaired")
    header = {key: v for key, v in manifest.items() if key not in ("shards", "complete")}
    return _fill(compute, data, cache_dir, header, _good_entries(cache_dir, manifest), progress=progress)


# ---------------------------------------------------------------- reading


class CacheReader:
    """Random access to a finished cache by example id: `signal(ids)` → SparseSignal rows in order."""

    def __init__(self, cache_dir: str | Path, *, verify: bool = False):
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        if not self.manifest.get("complete"):
            raise UserError(f"{self.dir} is an unfinished cache: rerun `kdkit cache` to finish it")
        if verify and (problems := verify_cache(self.dir)):
            raise UserError(f"{self.dir} is damaged: " + "; ".join(map(str, problems))
                            + ". Run `kdkit cache verify DIR --repair`.")
        prov = {**self.manifest["provenance"], "teacher_revision": cached_weights(self.manifest)}  # v1: prefixed
        self.provenance = Provenance(**prov)
        self.dataset_hash = self.manifest["dataset_hash"]
        self._handles: dict[int, object] = {}
        self.index: dict[str, tuple[int, int, int]] = {}  # example id → (shard, first row, end row)
        for entry in self.manifest["shards"]:
            shard = entry["first"] // self.manifest["shard_size"]
            f = self._open(shard)
            offsets = f.get_tensor("offsets")
            for j, ex_id in enumerate(json.loads(f.metadata()["example_ids"])):
                self.index[ex_id] = (shard, int(offsets[j]), int(offsets[j + 1]))

    def _open(self, shard: int):
        if shard not in self._handles:
            if len(self._handles) >= _HANDLES:
                self._handles.pop(next(iter(self._handles)))  # oldest first
            self._handles[shard] = safe_open(str(self.dir / _shard_name(shard)), framework="np")
        return self._handles[shard]

    def rows(self, ex_id: str) -> dict[str, np.ndarray]:
        """The encoded arrays of one example's rows."""
        try:
            shard, start, end = self.index[ex_id]
        except KeyError:
            raise UserError(f"example {ex_id!r} is not in the cache {self.dir}: was it built from this data?") from None
        f = self._open(shard)
        return {name: f.get_slice(name)[start:end] for name in ("ids", "codes", "top", "range", "tail")}

    def signal(self, example_ids: list[str]) -> SparseSignal:
        """Rows of every example in order, row-major over (example, supervised position)."""
        parts = [self.rows(ex_id) for ex_id in example_ids]
        arrays = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        ids, logprobs, tail = encoding.decode(arrays)  # (N, k), (N, k), (N,)
        return SparseSignal(ids, logprobs, tail, self.provenance)


def _unset(value) -> bool:
    return value is None or value == ""


def cache_signal_fn(reader: CacheReader, *, expected: Provenance, data_hash: str | None = None):
    """`signal_fn(batch) -> SparseSignal` for the training loop, after refusing a cache whose provenance
    differs from `expected` (fields left unset there, "" or None, are not compared) or whose dataset
    hash differs from `data_hash` (see `dataset_hash`)."""
    ignore = tuple(f.name for f in dataclasses.fields(expected) if _unset(getattr(expected, f.name)))
    differ = {name: (b, a) for name, (a, b) in reader.provenance.mismatches(expected, ignore=ignore).items()}
    if data_hash is not None and data_hash != reader.dataset_hash:
        differ["dataset_hash"] = (data_hash, reader.dataset_hash)
    if differ:
        lines = "\n".join(f"  {FIELD_LABELS.get(name, name)} ({name}): run {run!r}, cache {cached!r}"
                          for name, (run, cached) in differ.items())
        if "teacher_revision" in differ and differ["teacher_revision"][1] == "served":
            lines += ("\n  (the cache came from a served teacher, which has no weights hash: read it with "
                      "teacher.backend=http)")
        elif "teacher_revision" in differ:
            lines += "\n  (the teacher's weights are not the ones the cache was built from: retrained, or another model)"
        raise UserError(f"the teacher cache {reader.dir} does not match this run:\n{lines}\n"
                        "Rebuild the cache with `kdkit cache CONFIG` for this run's teacher, tokenizer, "
                        "temperature and data.")

    def signal_fn(batch: dict) -> SparseSignal:
        signal = reader.signal(list(batch["ids"]))
        mask, _ = supervised_positions(batch["labels"])  # (B, T-1)
        if signal.num_tokens != int(mask.sum()):
            raise UserError(f"the cache has {signal.num_tokens} rows for examples {list(batch['ids'])} but the batch "
                            f"has {int(mask.sum())} supervised positions: the data differs from the cache's")
        device = batch["labels"].device
        ids = signal.ids  # host-side: its range is checked here, not by the loss on the device
        lo, hi = (int(ids.min()), int(ids.max())) if ids.numel() else (0, -1)
        if lo < 0:
            raise UserError(f"the cache {reader.dir} holds a negative token id for examples {list(batch['ids'])}: "
                            "it is damaged; `kdkit cache verify DIR --repair` finds and rebuilds the shard")
        return SparseSignal(ids.to(device), signal.logprobs.to(device), signal.tail.to(device), signal.provenance,
                            id_bound=hi + 1)

    return signal_fn
