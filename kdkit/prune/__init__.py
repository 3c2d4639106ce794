"""Pruning a trained model into a student: importance on calibration data, then depth and/or width."""

from kdkit.prune.depth import layers_to_keep, prune_depth
from kdkit.prune.importance import Importance, compute_importance, plot_layer_importance
from kdkit.prune.plan import plan_prune, prune_model
from kdkit.prune.width import param_count, prune_width, solve_width

__all__ = ["Importance", "compute_importance", "layers_to_keep", "param_count", "plan_prune", "plot_layer_importance",
           "prune_depth", "prune_model", "prune_width", "solve_width"]
