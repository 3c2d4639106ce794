"""From a PruneConfig to a pruned model: which layers and widths (decided from the config alone, before
any importance work, so a size the architecture rejects fails fast), then depth before width."""

from __future__ import annotations

import math

from kdkit.config import PruneConfig
from kdkit.errors import UserError
from kdkit.models.load import count_parameters
from kdkit.prune.depth import layers_for_target, prune_depth
from kdkit.prune.dims import check_dims, default_kv_heads, solve_width
from kdkit.prune.importance import Importance
from kdkit.prune.width import check_supported, prune_width

DIMS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size")


def resolve_target(target: float | None, total: int) -> int | None:
    """A count, or a fraction (<= 1) of the model's `total` parameters."""
    if target is None:
        return None
    return int(target * total) if target <= 1 else int(target)


def plan_prune(model, pc: PruneConfig) -> dict:
    """{'target', 'num_layers' (None: keep all), 'widths' (None: no width pruning)} for the model.
    method=both with a target and no num_layers splits the reduction evenly: depth and width each shrink
    the parameter count by sqrt(target / total)."""
    if pc.method == "none":
        raise UserError("prune.method is none: set it to depth, width or both")
    total = count_parameters(model)
    target = resolve_target(pc.target_params, total)
    if target is not None and target >= total:
        raise UserError(f"prune.target_params={pc.target_params} is {target:,} parameters, not below the model's "
                        f"{total:,}: give a fraction below 1 or a smaller count")
    n = None
    if pc.method in ("depth", "both"):
        n = pc.num_layers
        if n is None:
            if target is None:
                raise UserError(f"prune.method={pc.method} needs prune.num_layers or prune.target_params")
            n = layers_for_target(model, target if pc.method == "depth" else int(math.sqrt(target * total)))
    widths = _plan_widths(model, pc, target, n) if pc.method in ("width", "both") else None
    return {"target": target, "num_layers": n, "widths": widths}


def _plan_widths(model, pc: PruneConfig, target: int | None, num_layers: int | None) -> dict:
    """Width dims as prune_width takes them; validated against the config class."""
    check_supported(model)
    c = model.config
    given = {"num_heads": pc.num_heads, "num_kv_heads": pc.num_kv_heads,
             "intermediate_size": pc.intermediate_size, "hidden_size": pc.hidden_size}
    if target is None and not any(v for k, v in given.items() if k != "num_kv_heads"):
        raise UserError(f"prune.method={pc.method} needs prune.target_params or one of prune.intermediate_size, "
                        "prune.num_heads, prune.hidden_size")
    if target is not None:
        dims = solve_width(model, target, round_to=pc.round_to, num_hidden_layers=num_layers, **given)
    else:
        nq = pc.num_heads or c.num_attention_heads
        nkv = pc.num_kv_heads or (c.num_key_value_heads if nq == c.num_attention_heads
                                  else default_kv_heads(nq, c.num_attention_heads, c.num_key_value_heads))
        dims = {"num_attention_heads": nq, "num_key_value_heads": nkv,
                "intermediate_size": pc.intermediate_size or c.intermediate_size,
                "hidden_size": pc.hidden_size or c.hidden_size}
    check_dims(c, step=pc.round_to, **dims)
    return {"num_heads": dims["num_attention_heads"], "num_kv_heads": dims["num_key_value_heads"],
            "intermediate_size": dims["intermediate_size"], "hidden_size": dims["hidden_size"]}


def prune_model(model, imp: Importance, pc: PruneConfig, plan: dict | None = None):
    """(pruned copy of the model, summary dict); plan: plan_prune's (computed here when not given)."""
    plan = plan or plan_prune(model, pc)
    summary = {"method": pc.method, "params_before": count_parameters(model), "target_params": plan["target"],
               "layers_kept": list(range(model.config.num_hidden_layers))}
    if plan["num_layers"] is not None:
        model, keep = prune_depth(model, imp, plan["num_layers"], metric=pc.layer_metric)
        imp, summary["layers_kept"] = imp.subset(keep), keep
    if plan["widths"] is not None:
        model = prune_width(model, imp, **plan["widths"])
    summary["params_after"] = count_parameters(model)
    summary["dims"] = {k: getattr(model.config, k) for k in DIMS}
    return model, summary
