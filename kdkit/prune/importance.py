"""Activation-based importance on calibration data (Minitron, Muralidharan et al. 2024).

One forward pass with hooks scores every prunable unit, averaged over the real (non-pad) tokens:

- **attention heads** (L, Hq): the L2 norm of each query head's contribution to the block output,
  ‖W_o[:, head] · attn_head‖, so a head whose value or output weights are zero scores 0. A GQA KV
  group scores the sum of its query heads (`Importance.kv_group_scores`); width pruning either keeps
  every group and drops query heads within each group, or drops whole groups (see prune/width.py).
- **MLP neurons** (L, I): mean |act_fn(gate) · up|, the input of down_proj.
- **embedding channels** (H,): mean |output| of every hidden-size RMSNorm (both per block and the
  final one), summed over the norms: what the model actually reads from each channel.

Layers get two scores: the mean cosine distance 1 - cos(x_in, x_out) between a block's input and
output (ShortGPT's "block influence"), and the perplexity increase on the calibration labels when
the block is skipped (its output replaced by its input), one extra forward pass per layer.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kdkit.data.collate import collate
from kdkit.data.render import IGNORE, TokenizedData
from kdkit.models.forward import supervised_logits


@dataclass
class Importance:
    heads: list[list[float]]  # (L, Hq) per query head
    mlp: list[list[float]]  # (L, I) per MLP neuron
    hidden: list[float]  # (H,) per embedding channel
    cosine_distance: list[float]  # (L,) mean 1 - cos(block input, block output)
    ppl_increase: list[float]  # (L,) perplexity with the block skipped minus base_ppl ([]: not computed)
    base_ppl: float
    num_key_value_heads: int
    tokens: int  # calibration tokens the activation scores average over

    def layer_scores(self, metric: str = "ppl") -> list[float]:
        """Higher = more important; metric 'ppl' or 'cosine'."""
        return self.ppl_increase if metric == "ppl" else self.cosine_distance

    def kv_group_scores(self) -> list[list[float]]:
        """(L, K): each GQA group's summed query-head scores."""
        scores = torch.tensor(self.heads)  # (L, Hq)
        return scores.view(len(self.heads), self.num_key_value_heads, -1).sum(-1).tolist()  # (L, K)

    def subset(self, layers: list[int]) -> Importance:
        """The scores of the kept layers, in order (after depth pruning)."""
        pick = lambda rows: [rows[i] for i in layers] if rows else []  # noqa: E731
        return Importance(heads=pick(self.heads), mlp=pick(self.mlp), hidden=list(self.hidden),
                          cosine_distance=pick(self.cosine_distance), ppl_increase=pick(self.ppl_increase),
                          base_ppl=self.base_ppl, num_key_value_heads=self.num_key_value_heads, tokens=self.tokens)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Importance:
        return cls(**json.loads(Path(path).read_text()))


# ---------------------------------------------------------------- calibration batches


def calibration_batches(data, *, pad_id: int, batch_size: int = 8) -> list[dict]:
    """TokenizedData → padded batches with labels; a list of batches passes through (labels added
    where missing: every real token is then a target)."""
    if isinstance(data, TokenizedData):
        return [collate(data.input_ids[i:i + batch_size], data.labels[i:i + batch_size], pad_id=pad_id)
                for i in range(0, len(data.input_ids), batch_size)]
    batches = []
    for b in data:
        b = dict(b)
        b.setdefault("attention_mask", torch.ones_like(b["input_ids"]))
        b.setdefault("labels", b["input_ids"].masked_fill(b["attention_mask"] == 0, IGNORE))
        batches.append(b)
    return batches


def _decoder_layers(model) -> torch.nn.ModuleList:
    return model.get_decoder().layers


def _hidden_norms(model) -> list[torch.nn.Module]:
    """RMSNorms over the hidden size (per-block and final), not per-head q/k norms."""
    H = model.config.hidden_size
    return [m for name, m in model.get_decoder().named_modules()
            if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None
            and m.weight.shape == (H,) and "self_attn" not in name]


# ---------------------------------------------------------------- activation scores


