"""From a PruneConfig to a pruned model: which layers and widths, then depth before width."""

from __future__ import annotations

import math

from kdkit.config import PruneConfig
from kdkit.errors import UserError
from kdkit.models.load import count_parameters
from kdkit.prune.depth import layers_for_target, prune_depth
from kdkit.prune.importance import Importance
from kdkit.prune.width import default_kv_heads, prune_width, solve_width

DIMS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size")


def resolve_target(target: float | None, total: int) -> int | None:
    """A count, or a fraction (<= 1) of the model's `total` parameters."""
    if target is None:
        return None
    return int(target * total) if target <= 1 else int(target)


def prune_model(model, imp: Importance, pc: PruneConfig):
    """(pruned copy of the model, summary dict). method=both with a target and no num_layers splits the
    reduction evenly: depth and width each shrink the parameter count by sqrt(target / total)."""
    if pc.method == "none":
        raise UserError("prune.method is none: set it to depth, width or both")
    total = count_parameters(model)
    target = resolve_target(pc.target_params, total)
    widths = {"num_heads": pc.num_heads, "num_kv_heads": pc.num_kv_heads,
              "intermediate_size": pc.intermediate_size, "hidden_size": pc.hidden_size}
    summary = {"method": pc.method, "params_before": total, "target_params": target,
               "layers_kept": list(range(model.config.num_hidden_layers))}
    if pc.method in ("depth", "both"):
        n = pc.num_layers
        if n is None:
            if target is None:
                raise UserError(f"prune.method={pc.method} needs prune.num_layers or prune.target_params")
            n = layers_for_target(model, target if pc.method == "depth" else int(math.sqrt(target * total)))
        model, keep = prune_depth(model, imp, n, metric=pc.layer_metric)
        imp, summary["layers_kept"] = imp.subset(keep), keep
    if pc.method in ("width", "both"):
        if target is not None:
            dims = solve_width(model, target, round_to=pc.round_to, **widths)
            widths = {"num_heads": dims["num_attention_heads"], "num_kv_heads": dims["num_key_value_heads"],
                      "intermediate_size": dims["intermediate_size"], "hidden_size": dims["hidden_size"]}
        elif not any(v for k, v in widths.items() if k != "num_kv_heads"):
            raise UserError(f"prune.method={pc.method} needs prune.target_params or one of prune.intermediate_size, "
                            "prune.num_heads, prune.hidden_size")
        c = model.config
        if widths["num_heads"] and not widths["num_kv_heads"] and widths["num_heads"] != c.num_attention_heads:
            widths["num_kv_heads"] = default_kv_heads(widths["num_heads"], c.num_attention_heads, c.num_key_value_heads)
        model = prune_width(model, imp, **widths)
    summary["params_after"] = count_parameters(model)
    summary["dims"] = {k: getattr(model.config, k) for k in DIMS}
    return model, summary
