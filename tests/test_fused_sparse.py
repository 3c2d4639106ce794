"""The fused loss against a top-k SparseSignal (kdkit/losses/fused_sparse.py), and its progress metrics.

Parity is with the dense sparse path (distill_loss on full logits and the same signal) to 1e-5 in
fp32, and with the fp64 bucket reference of tests/reference.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import reference as ref
from kdkit.losses import DIVERGENCES, distill_loss, forward_kl, fused_distill_loss, normalize, sparse_divergence
from kdkit.signal import DenseSignal, Provenance, SparseSignal
from test_fused import CASE_IDS, CASES, H, N, V, assert_parity, grads, leaves, make_problem

K = 7


def teacher_logits(n=N, seed=7):
    t = torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3
    t[:, -2:] = -math.inf  # padded vocabulary
    return t


def signal_from(t, k=K, *, capture=1.0, tail=True, short_rows=(2, 9)):
    """Top-k log-probs at `capture` (+ exact tail); rows in `short_rows` keep only 3 valid slots."""
    lp = torch.log_softmax(t.double() / capture, dim=-1)  # (N, V)
    top, ids = lp.topk(k, dim=-1)  # (N, k)
    rest = torch.logsumexp(lp.scatter(1, ids, -math.inf), dim=-1)  # (N,)
    top = top.clone()
    for r in short_rows:
        if r < t.shape[0]:
            rest[r] = torch.logsumexp(torch.cat([rest[r : r + 1], top[r, 3:]]), dim=0)  # moved into the tail
            top[r, 3:] = -math.inf  # a short top-k: invalid slots (their ids may repeat)
            ids[r, 3:] = ids[r, 0]
    return SparseSignal(ids, top.float(), rest.float() if tail else None, Provenance(temperature=capture, top_k=k))


def dense_sparse(p, signal, **opts):
    """The dense sparse path: full student logits, then distill_loss against the signal."""
    h, w, b = leaves(p)
    parts = distill_loss(h @ w.t() + b, signal, p["labels"], **opts)
    parts.total.backward()
    return parts, grads([h, w, b])


def fused_sparse(p, signal, **opts):
    h, w, b = leaves(p)
    parts = fused_distill_loss(h, w, p["labels"], student_bias=b, teacher_logits=signal, **opts)
    parts.total.backward()
    return parts, grads([h, w, b])


@pytest.mark.parametrize("chunk_size", [5, 64])  # 32 supervised rows: 5 leaves a short chunk
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_sparse_signal_matches_the_dense_sparse_path(name, kw, chunk_size):
    p, t = make_problem(), teacher_logits()
    signal = signal_from(t, capture=1.0)  # re-normalised from T_c = 1 to T = 2
    opts = dict(divergence=name, temperature=2.0, alpha=0.3, **kw)
    assert_parity(fused_sparse(p, signal, chunk_size=chunk_size, **opts), dense_sparse(p, signal, **opts))


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_sparse_signal_without_tail_and_pure_kd(name, kw):
    p, t = make_problem(), teacher_logits(seed=3)
    signal = signal_from(t, capture=0.5, tail=False)
    opts = dict(divergence=name, temperature=0.5, alpha=1.0, **kw)
    assert_parity(fused_sparse(p, signal, chunk_size=6, **opts), dense_sparse(p, signal, **opts))


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_sparse_value_matches_the_fp64_bucket_reference(name):
    p, t = make_problem(), teacher_logits()
    kw = {"beta": 0.3} if name == "jsd" else {"skew": 0.2} if name.startswith("skew") else {}
    signal = signal_from(t, capture=1.0, short_rows=())  # re-normalised to T = 2 (tail kept)
    with torch.no_grad():
        parts = fused_distill_loss(p["hidden"], p["weight"], p["labels"], student_bias=p["bias"],
                                   teacher_logits=signal, divergence=name, temperature=2.0, chunk_size=5, **kw)
    s = p["hidden"].double() @ p["weight"].double().t() + p["bias"].double()  # (N, V)
    per_row = ref.bucketed_divergence(name, s, t, K, temperature=2.0, capture_temperature=1.0, **kw)  # (N,)
    mask = p["labels"] != -100
    want = per_row[mask].sum() / mask.sum()
    torch.testing.assert_close(parts.kd.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("beta,kl_name", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_end_points_are_forward_and_reverse_kl(beta, kl_name):
    """Fused sparse jsd at β = 0 / 1 is the fused sparse forward / reverse KL, and equals the dense sparse path."""
    p, t = make_problem(), teacher_logits(seed=4)
    signal = signal_from(t, capture=1.0)
    opts = dict(temperature=2.0, alpha=0.6)
    got = fused_sparse(p, signal, divergence="jsd", beta=beta, chunk_size=6, **opts)
    assert got[0].kd > 1e-3
    assert_parity(got, fused_sparse(p, signal, divergence=kl_name, chunk_size=6, **opts), rtol=1e-6)
    assert_parity(got, dense_sparse(p, signal, divergence=kl_name, **opts))


def test_row_without_valid_slot_at_another_temperature_is_finite_and_all_tail():
    p, t = make_problem(), teacher_logits(seed=5)
    signal = signal_from(t, capture=1.0)
    lp = signal.logprobs.clone()
    lp[3] = -math.inf  # row 3 is supervised: no valid slot, its mass all in the tail
    tail = signal.tail.clone()
    tail[3] = 0.0
    empty = dataclasses.replace(signal, logprobs=lp, tail=tail)
    got = fused_sparse(p, empty, divergence="forward_kl", temperature=2.0, alpha=0.5, chunk_size=6)
    assert torch.isfinite(got[0].total) and all(torch.isfinite(g).all() for g in got[1])
    assert_parity(got, dense_sparse(p, empty, divergence="forward_kl", temperature=2.0, alpha=0.5))


def test_k_equal_v_equals_the_fused_dense_teacher():
    p, t = make_problem(), teacher_logits()
    opts = dict(divergence="jsd", beta=0.4, temperature=2.0, alpha=0.5, chunk_size=8)
    got = fused_sparse(p, signal_from(t, k=V, capture=2.0, short_rows=()), **opts)
    want = fused_sparse(p, DenseSignal(t), **opts)
    assert_parity(got, want, rtol=1e-4)


def test_compiled_sparse_step_matches_dense_sparse_path():
    p, t = make_problem(), teacher_logits()
    signal = signal_from(t)
    opts = dict(divergence="skew_reverse_kl", skew=0.3, temperature=2.0, alpha=0.5)
    # 32 supervised rows in chunks of 12: the last chunk is padded (labels -100, tail-only buckets)
    assert_parity(fused_sparse(p, signal, chunk_size=12, compiled=True, **opts), dense_sparse(p, signal, **opts))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_sparse_grad_accumulation_4x2_equals_1x8_and_all_masked_is_zero(alpha):
    p = make_problem(n=8)
    p["labels"][:] = torch.tensor([-100, 3, -100, -100, 7, 9, -100, 11])  # rows 2-3: a fully masked micro-batch
    signal = signal_from(teacher_logits(n=8), short_rows=(4,))
    opts = dict(divergence="jsd", temperature=2.0, alpha=alpha, num_tokens=4, chunk_size=3)
    full_parts, full_grads = fused_sparse(p, signal, **opts)
    h, w, b = leaves(p)
    summed = 0.0
    for rows in torch.arange(8).split(2):
        part = SparseSignal(signal.ids[rows], signal.logprobs[rows], signal.tail[rows], signal.provenance)
        parts = fused_distill_loss(h[rows], w, p["labels"][rows], student_bias=b, teacher_logits=part, **opts)
        parts.total.backward()
        summed = summed + parts.total.detach()
        if rows[0] == 2:
            assert parts.total.item() == 0.0
    assert full_parts.total.item() > 0
    torch.testing.assert_close(summed, full_parts.total, rtol=1e-6, atol=1e-7)
    for a, b_ in zip(grads([h, w, b]), full_grads):
        torch.testing.assert_close(a, b_, rtol=1e-6, atol=1e-7)


def test_sparse_ids_outside_the_vocabulary_raise():
    p = make_problem()
    signal = signal_from(teacher_logits())
    signal.ids[0, 0] = V + 5
    with pytest.raises(ValueError, match="ids"):
        fused_sparse(p, signal)
    with pytest.raises(ValueError, match="rows"):
        fused_sparse(make_problem(n=N - 1), signal_from(teacher_logits()))


def _expected_metrics(p, teacher):
    """KL(teacher ‖ student) at T = 1 over supervised rows / their count, and the top-1 agreement count."""
    s = p["hidden"] @ p["weight"].t() + p["bias"]  # (N, V)
    mask = p["labels"] != -100
    if isinstance(teacher, SparseSignal):
        kl_rows, top = sparse_divergence("forward_kl", s, teacher), teacher.ids[:, 0]
    else:
        kl_rows, top = forward_kl(s, teacher), teacher.argmax(-1)
    return normalize(kl_rows[mask].sum(), mask.sum()), ((s.argmax(-1) == top) & mask).sum().float()


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("name,temperature", [("forward_kl", 1.0), ("jsd", 2.0), ("tvd", 1.0)])
def test_metrics_are_kl_at_t1_and_top1_agreement(name, temperature, sparse):
    p = make_problem()
    t = p["hidden"] @ p["weight"].t() + p["bias"] + teacher_logits()  # (N, V): agrees on some rows
    teacher = signal_from(t) if sparse else t
    for compiled in (False, True) if name == "jsd" else (False,):
        parts, _ = fused_sparse(p, teacher, divergence=name, temperature=temperature, alpha=0.5, chunk_size=6,
                                metrics=True, compiled=compiled)
        kl, top1 = _expected_metrics(p, teacher)
        torch.testing.assert_close(parts.kl, kl, rtol=1e-5, atol=1e-7)
        assert parts.top1.item() == top1.item() > 0
    assert fused_sparse(p, teacher, divergence=name, chunk_size=6)[0].kl is None  # off by default


@pytest.mark.parametrize("sparse", [False, True])
def test_signal_token_weights_match_the_dense_path(sparse):
    p, t = make_problem(), torch.randn(N, V, generator=torch.Generator().manual_seed(4)) * 3
    w = torch.rand(N, generator=torch.Generator().manual_seed(5)) * 2
    w[[0, 3, 7]] = 0.0  # dropped tokens
    t[3, :50] = -math.inf  # an inf divergence on a weight-0 row must not reach the loss
    signal = signal_from(t, capture=1.0) if sparse else DenseSignal(t)
    signal.weight = w
    opts = dict(divergence="reverse_kl", temperature=2.0, alpha=0.4)
    got, want = fused_sparse(p, signal, chunk_size=5, **opts), dense_sparse(p, signal, **opts)
    unweighted = fused_sparse(p, dataclasses.replace(signal, weight=None), **opts)[0]
    assert torch.isfinite(got[0].total) and got[0].kd != unweighted.kd  # the weights matter
    assert_parity(got, want)


def test_training_loop_falls_back_to_dense_with_a_logged_reason_only_where_fused_cannot_apply(caplog):
    from types import SimpleNamespace

    from kdkit.train.loop import use_fused

    class Student(torch.nn.Module):
        def __init__(self, cap=None):
            super().__init__()
            self.config, self.head = SimpleNamespace(final_logit_softcapping=cap), torch.nn.Linear(H, V)

        def get_output_embeddings(self):
            return self.head

    lc = SimpleNamespace(implementation="fused", divergence="forward_kl")
    dense, sparse = DenseSignal(teacher_logits()), signal_from(teacher_logits())
    assert use_fused(lc, Student(), dense, vocab=V) and use_fused(lc, Student(), sparse, vocab=V)
    with caplog.at_level("WARNING"):
        assert not use_fused(lc, Student(cap=30.0), dense, vocab=V)
        assert not use_fused(SimpleNamespace(implementation="fused", divergence="uld"), Student(), dense, vocab=V)
        assert not use_fused(lc, Student(), DenseSignal(teacher_logits()[:, :50]), vocab=V)
    assert "softcapping" in caplog.text and "uld" in caplog.text and "columns" in caplog.text
    assert not use_fused(SimpleNamespace(implementation="dense", divergence="forward_kl"), Student(), dense)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_bf16_matmuls_against_a_sparse_signal_match_fp32_dense(name):
    from test_fused import assert_bf16_parity

    p, t = make_problem(), teacher_logits()
    signal = signal_from(t, capture=1.0)
    kw = {"beta": 0.5} if name == "jsd" else {"skew": 0.1} if name.startswith("skew") else {}
    opts = dict(divergence=name, temperature=2.0, alpha=0.5, **kw)
    fp32 = fused_sparse(p, signal, chunk_size=8, **opts)
    assert_bf16_parity(fused_sparse(p, signal, chunk_size=8, matmul_dtype=torch.bfloat16, **opts),
                       dense_sparse(p, signal, **opts), fp32)


def test_student_tail_far_below_its_top_k_keeps_its_gradient():
    """A student equal to its teacher whose top k hold all but ~1e-13 of the mass: the gradient on the
    tail, q_v − p_v, must stay ~0 relative to q_v. R taken as S − Σ top would be rounding noise here
    (fp32 or fp64) and send the tail a gradient of the order of q_v itself."""
    g = torch.Generator().manual_seed(3)
    n = 16
    t = torch.randn(n, V, generator=g)
    top = torch.randperm(V, generator=g)[:K]
    t[:, top] += 40.0  # (n, V) the top k dominate every row
    signal = signal_from(t, short_rows=())
    h = torch.eye(n).requires_grad_(True)  # logits = h @ w.T = t: grad_w[v, i] = d loss / d z[i, v]
    w = t.t().contiguous().requires_grad_(True)
    labels = torch.randint(0, V, (n,), generator=g)
    parts = fused_distill_loss(h, w, labels, teacher_logits=signal, divergence="forward_kl", alpha=1.0, chunk_size=8)
    parts.total.backward()
    grad = w.grad.t().double()  # (n, V) d loss / d z
    q = torch.softmax(t.double(), dim=-1) / n  # the scale of each entry's gradient
    tail = torch.ones(V, dtype=torch.bool)
    tail[top] = False
    assert (grad[:, tail].abs() <= 1e-3 * q[:, tail]).all()
    assert parts.kd.abs() < 1e-6