@torch.no_grad()
def _activation_scores(model, batches: list[dict]) -> dict:
    layers, cfg = _decoder_layers(model), model.config
    L, H = len(layers), cfg.hidden_size
    Hq = cfg.num_attention_heads
    dev = next(model.parameters()).device
    acc = {"heads": torch.zeros(L, Hq, dtype=torch.float64), "mlp": [None] * L,
           "hidden": torch.zeros(H, dtype=torch.float64), "cos": torch.zeros(L, dtype=torch.float64), "tokens": 0}
    state = {}  # the current batch's token mask (B, T), read by the hooks

    def head_hook(i, o_proj):
        def hook(module, args):
            x = args[0]  # (B, T, Hq·d)
            heads = x.view(*x.shape[:-1], Hq, -1)  # (B, T, Hq, d)
            w = o_proj.weight.view(o_proj.weight.shape[0], Hq, -1)  # (H, Hq, d)
            mask = state["mask"]
            for h in range(Hq):  # one head at a time: (B, T, H) instead of (B, T, Hq, H)
                contrib = heads[..., h, :] @ w[:, h, :].T  # (B, T, H)
                acc["heads"][i, h] += contrib.norm(dim=-1)[mask].double().sum().cpu()
        return hook

    def mlp_hook(i):
        def hook(module, args):
            a = args[0][state["mask"]].abs().double().sum(0).cpu()  # (I,)
            acc["mlp"][i] = a if acc["mlp"][i] is None else acc["mlp"][i] + a
        return hook

    def norm_hook(module, args, output):
        acc["hidden"] += output[state["mask"]].abs().double().sum(0).cpu()

    def layer_hook(i):
        def hook(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # (B, T)
            acc["cos"][i] += (1 - cos)[state["mask"]].double().sum().cpu()
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i, layer.self_attn.o_proj)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(mlp_hook(i)))
        handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
    handles += [norm.register_forward_hook(norm_hook) for norm in _hidden_norms(model)]
    try:
        for b in batches:
            state["mask"] = b["attention_mask"].to(dev).bool()
            acc["tokens"] += int(state["mask"].sum())
            model.get_decoder()(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                                use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n = max(acc["tokens"], 1)
    return {"heads": (acc["heads"] / n).tolist(), "mlp": [(m / n).tolist() for m in acc["mlp"]],
            "hidden": (acc["hidden"] / n).tolist(), "cos": (acc["cos"] / n).tolist(), "tokens": acc["tokens"]}


# ---------------------------------------------------------------- layer removal


@torch.no_grad()
def _perplexity(model, batches: list[dict]) -> float:
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for b in batches:
        b = {k: v.to(dev) for k, v in b.items()}
        logits, targets = supervised_logits(model, b)  # (N, V), (N,)
        total += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        count += targets.numel()
    return math.exp(total / max(count, 1))


def _skip(module, args, kwargs, output):
    """Forward hook: the block passes its input through unchanged."""
    x_in = args[0] if args else kwargs["hidden_states"]
    return (x_in, *output[1:]) if isinstance(output, tuple) else x_in


@torch.no_grad()
def layer_ppl_increase(model, batches: list[dict]) -> tuple[float, list[float]]:
    """(base perplexity, perplexity increase with each block skipped in turn)."""
    base = _perplexity(model, batches)
    out = []
    for layer in _decoder_layers(model):
        handle = layer.register_forward_hook(_skip, with_kwargs=True)
        try:
            out.append(_perplexity(model, batches) - base)
        finally:
            handle.remove()
    return base, out


def compute_importance(model, data, *, pad_id: int, batch_size: int = 8, layer_ppl: bool = True) -> Importance:
    """Every score on calibration data (TokenizedData or a list of batches); the model is not changed.
    layer_ppl=False skips the L extra forward passes of the perplexity scores (ppl_increase is then [])."""
    was_training = model.training
    model.eval()
    try:
        batches = calibration_batches(data, pad_id=pad_id, batch_size=batch_size)
        act = _activation_scores(model, batches)
        base, increase = layer_ppl_increase(model, batches) if layer_ppl else (_perplexity(model, batches), [])
    finally:
        model.train(was_training)
    return Importance(heads=act["heads"], mlp=act["mlp"], hidden=act["hidden"], cosine_distance=act["cos"],
                      ppl_increase=increase, base_ppl=base, num_key_value_heads=model.config.num_key_value_heads,
                      tokens=act["tokens"])


def plot_layer_importance(imp: Importance, path: str | Path) -> Path:
    """Bar charts of both layer scores (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    L = len(imp.cosine_distance)
    panels = [("1 - cos(in, out)", imp.cosine_distance, "tab:orange")]
    if imp.ppl_increase:
        panels.insert(0, ("ppl increase\nwhen skipped", imp.ppl_increase, "tab:blue"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, L * 0.3), 2.5 * len(panels)), sharex=True, squeeze=False)
    for ax, (label, values, color) in zip(axes[:, 0], panels):
        ax.bar(range(L), values, color=color)
        ax.set_ylabel(label)
    axes[0, 0].set_title(f"layer importance (base ppl {imp.base_ppl:.2f}, {imp.tokens} calibration tokens)")
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
