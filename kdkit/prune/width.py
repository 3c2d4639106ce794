"""Width pruning of llama-family models: attention heads, MLP neurons, embedding channels.

The kept units are the most important ones (prune/importance.py); the result is a fresh model of the
same architecture with a smaller config, its weights sliced from the original:

- heads: q/o slices per kept query head, k/v slices per kept KV head; `head_dim` is written into the
  config so it no longer follows hidden_size / num_heads. GQA: query head h reads KV head h // g
  (g = Hq / K). Either every KV group is kept and the same number of query heads is dropped within
  each group (the best ones kept), or whole groups (KV head + its query heads) are dropped; every
  group of the result has the same size, as the architecture requires.
- MLP: gate/up rows and down columns of the kept neurons.
- hidden: the kept channels in every weight that reads or writes the residual stream, every
  hidden-size RMSNorm, the embeddings and the (tied or untied) head. RMSNorm averages over the
  channels, so its weights are scaled by sqrt(H/H') and its eps by H/H': a dropped channel that is
  zero everywhere then leaves the function exactly unchanged; a low-energy one nearly so.
"""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM

from kdkit.errors import UserError
from kdkit.models.load import count_parameters

from kdkit.prune.importance import Importance

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def check_supported(model) -> None:
    if model.config.model_type not in SUPPORTED:
        raise UserError(f"width pruning supports {', '.join(SUPPORTED)} models, not {model.config.model_type!r}; "
                        "use prune.method=depth")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _top(scores, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order."""
    return torch.tensor(scores).topk(k).indices.sort().values


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


def keep_heads(scores: list[float], *, kv_heads: int, num_heads: int, num_kv_heads: int) -> tuple[list, list]:
    """(kept query heads, kept KV heads) of one layer: the best groups, then the best heads in each."""
    per = num_heads // num_kv_heads
    g = len(scores) // kv_heads
    if num_heads % num_kv_heads or not 1 <= num_kv_heads <= kv_heads or per > g:
        raise UserError(f"cannot keep {num_heads} query heads in {num_kv_heads} KV groups: the model has "
                        f"{kv_heads} groups of {g} query heads")
    s = torch.tensor(scores).view(kv_heads, g)  # (K, g)
    groups = _top(s.sum(-1).tolist(), num_kv_heads).tolist()
    q = [j * g + int(h) for j in groups for h in _top(s[j].tolist(), per)]
    return q, groups


def _rows(units: list[int], size: int) -> torch.Tensor:
    """Row indices of whole heads: unit u covers rows u·size … u·size + size - 1."""
    return (torch.tensor(units)[:, None] * size + torch.arange(size)).flatten()


def _new_config(model, **dims):
    cfg = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.head_dim = head_dim(model.config)  # fixed: no longer hidden_size // num_heads
    for key, value in dims.items():
        setattr(cfg, key, value)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
    return cfg


def param_count(model, **dims) -> int:
    """Parameters of the model's architecture with some config fields changed (built on the meta device)."""
    cfg = _new_config(model, **dims)
    with torch.device("meta"):
        return count_parameters(AutoModelForCausalLM.from_config(cfg))


def prune_width(model, imp: Importance, *, num_heads: int | None = None, num_kv_heads: int | None = None,
                intermediate_size: int | None = None, hidden_size: int | None = None):
    """A new model keeping the most important heads, neurons and channels (None: keep all of that kind)."""
    check_supported(model)
    c = model.config
    d, Hq, K = head_dim(c), c.num_attention_heads, c.num_key_value_heads
    nq = num_heads or Hq
    nkv = num_kv_heads or (K if nq == Hq else default_kv_heads(nq, Hq, K))
    I, H = intermediate_size or c.intermediate_size, hidden_size or c.hidden_size
    if not (nq <= Hq and I <= c.intermediate_size and H <= c.hidden_size):
        raise UserError(f"width pruning only shrinks: heads {nq}/{Hq}, intermediate {I}/{c.intermediate_size}, "
                        f"hidden {H}/{c.hidden_size}")
    if len(imp.heads) != c.num_hidden_layers:
        raise ValueError(f"importance covers {len(imp.heads)} layers, the model has {c.num_hidden_layers}")
    hid = _top(imp.hidden, H)
    plan = []
    for i in range(c.num_hidden_layers):
        q, kv = keep_heads(imp.heads[i], kv_heads=K, num_heads=nq, num_kv_heads=nkv)
        plan.append({"q": _rows(q, d), "kv": _rows(kv, d), "mlp": _top(imp.mlp[i], I)})
    cfg = _new_config(model, num_attention_heads=nq, num_key_value_heads=nkv, intermediate_size=I, hidden_size=H)
    if c.model_type != "qwen3":  # qwen3's per-head q/k norms share this eps, and their width is unchanged
        cfg.rms_norm_eps = c.rms_norm_eps * c.hidden_size / H  # with the sqrt(H/H') weights: the same function
    new = AutoModelForCausalLM.from_config(cfg, dtype=model.dtype)
    scale = math.sqrt(c.hidden_size / H)
    state = {k: _slice(k, v, plan, hid, scale) for k, v in model.state_dict().items()}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:  # a tied head is not in the state dict
        raise RuntimeError(f"width pruning mismatch: missing {missing}, unexpected {unexpected}")
    return new


def _slice(name: str, t: torch.Tensor, plan: list[dict], hid: torch.Tensor, scale: float) -> torch.Tensor:
    """The kept part of one weight, chosen by its name."""
    parts = name.split(".")
    kind, leaf = parts[-2], parts[-1]
    p = plan[int(parts[parts.index("layers") + 1])] if "layers" in parts else None
    hid = hid.to(t.device)
    if kind in ("embed_tokens", "lm_head"):
        return t[:, hid].clone()  # (V, H')
    if kind in ("q_norm", "k_norm"):  # per-head norms (qwen3): head_dim is unchanged
        return t.clone()
    if kind.endswith("norm"):  # input_layernorm, post_attention_layernorm, final norm: (H,) → (H',)
        return (t[hid] * scale).clone()
    rows = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "gate_proj": "mlp", "up_proj": "mlp"}
    if kind in rows:  # (out, H) → (out', H')
        r = p[rows[kind]].to(t.device)
        return (t[r][:, hid] if leaf == "weight" else t[r]).clone()
    cols = {"o_proj": "q", "down_proj": "mlp"}
    if kind in cols:  # (H, in) → (H', in')
        c = p[cols[kind]].to(t.device)
        return (t[hid][:, c] if leaf == "weight" else t[hid]).clone()
    raise UserError(f"width pruning does not know the weight {name!r} (supported: {', '.join(SUPPORTED)})")


