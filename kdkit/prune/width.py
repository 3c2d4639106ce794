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

from kdkit.prune.dims import check_dims, default_kv_heads, head_dim, new_config, param_count, solve_width
from kdkit.prune.importance import Importance

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
__all__ = ["SUPPORTED", "default_kv_heads", "head_dim", "param_count", "prune_width", "solve_width"]


def check_supported(model) -> None:
    if model.config.model_type not in SUPPORTED:
        raise UserError(f"width pruning supports {', '.join(SUPPORTED)} models, not {model.config.model_type!r}; "
                        "use prune.method=depth")


def _top(scores, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order."""
    return torch.tensor(scores).topk(k).indices.sort().values


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
    dims = {"num_attention_heads": nq, "num_key_value_heads": nkv, "intermediate_size": I, "hidden_size": H}
    check_dims(c, **dims)
    plan = []
    for i in range(c.num_hidden_layers):
        q, kv = keep_heads(imp.heads[i], kv_heads=K, num_heads=nq, num_kv_heads=nkv)
        plan.append({"q": _rows(q, d), "kv": _rows(kv, d), "mlp": _top(imp.mlp[i], I)})
    cfg = new_config(c, **dims)
    if not _has_head_norms(model):  # qwen3/gemma3's per-head q/k norms share this eps; their width is unchanged
        cfg.rms_norm_eps = c.rms_norm_eps * c.hidden_size / H  # with the sqrt(H/H') weights: the same function
    new = AutoModelForCausalLM.from_config(cfg, dtype=model.dtype)
    ctx = _context(model, plan, hid=_top(imp.hidden, H), H=H)
    state = {k: _slice(k, v, ctx) for k, v in model.state_dict().items()}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:  # a tied head is not in the state dict
        raise RuntimeError(f"width pruning mismatch: missing {missing}, unexpected {unexpected}")
    return new


def _has_head_norms(model) -> bool:
    return any(name.endswith(("q_norm", "k_norm")) for name, _ in model.named_modules())


@torch.no_grad()
def _norm_offset(model) -> float:
    """1 where RMSNorm multiplies by (1 + weight) (Gemma), 0 where by weight: probed on an all-ones row."""
    norm = model.get_decoder().norm
    out = norm(torch.ones(1, norm.weight.shape[0], dtype=norm.weight.dtype, device=norm.weight.device))[0]
    return float(torch.allclose(out, (1 + norm.weight) * out.new_tensor(1 / math.sqrt(1 + _eps(norm)))))


def _eps(norm) -> float:
    return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)


def _context(model, plan: list[dict], *, hid: torch.Tensor, H: int) -> dict:
    """What _slice needs. RMSNorm over H' channels divides by an RMS sqrt(H/H') larger (dropped channels ≈ 0):
    every hidden-size norm gain is scaled by that. A Gemma embedding multiplies by sqrt(hidden_size), so its
    rows are scaled by sqrt(H/H') to give the same vectors; a tied head then reads them scaled, which the
    final norm's gain undoes."""
    scale = math.sqrt(model.config.hidden_size / H)
    emb = scale if getattr(model.get_input_embeddings(), "embed_scale", None) is not None else 1.0
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return {"plan": plan, "hid": hid, "scale": scale, "embed": emb, "head": emb if tied else 1.0,
            "final": scale / (emb if tied else 1.0), "offset": _norm_offset(model)}


def _slice(name: str, t: torch.Tensor, ctx: dict) -> torch.Tensor:
    """The kept part of one weight, chosen by its name."""
    parts = name.split(".")
    kind, leaf = parts[-2], parts[-1]
    p = ctx["plan"][int(parts[parts.index("layers") + 1])] if "layers" in parts else None
    hid = ctx["hid"].to(t.device)
    if kind in ("embed_tokens", "lm_head"):  # (V, H) → (V, H')
        return (t[:, hid] * ctx["embed" if kind == "embed_tokens" else "head"]).clone()
    if kind in ("q_norm", "k_norm"):  # per-head norms (qwen3, gemma3): head_dim is unchanged
        return t.clone()
    if kind.endswith("norm"):  # every hidden-size norm: (H,) → (H',), gain = offset + weight
        s, off = ctx["scale" if p is not None else "final"], ctx["offset"]
        return ((t[hid] + off) * s - off).clone()
    rows = {"q_proj": "q", "k_proj": "kv", "v_proj": "kv", "gate_proj": "mlp", "up_proj": "mlp"}
    if kind in rows:  # (out, H) → (out', H')
        r = p[rows[kind]].to(t.device)
        return (t[r][:, hid] if leaf == "weight" else t[r]).clone()
    cols = {"o_proj": "q", "down_proj": "mlp"}
    if kind in cols:  # (H, in) → (H', in')
        c = p[cols[kind]].to(t.device)
        return (t[hid][:, c] if leaf == "weight" else t[hid]).clone()
    raise UserError(f"width pruning does not know the weight {name!r} (supported: {', '.join(SUPPORTED)})")
