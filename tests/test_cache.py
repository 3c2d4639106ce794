"""The offline top-k cache (kdkit/teacher/cache.py, encoding.py, axolotl.py) on the tiny teacher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import chat_rows
from kdkit.data.collate import collate
from kdkit.data.render import tokenize_examples
from kdkit.data.sources import to_example
from kdkit.errors import UserError
from kdkit.losses import distill_loss
from kdkit.models import load as M
from kdkit.models.fingerprint import files_hash, tensors_hash
from kdkit.models.forward import supervised_positions
from kdkit.models.tiny import save_tiny_model
from kdkit.signal import Provenance, SparseSignal
from kdkit.teacher import encoding
from kdkit.teacher.axolotl import export_axolotl, import_axolotl
from kdkit.teacher.cache import (
    MANIFEST, CacheReader, build_cache, build_with, cache_signal_fn, dataset_hash, make_header, read_manifest,
    refill, repair_cache, verify_cache,
)
from kdkit.utils import sha256_file
from kdkit.teacher.online import online_signal_fn


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    src = M.resolve(str(tiny_teacher))
    tok = M.load_tokenizer(src)
    model = M.freeze(M.load_model(src))
    prov = Provenance(teacher_id="tiny", tokenizer_hash=M.tokenizer_hash(tok),
                      chat_template_hash=M.chat_template_hash(tok))
    return model, tok, prov


def make_data(tok, n=10, seed=0):
    examples = [to_example(r, index=i, source="t") for i, r in enumerate(chat_rows(n, seed=seed))]
    return tokenize_examples(examples, tok, max_length=64)


def build(teacher, out, data, **kw):
    model, tok, prov = teacher
    args = dict(k=8, temperature=1.0, provenance=prov, vocab=len(tok), shard_size=3, batch_size=2, progress=False)
    return build_cache(model, data, out, **{**args, **kw})


def batch_of(data, order):
    batch = collate([data.input_ids[i] for i in order], [data.labels[i] for i in order], pad_id=0)
    batch["ids"] = [data.ids[i] for i in order]
    return batch


# ---------------------------------------------------------------- encoding


@pytest.mark.parametrize("k", [1, 8, 64])
def test_encoding_round_trip_within_the_documented_bound(k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(50, 300, generator=g) * torch.rand(50, 1, generator=g) * 8
    lp = torch.log_softmax(logits.double(), -1)
    top, ids = lp.topk(k, dim=-1)
    top[3, k // 2:] = -torch.inf  # a short top-k: invalid slots
    top[4] = -torch.inf  # a row with no valid slot
    tail = torch.logsumexp(lp.scatter(1, ids, -torch.inf), -1)
    arrays = encoding.encode(ids, top, tail, vocab=300)
    assert arrays["ids"].dtype == np.uint16 and arrays["codes"].dtype == np.uint8
    got_ids, got_lp, got_tail = encoding.decode(arrays)
    assert torch.equal(got_ids, ids)
    finite = torch.isfinite(top)
    assert torch.equal(torch.isfinite(got_lp), finite)
    err = (got_lp.double() - top).abs()[finite]
    bound = encoding.error_bound(top, arrays)[finite]
    assert (err <= bound + 1e-5 * (1 + top.abs()[finite])).all(), (err - bound).max()
    tail_err = (got_tail.double() - tail).abs()
    assert (tail_err <= 2**-11 * tail.abs() + 1e-7).all()


def test_bytes_per_token_and_id_width():
    assert encoding.bytes_per_token(64, 49152) == 198 <= 200
    assert [encoding.id_bytes(v) for v in (65536, 65537, 2**24, 2**24 + 1)] == [2, 3, 3, 4]
    assert [encoding.bytes_per_token(k, 49152) for k in (8, 32, 64, 128)] == [30, 102, 198, 390]
    assert [encoding.bytes_per_token(64, v) for v in (128256, 151936, 262144)] == [262, 262, 262]  # ≤ 264


@pytest.mark.parametrize("vocab", [300, 2**16, 2**16 + 1, 151936, 2**24, 2**24 + 1, 2**32])
def test_ids_round_trip_exactly_at_every_width(vocab):
    g = torch.Generator().manual_seed(vocab % 1000)
    edge = torch.tensor([0, 1, 255, 256, 65535, 65536, 2**24 - 2, 2**24 - 1, 2**24, 2**32 - 1])
    edge = edge[edge < vocab]  # every byte boundary below the vocabulary, its last id included
    rand = torch.randint(0, vocab, (40 * 8 - len(edge),), generator=g, dtype=torch.long)
    ids = torch.cat([edge, torch.tensor([vocab - 1]), rand])[: 40 * 8].reshape(40, 8)  # (N, k)
    lp = torch.log_softmax(torch.randn(40, 8, generator=g), -1)
    arrays = encoding.encode(ids, lp, torch.full((40,), -3.0), vocab=vocab)
    width = encoding.id_bytes(vocab)
    assert arrays["ids"].nbytes == 40 * 8 * width  # packed: no byte above what the vocabulary needs
    assert torch.equal(encoding.decode(arrays)[0], ids)
    with pytest.raises(ValueError, match="token ids"):
        encoding.encode(torch.full((1, 8), vocab), lp[:1], torch.zeros(1), vocab=vocab)


def _synthetic_rows(vocab: int, k: int, data):
    """`compute(first, last)` for build_with: ids crowding the top of the vocabulary (2^24 − 1 at 2^24)."""
    counts = [sum(x != -100 for x in row[1:]) for row in data.labels]

    def compute(first, last):
        n = sum(counts[first:last])
        g = torch.Generator().manual_seed(first)
        ids = vocab - 1 - torch.stack([torch.randperm(min(vocab, 4 * k), generator=g)[:k] for _ in range(n)])
        lp, _ = torch.log_softmax(torch.randn(n, k, generator=g) * 3, -1).sort(dim=-1, descending=True)
        return ids.reshape(n, k), lp.reshape(n, k), torch.full((n,), -4.0)  # (n, k), (n, k), (n,)

    return compute


@pytest.mark.parametrize("vocab", [151936, 2**24])
def test_packed_ids_survive_shards_and_row_slicing(teacher, tmp_path, vocab):
    _, tok, prov = teacher
    data = make_data(tok)
    header = make_header(data, prov, k=8, temperature=1.0, vocab=vocab, shard_size=3, weights="files:test")
    compute = _synthetic_rows(vocab, 8, data)
    manifest = build_with(compute, data, tmp_path / "c", header, progress=False)
    assert manifest["version"] == 2 and manifest["id_bytes"] == 3 and manifest["bytes_per_token"] == 8 * 4 + 6
    reader = CacheReader(tmp_path / "c", verify=True)
    want_ids, want_lp, want_tail = compute(3, 6)  # shard 1: examples 3, 4, 5
    got = reader.signal(data.ids[3:6])
    assert torch.equal(got.ids, want_ids) and int(got.ids.max()) == vocab - 1
    # the log-probs exactly as encoded: nothing shifted by the 3-byte ids beside them
    assert torch.equal(got.logprobs, encoding.decode(encoding.encode(want_ids, want_lp, want_tail, vocab=vocab))[1])


# ---------------------------------------------------------------- build and read


def test_cache_rows_match_the_online_teacher_in_batch_order(teacher, tmp_path):
    model, tok, prov = teacher
    data = make_data(tok)
    manifest = build(teacher, tmp_path / "c", data, k=len(tok), temperature=2.0)
    assert manifest["complete"] and manifest["num_shards"] == 4 and verify_cache(tmp_path / "c") == []
    reader = CacheReader(tmp_path / "c", verify=True)
    batch = batch_of(data, [7, 2, 9, 0])  # across shards, out of order
    expected = Provenance(tokenizer_hash=prov.tokenizer_hash, chat_template_hash=prov.chat_template_hash,
                          temperature=2.0)
    sig = cache_signal_fn(reader, expected=expected, data_hash=dataset_hash(data))(batch)
    dense = online_signal_fn(model, vocab=len(tok), provenance=prov)(batch)
    assert sig.num_tokens == int(supervised_positions(batch["labels"])[0].sum())
    want = torch.log_softmax(dense.logits / 2.0, -1).gather(1, sig.ids)  # (N, k)
    assert (sig.logprobs - want).abs().max() < 0.05
    assert torch.equal(sig.ids[:, 0], dense.logits.argmax(-1))
    # k = V: the cached loss is the online loss up to the encoding error (offline = online)
    s = torch.randn(dense.logits.shape, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(sig.num_tokens, dtype=torch.long)
    offline = distill_loss(s, sig, labels, temperature=2.0).total
    online = distill_loss(s, dense, labels, temperature=2.0).total
    assert abs(float(offline) - float(online)) < 1e-2 * float(online)


def test_cache_ids_are_range_checked_on_the_host_and_the_loss_reads_none_back(teacher, tmp_path):
    """The reader checks a batch's ids where they lie (host memory) and says so (`id_bound`); the loss then
    refuses a vocabulary too small from that bound and calls no min/max on the ids it moves to the device
    (each a host sync per step on a GPU). A signal without the bound is still checked by the loss."""
    from torch.overrides import TorchFunctionMode

    from kdkit.losses.fused_sparse import SparseTeacher

    model, tok, prov = teacher
    data = make_data(tok)
    build(teacher, tmp_path / "c", data, k=8, temperature=1.0)
    reader = CacheReader(tmp_path / "c", verify=True)
    expected = Provenance(tokenizer_hash=prov.tokenizer_hash, chat_template_hash=prov.chat_template_hash)
    sig = cache_signal_fn(reader, expected=expected, data_hash=dataset_hash(data))(batch_of(data, [3, 1]))
    assert sig.id_bound == int(sig.ids.max()) + 1 and int(sig.ids.min()) >= 0

    class Reads(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Reads.calls += func in (torch.Tensor.min, torch.Tensor.max, torch.min, torch.max)
            return func(*args, **(kwargs or {}))

    with Reads():
        SparseTeacher.build(sig, vocab=len(tok), temperature=1.0, capture_temperature=None, device="cpu")
    assert Reads.calls == 0
    with pytest.raises(ValueError, match="signal ids must lie in"):
        SparseTeacher.build(sig, vocab=sig.id_bound - 1, temperature=1.0, capture_temperature=None, device="cpu")
    unchecked = SparseSignal(sig.ids, sig.logprobs, sig.tail, sig.provenance)  # no bound: the loss looks
    with pytest.raises(ValueError, match="signal ids must lie in"):
        SparseTeacher.build(unchecked, vocab=sig.id_bound - 1, temperature=1.0, capture_temperature=None, device="cpu")


def test_flipped_byte_is_named_by_verify_and_repair_redoes_only_that_shard(teacher, tmp_path):
    model, tok, _ = teacher
    data = make_data(tok)
    before = build(teacher, tmp_path / "c", data)
    shard = tmp_path / "c" / "shard-00002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    problems = verify_cache(tmp_path / "c")
    assert [p.file for p in problems] == ["shard-00002.safetensors"] and "checksum" in str(problems[0])
    with pytest.raises(UserError, match="shard-00002"):
        CacheReader(tmp_path / "c", verify=True)
    mtimes = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "c").glob("shard-*")}
    assert repair_cache(model, data, tmp_path / "c", progress=False) == ["shard-00002.safetensors"]
    assert verify_cache(tmp_path / "c") == [] and read_manifest(tmp_path / "c") == before
    # a rewrite is a new file (temp name + os.replace): a new inode even within one clock tick
    changed = {p.name for p in (tmp_path / "c").glob("shard-*") if (p.stat().st_ino, p.stat().st_mtime_ns) != mtimes[p.name]}
    assert changed == {"shard-00002.safetensors"}
    (tmp_path / "c" / "shard-00001.safetensors").unlink()
    assert [str(p) for p in verify_cache(tmp_path / "c")] == ["shard-00001.safetensors: missing"]
    with pytest.raises(UserError, match="other data"):
        repair_cache(model, make_data(tok, seed=5), tmp_path / "c", progress=False)


WORKER = """
import sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_cache import make_data
from kdkit.models import load as M
from kdkit.signal import Provenance
from kdkit.teacher.cache import build_cache
src = M.resolve({teacher!r}); tok = M.load_tokenizer(src); model = M.freeze(M.load_model(src))
prov = Provenance(teacher_id="tiny", tokenizer_hash=M.tokenizer_hash(tok), chat_template_hash=M.chat_template_hash(tok))
if {slow}:
    model.get_decoder().register_forward_hook(lambda *a: time.sleep(0.3))  # time for the kill to land mid-build
