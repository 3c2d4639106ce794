"""Divergences on top-k SparseSignals (kdkit/losses/sparse.py): k = V equals dense, the tail bucket
against a naive fp64 reference, temperature re-normalisation, -inf slots, no NaN."""

from __future__ import annotations

import math

import pytest
import torch

import reference as ref
from kdkit.losses import DIVERGENCES, distill_loss, sparse_distill_loss, sparse_divergence
from kdkit.signal import Provenance, SparseSignal

INF = math.inf
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}),
    ("skew_forward_kl", {"skew": 0.1}),
    ("skew_reverse_kl", {"skew": 0.1}),
    ("tvd", {}),
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in CASES]


def make_logits(n=6, v=29, *, scale=3.0, seed=0, teacher_zeros=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * scale
    t = torch.randn(n, v, generator=g) * scale
    s[:, -3:] = -INF  # padded vocabulary in both
    t[:, -3:] = -INF
    if teacher_zeros:
        t[0, 2] = t[3, 5] = -INF
    return s, t


def signal_from(t, k, *, temperature=1.0):
    """The SparseSignal a cache would hold: top-k log-probs at `temperature` and the exact tail (fp64)."""
    lp = torch.log_softmax(t.double() / temperature, dim=-1)  # (N, V)
    top, ids = lp.topk(k, dim=-1)  # (N, k), sorted
    rest = lp.scatter(1, ids, -INF)  # (N, V)
    tail = torch.logsumexp(rest, dim=-1)  # (N,)
    return SparseSignal(ids, top.float(), tail.float(), Provenance(temperature=temperature, top_k=k))


def grads_of(fn, s, weights):
    s = s.detach().clone().requires_grad_(True)
    values = fn(s)
    (torch.where(torch.isfinite(values), values, 0.0) * weights.to(values.dtype)).sum().backward()
    return values.detach(), s.grad


WEIGHTS = torch.rand(6, generator=torch.Generator().manual_seed(1)) + 0.5


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_k_equal_v_is_the_dense_divergence(name, kw, temperature):
    s, t = make_logits(teacher_zeros=name != "reverse_kl")
    signal = signal_from(t, t.shape[1], temperature=temperature)
    dense = DIVERGENCES[name]
    got, g_got = grads_of(lambda x: sparse_divergence(name, x, signal, temperature=temperature, **kw), s, WEIGHTS)
    want, g_want = grads_of(lambda x: dense(x, t, temperature=temperature, **kw), s, WEIGHTS)
    assert not torch.isnan(got).any() and not torch.isnan(g_got).any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_k_equal_v_objective_equals_dense_objective(alpha):
    s, t = make_logits()
    labels = torch.tensor([1, -100, 4, 7, -100, 0])
    signal = signal_from(t, t.shape[1], temperature=2.0)
    sv = s.clone().requires_grad_(True)
    dv = s.clone().requires_grad_(True)
    a = sparse_distill_loss(sv, signal, labels, divergence="jsd", beta=0.3, temperature=2.0, alpha=alpha, num_tokens=9)
    b = distill_loss(dv, t, labels, divergence="jsd", beta=0.3, temperature=2.0, alpha=alpha, num_tokens=9)
    a.total.backward()
    b.total.backward()
    torch.testing.assert_close(a.total, b.total)
    torch.testing.assert_close(sv.grad, dv.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("k", [1, 4, 12])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_tail_bucket_matches_fp64_reference(name, kw, temperature, k):
    s, t = make_logits(seed=k)
    signal = signal_from(t, k, temperature=temperature)
    got, g_got = grads_of(lambda x: sparse_divergence(name, x, signal, temperature=temperature, **kw), s, WEIGHTS)
    want, g_want = grads_of(
        lambda x: ref.bucketed_divergence(name, x, t.double(), k, temperature, **kw), s.double(), WEIGHTS
    )
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert want.abs().min() > 1e-6
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("k", [5, 29])
@pytest.mark.parametrize("beta,kl_name", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_end_points_are_forward_and_reverse_kl(beta, kl_name, k):
    """On the k + 1 buckets (re-normalised from T_c = 1 to T = 2), jsd at β = 0 / 1 is the bucketed KL."""
    s, t = make_logits(seed=11)
    signal = signal_from(t, k, temperature=1.0)
    got, g_got = grads_of(lambda x: sparse_divergence("jsd", x, signal, temperature=2.0, beta=beta), s, WEIGHTS)
    kl, g_kl = grads_of(lambda x: sparse_divergence(kl_name, x, signal, temperature=2.0), s, WEIGHTS)
    assert got.abs().min() > 1e-3 and torch.isfinite(got).all()
    assert torch.equal(got, kl) and torch.equal(g_got, g_kl)
    want = ref.bucketed_divergence("jsd", s.double(), t.double(), k, 2.0, capture_temperature=1.0, beta=beta)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_tail_bucket_is_at_most_the_dense_divergence():
    s, t = make_logits(seed=3)
    dense = DIVERGENCES["forward_kl"](s, t)
    for k in (1, 5, 26):
        sparse = sparse_divergence("forward_kl", s, signal_from(t, k))
        assert (sparse <= dense + 1e-5).all()  # data processing: coarsening never adds divergence


@pytest.mark.parametrize("t_c,t", [(1.0, 2.0), (2.0, 0.5), (1.0, 4.0)])
def test_temperature_renormalisation_exact_for_k_equal_v(t_c, t):
    s, teacher = make_logits(seed=4)
    signal = signal_from(teacher, teacher.shape[1], temperature=t_c)  # captured at T_c
    got = sparse_divergence("forward_kl", s, signal, temperature=t)
    want = DIVERGENCES["forward_kl"](s, teacher, temperature=t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t_c,t", [(1.0, 2.0), (2.0, 0.5)])
@pytest.mark.parametrize("name,kw", CASES[:3], ids=CASE_IDS[:3])
def test_temperature_renormalisation_with_tail_matches_reference(name, kw, t_c, t):
    s, teacher = make_logits(seed=5)
    signal = signal_from(teacher, 6, temperature=t_c)
    got = sparse_divergence(name, s, signal, temperature=t, **kw)
    want = ref.bucketed_divergence(name, s.double(), teacher.double(), 6, t, capture_temperature=t_c, **kw)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    # capture_temperature= overrides the provenance
    again = sparse_divergence(name, s, SparseSignal(signal.ids, signal.logprobs, signal.tail), temperature=t,
                              capture_temperature=t_c, **kw)
    torch.testing.assert_close(again, got)


def test_missing_tail_is_derived_from_the_top_k():
    s, t = make_logits(seed=6)
    signal = signal_from(t, 5)
    no_tail = SparseSignal(signal.ids, signal.logprobs, None, signal.provenance)
    for name, kw in CASES:
        torch.testing.assert_close(sparse_divergence(name, s, no_tail, **kw), sparse_divergence(name, s, signal, **kw),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_invalid_slots_are_ignored_without_nan(name, kw):
    """Slots of -inf (short top-k padded with id 0) give the same value as the shorter signal."""
    s, t = make_logits(seed=7)
    short = signal_from(t, 4)
    ids = torch.cat([short.ids, torch.zeros(6, 3, dtype=torch.long)], dim=1)  # id 0 may repeat a real id
    lp = torch.cat([short.logprobs, torch.full((6, 3), -INF)], dim=1)
    padded = SparseSignal(ids, lp, short.tail, short.provenance)
    got, g_got = grads_of(lambda x: sparse_divergence(name, x, padded, **kw), s, WEIGHTS)
    want, g_want = grads_of(lambda x: sparse_divergence(name, x, short, **kw), s, WEIGHTS)
    assert not torch.isnan(g_got).any()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_tail_log_prob_at_or_above_zero_is_read_as_log_one(name, kw):
    """A tail log-prob a hair above 0 (rounding) at T ≠ T_c: finite, as a tail of exactly log 1 (all mass there)."""
    s, t = make_logits(seed=12)
    signal = signal_from(t, 4)
    over = signal.tail.clone()
    over[2] = 1e-3  # 1 − p(tail) < 0: its log was NaN
    exact = over.clone()
    exact[2] = 0.0
    got, g_got = grads_of(lambda x: sparse_divergence(name, x, SparseSignal(signal.ids, signal.logprobs, over,
                                                                            signal.provenance), temperature=2.0, **kw), s, WEIGHTS)
    want, g_want = grads_of(lambda x: sparse_divergence(name, x, SparseSignal(signal.ids, signal.logprobs, exact,
                                                                              signal.provenance), temperature=2.0, **kw), s, WEIGHTS)
    assert not torch.isnan(got).any() and not torch.isnan(g_got).any()
    assert torch.equal(got, want) and torch.equal(g_got, g_want)
    if name == "forward_kl":  # the teacher is all tail: KL = −log p_S(tail) at T = 2
        lp = torch.log_softmax(s[2] / 2.0, dim=-1)
        tail_s = torch.logsumexp(lp[[j for j in range(s.shape[1]) if j not in set(signal.ids[2].tolist())]], dim=0)
        torch.testing.assert_close(got[2], -tail_s)


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("tail", [True, False])
def test_row_without_valid_slot_is_all_tail_at_every_temperature(name, kw, tail):
    """A row whose slots are all -inf, at T ≠ T_c: 0 (all tail on both sides), finite grads, other rows untouched."""
    s, t = make_logits(seed=13)
    signal = signal_from(t, 4)
    lp = signal.logprobs.clone()
    lp[1] = -INF
    tails = signal.tail.clone()
    tails[1] = 0.0
    empty = SparseSignal(signal.ids, lp, tails if tail else None, signal.provenance)
    for temperature in (1.0, 2.0):  # T = T_c worked before; T ≠ T_c gave NaN
        got, g_got = grads_of(lambda x: sparse_divergence(name, x, empty, temperature=temperature, **kw), s, WEIGHTS)
        full = sparse_divergence(name, s, signal, temperature=temperature, **kw)
        assert not torch.isnan(got).any() and not torch.isnan(g_got).any()
        assert got[1].abs() < 1e-6 and g_got[1].abs().max() < 1e-6  # (jsd's log mixture rounds to ~1e-8)
        rows = [0, 2, 3, 4, 5]
        torch.testing.assert_close(got[rows], full[rows])


def test_student_minus_inf_at_a_teacher_id_is_inf_without_nan_gradient():
    s, t = make_logits(seed=8)
    signal = signal_from(t, 4)
    s[1, signal.ids[1, 0]] = -INF
    s = s.requires_grad_(True)
    values = sparse_divergence("forward_kl", s, signal)
    assert values[1] == INF and torch.isfinite(values[[0, 2, 3, 4, 5]]).all()
    torch.where(torch.isfinite(values), values, 0.0).sum().backward()
    assert torch.isfinite(s.grad).all() and (s.grad[1] == 0).all()


def test_all_masked_gives_zero_and_zero_grads_and_bf16_runs():
    s, t = make_logits(seed=9)
    signal = signal_from(t, 5)
    x = s.clone().requires_grad_(True)
    parts = sparse_distill_loss(x, signal, torch.full((6,), -100), divergence="tvd", alpha=0.5)
    parts.total.backward()
    assert parts.total == 0 and (x.grad == 0).all()
    bf = sparse_distill_loss(s.bfloat16(), signal, torch.arange(6), divergence="forward_kl", temperature=2.0)
    assert torch.isfinite(bf.total) and bf.total.dtype == torch.float32


def test_bad_inputs():
    s, t = make_logits()
    signal = signal_from(t, 3)
    with pytest.raises(ValueError, match="N = 6"):
        sparse_divergence("forward_kl", s[:4], signal)
    with pytest.raises(ValueError, match="vocabulary"):
        sparse_divergence("forward_kl", s[:, :5], signal)
    with pytest.raises(TypeError):
        sparse_distill_loss(s, t, torch.arange(6))
    with pytest.raises(ValueError, match="SparseSignal"):
        distill_loss(s, t, torch.arange(6), capture_temperature=1.0)
