"""Small file helpers shared by everything that writes durable state (checkpoints, caches)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_json(path: Path, obj: dict, *, sort_keys: bool = True) -> None:
    """Write JSON to a temporary name, fsync, rename: readers see the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=sort_keys)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def keep_freed_memory() -> bool:
    """Let glibc reuse freed memory instead of mapping and unmapping it: every block over 32 MiB (a chunk of
    logits at V = 49,152 is 35-75 MB) is otherwise a fresh mmap whose pages fault in, zeroed, on first touch,
    and is unmapped again when freed; on a 2-core CPU that was ~15% of a quickstart training step. Off
    glibc (macOS, musl) a no-op. Process-wide: called by the `kdkit` command (and the benchmarks, for both
    sides of a comparison), never on import. `models.load.return_freed_memory` still hands memory back
    explicitly. Returns whether it applied. `KDKIT_KEEP_FREED=0` turns it off."""
    if os.environ.get("KDKIT_KEEP_FREED", "1") == "0":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False