build_cache(model, make_data(tok, n=16), {out!r}, k=8, temperature=1.0, provenance=prov, vocab=len(tok),
            shard_size=2, batch_size=1, progress=False)
"""


def test_kill_9_then_rerun_gives_the_uninterrupted_manifest(teacher, tiny_teacher, tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent), teacher=str(tiny_teacher), out=str(out), slow=True))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            try:
                if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 2:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    partial = read_manifest(out)
    assert not partial["complete"] and 2 <= len(partial["shards"]) < 8
    assert any("not written" in str(p) for p in verify_cache(out))
    (out / "shard-00007.safetensors.tmp").write_bytes(b"torn")  # a torn write left behind
    model, tok, _ = teacher
    data = make_data(tok, n=16)
    resumed = build(teacher, out, data, shard_size=2, batch_size=1)
    fresh = build(teacher, tmp_path / "fresh", data, shard_size=2, batch_size=1)
    assert resumed == fresh and resumed["complete"]
    assert not list(out.glob("*.tmp")) and verify_cache(out) == []


def test_provenance_mismatch_is_refused_naming_the_fields(teacher, tmp_path):
    _, tok, prov = teacher
    data = make_data(tok)
    build(teacher, tmp_path / "c", data)
    reader = CacheReader(tmp_path / "c")
    wrong = Provenance(tokenizer_hash="other", chat_template_hash=prov.chat_template_hash, temperature=2.0)
    with pytest.raises(UserError) as e:
        cache_signal_fn(reader, expected=wrong, data_hash=dataset_hash(make_data(tok, seed=3)))
    msg = str(e.value)
    assert "tokenizer_hash" in msg and "temperature" in msg and "dataset_hash" in msg
    assert "chat_template_hash" not in msg and "teacher_id" not in msg  # equal or unset: not named
    right = Provenance(tokenizer_hash=prov.tokenizer_hash, temperature=1.0, top_k=8)
    fn = cache_signal_fn(reader, expected=right, data_hash=dataset_hash(data))
    assert isinstance(fn(batch_of(data, [1, 4])), SparseSignal)
    with pytest.raises(UserError, match="not in the cache"):
        fn(batch_of(make_data(tok, n=12), [11]))


def test_an_output_dir_with_other_settings_is_refused(teacher, tmp_path):
    _, tok, _ = teacher
    data = make_data(tok)
    build(teacher, tmp_path / "c", data)
    with pytest.raises(UserError, match="temperature"):
        build(teacher, tmp_path / "c", data, temperature=2.0)
    with pytest.raises(UserError, match="unfinished|missing"):
        (tmp_path / "d").mkdir()
        CacheReader(tmp_path / "d")


def test_axolotl_export_import_round_trip(teacher, tmp_path):
    _, tok, _ = teacher
    data = make_data(tok, n=4)
    build(teacher, tmp_path / "c", data)
    reader = CacheReader(tmp_path / "c")
    assert export_axolotl(reader, data, tmp_path / "kd.jsonl") == 4
    row = json.loads((tmp_path / "kd.jsonl").read_text().splitlines()[0])
    assert {"target_token_ids", "target_logprobs", "target_mask", "input_ids", "labels"} <= set(row)
    assert len(row["target_mask"]) == len(row["input_ids"]) and len(row["target_mask"][0]) == 8
    back, signals = import_axolotl(tmp_path / "kd.jsonl")
    assert back.ids == data.ids and back.input_ids == data.input_ids and back.labels == data.labels
    for ex_id, sig in zip(data.ids, signals):
        want = reader.signal([ex_id])
        assert torch.equal(sig.ids, want.ids) and sig.tail is None
        torch.testing.assert_close(sig.logprobs, want.logprobs)


def test_a_manifest_path_escaping_the_cache_is_never_followed(teacher, tmp_path):
    """A tampered manifest entry pointing outside the cache is distrusted and that shard rebuilt."""
    import json

    from kdkit.teacher.cache import MANIFEST

    _, tok, _ = teacher
    data = make_data(tok)
    before = build(teacher, tmp_path / "c", data)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((tmp_path / "c" / "shard-00001.safetensors").read_bytes())
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    manifest["shards"][1]["file"] = "../outside.safetensors"
    (tmp_path / "c" / MANIFEST).write_text(json.dumps(manifest))
    assert build(teacher, tmp_path / "c", data) == before  # rebuilt under its own name
    assert outside.read_bytes()  # untouched, and not used


# ---------------------------------------------------------------- format versions


def _as_v1(cache, *, id_dtype=None):
    """Rewrite a v2 cache as kdkit < 2 wrote it: version 1, a bare state_dict hash, uint32 ids above
    2^16 entries (shards rewritten, checksums updated)."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    manifest = json.loads((cache / MANIFEST).read_text())
    bare = manifest["weights_sha256"].split(":")[-1]
    manifest.update(version=1, weights_sha256=bare, id_dtype=id_dtype or "uint16")
    manifest["provenance"]["teacher_revision"] = bare
    manifest.pop("id_bytes")
    for entry in manifest["shards"]:
        path = cache / entry["file"]
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata()
        arrays = load_file(str(path))
        if id_dtype:
            arrays["ids"] = encoding.unpack_ids(arrays["ids"]).astype(id_dtype)
        save_file(arrays, str(path), metadata=meta)
        entry.update(sha256=sha256_file(path), bytes=path.stat().st_size)
    (cache / MANIFEST).write_text(json.dumps(manifest))


