"""Depth pruning: keep the most important layers (prune/importance.py), in their original order."""

from __future__ import annotations

import torch

from kdkit.errors import UserError
from kdkit.models.load import student_from_layers

from kdkit.prune.importance import Importance
from kdkit.prune.width import param_count


def layers_to_keep(imp: Importance, num_layers: int, *, metric: str = "ppl") -> list[int]:
    """Indices of the `num_layers` highest-scoring layers, ascending. Each layer is scored alone (the
    model with only that layer skipped), as in Minitron and ShortGPT."""
    scores = imp.layer_scores(metric)
    if not scores:
        raise ValueError(f"the importance has no {metric!r} layer scores (computed with layer_ppl=False)")
    if not 1 <= num_layers <= len(scores):
        raise UserError(f"prune.num_layers must be between 1 and the model's {len(scores)} layers, got {num_layers}")
    return torch.tensor(scores).topk(num_layers).indices.sort().values.tolist()


def prune_depth(model, imp: Importance, num_layers: int, *, metric: str = "ppl"):
    """(a copy of the model with the most important layers, their indices)."""
    keep = layers_to_keep(imp, num_layers, metric=metric)
    return student_from_layers(model, keep), keep


def layers_for_target(model, target: int) -> int:
    """The layer count whose parameter count comes closest to `target` (at least 1)."""
    one, two = param_count(model, num_hidden_layers=1), param_count(model, num_hidden_layers=2)
    per_layer, rest = two - one, one - (two - one)
    n = round((target - rest) / per_layer)
    return max(1, min(model.config.num_hidden_layers, n))
