"""How the KD objective and the auxiliary terms add up: `Plugins.combine` with static, magnitude-
balanced or learned (uncertainty) weights, and a watch that warns when one term swamps the rest.

    static       L = w_kd·L_kd + Σ β_i·L_i
    balanced     L = w_kd·L_kd + Σ β_i·(|w_kd·L_kd| / |L_i|)·L_i, the ratio detached: each term pulls
                 with β_i times the KD term's magnitude, whatever its own scale (the detached-ratio
                 rescaling of NVIDIA ModelOpt's logits-and-intermediates loss balancer)
    uncertainty  L = w_kd·L_kd + Σ [β_i·exp(−s_i)·L_i + s_i] with learned log-variances s_i
                 (Kendall, Gal & Cipolla 2018). The KD term is the anchor (weight w_kd, not learned);
                 at the optimum exp(s_i) = β_i·L_i. s_i trains with the student (Plugins.trainable).

Terms not named in `betas` (other training modes' terms) are added with weight 1 in every mode.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
EPS = 1e-12


class Weighting(torch.nn.Module):
    """`combine(kd_total, {name: value}) -> (total, {name: weight})`, called once per micro-batch.

    The uncertainty regulariser s_i is counted with the micro-batch's share of the step's supervised
    tokens (`share`, set before combine by whoever computes the terms), so it adds up to s_i per step
    and gradient accumulation stays exact. `after_step` runs the dominance watch.
    """

    def __init__(self, mode: str, betas: dict[str, float], *, kd_weight: float = 1.0,
                 dominance_threshold: float = 0.9, dominance_steps: int = 50):
        super().__init__()
        if mode not in ("static", "balanced", "uncertainty"):
            raise ValueError(f"unknown weighting {mode!r}")
        self.mode, self.betas, self.kd_weight = mode, dict(betas), kd_weight
        self.names = list(betas)
        if mode == "uncertainty":
            self.log_vars = torch.nn.Parameter(torch.zeros(len(self.names)))  # s_i = log σ_i², one per term
        self.share = 1.0
        self.watch = DominanceWatch(threshold=dominance_threshold, steps=dominance_steps)

    def weight(self, name: str, value: torch.Tensor, kd: torch.Tensor) -> torch.Tensor:
        """The multiplier of term `name` this micro-batch (a detached scalar tensor, or a graph one for
        uncertainty, whose exp(−s) must carry the gradient to s)."""
        beta = self.betas[name]
        if self.mode == "static":
            return torch.as_tensor(beta)
        if self.mode == "balanced":
            size = value.detach().abs()
            return beta * kd.detach().abs() / size if size > EPS else torch.as_tensor(beta)
        return beta * torch.exp(-self.log_vars[self.names.index(name)])

    def forward(self, kd_total: torch.Tensor, values: dict) -> tuple[torch.Tensor, dict]:
        kd = self.kd_weight * kd_total
        # the watch skips a switched-off KD term (features.kd_weight=0: the others are all there is)
        total, weights, parts = kd, {}, ({"kd": float(kd.detach().abs())} if self.kd_weight else {})
        for name, value in values.items():
            if name not in self.betas:  # another mode's term: plain sum
                total, weights[name] = total + value, 1.0
                parts[name] = float(value.detach().abs())
                continue
            w = self.weight(name, value, kd)
            total = total + w * value
            weights[name] = float(w.detach())
            parts[name] = float((w * value).detach().abs())
            if self.mode == "uncertainty":  # the regulariser keeps σ² from growing without bound
                total = total + self.log_vars[self.names.index(name)] * self.share
        self.watch.add(parts)
        return total, weights

    def after_step(self, step: int) -> None:
        self.watch.end_step(step)


class DominanceWatch:
    """Sums each term's |contribution| over an optimizer step; warns once per streak when one term is
    more than `threshold` of the total for `steps` steps in a row (the others then barely train)."""

    def __init__(self, *, threshold: float, steps: int):
        self.threshold, self.steps = threshold, steps
        self.sums: dict[str, float] = {}
        self.leader, self.streak = None, 0

    def add(self, parts: dict[str, float]) -> None:
        for name, value in parts.items():
            self.sums[name] = self.sums.get(name, 0.0) + value

    def end_step(self, step: int) -> str | None:
        """Close the step; returns the name of the term it warned about (None when it did not)."""
        sums, self.sums = self.sums, {}
        total = sum(sums.values())
        if len(sums) < 2 or total <= 0:
            return None
        name, value = max(sums.items(), key=lambda kv: kv[1])
        if value / total <= self.threshold:
            self.leader, self.streak = None, 0
            return None
        self.streak = self.streak + 1 if name == self.leader else 1
        self.leader = name
        if self.streak != self.steps:
            return None
        others = ", ".join(f"{k} {v / total:.1%}" for k, v in sums.items() if k != name)
        log.warning("step %d: term %r has been more than %.0f%% of the loss for %d steps in a row (now %.1f%%; %s): "
                    "the other terms barely train. Rebalance features.*.weight / features.kd_weight, or use "
                    "features.weighting=balanced", step, name, 100 * self.threshold, self.steps,
                    100 * value / total, others)
        return name
