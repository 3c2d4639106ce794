"""Forward hooks that read a decoder's internals: hidden states and attention maps of chosen layers.

Hidden states are read at a layer's output ("pre": the residual stream before any norm) or at the
output of the norm that reads it ("post": the next layer's input norm, or the final norm). Attention
maps are never requested from the model (SDPA and flash kernels do not return them, and eager
attention on every layer is slow): for the chosen layers we record the q/k projections and the
rotary embeddings and attention mask the attention module is called with, and compute
softmax(q·kᵀ·scale + mask) for those layers only, in fp32.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from kdkit.errors import UserError


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder's layer stack of a causal LM."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise UserError(f"{type(model).__name__}: no decoder `layers` to hook; hidden/attention distillation "
                        "supports Llama-style decoders (Llama, Qwen2/3, Mistral, SmolLM2)")
    return layers


def _norm_after(model, index: int) -> torch.nn.Module:
    """The norm that reads layer `index`'s output: the next layer's input norm, or the final norm."""
    layers = decoder_layers(model)
    norm = getattr(layers[index + 1], "input_layernorm", None) if index + 1 < len(layers) \
        else getattr(model.get_decoder(), "norm", None)
    if norm is None:
        raise UserError(f"{type(model).__name__}: no norm after layer {index}; use features.hidden.position=pre")
    return norm


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class FeatureCapture:
    """Records hidden states and attention inputs of chosen layers, only while armed.

    `hidden[i]` (B, T, H) and `attention_probs(i)` (B, heads, T, T) are valid after a forward pass
    run while armed (`with capture.recording():` or `arm()`); tensors keep their autograd graph, so a
    loss on a student's captures trains the student. `remove()` takes the hooks off.
    """

    def __init__(self, model, *, hidden_layers=(), position: str = "pre", attention_layers=()):
        self.model = model
        self.armed = False
        self.hidden: dict[int, Tensor] = {}
        self.attn: dict[int, dict] = {}
        self._handles = []
        layers = decoder_layers(model)
        for i in sorted(set(hidden_layers) | set(attention_layers)):
            if not 0 <= i < len(layers):
                raise UserError(f"layer {i} does not exist in {type(model).__name__} ({len(layers)} layers, 0-based)")
        for i in sorted(set(hidden_layers)):
            module = layers[i] if position == "pre" else _norm_after(model, i)
            self._handles.append(module.register_forward_hook(self._hidden_hook(i)))
        for i in sorted(set(attention_layers)):
            self._hook_attention(i, layers[i])

    def _hidden_hook(self, i: int):
        def hook(module, args, output):
            if self.armed:
                self.hidden[i] = _first(output)  # (B, T, H)
        return hook

    def _hook_attention(self, i: int, layer) -> None:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "head_dim", "scaling")):
            raise UserError(f"layer {i} of {type(self.model).__name__} has no Llama-style self_attn "
                            "(q_proj, k_proj); attention distillation cannot read its maps")

        def inputs(module, args, kwargs):
            if self.armed:
                self.attn[i] = {"module": module, "position_embeddings": kwargs.get("position_embeddings"),
                                "attention_mask": kwargs.get("attention_mask")}

        def projection(name):
            def hook(module, args, output):
                if self.armed:
                    self.attn.setdefault(i, {})[name] = output  # (B, T, heads·head_dim)
            return hook

        self._handles += [attn.register_forward_pre_hook(inputs, with_kwargs=True),
                          attn.q_proj.register_forward_hook(projection("q")),
                          attn.k_proj.register_forward_hook(projection("k"))]

    def arm(self) -> None:
        """Record on the next forward passes (earlier captures are dropped)."""
        self.clear()
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    @contextmanager
    def recording(self):
        self.arm()
        try:
            yield self
        finally:
            self.disarm()

    def clear(self) -> None:
        self.hidden.clear()
        self.attn.clear()

    def attention_probs(self, i: int, *, max_seq_len: int | None = None) -> Tensor:
        """Attention probabilities (B, heads, T, T) of layer `i` from the last armed forward."""
        rec = self.attn.get(i)
        if not rec or "q" not in rec or rec.get("position_embeddings") is None:
            raise RuntimeError(f"no attention inputs captured for layer {i}: run a forward pass while armed")
        return attention_probs(rec["module"], rec["q"], rec["k"], rec["position_embeddings"],
                               rec["attention_mask"], max_seq_len=max_seq_len)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.disarm()
        self.clear()


def check_seq_len(batch: int, heads: int, seq_len: int, max_seq_len: int | None) -> None:
    """Attention maps cost B·heads·T² floats per layer: refuse sequences past the configured limit."""
    if max_seq_len is not None and seq_len > max_seq_len:
        gib = batch * heads * seq_len**2 * 4 / 2**30
        raise UserError(f"attention distillation: a batch of {seq_len} tokens is longer than "
                        f"features.attention.max_seq_len={max_seq_len} (its maps need {gib:.2f} GiB per layer "
                        "and model, O(T²)); lower data.max_length, pick fewer attention layers, or raise the limit")


def attention_probs(attn, q_out: Tensor, k_out: Tensor, position_embeddings, attention_mask,
                    *, max_seq_len: int | None = None) -> Tensor:
    """softmax(q·kᵀ·scale + mask) (B, heads, T, T) in fp32, as eager attention computes it.

    q_out (B, T, heads·d) and k_out (B, T, kv_heads·d) are the q/k projections' outputs;
    `attention_mask` is what the model passed the layer: None (causal, no padding: SDPA's fast
    path), a bool mask (B, 1, T, T) with True where a query may attend, or an additive float mask.
    """
    b, t, _ = q_out.shape
    d = attn.head_dim
    check_seq_len(b, q_out.shape[-1] // d, t, max_seq_len)
    with torch.autocast(q_out.device.type, enabled=False):  # the maps in fp32 even under bf16 autocast
        q = q_out.float().view(b, t, -1, d)  # (B, T, heads, d)
        k = k_out.float().view(b, t, -1, d)  # (B, T, kv_heads, d)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3/OLMo-style per-head norms before rotary
            q, k = attn.q_norm(q).float(), attn.k_norm(k).float()
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, T, d), (B, kv_heads, T, d)
        cos, sin = (x.float() for x in position_embeddings)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, q.shape[1] // k.shape[1])  # (B, heads, T, d): GQA groups share their KV head
        scores = q @ k.transpose(-1, -2) * attn.scaling  # (B, heads, T, T)
        cap = getattr(attn.config, "attn_logit_softcapping", None) if hasattr(attn, "config") else None
        if cap:
            scores = torch.tanh(scores / cap) * cap
        scores = _apply_mask(scores, attention_mask)
        return torch.softmax(scores, dim=-1)


def _apply_mask(scores: Tensor, mask) -> Tensor:
    """Causal + padding as the model masked; a query that may see nothing gets a uniform row (no NaN)."""
    t = scores.shape[-1]
    lowest = torch.finfo(scores.dtype).min
    if mask is None:
        allowed = torch.ones(t, t, dtype=torch.bool, device=scores.device).tril()  # (T, T)
        return scores.masked_fill(~allowed, lowest)
    mask = mask[..., :t, :t]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, lowest)
    return (scores + mask.float()).clamp_min(lowest)  # additive (0 or the dtype's min)