def test_a_v1_cache_is_read_and_checked_but_repair_and_resume_say_rebuild(teacher, tmp_path):
    model, tok, prov = teacher
    data = make_data(tok)
    build(teacher, tmp_path / "c", data)  # weights: the in-memory model's state_dict hash
    v2 = CacheReader(tmp_path / "c").signal(data.ids)
    _as_v1(tmp_path / "c")
    reader = CacheReader(tmp_path / "c", verify=True)
    got = reader.signal(data.ids)
    assert torch.equal(got.ids, v2.ids) and torch.equal(got.logprobs, v2.logprobs)
    assert reader.provenance.teacher_revision == tensors_hash(model)  # the bare v1 hash, with its kind
    expected = Provenance(tokenizer_hash=prov.tokenizer_hash, teacher_revision=tensors_hash(model))
    cache_signal_fn(reader, expected=expected, data_hash=dataset_hash(data))
    with pytest.raises(UserError, match=r"format v1 .*kdkit cache CONFIG"):
        repair_cache(model, data, tmp_path / "c", progress=False)
    with pytest.raises(UserError, match=r"format v1 .*kdkit cache CONFIG"):
        build(teacher, tmp_path / "c", data)
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    (tmp_path / "c" / MANIFEST).write_text(json.dumps({**manifest, "version": 7}))
    with pytest.raises(UserError, match=r"version 7.*rebuild the cache with `kdkit cache CONFIG`"):
        CacheReader(tmp_path / "c")


