"""AdamW with linear warm-up and a cosine or linear decay to a floor."""

from __future__ import annotations

import math

import torch

from kdkit.config import TrainConfig


def lr_factor(step: int, *, warmup: int, total: int, floor: float, shape: str = "cosine") -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then down to `floor` on a cosine or
    (`shape="linear"`) a straight line."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    fall = 1.0 - progress if shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * fall


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW (no weight decay on norms, biases and embeddings' 1-d params) + its schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One fixed implementation, so a resumed run is bitwise equal: the fused kernel (one pass over each
    # parameter, its gradient and both moments; the per-parameter loop of ~10 element-wise kernels took
    # ~15% of a quickstart step on CPU) where every parameter is a plain CPU/CUDA tensor, else (FSDP2's
    # DTensor shards, other devices) the same per-parameter kernels on every run.
    fused = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **({"fused": True} if fused else {"foreach": False}))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, warmup=cfg.warmup_steps, total=cfg.max_steps, floor=cfg.min_lr_ratio,
                            shape=cfg.schedule)
    )
    return opt, sched
