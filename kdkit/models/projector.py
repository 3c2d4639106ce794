"""Learned linear maps from the student's hidden width to the teacher's, one per distilled layer pair.

They train with the student (Plugins.trainable) but are not part of it: they are written beside the
run as `projector.safetensors` (with the layer pairs and init in its metadata) and never exported.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kdkit.errors import UserError

INITS = ("identity", "xavier", "orthogonal")


def make_projector(d_student: int, d_teacher: int, *, init: str) -> torch.nn.Linear:
    """Linear (D_s → D_t), no bias. identity: the identity where widths match, zero-padded (or cut)
    where they do not; xavier: Glorot-uniform; orthogonal: a (semi-)orthogonal matrix."""
    proj = torch.nn.Linear(d_student, d_teacher, bias=False)
    weight = proj.weight  # (D_t, D_s)
    with torch.no_grad():
        if init == "identity":
            weight.copy_(torch.eye(d_teacher, d_student))
        elif init == "xavier":
            torch.nn.init.xavier_uniform_(weight)
        elif init == "orthogonal":
            torch.nn.init.orthogonal_(weight)
        else:
            raise ValueError(f"unknown projector init {init!r}; choose one of {INITS}")
    return proj


def pair_key(student_layer: int, teacher_layer: int) -> str:
    return f"s{student_layer}_t{teacher_layer}"


class Projectors(torch.nn.Module):
    """One projector per (student layer, teacher layer) pair; `self[s, t](rows)` maps (N, D_s) → (N, D_t)."""

    def __init__(self, pairs, *, d_student: int, d_teacher: int, init: str):
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.init = init
        self.maps = torch.nn.ModuleDict(
            {pair_key(s, t): make_projector(d_student, d_teacher, init=init) for s, t in self.pairs})

    def __getitem__(self, pair) -> torch.nn.Linear:
        return self.maps[pair_key(*pair)]

    def save(self, path: Path) -> Path:
        """safetensors of every projector's weight, layer pairs and init in the metadata."""
        state = {name: p.detach().cpu().contiguous() for name, p in self.maps.state_dict().items()}
        meta = {"pairs": json.dumps(self.pairs), "init": self.init}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(state, tmp, metadata=meta)
        tmp.replace(path)
        return path


def load_projectors(path: str | Path) -> Projectors:
    """Projectors written by `Projectors.save`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"projector file {path} does not exist (it is written as RUN_DIR/projector.safetensors)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    pairs = [tuple(p) for p in json.loads(meta.get("pairs", "[]"))]
    if not pairs:
        raise UserError(f"{path}: no layer pairs in its metadata; not a kdkit projector file")
    d_teacher, d_student = state[f"{pair_key(*pairs[0])}.weight"].shape
    proj = Projectors(pairs, d_student=d_student, d_teacher=d_teacher, init=meta.get("init", "identity"))
    proj.maps.load_state_dict(state)
    return proj