def test_v1_uint32_ids_above_2_16_still_decode(teacher, tmp_path):
    _, tok, prov = teacher
    data = make_data(tok, n=4)
    header = make_header(data, prov, k=8, temperature=1.0, vocab=151936, shard_size=3, weights="files:test")
    build_with(_synthetic_rows(151936, 8, data), data, tmp_path / "c", header, progress=False)
    want = CacheReader(tmp_path / "c").signal(data.ids)
    _as_v1(tmp_path / "c", id_dtype="uint32")
    assert torch.equal(CacheReader(tmp_path / "c", verify=True).signal(data.ids).ids, want.ids)
    with pytest.raises(UserError, match="format v1"):
        refill(_synthetic_rows(151936, 8, data), data, tmp_path / "c", progress=False)


# ---------------------------------------------------------------- the teacher's weights


def _perturbed_copy(src: Path, dest: Path) -> Path:
    """A copy of a saved model with one weight changed by 1e-3 (a teacher trained a little more)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    weights = load_file(dest / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-3
    save_file(weights, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_the_weights_hash_is_compared_by_content_not_path(tmp_path):
    a = save_tiny_model(tmp_path / "a", num_layers=2, seed=4)
    b = Path(shutil.copytree(a, tmp_path / "b"))  # the same weights at another path
    c = _perturbed_copy(a, tmp_path / "c")
    assert files_hash(a) == files_hash(b) != files_hash(c)
    src = M.resolve(str(a))
    tok, model = M.load_tokenizer(src), M.freeze(M.load_model(src))
    data = make_data(tok, n=4)
    build_cache(model, data, tmp_path / "cache", k=4, temperature=1.0, provenance=Provenance(teacher_id=str(a)),
                vocab=len(tok), shard_size=2, weights=files_hash(a), progress=False)
    reader = CacheReader(tmp_path / "cache")
    assert reader.provenance.teacher_revision == files_hash(a)

    def check(weights):
        return cache_signal_fn(reader, expected=Provenance(teacher_revision=weights), data_hash=dataset_hash(data))

    assert callable(check(files_hash(b)))  # accepted: same content
    with pytest.raises(UserError) as e:
        check(files_hash(c))
    msg = str(e.value)
    assert "teacher weights hash" in msg and files_hash(c) in msg and "kdkit cache CONFIG" in msg
    # retrained in place: the path the cache was built from, new weights (the hash is not memoised past it)
    shutil.copyfile(c / "model.safetensors", a / "model.safetensors")
    with pytest.raises(UserError, match="teacher weights hash"):
        check(files_hash(a))
    with pytest.raises(UserError, match="teacher weights hash"):
        repair_cache(model, data, tmp_path / "cache", weights=files_hash(a), progress=False)


def test_files_hash_covers_every_shard_of_a_sharded_checkpoint(tmp_path):
    a = save_tiny_model(tmp_path / "a", num_layers=2, seed=4)
    model = M.load_model(M.resolve(str(a)))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")  # several shards + an index
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    before = files_hash(tmp_path / "sharded")
    raw = bytearray(shards[-1].read_bytes())
    raw[-1] ^= 1  # the last byte of the last shard
    shards[-1].write_bytes(bytes(raw))
    assert files_hash(tmp_path / "sharded") != before
    with pytest.raises(UserError, match="no weight files"):
        files_hash(tmp_path)


# ---------------------------------------------------------------- rows kept during generation


def _ends_sometimes(model, tok):
    """A copy of the tiny teacher that writes varied text (weights × 8, no "\\n" token) and ends its turn where
    it would have written "y": some answers end early, others are cut at max_new_tokens."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in m.named_parameters():
            if w.dim() == 2 and "embed" not in name:
                w.mul_(8)
        head = m.get_output_embeddings().weight  # tied: the input rows change too
        head[tok.convert_tokens_to_ids("\n")] = 0
        head[tok.eos_token_id] = head[tok.convert_tokens_to_ids("y")] * 1.1
    return m


