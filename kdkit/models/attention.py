"""Causal self-attention for training on CPU in bf16: a GEMM backward, and a GEMM forward for short rows.

PyTorch's CPU flash-attention backward is twice as slow in bf16 as in fp32 (9.9 ms against 5.4 ms at the
quickstart's shape, 8 × 6 heads × 160 tokens × 64): it was a fifth of a quickstart training step. The
backward here recomputes the probabilities from the forward's log-sum-exp with five bf16 GEMMs (fp32
accumulation) over whole (T, T) tiles, which at training lengths fit in cache:

    P  = exp(scale · Q Kᵀ − lse)      (causal entries −inf, so 0)     dV = Pᵀ dO
    dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O))                                  dQ = scale · dS K,  dK = scale · dSᵀ Q

The query heads of a KV group are stacked along the rows (GQA without repeating K and V). Forward
and backward together: 4.6 ms against 11.6 (benchmarks/step_floor.py shows it in the step). Where P is
small (`KEEP_P_BYTES` a layer: training lengths) the forward computes it too, by an fp32 GEMM of the
scores (autocast switched off for it: it casts every baddbmm to bf16, which rounded the scores before the
softmax, 4x the flash kernel's error on peaked rows) and an fp32 softmax, and keeps it (in bf16) for the
backward, which then skips recomputing it:
1.1 ms against the flash kernel's 2.0 at the quickstart's shape. Longer rows take the flash kernel and
its log-sum-exp.

`train_attention(model)` registers it with transformers' AttentionInterface and switches a model to
it; it computes only where it is faster and exact in form: CPU, bf16 (autocast's dtype), gradients
wanted, no mask (kdkit hands right-padded batches to the decoder with none), causal, no dropout,
softcap, sliding window or position bias, as many queries as keys. Anything else, including every
no-grad forward (evaluation, generation), goes to transformers' own sdpa function unchanged.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "kdkit_cpu_sdpa"
_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


# The forward keeps P for the backward where P (in the inputs' dtype) takes at most this per layer: the
# quickstart's batches (8 × 6 heads × ~140 tokens) take ~2 MB. Longer sequences use the flash kernel.
KEEP_P_BYTES = 8 << 20


def _heads(x: torch.Tensor, b: int, g: int) -> torch.Tensor:
    """(B·H_kv, g·T, D) → (B, H, T, D), one dimension at a time. The same view as `x.view(b, h, t, d)`, but
    under torch.compile with dynamic shapes inductor then indexes it plainly: the one-step view left the
    rotary backward that reads dQ with a per-element modulo by the symbolic length and scalar gathers
    (0.85 ms a layer against 0.08 in a profiler trace of the quickstart's step)."""
    n, gt, d = x.shape
    hk, t = n // b, gt // g
    return x.view(b, hk, gt, d).view(b, hk, g, t, d).view(b, hk * g, t, d)


class CausalAttention(torch.autograd.Function):
    """softmax(scale · Q Kᵀ + causal) V for q (B, H, T, D), k and v (B, H_kv, T, D), H a multiple of H_kv."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        b, h, t, d = q.shape
        g, n = h // k.shape[1], b * k.shape[1]
        ctx.scale = scale
        if n * g * t * t * q.element_size() <= KEEP_P_BYTES:
            # Short sequences: the scores by one GEMM in fp32 (exact products of the bf16 inputs), the softmax
            # in fp32, then P in the inputs' dtype for P V and, kept, for the backward. At the quickstart's
            # shape this ran in 1.1 ms against the flash kernel's 2.0.
            acc = torch.promote_types(q.dtype, torch.float32)
            causal = torch.full((t, t), float("-inf"), dtype=acc, device=q.device).triu_(1)  # (T, T)
            with torch.autocast(q.device.type, enabled=False):  # autocast would round the scores to bf16
                scores = torch.baddbmm(causal.repeat(g, 1), q.reshape(n, g * t, d).to(acc),
                                       k.reshape(n, t, d).to(acc).transpose(1, 2), alpha=scale)  # (n, g·T, T)
            p = torch.softmax(scores, dim=-1).to(q.dtype)  # 0 above the diagonal
            out = _heads(torch.bmm(p, v.reshape(n, t, d)), b, g)
            ctx.save_for_backward(q, k, v, out, p)
            ctx.kept_p = True
            return out
        out, lse = _flash(q, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), 0.0, True,
                          scale=scale)  # (B, H, T, D), (B, H, T) fp32
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kept_p = False
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, p_or_lse = ctx.saved_tensors
        b, h, t, d = q.shape
        hk = k.shape[1]
        g, n, s = h // hk, b * hk, ctx.scale
        qg = q.reshape(n, g * t, d)  # the g query heads of each KV group, stacked along the rows
        dog = d_out.reshape(n, g * t, d)
        kk, vv = k.reshape(n, t, d), v.reshape(n, t, d)
        acc = torch.promote_types(q.dtype, torch.float32)  # fp32 (fp64 in the reference tests)
        delta = (d_out.to(acc) * out.to(acc)).sum(-1)  # (B, H, T): rowsum(dO ⊙ O)
        if ctx.kept_p:  # P, from the forward
            p = p_or_lse  # (n, g·T, T), read only (a second backward sees it unchanged)
        else:  # recomputed from the flash kernel's log-sum-exp
            causal = torch.full((t, t), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)  # (T, T)
            shift = (causal - p_or_lse.reshape(n, g, t, 1).to(q.dtype)).reshape(n, g * t, t)
            p = torch.baddbmm(shift, qg, kk.transpose(1, 2), alpha=s).exp_()  # (n, g·T, T): 0 above the diagonal
        dv = torch.bmm(p.transpose(1, 2), dog)  # (n, T, D)
        ds = torch.baddbmm(-delta.reshape(n, g * t, 1).to(q.dtype), dog, vv.transpose(1, 2)).mul_(p)  # P ⊙ (dP − δ)
        dq = _heads(torch.bmm(ds, kk).mul_(s), b, g)
        dk = torch.bmm(ds.transpose(1, 2), qg).mul_(s).view(b, hk, t, d)
        return dq, dk, dv.view(b, hk, t, d), None


def _fast_path(module, query, key, attention_mask, dropout, is_causal, kwargs) -> torch.dtype | None:
    """The dtype to compute in where CausalAttention applies to this call, else None."""
    if _flash is None or query.device.type != "cpu" or not torch.is_grad_enabled():
        return None
    if not (query.requires_grad or key.requires_grad):
        return None
    if attention_mask is not None or dropout or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return None
    if any(kwargs.get(name) is not None for name in ("softcap", "sliding_window", "position_bias", "s_aux")):
        return None
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    if dtype != torch.bfloat16 or query.shape[1] % key.shape[1]:
        return None
    return dtype


def cpu_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
             is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: q (B, H, T, D), k/v (B, H_kv, T, D) → ((B, T, H, D), None)."""
    dtype = _fast_path(module, query, key, attention_mask, dropout, is_causal, kwargs)
    if dtype is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = CausalAttention.apply(query.to(dtype), key.to(dtype), value.to(dtype), scale)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, cpu_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the masks sdpa gets (unregistered: no mask at all)


def train_attention(model) -> None:
    """Switch a model computing with transformers' sdpa to `cpu_sdpa` (same results within bf16 rounding, its
    backward ~2.5× faster on CPU); other attention implementations (eager, flash_attention_2, ...) are kept."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(NAME)
