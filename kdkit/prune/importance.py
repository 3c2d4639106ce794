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
the block is skipped (its output replaced by its input). The latter reruns only the blocks after the
skipped one, from a recorded forward, on a token budget (`ppl_tokens`): L²/2 block passes per token.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kdkit.data.collate import collate
from kdkit.data.render import IGNORE, TokenizedData
from kdkit.models.forward import project, supervised_positions


@dataclass
class Importance:
    heads: list[list[float]]  # (L, Hq) per query head
    mlp: list[list[float]]  # (L, I) per MLP neuron
    hidden: list[float]  # (H,) per embedding channel
    cosine_distance: list[float]  # (L,) mean 1 - cos(block input, block output)
    ppl_increase: list[float]  # (L,) ppl with the block skipped minus without, on the ppl_tokens examples ([]: none)
    base_ppl: float  # on every calibration example
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
    """TokenizedData → padded batches with labels, longest first (similar lengths share a batch, so little
    compute goes to padding; every score is a sum over tokens, so order does not matter). A list of
    batches passes through (labels added where missing: every real token is then a target)."""
    if isinstance(data, TokenizedData):
        order = sorted(range(len(data.input_ids)), key=lambda j: -len(data.input_ids[j]))
        ids, labels = [data.input_ids[j] for j in order], [data.labels[j] for j in order]
        return [collate(ids[i:i + batch_size], labels[i:i + batch_size], pad_id=pad_id)
                for i in range(0, len(ids), batch_size)]
    batches = []
    for b in data:
        b = dict(b)
        b.setdefault("attention_mask", torch.ones_like(b["input_ids"]))
        b.setdefault("labels", b["input_ids"].masked_fill(b["attention_mask"] == 0, IGNORE))
        batches.append(b)
    return batches


def first_tokens(data, budget: int):
    """The leading examples of `data` (TokenizedData or batches) holding about `budget` real tokens (at least
    one example): the per-layer perplexities cost L²/2 layer passes per token, so they get a budget."""
    if isinstance(data, TokenizedData):
        n, seen = 0, 0
        while n < len(data.input_ids) and (n == 0 or seen < budget):
            seen, n = seen + len(data.input_ids[n]), n + 1
        return dataclasses.replace(data, ids=data.ids[:n], input_ids=data.input_ids[:n], labels=data.labels[:n])
    out, seen = [], 0
    for b in data:
        if out and seen >= budget:
            break
        out.append(b)
        seen += int(b.get("attention_mask", torch.ones_like(b["input_ids"])).sum())
    return out


def _decoder_layers(model) -> torch.nn.ModuleList:
    return model.get_decoder().layers


def _hidden_norms(model) -> list[torch.nn.Module]:
    """RMSNorms over the hidden size (per-block and final), not per-head q/k norms."""
    H = model.config.hidden_size
    return [m for name, m in model.get_decoder().named_modules()
            if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None
            and m.weight.shape == (H,) and "self_attn" not in name]


# ---------------------------------------------------------------- activation scores


@torch.inference_mode()
def _activation_scores(model, batches: list[dict]) -> dict:
    layers, cfg = _decoder_layers(model), model.config
    L, H = len(layers), cfg.hidden_size
    Hq = cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or H // Hq
    dev = next(model.parameters()).device
    acc = {"heads": torch.zeros(L, Hq, dtype=torch.float64), "mlp": [None] * L,
           "hidden": torch.zeros(H, dtype=torch.float64), "cos": torch.zeros(L, dtype=torch.float64), "tokens": 0,
           "nll": 0.0, "targets": 0}
    state = {}  # the current batch's token mask (B, T), read by the hooks

    def head_hook(i, o_proj):
        def hook(module, args):
            heads = args[0][state["mask"]].view(-1, Hq, d).float()  # (N, Hq, d), real tokens only
            w = o_proj.weight.float().view(-1, Hq, d)  # (H, Hq, d)
            # ‖W_h x‖² = xᵀ (W_hᵀ W_h) x: d² instead of H·d multiply-adds per token and head
            gram = torch.einsum("ohd,ohe->hde", w, w)  # (Hq, d, d)
            sq = (torch.einsum("nhd,hde->nhe", heads, gram) * heads).sum(-1)  # (N, Hq)
            acc["heads"][i] += sq.clamp_min(0).sqrt().double().sum(0).cpu()
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
            out = model.get_decoder()(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                                      use_cache=False)
            acc["nll"] += _nll(model, out.last_hidden_state, b["labels"].to(dev))  # base ppl from the same pass
            acc["targets"] += int(supervised_positions(b["labels"])[0].sum())
    finally:
        for h in handles:
            h.remove()
    n = max(acc["tokens"], 1)
    return {"heads": (acc["heads"] / n).tolist(), "mlp": [(m / n).tolist() for m in acc["mlp"]],
            "hidden": (acc["hidden"] / n).tolist(), "cos": (acc["cos"] / n).tolist(), "tokens": acc["tokens"],
            "ppl": math.exp(acc["nll"] / max(acc["targets"], 1))}