def test_cache_from_generation_equals_a_teacher_pass_and_the_answers_are_unchanged(tmp_path, teacher):
    from kdkit.teacher.gen_signal import load_captured, signal_dir
    from kdkit.teacher.generate import generate_answers

    model, tok, prov = teacher
    model = _ends_sometimes(model, tok)
    prompts = [to_example(r, index=i, source="t") for i, r in enumerate(chat_rows(12, seed=3))]
    spec = {"k": 8, "temperature": 2.0, "vocab": len(tok), "weights": "w1"}
    kw = dict(max_new_tokens=12, batch_size=5)
    plain = generate_answers(model, tok, prompts, tmp_path / "plain.jsonl", **kw)
    kept = generate_answers(model, tok, prompts, tmp_path / "kept.jsonl", signal=spec, **kw)
    assert plain.read_text() == kept.read_text()  # the same answers, byte for byte
    answers = [json.loads(line)["messages"][-1]["content"] for line in kept.read_text().splitlines()]
    lengths = {len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers}
    assert min(lengths) < 12 and 12 in lengths, lengths  # both kinds: ended early, and cut at 12

    data = tokenize_examples([to_example(json.loads(line), index=i, source="kept")
                              for i, line in enumerate(kept.read_text().splitlines())], tok, max_length=64)
    captured = load_captured(signal_dir(kept), k=8, temperature=2.0, weights="w1")
    assert set(captured) == set(data.ids)
    build_cache(model, data, tmp_path / "pass", k=8, temperature=2.0, provenance=prov, vocab=len(tok),
                shard_size=5, batch_size=3, weights="w1", progress=False)
    # a row whose text re-tokenises differently is computed by the teacher instead
    first = data.ids[0]
    captured[first] = (captured[first][0][:-1], *captured[first][1:])
    calls = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    manifest = build_cache(model, data, tmp_path / "kept", k=8, temperature=2.0, provenance=prov, vocab=len(tok),
                           shard_size=5, batch_size=3, weights="w1", progress=False, captured=captured)
    hook.remove()
    assert [shape[0] for shape in calls] == [1]  # one teacher forward, of the one mismatched example
    header = {key: v for key, v in read_manifest(tmp_path / "pass").items() if key != "shards"}
    assert {key: v for key, v in manifest.items() if key != "shards"} == header  # one cache, two ways to fill it
    a, b = CacheReader(tmp_path / "pass").signal(data.ids), CacheReader(tmp_path / "kept").signal(data.ids)
    assert torch.equal(a.ids, b.ids)
    assert torch.allclose(a.logprobs, b.logprobs, atol=2e-3) and torch.allclose(a.tail, b.tail, atol=2e-3)
    # rows kept for another teacher, k or temperature are not used
    assert load_captured(signal_dir(kept), k=8, temperature=2.0, weights="w2") == {}
    assert load_captured(signal_dir(kept), k=4, temperature=2.0, weights="w1") == {}
    assert load_captured(signal_dir(kept), k=8, temperature=1.0, weights="w1") == {}


