"""`kdkit plan CONFIG`: peak memory per device of `kdkit distill CONFIG`, and what fits a device."""

from __future__ import annotations

from kdkit.config import Config
from kdkit.train.plan import GIB, plan_memory, suggest


def run(cfg: Config, *, world: int = 1, device_gib: float | None = None) -> dict:
    """{"plan": MemoryPlan, "table": markdown, "suggestion": dict | None} for `world` devices."""
    plan = plan_memory(cfg, world=world)
    lines = [f"kdkit distill on {world} device(s), global micro-batch {cfg.train.batch_size} × "
             f"{cfg.train.grad_accum} accumulation, {cfg.data.max_length} tokens, "
             f"train.distributed={cfg.train.distributed}, loss.implementation={cfg.loss.implementation}",
             "", plan.table()]
    advice = None
    if device_gib:
        advice = suggest(cfg, device_bytes=int(device_gib * GIB), world=world)
        fits = "fits" if plan.total <= 0.9 * device_gib * GIB else "does NOT fit"
        lines += ["", f"this config {fits} in {device_gib} GiB (90% headroom); suggested: "
                      f"train.batch_size={advice['batch_size']} train.grad_accum={advice['grad_accum']}, "
                      f"fused-loss chunk {advice['chunk_size']} rows"]
    return {"plan": plan, "table": "\n".join(lines), "suggestion": advice}
