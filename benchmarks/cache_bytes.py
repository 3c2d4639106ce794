"""Bytes per supervised token of the top-k cache at real vocabulary sizes (SmolLM2 49,152, Llama 3
128,256, Qwen2.5 151,936, Gemma 3 262,144) and k in {8, 64, 128}: the encoding's formula and what lands
on disk (shards, and shards + manifest), measured on caches written by a tiny teacher whose head is
padded to each vocabulary, beside what format v1's uint32 ids cost above 2^16 entries (formula).

Run: python benchmarks/cache_bytes.py [--examples 48]"""

from __future__ import annotations

import argparse
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
from kdkit.teacher.encoding import bytes_per_token, id_bytes  # noqa: E402

VOCABS = (49152, 128256, 151936, 262144)
KS = (8, 64, 128)


def v1_bytes_per_token(k: int, vocab: int) -> int:
    """Format v1: uint16 ids up to 2^16 entries, else uint32."""
    return k * ((2 if vocab <= 1 << 16 else 4) + 1) + 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{args.examples} examples, shards of 16 examples; B/token = bytes / supervised tokens")
    print("| vocab | k | id bytes | formula B/token | shards B/token | shards + manifest B/token | v1 formula |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in VOCABS:
            src = M.resolve(str(save_tiny_model(Path(tmp) / f"t{vocab}", vocab_pad_to=vocab, seed=1)))
            tok, model = M.load_tokenizer(src), M.freeze(M.load_model(src))
            examples = [to_example(r, index=i, source="b") for i, r in enumerate(chat_rows(args.examples))]
            data = tokenize_examples(examples, tok, max_length=128)
            for k in KS:
                out = Path(tmp) / f"v{vocab}-k{k}"
                m = build_cache(model, data, out, k=k, temperature=1.0, provenance=Provenance(teacher_id="tiny"),
                                vocab=vocab, shard_size=16, batch_size=4, progress=False)
                shards = sum((out / s["file"]).stat().st_size for s in m["shards"])  # the files, not the manifest's
                total = shards + (out / "manifest.json").stat().st_size
                n = m["num_tokens"]
                print(f"| {vocab:,} | {k} | {id_bytes(vocab)} | {bytes_per_token(k, vocab)} | {shards / n:.1f} | "
                      f"{total / n:.1f} | {v1_bytes_per_token(k, vocab)} |", flush=True)


if __name__ == "__main__":
    main()