def test_decode_is_greedy_generate_token_for_token_and_finished_rows_leave_the_batch(teacher):
    """kdkit.teacher.generate.decode, the loop every greedy answer now comes from, against transformers'
    generate() on the same left-padded batch: the same tokens, pad after each row's end; the batch it
    forwards shrinks as rows end (generate() computes every row until the longest one ends)."""
    from kdkit.data.render import render_prompt
    from kdkit.teacher.generate import decode

    model, tok, _ = teacher
    model = _ends_sometimes(model, tok)
    prompts = [render_prompt(to_example(r, index=i, source="t"), tok) for i, r in enumerate(chat_rows(12, seed=3))]
    batch = collate(prompts, prompts, pad_id=tok.pad_token_id, side="left")
    width = batch["input_ids"].shape[1]
    with torch.no_grad():
        ref = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=12,
                             do_sample=False, top_k=None, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)[:, width:]
    sizes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, args, out: sizes.append(args[0].shape[0]))
    with torch.no_grad():
        got = decode(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=12, pad_id=tok.pad_token_id,
                     eos_id=tok.eos_token_id)
    hook.remove()
    assert torch.equal(got[:, : ref.shape[1]], ref) and bool((got[:, ref.shape[1]:] == tok.pad_token_id).all())
    ended = (ref == tok.eos_token_id).any(dim=1)
    assert 0 < int(ended.sum()) < len(prompts)  # some rows end early, some are cut
    before_last = int((ref[:, :11] == tok.eos_token_id).any(dim=1).sum())  # left before the forward of step 11
    assert len(sizes) == 12 and sizes[0] == len(prompts) and sizes[-1] == len(prompts) - before_last > 0
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]
