"""Bytes per supervised token of the top-k cache for k in {8, 32, 64, 128}: the encoding's formula and
what lands on disk (shards, and shards + manifest), on a tiny teacher whose head is padded to a
SmolLM2-sized vocabulary (49152: ids as uint16). Run: python benchmarks/cache_bytes.py"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import chat_rows  # noqa: E402

from kdkit.data.render import tokenize_examples  # noqa: E402
from kdkit.data.sources import to_example  # noqa: E402
from kdkit.models import load as M  # noqa: E402
from kdkit.models.tiny import save_tiny_model  # noqa: E402
from kdkit.signal import Provenance  # noqa: E402
from kdkit.teacher.cache import build_cache  # noqa: E402
from kdkit.teacher.encoding import bytes_per_token  # noqa: E402

VOCAB = 49152


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = M.resolve(str(save_tiny_model(Path(tmp) / "t", vocab_pad_to=VOCAB, seed=1)))
        tok, model = M.load_tokenizer(src), M.freeze(M.load_model(src))
        examples = [to_example(r, index=i, source="b") for i, r in enumerate(chat_rows(200))]
        data = tokenize_examples(examples, tok, max_length=128)
        print(f"vocab {VOCAB}, {len(data.ids)} examples, shards of 100 examples")
        print("| k | formula B/token | shards B/token | shards + manifest B/token |")
        print("| --- | --- | --- | --- |")
        for k in (8, 32, 64, 128):
            out = Path(tmp) / f"k{k}"
            m = build_cache(model, data, out, k=k, temperature=1.0, provenance=Provenance(teacher_id="tiny"),
                            vocab=VOCAB, shard_size=100, batch_size=16, progress=False)
            shards = sum(s["bytes"] for s in m["shards"])
            total = shards + (out / "manifest.json").stat().st_size
            n = m["num_tokens"]
            print(f"| {k} | {bytes_per_token(k, VOCAB)} | {shards / n:.1f} | {total / n:.1f} |")


if __name__ == "__main__":
    main()
