"""Which pruned dimensions an architecture accepts, their parameter counts, and the widths for a target.

Every candidate config is built the way the model class builds it (`cls.from_dict`, which runs
transformers 5's strict validators), so a size the class rejects is never chosen and an explicit one
is refused before any importance work. What the classes check (transformers 5.x, head_dim explicit):
Llama and Gemma 3 need hidden_size % num_attention_heads == 0 even with head_dim set; Qwen2, Qwen3 and
Mistral accept any hidden size; all need an even head_dim (RoPE), which width pruning never changes.
"""

from __future__ import annotations

import math

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM

from kdkit.errors import UserError
from kdkit.models.load import count_parameters

REJECTED = (ValueError, TypeError, StrictDataclassError)  # what a config class raises for a bad combination


def _config(x):
    return getattr(x, "config", x)  # a model or its config


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _fields(config, dims: dict) -> dict:
    d = config.to_dict()
    d.pop("quantization_config", None)  # a GGUF-loaded teacher's; the pruned model is plain
    d["head_dim"] = head_dim(config)  # fixed: no longer hidden_size // num_heads
    d.update(dims)
    if d.get("layer_types"):
        d["layer_types"] = d["layer_types"][: d["num_hidden_layers"]]
    return d


def new_config(config, **dims):
    """The config with some fields changed, constructed (and so validated) by its own class."""
    return config.__class__.from_dict(_fields(config, dims))


def rejection(config, **dims) -> str | None:
    """None if the config class accepts these dims, else its reason."""
    try:
        new_config(config, **dims)
    except REJECTED as e:
        return str(e).strip().splitlines()[-1].strip().removeprefix("ValueError: ")
    return None


def param_count(model, **dims) -> int:
    """Parameters of the architecture with some config fields changed, built on the meta device. The
    fields are set unvalidated, so counts of sizes the class would reject can still be interpolated."""
    cfg = new_config(_config(model))
    for key, value in dims.items():
        setattr(cfg, key, value)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
    with torch.device("meta"):
        return count_parameters(AutoModelForCausalLM.from_config(cfg))


