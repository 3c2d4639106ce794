"""kdkit.losses against the naive fp64 reference (tests/reference.py), plus edge cases and invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import reference as ref
from kdkit.losses import DIVERGENCES, distill_loss, forward_kl, jsd, masked_sum, normalize, reverse_kl, token_mean
from kdkit.signal import DenseSignal

INF = math.inf
TEMPERATURES = [0.5, 1.0, 2.0, 4.0]
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}),
    ("skew_forward_kl", {"skew": 0.1}),
    ("skew_forward_kl", {"skew": 0.5}),
    ("skew_reverse_kl", {"skew": 0.1}),
    ("skew_reverse_kl", {"skew": 0.5}),
    ("tvd", {}),
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in CASES]
# reverse KL is +inf where the teacher has probability 0 and the student does not.
FINITE_WITH_TEACHER_ZEROS = set(DIVERGENCES) - {"reverse_kl"}


def make_logits(n=7, v=33, *, scale=3.0, seed=0, teacher_zeros=True, dtype=torch.float32):
    """Random student/teacher logits (N, V) with a padded vocab (-inf in both) and optional teacher-only -inf."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * scale
    t = torch.randn(n, v, generator=g) * scale
    s[:, -3:] = -INF  # padded vocabulary: the same columns in both
    t[:, -3:] = -INF
    if teacher_zeros:
        t[0, 2] = t[3, 5] = t[3, 6] = -INF
    return s.to(dtype), t.to(dtype)


def value_and_grads(fn, s, t, weights, **kw):
    """fn's (N,) values and the grads of Σ weights·values w.r.t. both logits."""
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(True)
    values = fn(s, t, **kw)
    (values * weights.to(values.dtype)).sum().backward()
    return values.detach(), s.grad, t.grad


def assert_no_nan(*tensors):
    for x in tensors:
        assert not torch.isnan(x).any(), x


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_divergence_matches_fp64_reference(name, kw, temperature):
    s, t = make_logits(teacher_zeros=name in FINITE_WITH_TEACHER_ZEROS)
    weights = torch.rand(s.shape[0], generator=torch.Generator().manual_seed(1)) + 0.5
    got, gs, gt = value_and_grads(DIVERGENCES[name], s, t, weights, temperature=temperature, **kw)
    want, ws, wt = value_and_grads(ref.DIVERGENCES[name], s.double(), t.double(), weights, temperature=temperature, **kw)
    assert got.dtype == torch.float32 and got.shape == (s.shape[0],)
    assert_no_nan(got, gs, gt)
    assert torch.isfinite(got).all()
    assert want.abs().min() > 1e-3  # a real signal, not a comparison of zeros
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    # Gradients: 1e-5 relative to the largest entry. Entry by entry is beyond fp32: at T = 0.5 the
    # logits/T reach ~20, whose ulp (2e-6) already bounds each log-prob's absolute accuracy.
    torch.testing.assert_close(gs.double(), ws, rtol=1e-5, atol=1e-5 * ws.abs().max().item())
    torch.testing.assert_close(gt.double(), wt, rtol=1e-5, atol=1e-5 * wt.abs().max().item())
    assert (gs[:, -3:] == 0).all() and (gt[:, -3:] == 0).all()  # padded vocab gets no gradient


