"""Atomic, verified step checkpoints.

A checkpoint is a directory `step-00000040/` holding the student (safetensors), the optimizer and
scheduler state (tensors only, loaded with `weights_only=True`), the RNG state, and `meta.json`
with a SHA-256 per file. It is written under a temporary name, every file fsync'ed, then renamed:
a kill mid-write leaves a `*.tmp` directory that is never read. On load, checksums are verified;
a damaged checkpoint is reported and the previous good one is used.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kdkit.errors import UserError
from kdkit.utils import fsync_dir, sha256_file

log = logging.getLogger(__name__)

PREFIX = "step-"




def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the second name of tied tensors (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous()
    return out


def save_checkpoint(root: Path, step: int, *, model, optimizer, scheduler, extra: dict | None = None, keep: int = 2):
    """Write step checkpoint `root/step-{step}` atomically; prune all but the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(_unique_state(model), tmp / "model.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        meta = {"step": step, "extra": extra or {}, "sha256": {n: sha256_file(tmp / n) for n in files}}
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk: torch's writer raises RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)  # the partial write; the checkpoints before it stay whole
        free = shutil.disk_usage(root).free
        last = list_checkpoints(root)
        raise UserError(
            f"could not write the checkpoint {final} ({type(e).__name__}: {e}); {free / 2**30:.1f} GiB free on its "
            f"disk. Free space and rerun: training resumes from "
            f"{last[-1].name if last else 'the start (no checkpoint yet)'}"
        ) from e
    if final.exists():  # a rerun of the same step replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)  # the atomic commit point
    fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp"))


def verify(path: Path) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        return f"meta.json unreadable ({e})"
    for name, digest in meta.get("sha256", {}).items():
        if Path(name).name != name or name in ("", ".", ".."):  # a manifest must not point outside
            return f"unsafe file name {name!r} in meta.json"
        if not (path / name).is_file():
            return f"{name} missing"
        if sha256_file(path / name) != digest:
            return f"{name} checksum mismatch"
    return None


def load_latest(root: Path, *, model, optimizer, scheduler) -> tuple[int, dict] | None:
    """Restore the newest whole checkpoint; returns (step, extra) or None when there is none."""
    for path in reversed(list_checkpoints(root)):
        problem = verify(path)
        if problem and problem.startswith("unsafe file name"):  # tampering, not damage: stop, do not skip
            raise UserError(f"refusing checkpoint {path}: {problem} (a path outside the checkpoint). "
                            "Delete it or restore it from a trusted copy.")
        if problem:
            log.warning("checkpoint %s is damaged (%s); trying the previous one", path, problem)
            continue
        state = load_file(path / "model.safetensors")
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {n for n in missing if n.endswith("lm_head.weight")}  # restored through the tie
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"checkpoint {path} does not fit the model: {missing} {unexpected}")
        try:  # tensors and plain containers only: a pickle that would run code is refused
            opt = torch.load(path / "optim.pt", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(f"refusing to load {path / 'optim.pt'}: it is not a tensors-only file ({e}). "
                            "Delete the checkpoint or restore it from a trusted copy.") from None
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        torch.set_rng_state(load_file(path / "rng.safetensors")["torch"])
        meta = json.loads((path / "meta.json").read_text())
        log.info("resumed from %s", path)
        return meta["step"], meta.get("extra", {})
    return None