def _round(x: float, step: int) -> int:
    return max(step, step * round(x / step))


def solve_width(model, target: int, *, round_to: int = 8, num_heads: int | None = None,
                num_kv_heads: int | None = None, intermediate_size: int | None = None,
                hidden_size: int | None = None) -> dict:
    """Width dims whose parameter count comes closest to `target`: the given dims are kept, the free ones
    among (intermediate_size, hidden_size) shrink by one common ratio, in steps of `round_to`.
    Minitron found MLP and embedding width the best axes to prune; heads shrink only when set."""
    c = model.config
    fixed = {"num_attention_heads": num_heads or c.num_attention_heads}
    fixed["num_key_value_heads"] = num_kv_heads or (
        c.num_key_value_heads if fixed["num_attention_heads"] == c.num_attention_heads
        else default_kv_heads(fixed["num_attention_heads"], c.num_attention_heads, c.num_key_value_heads))
    free = {k: getattr(c, k) for k, v in (("intermediate_size", intermediate_size), ("hidden_size", hidden_size))
            if v is None}
    fixed.update({k: v for k, v in (("intermediate_size", intermediate_size), ("hidden_size", hidden_size)) if v})
    if not free:
        return fixed
    axis = "hidden_size" if "hidden_size" in free else "intermediate_size"
    steps = list(range(round_to, free[axis] + 1, round_to)) or [free[axis]]

    def dims(k: int) -> dict:  # the k-th candidate: the main axis at steps[k], the other at the same ratio
        r = steps[k] / free[axis]
        return {**fixed, **{name: min(size, _round(r * size, round_to)) for name, size in free.items()}}

    lo, hi = 0, len(steps) - 1  # counts grow with k: bisect for the last candidate at or below the target
    if param_count(model, **dims(lo)) > target:
        raise UserError(f"prune.target_params={target:,} is below the smallest width-pruned model "
                        f"({param_count(model, **dims(lo)):,} parameters); prune depth too (method: both)")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if param_count(model, **dims(mid)) <= target else (lo, mid - 1)
    options = [dims(k) for k in {lo, min(lo + 1, len(steps) - 1)}]
    return min(options, key=lambda o: abs(param_count(model, **o) - target))