@pytest.mark.parametrize("name,t_zero", [("forward_kl", False), ("reverse_kl", True)])
def test_kl_is_inf_off_support_and_that_row_has_no_gradient(name, t_zero):
    s, t = make_logits(teacher_zeros=False)
    (t if t_zero else s)[2, 4] = -INF  # the other side keeps probability there
    values, gs, gt = value_and_grads(DIVERGENCES[name], s, t, torch.ones(s.shape[0]))
    others = torch.arange(7) != 2
    assert values[2] == INF and torch.isfinite(values[others]).all()
    assert_no_nan(gs, gt)
    assert (gs[2] == 0).all() and (gt[2] == 0).all() and (gs[others] != 0).any()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_identical_distributions_give_zero(name, kw, temperature):
    _, t = make_logits()
    s = t + 5.0  # a row-wise shift: the same distribution, but different logits
    values, gs, _ = value_and_grads(DIVERGENCES[name], s, t, torch.ones(t.shape[0]), temperature=temperature, **kw)
    assert values.abs().max() < 1e-6
    assert_no_nan(gs)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_all_masked_gives_zero_loss_and_zero_grads(name, alpha):
    s, t = make_logits()  # teacher zeros: reverse_kl rows are +inf, and must not leak
    s.requires_grad_(True)
    labels = torch.full((s.shape[0],), -100)
    parts = distill_loss(s, t, labels, divergence=name, alpha=alpha, temperature=2.0)
    parts.total.backward()
    assert parts.total.item() == 0.0 and parts.kd.item() == 0.0 and parts.ce.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_jsd_tends_to_scaled_kls_at_the_ends():
    # Mild logits: the limit is approached at a rate set by χ²(p_T ‖ p_S), huge for heavy tails.
    s, t = make_logits(scale=1.0, teacher_zeros=False)
    eps = 1e-4
    torch.testing.assert_close(jsd(s, t, beta=eps) / eps, forward_kl(s, t), rtol=1e-2, atol=0)
    torch.testing.assert_close(jsd(s, t, beta=1 - eps) / eps, reverse_kl(s, t), rtol=1e-2, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta,kl_name", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_end_points_are_forward_and_reverse_kl(beta, kl_name, temperature):
    # β = 0 → KL(p_T ‖ p_S), β = 1 → KL(p_S ‖ p_T) (TRL's convention), value and gradient, and the
    # fp64 reference agrees. Teacher zeros at β = 0 (forward KL stays finite there).
    s, t = make_logits(teacher_zeros=beta == 0.0)
    weights = torch.rand(s.shape[0], generator=torch.Generator().manual_seed(2)) + 0.5
    got, gs, gt = value_and_grads(jsd, s, t, weights, beta=beta, temperature=temperature)
    kl, ks, kt = value_and_grads(DIVERGENCES[kl_name], s, t, weights, temperature=temperature)
    assert got.abs().min() > 1e-3  # not the old exact zeros
    assert torch.equal(got, kl) and torch.equal(gs, ks) and torch.equal(gt, kt)
    want, ws, wt = value_and_grads(ref.DIVERGENCES[kl_name], s.double(), t.double(), weights, temperature=temperature)
    ref_jsd, rs, rt = value_and_grads(ref.jsd, s.double(), t.double(), weights, beta=beta, temperature=temperature)
    assert torch.equal(ref_jsd, want) and torch.equal(rs, ws) and torch.equal(rt, wt)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gs.double(), ws, rtol=1e-5, atol=1e-5 * ws.abs().max().item())
    torch.testing.assert_close(gt.double(), wt, rtol=1e-5, atol=1e-5 * wt.abs().max().item())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_equals_trl_generalized_jsd_loss(beta, temperature):
    """kdkit's jsd is TRL's GKDTrainer.generalized_jsd_loss (trl==1.16.0), value and gradient, at every β."""
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 29, generator=g) * 2, torch.randn(6, 29, generator=g) * 2  # finite: TRL has no -inf guard

    def trl_jsd(s, t, *, beta, temperature):
        per_entry = gkd.GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=temperature, reduction="none")
        return per_entry.sum(-1)  # (N, V) → (N,)

    weights = torch.rand(6, generator=g) + 0.5
    got, gs, gt = value_and_grads(jsd, s, t, weights, beta=beta, temperature=temperature)
    want, ws, wt = value_and_grads(trl_jsd, s.double(), t.double(), weights, beta=beta, temperature=temperature)
    assert want.abs().min() > 1e-4
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gs.double(), ws, rtol=1e-5, atol=1e-5 * ws.abs().max().item())
    torch.testing.assert_close(gt.double(), wt, rtol=1e-5, atol=1e-5 * wt.abs().max().item())