def _bilinear(config, fixed: dict):
    """P(h, i): the parameter count as a function of hidden and intermediate size, other dims `fixed`.
    Every weight is (h or constant) × (i or constant), so four meta counts determine it exactly."""
    H, I = config.hidden_size, config.intermediate_size
    h2, i2 = max(1, H // 2), max(1, I // 2)
    p = {(h, i): param_count(config, **fixed, hidden_size=h, intermediate_size=i) for h in (H, h2) for i in (I, i2)}
    d = (p[H, I] - p[H, i2] - p[h2, I] + p[h2, i2]) / ((H - h2) * (I - i2) or 1)  # the h·i coefficient
    b = (p[H, i2] - p[h2, i2]) / ((H - h2) or 1) - d * i2  # per unit of h
    c = (p[h2, I] - p[h2, i2]) / ((I - i2) or 1) - d * h2  # per unit of i
    a = p[h2, i2] - b * h2 - c * i2 - d * h2 * i2
    return lambda h, i: round(a + b * h + c * i + d * h * i)


def valid_hidden_sizes(config, *, step: int, **dims) -> list[int]:
    """Hidden sizes up to the model's that are multiples of `step` (and the model's own) and that the
    config class accepts with `dims`."""
    H = config.hidden_size
    sizes = sorted({*range(step, H + 1, step), H})
    return [h for h in sizes if rejection(config, **dims, hidden_size=h) is None]


def nearest_valid(config, key: str, value: int, *, step: int, **dims) -> str:
    """'a, b' — the closest accepted values of `key` below and above `value` (any size, then multiples
    of `step`): what an error message suggests."""
    top = getattr(config, key)

    def around(sizes):
        ok = [s for s in sizes if rejection(config, **dims, **{key: s}) is None]
        below, above = [s for s in ok if s < value][-1:], [s for s in ok if s > value][:1]
        return ", ".join(map(str, below + above)) or "none"

    return f"{around(range(1, top + 1))} (multiples of {step}: {around(range(step, top + 1, step))})"


def check_dims(config, *, where: str = "prune", step: int = 32, advice: str | None = None, **dims) -> None:
    """UserError naming the nearest accepted sizes when the class rejects these dims; `advice`: its last
    sentence (default: the prune section's fields)."""
    reason = rejection(config, **dims)
    if reason is None:
        return
    name = type(config).__name__
    shown = ", ".join(f"{k}={v}" for k, v in dims.items())
    hint = ""
    if "hidden_size" in dims:
        others = {k: v for k, v in dims.items() if k != "hidden_size"}
        hint = (f"; nearest hidden sizes it accepts: "
                f"{nearest_valid(config, 'hidden_size', dims['hidden_size'], step=step, **others)}")
    advice = advice or (f"Set {where}.hidden_size/num_heads/intermediate_size to sizes it accepts, or leave them "
                        f"unset and give {where}.target_params")
    raise UserError(f"{where}: {name} rejects the pruned dimensions {shown} ({reason}){hint}. {advice}")


def default_kv_heads(num_heads: int, heads: int, kv_heads: int) -> int:
    """Keep every KV group when num_heads splits evenly among them, else drop whole groups."""
    g = heads // kv_heads
    if num_heads % kv_heads == 0:
        return kv_heads
    if num_heads % g == 0:
        return num_heads // g
    raise UserError(f"prune.num_heads={num_heads} fits the model's GQA ({heads} query heads in {kv_heads} groups "
                    f"of {g}) neither as a multiple of {kv_heads} (heads dropped within groups) nor of {g} "
                    "(whole groups dropped)")


def _pick(options: list[tuple], target: int, tolerance: float) -> tuple:
    """options (h, i, params, imbalance): the most balanced one within the tolerance of the target
    (or of the closest option, when none is that close)."""
    best = min(abs(p - target) for _, _, p, _ in options)
    near = [o for o in options if abs(o[2] - target) <= max(tolerance * target, best)]
    return min(near, key=lambda o: (o[3], abs(o[2] - target)))


def solve_width(model, target: int, *, round_to: int = 32, num_heads: int | None = None,
                num_kv_heads: int | None = None, intermediate_size: int | None = None,
                hidden_size: int | None = None, num_hidden_layers: int | None = None,
                tolerance: float = 0.02) -> dict:
    """Width dims whose parameter count comes closest to `target`: the given dims are kept; the free
    ones among (intermediate_size, hidden_size) are multiples of `round_to` (or unchanged) that the
    config class accepts, and among the choices within `tolerance` of the target, the one where both
    shrink by the most similar ratio wins (Minitron: MLP and embedding width are the best axes).
    Heads shrink only when set. num_hidden_layers: count for that depth (method both)."""
    c = _config(model)
    fixed = {"num_attention_heads": num_heads or c.num_attention_heads}
    fixed["num_key_value_heads"] = num_kv_heads or (
        c.num_key_value_heads if fixed["num_attention_heads"] == c.num_attention_heads
        else default_kv_heads(fixed["num_attention_heads"], c.num_attention_heads, c.num_key_value_heads))
    if num_hidden_layers:
        fixed["num_hidden_layers"] = num_hidden_layers
    H, I = c.hidden_size, c.intermediate_size
    hs = [hidden_size] if hidden_size else valid_hidden_sizes(c, step=round_to, **fixed)
    if not hs:
        raise UserError(f"{type(c).__name__} accepts no hidden size up to {H} that is a multiple of "
                        f"prune.round_to={round_to} with {fixed['num_attention_heads']} heads; lower prune.round_to "
                        "or set prune.hidden_size")
    if hidden_size or intermediate_size:
        check_dims(c, step=round_to, **fixed, **({"hidden_size": hidden_size} if hidden_size else {}),
                   **({"intermediate_size": intermediate_size} if intermediate_size else {}))
    count = _bilinear(c, fixed)
    options = []
    for h in hs:
        for i in _intermediate_options(count, h, target, I=I, step=round_to, given=intermediate_size):
            imbalance = abs(math.log(h / H) - math.log(i / I)) if not (hidden_size or intermediate_size) else 0
            options.append((h, i, count(h, i), imbalance))
    smallest = min(o[2] for o in options)
    if smallest > target:
        raise UserError(f"prune.target_params={target:,} is below the smallest width-pruned model ({smallest:,} "
                        f"parameters at round_to={round_to}); prune depth too (method: both) or lower prune.round_to")
    h, i, _, _ = _pick(options, target, tolerance)
    return {**fixed, "intermediate_size": i, "hidden_size": h}


def _intermediate_options(count, h: int, target: int, *, I: int, step: int, given: int | None) -> list[int]:
    """The (at most two) intermediate sizes around the one that hits `target` at hidden size h."""
    if given:
        return [given]
    per = count(h, step + 1) - count(h, step)  # parameters per intermediate neuron at this h
    exact = (target - count(h, 0)) / per
    lo = min(I, max(step, step * math.floor(exact / step)))
    hi = min(I, max(step, step * math.ceil(exact / step)))
    return sorted({lo, hi} | ({I} if exact >= I else set()))
