"""What a teacher's weights are, as a short content hash: the identity a signal cache is checked against.

Two kinds, each prefixed so that a comparison never mixes them:

- `files:<16 hex>`   the weight files a model is loaded from (safetensors, their shards, a .bin or a
                     GGUF): SHA-256 over (file name, size, SHA-256 of its bytes) in name order. The
                     same files at another path hash alike; a teacher retrained in place does not.
                     Streamed from disk, several files at once (hashlib releases the GIL), and never
                     needs the model in memory: cheap at training startup.
- `tensors:<16 hex>` a model in memory (no files known): its state_dict's names, dtypes, shapes and
                     bytes. Caches of kdkit < 2 stored this hash bare (16 hex, no prefix).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kdkit.errors import UserError

FILES, TENSORS = "files:", "tensors:"
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")


def weight_files(directory: Path, gguf_file: str | None = None) -> list[Path]:
    """The files a model's weights load from, in name order: the GGUF file, else the shards an index
    names, else the single checkpoint file, else every *.safetensors (then *.bin) in the directory."""
    directory = Path(directory)
    if gguf_file:
        return [directory / gguf_file]
    for index in _INDEXES:
        if (directory / index).is_file():
            try:
                names = set(json.loads((directory / index).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise UserError(f"{directory / index} is unreadable ({e}): re-save or re-download the model") from None
            return sorted(directory / n for n in names)
    for single in _SINGLES:
        if (directory / single).is_file():
            return [directory / single]
    for pattern in ("*.safetensors", "*.bin"):
        if found := sorted(directory.glob(pattern)):
            return found
    raise UserError(f"{directory} holds no weight files (*.safetensors, *.bin or .gguf): "
                    "point teacher.path at the model's directory")


def _file_digest(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise UserError(f"cannot read the weight file {path} ({e}): is the model complete?") from None


def files_hash(directory: str | Path, gguf_file: str | None = None) -> str:
    """`files:<16 hex>` of the model's weight files (see the module docstring)."""
    files = weight_files(Path(directory), gguf_file)
    return _files_hash(tuple(str(f) for f in files), tuple(_stamp(f) for f in files))


def _stamp(path: Path) -> tuple:
    """What a file rewritten in place changes: the in-process memo is keyed on it."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"cannot read the weight file {path} ({e}): is the model complete?") from None
    return st.st_ino, st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=16)
def _files_hash(paths: tuple[str, ...], stamps: tuple) -> str:
    with ThreadPoolExecutor(max_workers=min(4, len(paths))) as pool:
        digests = list(pool.map(lambda p: _file_digest(Path(p)), paths))
    h = hashlib.sha256()
    for path, (_, size, _), digest in zip(paths, stamps, digests):
        h.update(f"{Path(path).name}\0{size}\0{digest}\n".encode())  # the name, not the directory
    return FILES + h.hexdigest()[:16]


def tensors_hash(model: torch.nn.Module) -> str:
    """`tensors:<16 hex>` of the model's state_dict: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return TENSORS + h.hexdigest()[:16]
