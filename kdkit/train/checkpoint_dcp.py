"""Sharded step checkpoints for FSDP2 runs, with the atomic + SHA-256 design of `checkpoint.py`.

Every rank writes its shards of the student and optimizer with `torch.distributed.checkpoint`
(DCP; `get_state_dict` / `set_state_dict` translate FSDP2's DTensors) into `step-N.tmp/`. Rank 0
adds the schedule and RNG state, fsyncs every file, writes `meta.json` with a SHA-256 per file and
renames the directory: the rename is the commit point, as for single-process checkpoints, and
`verify` / `list_checkpoints` read both kinds. A checkpoint resumes at the same world size.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from kdkit.train.checkpoint import PREFIX, list_checkpoints, verify
from kdkit.utils import fsync_dir, sha256_file

log = logging.getLogger(__name__)


def _commit(tmp: Path, final: Path, step: int) -> None:
    """Rank 0: fsync every file, write meta.json with checksums, rename tmp → final."""
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    meta = {"step": step, "extra": {"sharded": True, "world": dist.get_world_size()},
            "sha256": {n: sha256_file(tmp / n) for n in files}}
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # the atomic commit point
    fsync_dir(final.parent)


def save_sharded(root: Path, step: int, *, model, optimizer, scheduler, keep: int = 2) -> Path:
    """Every rank calls this; returns the committed `root/step-N`."""
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{final.name}.tmp"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if dist.get_rank() == 0:
        torch.save({"scheduler": scheduler.state_dict()}, tmp / "sched.pt")
        save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
    dist.barrier()  # every rank's shards are on disk
    if dist.get_rank() == 0:
        _commit(tmp, final, step)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _newest_whole(root: Path) -> Path | None:
    """Rank 0 picks the newest verified checkpoint; every rank gets its name."""
    choice = [None]
    if dist.get_rank() == 0:
        for path in reversed(list_checkpoints(root)):
            problem = verify(path)
            if problem is None:
                choice[0] = str(path)
                break
            log.warning("checkpoint %s is damaged (%s); trying the previous one", path, problem)
    dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def load_sharded_latest(root: Path, *, model, optimizer, scheduler) -> tuple[int, dict] | None:
    """Restore the newest whole sharded checkpoint on every rank; (step, extra) or None."""
    path = _newest_whole(root)
    if path is None:
        return None
    meta = json.loads((path / "meta.json").read_text())
    if not meta.get("extra", {}).get("sharded"):
        raise RuntimeError(f"{path} is a single-process checkpoint; resume it with train.distributed=none or ddp")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))  # in place, into this rank's shards
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(torch.load(path / "sched.pt", weights_only=True)["scheduler"])
    torch.set_rng_state(load_file(path / "rng.safetensors")["torch"])
    log.info("resumed from %s", path)
    return meta["step"], meta.get("extra", {})
