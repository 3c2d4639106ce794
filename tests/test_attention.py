"""The CPU training attention (kdkit.models.attention) against an fp64 reference, and where it applies."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from kdkit.models import attention as A
from kdkit.models.tiny import tiny_llama


def qkv(dtype, *, b=2, h=4, hk=2, t=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # transformers hands (B, T, H, D) projections transposed to (B, H, T, D): non-contiguous views
    q = torch.randn(b, t, h, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    k = torch.randn(b, t, hk, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    v = torch.randn(b, t, hk, d, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
    return [x.requires_grad_() for x in (q, k, v)]


def reference(q, k, v, scale):
    """Causal attention in fp64 by the textbook formula, GQA by repeating K and V."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ k.transpose(-1, -2) * scale
    t = q.shape[2]
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


def grads(fn, q, k, v, d_out):
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v)
    out.backward(d_out.to(out.dtype))
    return out.detach().double(), [x.grad.double() for x in (q, k, v)]


@pytest.mark.parametrize("keep_p", [True, False], ids=["gemm-forward", "flash-forward"])
@pytest.mark.parametrize("h,hk", [(4, 2), (3, 3), (6, 1)])
def test_causal_attention_value_and_gradients_match_fp64_reference(h, hk, keep_p, monkeypatch):
    """Both forwards (short sequences: GEMMs, P kept for the backward; longer: the flash kernel, P recomputed
    from its log-sum-exp) and the backward equal the textbook formula."""
    monkeypatch.setattr(A, "KEEP_P_BYTES", A.KEEP_P_BYTES if keep_p else 0)
    q, k, v = qkv(torch.float64, h=h, hk=hk)
    d_out = torch.randn(2, h, 7, 8, dtype=torch.float64)
    out, g = grads(lambda *x: A.CausalAttention.apply(*x, 0.3), q, k, v, d_out)
    ref, g_ref = grads(lambda *x: reference(*x, 0.3), q, k, v, d_out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("keep_p", [True, False], ids=["gemm-forward", "flash-forward"])
def test_bf16_gradients_within_bf16_rounding_of_fp64_and_as_close_as_pytorchs_kernel(keep_p, monkeypatch):
    monkeypatch.setattr(A, "KEEP_P_BYTES", A.KEEP_P_BYTES if keep_p else 0)
    q, k, v = qkv(torch.bfloat16, b=4, h=6, hk=3, t=40, d=16)
    d_out = torch.randn(4, 6, 40, 16, dtype=torch.float64)
    out, g = grads(lambda *x: A.CausalAttention.apply(*x, 0.25), q, k, v, d_out)
    out_torch, g_torch = grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=0.25,
                                                                              enable_gqa=True), q, k, v, d_out)
    ref, g_ref = grads(lambda *x: reference(*x, 0.25), q, k, v, d_out)
    err, err_torch = ((out - ref).norm() / ref.norm()).item(), ((out_torch - ref).norm() / ref.norm()).item()
    assert err < 2 * err_torch + 1e-4, (err, err_torch)  # the output's own bf16 rounding dominates both
    for a, t, r in zip(g, g_torch, g_ref):
        err, err_torch = ((a - r).norm() / r.norm()).item(), ((t - r).norm() / r.norm()).item()
        assert err < 2e-2 and err < 4 * err_torch + 1e-3, (err, err_torch)


def test_under_autocast_the_scores_stay_fp32_peaked_attention_as_close_as_pytorchs_kernel():
    """Training runs under bf16 autocast, which casts every baddbmm to bf16: the GEMM forward's scores must
    not be rounded to bf16 before the softmax. With peaked attention (large scores) that rounding gave 4-5x
    the error of PyTorch's flash kernel; with fp32 scores the output is within bf16 rounding of fp64."""
    q, k, v = qkv(torch.bfloat16, b=4, h=6, hk=3, t=40, d=16)
    q = (q.detach().double() * 8).to(torch.bfloat16)  # scores of std ~8: peaked rows
    ref = reference(q, k, v, 0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = A.CausalAttention.apply(q, k.detach(), v.detach(), 0.25).double()
    out_torch = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True).double()
    err, err_torch = ((out - ref).norm() / ref.norm()).item(), ((out_torch - ref).norm() / ref.norm()).item()
    assert err < 2 * err_torch + 1e-4, (err, err_torch)


def tiny():
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    return model.train()


def loss_and_grads(model, ids, mask=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    hidden.float().pow(2).mean().backward()
    return hidden.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_train_attention_takes_the_fast_path_in_bf16_training_only(monkeypatch, tmp_path):
    model, ids = tiny(), torch.randint(4, 64, (3, 12))
    h_sdpa, g_sdpa = loss_and_grads(model, ids)
    A.train_attention(model)
    assert model.config._attn_implementation == A.NAME
    calls = []
    real = A.CausalAttention.apply
    monkeypatch.setattr(A.CausalAttention, "apply", lambda *a: calls.append(1) or real(*a))
    h_fast, g_fast = loss_and_grads(model, ids)
    assert len(calls) == 2  # one per layer
    # short rows: the GEMM forward, within bf16 rounding of sdpa's kernel (P is rounded to bf16 for P V)
    assert ((h_fast - h_sdpa).norm() / h_sdpa.norm()).item() < 1e-2
    for name, grad in g_sdpa.items():
        assert ((g_fast[name] - grad).norm() / grad.norm()).item() < 3e-2, name
    monkeypatch.setattr(A, "KEEP_P_BYTES", 0)  # longer rows: PyTorch's flash kernel, sdpa's own forward
    h_flash, g_flash = loss_and_grads(model, ids)
    torch.testing.assert_close(h_flash, h_sdpa)
    for name, grad in g_sdpa.items():
        assert ((g_flash[name] - grad).norm() / grad.norm()).item() < 3e-2, name
    calls.clear()
    with torch.no_grad():  # evaluation, generation: transformers' sdpa
        model(ids)
    padded = torch.ones_like(ids)
    padded[0, -3:] = 0
    loss_and_grads(model, ids, mask=padded)  # a padding mask: transformers' sdpa
    model.zero_grad()
    model.model(input_ids=ids).last_hidden_state.sum().backward()  # fp32: transformers' sdpa
    assert calls == []
    model.save_pretrained(tmp_path)  # the saved config names no kdkit attention
    assert A.NAME not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