@pytest.mark.parametrize("name", ["skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("skew", [1.0, 1.5, -0.1])
def test_degenerate_skew_is_refused(name, skew):
    s, t = make_logits()
    with pytest.raises(ValueError, match=r"skew must be in \[0, 1\)"):
        DIVERGENCES[name](s, t, skew=skew)


def make_labels(seed=0, n=7, v=30):
    labels = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    labels[[1, 4]] = -100
    return labels


@pytest.mark.parametrize("temperature,alpha,num_tokens", [(0.5, 0.3, None), (2.0, 1.0, 11), (4.0, 0.0, None)])
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_objective_matches_fp64_reference(name, kw, temperature, alpha, num_tokens):
    s, t = make_logits(teacher_zeros=name in FINITE_WITH_TEACHER_ZEROS)
    labels = make_labels()
    opts = dict(divergence=name, temperature=temperature, alpha=alpha, num_tokens=num_tokens, **kw)
    s_ours = s.clone().requires_grad_(True)
    parts = distill_loss(s_ours, DenseSignal(t), labels, **opts)
    parts.total.backward()
    s_ref = s.double().requires_grad_(True)
    total, kd, ce = ref.distill_loss(s_ref, t, labels, **opts)
    total.backward()
    assert not parts.kd.requires_grad and not parts.ce.requires_grad
    for got, want in [(parts.total, total), (parts.kd, kd), (parts.ce, ce), (s_ours.grad, s_ref.grad)]:
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_temperature_squared_scaling_and_alpha_mixing(temperature):
    s, t = make_logits()
    labels = make_labels()
    mask = labels != -100
    kd = token_mean(jsd(s, t, temperature=temperature), mask)
    ce = F.cross_entropy(s, labels, ignore_index=-100)  # torch's mean over non-ignored rows
    pure_kd = distill_loss(s, t, labels, divergence="jsd", temperature=temperature, alpha=1.0)
    torch.testing.assert_close(pure_kd.total, temperature**2 * kd)
    torch.testing.assert_close(pure_kd.kd, kd)
    torch.testing.assert_close(pure_kd.ce, ce)  # reported even when it does not count
    pure_ce = distill_loss(s, t, labels, divergence="jsd", temperature=temperature, alpha=0.0)
    torch.testing.assert_close(pure_ce.total, ce)
    torch.testing.assert_close(pure_ce.kd, kd)
    mixed = distill_loss(s, t, labels, divergence="jsd", temperature=temperature, alpha=0.25)
    torch.testing.assert_close(mixed.total, 0.25 * temperature**2 * kd + 0.75 * ce)


@pytest.mark.parametrize("name,scaled", [("forward_kl", True), ("jsd", True), ("skew_reverse_kl", True),
                                         ("tvd", False), ("uld", False)])
def test_t_squared_scales_the_kl_family_only(name, scaled):
    # tvd's and uld's logit gradients shrink as 1/T, not 1/T²: T² would grow them with T.
    s, t = make_logits(teacher_zeros=False)
    labels = make_labels()
    for temperature in (2.0, 4.0):
        parts = distill_loss(s, t, labels, divergence=name, temperature=temperature, alpha=1.0)
        factor = temperature**2 if scaled else 1.0
        torch.testing.assert_close(parts.total, factor * parts.kd)
        mixed = distill_loss(s, t, labels, divergence=name, temperature=temperature, alpha=0.4)
        torch.testing.assert_close(mixed.total, 0.4 * factor * mixed.kd + 0.6 * mixed.ce)


def test_pure_ce_gradient_is_the_cross_entropy_gradient():
    s, t = make_logits()
    labels = make_labels()
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    distill_loss(s1, t, labels, divergence="reverse_kl", alpha=0.0).total.backward()  # reverse_kl is inf here
    F.cross_entropy(s2, labels, ignore_index=-100).backward()
    torch.testing.assert_close(s1.grad, s2.grad)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_grad_accumulation_equals_full_batch(name, alpha):
    g = torch.Generator().manual_seed(3)
    features = torch.randn(8, 16, generator=g)
    teacher = torch.randn(8, 40, generator=g) * 3
    labels = torch.randint(0, 40, (8,), generator=g)
    labels[[0, 2, 3, 6]] = -100  # rows 2-3 form a fully masked micro-batch
    num_tokens = int((labels != -100).sum())  # the global count over all 8 rows
    opts = dict(divergence=name, temperature=2.0, alpha=alpha, num_tokens=num_tokens)

    torch.manual_seed(0)
    full = torch.nn.Linear(16, 40)
    micro = torch.nn.Linear(16, 40)
    micro.load_state_dict(full.state_dict())
    full_loss = distill_loss(full(features), teacher, labels, **opts).total
    full_loss.backward()
    summed = 0.0
    for rows in torch.arange(8).split(2):
        loss = distill_loss(micro(features[rows]), teacher[rows], labels[rows], **opts).total
        loss.backward()
        summed = summed + loss.detach()
    assert full_loss.item() > 0
    torch.testing.assert_close(summed, full_loss.detach(), rtol=1e-6, atol=1e-7)
    for p_full, p_micro in zip(full.parameters(), micro.parameters()):
        torch.testing.assert_close(p_micro.grad, p_full.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_bf16_inputs(name, kw):
    s32, t32 = make_logits(teacher_zeros=name in FINITE_WITH_TEACHER_ZEROS)
    s, t = s32.bfloat16().requires_grad_(True), t32.bfloat16()
    values = DIVERGENCES[name](s, t, temperature=2.0, **kw)
    values.sum().backward()
    assert values.dtype == torch.float32 and torch.isfinite(values).all()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad).all()
    # Computed in fp32 internally: exactly the fp32 result on the (rounded) bf16 inputs ...
    torch.testing.assert_close(values, DIVERGENCES[name](s.float(), t.float(), temperature=2.0, **kw))
    # ... and within bf16 rounding of the inputs from the fp32 result.
    torch.testing.assert_close(values, DIVERGENCES[name](s32, t32, temperature=2.0, **kw), rtol=5e-2, atol=5e-3)


def test_bf16_objective():
    s32, t32 = make_logits()
    labels = make_labels()
    parts = distill_loss(s32.bfloat16(), t32.bfloat16(), labels, temperature=2.0, alpha=0.5)
    want = distill_loss(s32, t32, labels, temperature=2.0, alpha=0.5)
    assert parts.total.dtype == torch.float32
    torch.testing.assert_close(parts.total, want.total, rtol=5e-2, atol=5e-3)


def test_dense_signal_and_tensor_teacher_agree():
    s, t = make_logits()
    labels = make_labels()
    a = distill_loss(s, DenseSignal(t), labels, divergence="tvd", alpha=0.5)
    b = distill_loss(s, t, labels, divergence="tvd", alpha=0.5)
    assert torch.equal(a.total, b.total)


def test_reduce():
    values = torch.tensor([1.0, INF, 2.0, math.nan], requires_grad=True)
    mask = torch.tensor([True, False, True, False])
    assert masked_sum(values, mask).item() == 3.0
    normalize(masked_sum(values, mask), torch.tensor(4)).backward()
    assert torch.equal(values.grad, torch.tensor([0.25, 0.0, 0.25, 0.0]))
    assert token_mean(values, mask).item() == 1.5
    assert token_mean(values, mask, num_tokens=6).item() == 0.5
    assert normalize(torch.tensor(0.0), 0).item() == 0.0
    assert normalize(torch.tensor(3.0), torch.tensor(0)).item() == 3.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(divergence="kl"), "forward_kl"),
        (dict(divergence="jsd", beta=1.5), "beta"),
        (dict(divergence="skew_forward_kl", skew=-0.1), "skew"),
        (dict(divergence="forward_kl", beta=0.5), "beta"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    s, t = make_logits()
    with pytest.raises(ValueError, match=match):
        distill_loss(s, t, make_labels(), **kwargs)


def test_bad_shapes_raise_value_error():
    s, t = make_logits()
    with pytest.raises(ValueError, match="same shape"):
        forward_kl(s, t[:, :-1])
    with pytest.raises(ValueError, match="labels"):
        distill_loss(s, t, make_labels()[:-1])
    with pytest.raises(ValueError, match="mask"):
        masked_sum(torch.ones(3), torch.ones(4, dtype=torch.bool))