# ---------------------------------------------------------------- layer removal


def _record_layers(model, batch: dict) -> tuple[list, torch.Tensor]:
    """One forward of the decoder; returns every layer's call (input hidden (B, T, H), other args, kwargs:
    masks, rotary embeddings…) and the final normed hidden states (B, T, H)."""
    calls = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        calls.append((x, args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in _decoder_layers(model)]
    try:
        out = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls, out.last_hidden_state


def _nll(model, hidden: torch.Tensor, labels: torch.Tensor) -> float:
    """Summed next-token NLL of the supervised positions, from final normed hidden states (B, T, H)."""
    mask, targets = supervised_positions(labels)  # (B, T-1), (N,)
    logits = project(model, hidden[:, :-1][mask])  # (N, V)
    return float(F.cross_entropy(logits.float(), targets, reduction="sum"))


def _skipped_hidden(model, calls: list, i: int) -> torch.Tensor:
    """Last block output (B, T, H) with block i skipped: block i+1 gets block i's recorded input, so the
    blocks before i are not recomputed."""
    layers, h = _decoder_layers(model), calls[i][0]
    for j in range(i + 1, len(layers)):
        _, args, kwargs = calls[j]
        out = layers[j](h, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out  # (B, T, H)
    return h


@torch.inference_mode()
def layer_ppl_increase(model, batches: list[dict]) -> tuple[float, list[float]]:
    """(base perplexity, perplexity increase with each block skipped in turn, its output replaced by its
    input). One recorded forward per batch; skipping block i reruns only blocks i+1 … L-1 from the recorded
    input of block i (L²/2 block passes, not L²)."""
    dev, L = next(model.parameters()).device, len(_decoder_layers(model))
    norm = model.get_decoder().norm
    base, skipped, count = 0.0, [0.0] * L, 0
    for b in batches:
        b = {k: v.to(dev) for k, v in b.items()}
        calls, final = _record_layers(model, b)
        base += _nll(model, final, b["labels"])
        for i in range(L):
            skipped[i] += _nll(model, norm(_skipped_hidden(model, calls, i)), b["labels"])
        count += int(supervised_positions(b["labels"])[0].sum())
    ppl = lambda nll: math.exp(nll / max(count, 1))  # noqa: E731
    return ppl(base), [ppl(s) - ppl(base) for s in skipped]


def compute_importance(model, data, *, pad_id: int, batch_size: int = 8, layer_ppl: bool = True,
                       ppl_tokens: int | None = None) -> Importance:
    """Every score on calibration data (TokenizedData or a list of batches); the model is not changed.
    One forward pass gives the activation scores and base_ppl on every example; layer_ppl=False skips the
    per-layer perplexities (ppl_increase is then []); ppl_tokens: computes those on the leading examples
    holding about that many tokens (None: all), as increases over the perplexity of the same examples."""
    was_training = model.training
    model.eval()
    try:
        act = _activation_scores(model, calibration_batches(data, pad_id=pad_id, batch_size=batch_size))
        increase = []
        if layer_ppl:
            few = first_tokens(data, ppl_tokens) if ppl_tokens else data
            increase = layer_ppl_increase(model, calibration_batches(few, pad_id=pad_id, batch_size=batch_size))[1]
    finally:
        model.train(was_training)
    return Importance(heads=act["heads"], mlp=act["mlp"], hidden=act["hidden"], cosine_distance=act["cos"],
                      ppl_increase=increase, base_ppl=act["ppl"], num_key_value_heads=model.config.num_key_value_heads,
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
