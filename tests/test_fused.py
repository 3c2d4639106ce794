"""kdkit.losses.fused against the dense path (distill_loss on full logits): values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from kdkit.losses import DIVERGENCES, distill_loss, fused_distill_loss
from kdkit.losses.fused import DEFAULT_MEMORY_BUDGET, auto_chunk_size
from kdkit.signal import DenseSignal

N, H, HT, V = 37, 16, 24, 101
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("skew_forward_kl", {"skew": 0.1}),
    ("skew_reverse_kl", {"skew": 0.5}),
    ("tvd", {}),
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in CASES]


def make_problem(*, n=N, seed=0, bias=True):
    """Student hidden (N, H), head (V, H) (+ bias), teacher hidden (N, HT), head (V, HT), labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    p = {
        "hidden": torch.randn(n, H, generator=g),
        "weight": torch.randn(V, H, generator=g) * 0.7,
        "bias": torch.randn(V, generator=g) if bias else None,
        "t_hidden": torch.randn(n, HT, generator=g),
        "t_weight": torch.randn(V, HT, generator=g) * 0.7,
        "t_bias": torch.randn(V, generator=g) if bias else None,
        "labels": torch.randint(0, V, (n,), generator=g),
    }
    p["labels"][[i for i in (1, 4, 5, 20, n - 1) if i < n]] = -100  # masked rows, including the last one
    return p


def leaves(p):
    """Fresh leaf copies of the student's tensors (hidden, weight, bias) that require grad."""
    return [None if p[k] is None else p[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]


def grads(tensors):
    return [None if t is None else t.grad for t in tensors]


def dense(p, teacher_logits=None, **opts):
    """The dense path: full logits, then distill_loss. Returns (LossParts, [grad h, grad W, grad b])."""
    h, w, b = leaves(p)
    logits = h @ w.t() + (0 if b is None else b)  # (N, V)
    if teacher_logits is None:
        teacher_logits = p["t_hidden"] @ p["t_weight"].t() + (0 if p["t_bias"] is None else p["t_bias"])
    parts = distill_loss(logits, teacher_logits, p["labels"], **opts)
    parts.total.backward()
    return parts, grads([h, w, b])


def fused(p, teacher_logits=None, **opts):
    """The fused path on the same tensors. Returns (LossParts, [grad h, grad W, grad b])."""
    h, w, b = leaves(p)
    teacher = (
        {"teacher_logits": teacher_logits}
        if teacher_logits is not None
        else {"teacher_hidden": p["t_hidden"], "teacher_weight": p["t_weight"], "teacher_bias": p["t_bias"]}
    )
    parts = fused_distill_loss(h, w, p["labels"], student_bias=b, **teacher, **opts)
    parts.total.backward()
    return parts, grads([h, w, b])


def assert_parity(got, want, rtol=1e-5):
    """Values to `rtol`; each gradient to `rtol` relative to its largest entry."""
    (g_parts, g_grads), (w_parts, w_grads) = got, want
    assert not g_parts.kd.requires_grad and not g_parts.ce.requires_grad
    for a, b in [(g_parts.total, w_parts.total), (g_parts.kd, w_parts.kd), (g_parts.ce, w_parts.ce)]:
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-7)
    for a, b in zip(g_grads, w_grads):
        if b is None:
            assert a is None
            continue
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


@pytest.mark.parametrize("chunk_size", [5, 8, 64])  # 32 supervised rows: 5 and 8 leave a short chunk
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_online_teacher_matches_dense(name, kw, chunk_size):
    p = make_problem()
    opts = dict(divergence=name, temperature=2.0, alpha=0.3, **kw)
    assert_parity(fused(p, chunk_size=chunk_size, **opts), dense(p, **opts))


@pytest.mark.parametrize("temperature,alpha", [(0.5, 1.0), (4.0, 0.0), (1.0, 0.7)])
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_dense_signal_teacher_with_inf_logits_matches_dense(name, kw, temperature, alpha):
    p = make_problem(bias=False)
    t = torch.randn(N, V, generator=torch.Generator().manual_seed(7)) * 3
    t[0, 2] = t[3, 5] = t[3, 6] = t[9, :50] = -math.inf  # teacher zeros (banned tokens)
    opts = dict(divergence=name, temperature=temperature, alpha=alpha, **kw)
    got, want = fused(p, DenseSignal(t), chunk_size=6, **opts), dense(p, t, **opts)
    if name == "reverse_kl" and alpha > 0:  # the student has mass where the teacher has none: +inf
        assert got[0].total.item() == math.inf == want[0].total.item()
        for a, b in zip(got[1][:2], want[1][:2]):  # rows at +inf carry no gradient, in both
            assert not torch.isnan(a).any()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        assert got[1][0][2].abs().sum() > 0
        if alpha == 1.0:  # row 0 is +inf: no gradient at all (with alpha < 1, its CE part still has one)
            assert torch.equal(got[1][0][0], torch.zeros(H))
        return
    assert_parity(got, want)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("beta,kl_name", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_end_points_are_forward_and_reverse_kl(beta, kl_name, compiled):
    """Fused jsd at β = 0 / 1 is the fused forward / reverse KL, and both equal the dense path."""
    p = make_problem()
    opts = dict(temperature=2.0, alpha=0.6, chunk_size=8, compiled=compiled)
    got = fused(p, divergence="jsd", beta=beta, **opts)
    kl = fused(p, divergence=kl_name, **opts)
    assert got[0].kd > 1e-3
    assert_parity(got, kl, rtol=1e-6)
    assert_parity(got, dense(p, divergence=kl_name, temperature=2.0, alpha=0.6))


@pytest.mark.parametrize("compiled", [False, True])
def test_tvd_is_not_scaled_by_t_squared(compiled):
    p = make_problem()
    for alpha in (1.0, 0.5):
        parts, _ = fused(p, divergence="tvd", temperature=3.0, alpha=alpha, chunk_size=8, compiled=compiled)
        torch.testing.assert_close(parts.total, alpha * parts.kd + (1 - alpha) * parts.ce)
        kl, _ = fused(p, divergence="forward_kl", temperature=3.0, alpha=alpha, chunk_size=8, compiled=compiled)
        torch.testing.assert_close(kl.total, alpha * 9.0 * kl.kd + (1 - alpha) * kl.ce)


def test_padded_head_uses_first_vocab_columns_only():
    p = make_problem()
    pad = lambda x, rows: torch.cat([x, torch.randn(rows, *x.shape[1:]) * 5])  # noqa: E731
    padded = dict(p, weight=pad(p["weight"], 27), bias=pad(p["bias"], 27), t_weight=pad(p["t_weight"], 3),
                  t_bias=pad(p["t_bias"], 3))
    opts = dict(divergence="jsd", alpha=0.5, beta=0.3)
    got_parts, got_grads = fused(padded, vocab=V, chunk_size=7, **opts)
    want_parts, want_grads = dense(p, **opts)
    assert got_grads[1].shape == (V + 27, H) and (got_grads[1][V:] == 0).all() and (got_grads[2][V:] == 0).all()
    got_grads = [got_grads[0], got_grads[1][:V], got_grads[2][:V]]
    assert_parity((got_parts, got_grads), (want_parts, want_grads))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_all_masked_gives_zero_loss_and_zero_grads(name, alpha):
    p = make_problem()
    p["labels"][:] = -100
    parts, (gh, gw, gb) = fused(p, divergence=name, alpha=alpha, chunk_size=4)
    assert parts.total.item() == 0.0 and parts.kd.item() == 0.0 and parts.ce.item() == 0.0
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))
    assert torch.equal(gb, torch.zeros_like(gb))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd"])
def test_grad_accumulation_4x2_equals_1x8(name, alpha):
    p = make_problem(n=8)
    p["labels"][:] = torch.tensor([-100, 3, -100, -100, 7, 9, -100, 11])  # rows 2-3: a fully masked micro-batch
    num_tokens = int((p["labels"] != -100).sum())  # the global count over all 8 rows
    opts = dict(divergence=name, temperature=2.0, alpha=alpha, num_tokens=num_tokens, chunk_size=3)
    full_parts, full_grads = fused(p, **opts)
    h, w, b = leaves(p)
    summed = 0.0
    for rows in torch.arange(8).split(2):
        parts = fused_distill_loss(
            h[rows], w, p["labels"][rows], student_bias=b, teacher_hidden=p["t_hidden"][rows],
            teacher_weight=p["t_weight"], teacher_bias=p["t_bias"], **opts,
        )
        parts.total.backward()
        summed = summed + parts.total.detach()
    assert full_parts.total.item() > 0
    torch.testing.assert_close(summed, full_parts.total, rtol=1e-6, atol=1e-7)
    for a, b_ in zip(grads([h, w, b]), full_grads):
        torch.testing.assert_close(a, b_, rtol=1e-6, atol=1e-7)


def test_bf16_inputs_and_bf16_matmuls():
    p = make_problem()
    opts = dict(divergence="jsd", temperature=2.0, alpha=0.5)
    want_parts, want_grads = dense(p, **opts)
    bf = {k: (v.bfloat16() if v is not None and v.is_floating_point() else v) for k, v in p.items()}
    for parts, got_grads, dtype in [
        (*fused(bf, chunk_size=6, **opts), torch.bfloat16),  # bf16 inputs: bf16 grads
        (*fused(p, chunk_size=6, matmul_dtype=torch.bfloat16, **opts), torch.float32),  # fp32 inputs, bf16 GEMMs
    ]:
        assert parts.total.dtype == torch.float32 and torch.isfinite(parts.total)
        torch.testing.assert_close(parts.total, want_parts.total, rtol=3e-2, atol=1e-3)
        for a, b in zip(got_grads, want_grads):
            assert a.dtype == dtype and torch.isfinite(a).all()
            torch.testing.assert_close(a.float(), b, rtol=0, atol=5e-2 * b.abs().max().item())


def test_chunk_size_is_chosen_from_the_memory_budget():
    assert auto_chunk_size(49152) == 336  # 512 MiB / (49152 · 4 B · 8 temporaries) = 341, rounded down to 8s
    assert auto_chunk_size(151936) == 104
    assert auto_chunk_size(V, memory_budget_bytes=1) == 1
    assert auto_chunk_size(V, memory_budget_bytes=5 * V * 4 * 8) == 5  # under 8 rows: not rounded
    assert auto_chunk_size(V, memory_budget_bytes=DEFAULT_MEMORY_BUDGET) >= N
    p = make_problem()
    opts = dict(divergence="skew_forward_kl", skew=0.2, alpha=0.4)
    # A budget of 3 rows per chunk must give the same loss and gradients as the default (one chunk).
    assert_parity(fused(p, memory_budget_bytes=3 * V * 4 * 8, **opts), fused(p, **opts))


def test_grad_output_scales_the_stored_gradients_and_no_grad_gives_values():
    p = make_problem()
    h, w, b = leaves(p)
    teacher = dict(teacher_hidden=p["t_hidden"], teacher_weight=p["t_weight"], teacher_bias=p["t_bias"])
    (3.0 * fused_distill_loss(h, w, p["labels"], student_bias=b, chunk_size=9, **teacher).total).backward()
    _, want = fused(p, chunk_size=9)
    for a, b_ in zip(grads([h, w, b]), want):
        torch.testing.assert_close(a, 3.0 * b_)
    with torch.no_grad():
        parts = fused_distill_loss(h, w, p["labels"], student_bias=b, chunk_size=9, **teacher)
    assert not parts.total.requires_grad
    torch.testing.assert_close(parts.total, dense(p)[0].total)


def test_works_under_an_outer_torch_compile():
    p = make_problem()
    teacher = dict(teacher_hidden=p["t_hidden"], teacher_weight=p["t_weight"], teacher_bias=p["t_bias"])

    @torch.compile(backend="eager")  # dynamo tracing around the loss; the loss itself runs eagerly
    def step(h, w, b):
        return fused_distill_loss(h, w, p["labels"], student_bias=b, divergence="jsd", chunk_size=7, **teacher).total

    h, w, b = leaves(p)
    step(h, w, b).backward()
    assert_parity((fused(p, divergence="jsd", chunk_size=7)[0], grads([h, w, b])), dense(p, divergence="jsd"))


def test_bad_arguments_raise_value_error():
    p = make_problem()
    h, w, y = p["hidden"], p["weight"], p["labels"]
    with pytest.raises(ValueError, match="teacher"):
        fused_distill_loss(h, w, y)
    with pytest.raises(ValueError, match="teacher"):
        fused_distill_loss(h, w, y, teacher_logits=torch.zeros(N, V), teacher_hidden=p["t_hidden"],
                           teacher_weight=p["t_weight"])
    with pytest.raises(ValueError, match="vocab"):
        fused_distill_loss(h, w, y, teacher_logits=torch.zeros(N, V), vocab=V + 1)
    with pytest.raises(ValueError, match="labels"):
        fused_distill_loss(h, w, y[:-1], teacher_logits=torch.zeros(N, V))
    with pytest.raises(ValueError, match="beta"):
        fused_distill_loss(h, w, y, teacher_logits=torch.zeros(N, V), divergence="jsd", beta=2.0)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_distill_loss(h, w, y, teacher_logits=torch.zeros(N, V), chunk_size=-1)


def test_compiled_chunk_step_matches_dense():
    p = make_problem()
    opts = dict(divergence="jsd", beta=0.3, temperature=2.0, alpha=0.5)
    # chunk 12 over 32 supervised rows: 12, 12, 8 rows; the short last chunk recompiles once (dynamic)
    assert_parity(fused(p, chunk_size=12, compiled=True, **opts), dense(p, **opts))


# ---------------------------------------------------------------- precision: bf16 GEMMs, fp32 everything else

# bf16 fused (the head's forward and both backward products in bf16, fp32 accumulation) against the
# fp32 dense path, at N = 37, H = 16, V = 101. Measured here: values ≤ 6e-4 relative, gradients
# ≤ 1.4e-2 of their largest entry (bf16 keeps 8 mantissa bits: ~4e-3 per rounding).
BF16_RTOL, BF16_GRAD_RTOL = 2e-3, 3e-2
BF16_CASES = [("jsd", {"beta": b}) for b in (0.0, 0.5, 1.0)] + [
    (name, {"skew": 0.1} if name.startswith("skew") else {}) for name in sorted(DIVERGENCES) if name != "jsd"]


def assert_bf16_parity(got, want, fp32):
    (g_parts, g_grads), (w_parts, w_grads) = got, want
    assert not torch.equal(g_parts.kd, fp32[0].kd)  # the bf16 products did run
    for a, b in [(g_parts.total, w_parts.total), (g_parts.kd, w_parts.kd), (g_parts.ce, w_parts.ce)]:
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=BF16_RTOL, atol=1e-6)
    for a, b in zip(g_grads, w_grads):
        assert a.dtype == b.dtype == torch.float32 and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=BF16_GRAD_RTOL, atol=BF16_GRAD_RTOL * b.abs().max().item())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name,kw", BF16_CASES, ids=[n + "".join(f"-{k}={v}" for k, v in kw.items()) for n, kw in BF16_CASES])
def test_bf16_matmuls_match_fp32_dense(name, kw, temperature):
    p = make_problem()
    opts = dict(divergence=name, temperature=temperature, alpha=0.5, **kw)
    fp32 = fused(p, chunk_size=8, **opts)
    assert_bf16_parity(fused(p, chunk_size=8, matmul_dtype=torch.bfloat16, **opts), dense(p, **opts), fp32)


def test_precision_policy_and_tf32(monkeypatch):
    from kdkit.train import loop

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert loop.compute_dtype(cpu, "bf16") == torch.bfloat16 and loop.compute_dtype(cpu, "fp32") == torch.float32
    monkeypatch.setattr(loop, "native_bf16", lambda device: False)  # e.g. this AMD EPYC: no avx512_bf16
    assert loop.compute_dtype(cpu, "auto") == torch.float32
    assert isinstance(loop.autocast(cpu, "auto"), type(loop.contextlib.nullcontext()))
    monkeypatch.setattr(loop, "native_bf16", lambda device: True)
    assert loop.compute_dtype(cpu, "auto") == torch.bfloat16
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    loop.enable_tf32(cpu)
    assert torch.backends.cuda.matmul.allow_tf32 is False  # CPU fp32 untouched
    loop.enable_tf32(cuda)
    assert torch.backends.cuda.matmul.allow_tf32 is True


def test_bf16_step_holds_the_teacher_in_bf16_and_runs_the_fused_head_in_bf16(tiny_config, monkeypatch):
    from kdkit.config import load_config
    from kdkit.data.render import tokenize_examples
    from kdkit.data.sources import load_examples
    from kdkit.teacher.online import hold_in, online_signal_fn
    from kdkit.train import loop
    from kdkit.train.setup import build_student, load_teacher, teacher_dtype

    cfg = load_config(tiny_config)
    monkeypatch.setattr(loop, "native_bf16", lambda device: False)
    assert teacher_dtype(cfg, torch.device("cpu")) == torch.float32  # auto follows train.precision=auto → fp32 here
    cfg.train.precision = "bf16"
    assert teacher_dtype(cfg, torch.device("cpu")) == torch.bfloat16
    cfg.teacher.dtype = "fp32"
    assert teacher_dtype(cfg, torch.device("cpu")) == torch.float32
    teacher = load_teacher(cfg)
    student = build_student(cfg, teacher)[0]  # before the cast: the student keeps fp32 master weights
    vocab = len(teacher.tokenizer)
    model = hold_in(teacher.model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in student.parameters())
    seen = []
    real = loop.fused_distill_loss
    monkeypatch.setattr(loop, "fused_distill_loss", lambda *a, **k: seen.append((a[1].dtype, k)) or real(*a, **k))
    fn = online_signal_fn(model, vocab=vocab, provenance=teacher.provenance(), lazy=True)
    data = tokenize_examples(load_examples(cfg.data.train), teacher.tokenizer, max_length=64)
    batches = loop.micro_batches(data, 0, batch_size=4, grad_accum=1, seed=0, pad_id=0)
    out = loop.train_step(student, batches, fn, cfg, vocab=vocab, device=torch.device("cpu"), precision="bf16")
    assert math.isfinite(out["loss"]) and seen
    head_dtype, kwargs = seen[0]
    assert kwargs["matmul_dtype"] == torch.bfloat16 and kwargs["teacher_logits"].head.dtype == torch.bfloat16
    assert head_dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in student.parameters())
    seen.clear()
    loop.train_step(student, batches, fn, cfg, vocab=vocab, device=torch.device("cpu"), precision="fp32")
    assert seen[0][1]["matmul_dtype"] is None  # fp32: the inputs' own dtype, as before


def test_default_chunks_have_a_row_floor_where_memory_allows_and_split_evenly():
    from kdkit.losses.fused_chunk import step_rows

    assert auto_chunk_size(151936, free_bytes=2**40) == 512  # the default budget alone: 104 rows
    assert auto_chunk_size(151936, free_bytes=300 * 151936 * 4 * 8 * 4) == 296  # what a quarter of it holds
    assert auto_chunk_size(151936, free_bytes=0) == 104  # never below the budget's rows
    assert auto_chunk_size(151936, memory_budget_bytes=DEFAULT_MEMORY_BUDGET, free_bytes=2**40) == 104  # explicit: kept
    assert step_rows(739, 512, False) == 376 and step_rows(1024, 104, False) == 104 and step_rows(5, 336, False) == 5
    p = make_problem()
    keep = p["labels"] != -100
    q = {k: (v[keep] if k in ("hidden", "t_hidden", "labels") else v) for k, v in p.items()}
    assert_parity(fused(q, chunk_size=7, all_supervised=True), fused(q, chunk_size=7))


def test_train_step_reads_its_metrics_once_and_only_when_asked(tiny_config, monkeypatch):
    from kdkit.config import load_config
    from kdkit.data.render import tokenize_examples
    from kdkit.data.sources import load_examples
    from kdkit.teacher.online import online_signal_fn
    from kdkit.train import loop
    from kdkit.train.optim import build_optimizer
    from kdkit.train.setup import build_student, load_teacher

    cfg = load_config(tiny_config)
    teacher = load_teacher(cfg)
    student = build_student(cfg, teacher)[0]
    vocab = len(teacher.tokenizer)
    fn = online_signal_fn(teacher.model, vocab=vocab, provenance=teacher.provenance(), lazy=True)
    data = tokenize_examples(load_examples(cfg.data.train), teacher.tokenizer, max_length=64)
    batches = loop.micro_batches(data, 0, batch_size=4, grad_accum=2, seed=0, pad_id=0)
    cpu = torch.device("cpu")
    full = loop.train_step(student, batches, fn, cfg, vocab=vocab, device=cpu, precision="fp32")
    student.zero_grad()
    lazy = loop.train_step(student, batches, fn, cfg, vocab=vocab, device=cpu, precision="fp32", metrics=False,
                           settle=False)
    assert lazy["kl"] is None and lazy["top1"] is None and torch.is_tensor(lazy["loss"])
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or real(t))
    opt, sched = build_optimizer(student, cfg.train)
    assert loop.optimizer_step(student, opt, sched, lazy, cfg.train, step=1, ids=[])
    assert len(reads) == 1  # loss, kd, ce and the gradient norm in one read
    assert lazy["loss"] == pytest.approx(full["loss"], rel=1e-6) and math.isfinite(lazy["grad_norm"])
    assert full["kl"] >= 0 and 0 <= full["top1"] <= 1


@pytest.mark.parametrize("teacher", ["dense", "dense-bf16", "dense-blocks", "sparse"])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 1.0), (1.0, 0.3), (2.0, 1.0), (0.5, 1.0)])
def test_closed_form_forward_kl_chunk_equals_autograd(teacher, temperature, alpha, monkeypatch):
    """`overwrite=True` runs forward KL in closed form, in place (fused_fkl); its gradient and sums equal
    torch.func on the same divergence, with teacher zeros, an invalid top-k slot, token weights (one 0) and a
    masked row; the gradient is the overwritten buffer itself. A dense teacher is read, never written, in
    row blocks (here also 3 rows at a time, the last block short) and in its own dtype (bf16: the same
    values as their fp32 upcast)."""
    from kdkit.losses import fused_fkl
    from kdkit.losses.fused_chunk import Spec, chunk_grad
    from kdkit.losses.fused_sparse import SparseTeacher
    from kdkit.signal import Provenance, SparseSignal

    gen = torch.Generator().manual_seed(3)
    c, v, k = 7, 50, 6
    z = torch.randn(c, v, generator=gen) * 3
    t = torch.randn(c, v, generator=gen) * 3
    t[0, :5] = -math.inf
    labels = torch.randint(0, v, (c,), generator=gen)
    labels[4] = -100
    weight = torch.rand(c, generator=gen)
    weight[2] = 0.0
    sparse = teacher == "sparse"
    if teacher == "dense-blocks":
        monkeypatch.setattr(fused_fkl, "_BLOCK_BYTES", 1)
        monkeypatch.setattr(fused_fkl, "_BLOCK_ROWS", 3)
    if sparse:
        lp = torch.log_softmax(t, -1)
        top, ids = lp.topk(k, -1)
        top[1, -1] = -math.inf  # an invalid slot (its id's mass belongs to the tail)
        tail = torch.logsumexp(lp.scatter(1, ids, -math.inf), -1)
        sig = SparseSignal(ids=ids, logprobs=top, tail=tail, provenance=Provenance(temperature=1.0))
        teacher = SparseTeacher.build(sig, vocab=v, temperature=temperature, capture_temperature=None, device="cpu")
        chunk = teacher.chunk(slice(None), c)
    else:
        chunk = (t.bfloat16(),) if teacher == "dense-bf16" else (t,)
    spec = Spec("forward_kl", temperature, alpha, (), need_grad=True, sparse=sparse, metrics=True)
    want_g, want = chunk_grad(z.clone(), tuple(x.float() for x in chunk) if not sparse else chunk, labels, weight, spec)
    buf, before = z.clone(), [x.clone() for x in chunk]
    got_g, got = chunk_grad(buf, chunk, labels, weight, spec, overwrite=True)
    assert got_g.data_ptr() == buf.data_ptr()
    assert all(torch.equal(a, b) for a, b in zip(chunk, before))  # the teacher's chunk is read only
    torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("matmul_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 1.0), (2.0, 1.0), (1.0, 0.7)])
def test_closed_form_forward_kl_over_chunks_equals_dense_and_never_writes_the_teacher(temperature, alpha, matmul_dtype):
    """Closed-form forward KL on an online teacher head (its logits in the matmul dtype) over several chunks
    equals the dense path, metrics included; a caller's teacher logits (a DenseSignal whose chunks are views
    of its tensor: every row supervised) are never written."""
    p = make_problem(bias=False)
    p["labels"] = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(5))  # no masked row
    opts = dict(divergence="forward_kl", temperature=temperature, alpha=alpha)
    want = dense(p, **opts)
    tol = 1e-5 if matmul_dtype is None else 2e-2
    got = fused(p, chunk_size=8, matmul_dtype=matmul_dtype, metrics=True, **opts)  # online head
    assert_parity(got, want, rtol=tol)
    t = p["t_hidden"] @ p["t_weight"].t()
    s_logits = p["hidden"] @ p["weight"].t()
    log_p, log_q = t.double().log_softmax(-1), s_logits.double().log_softmax(-1)
    kl1 = (log_p.exp() * (log_p - log_q)).sum(-1).mean()  # at T = 1, whatever the loss's temperature
    torch.testing.assert_close(got[0].kl.double(), kl1, rtol=tol, atol=1e-6)
    if matmul_dtype is None:
        assert got[0].top1.item() == (s_logits.argmax(-1) == t.argmax(-1)).sum().item()
    before = t.clone()
    assert_parity(fused(p, DenseSignal(t), chunk_size=8, **opts), want)
    assert torch.equal(t, before)


def test_forward_kl_blocks_rows_on_a_cpu_only():
    """The dense forward KL walks a chunk in cache-sized row blocks on a CPU (the last one short); on any
    other device the chunk is one block, so a GPU launches each element-wise op once per chunk."""
    from kdkit.losses.fused_fkl import _blocks

    cpu = _blocks(40, 49_152, torch.device("cpu"))
    assert cpu == [(0, 16), (16, 32), (32, 40)]
    assert _blocks(40, 49_152, torch.device("meta")) == [(0, 40)]


def test_low_precision_partial_gradients_add_as_one_mixed_dtype_add(monkeypatch):
    """The CPU path upcasts a bf16 partial grad_W block by block (PyTorch's mixed-dtype add_ is a scalar
    loop there): the sums must be those of `target.add_(part)`, bit for bit, across a short last block."""
    from kdkit.losses import fused

    torch.manual_seed(0)
    target = torch.randn(101, 24)
    part = torch.randn(101, 24).to(torch.bfloat16)
    monkeypatch.setattr(fused, "_ADD_BLOCK_BYTES", 4 * 24 * 16)  # 16-row blocks: 6 full, one of 5
    got = target.clone()
    fused._add_lowp(got, part)
    assert torch.equal(got, target.clone().add_(part))


def test_the_head_gradient_buffer_is_lent_then_reclaimed_for_the_next_step():
    """On a CPU the fused loss returns grad_W in the buffer the training loop reclaimed from the weight's
    last `.grad` (no fresh (V, H) tensor a step); the values are those of a fresh one, and a caller that
    never reclaims gets a fresh tensor each time."""
    from kdkit.losses import scratch

    p = make_problem(bias=False)
    weight = torch.nn.Parameter(p["weight"].clone())
    hidden = p["hidden"].clone().requires_grad_(True)
    signal = DenseSignal(p["t_hidden"] @ p["t_weight"].t())

    def step():
        fused_distill_loss(hidden, weight, p["labels"], teacher_logits=signal, chunk_size=8).total.backward()
        return weight.grad

    scratch.reclaim()  # nothing lent yet: a no-op
    first = step().clone()
    scratch.reclaim()
    kept = weight.grad.data_ptr()
    weight.grad = hidden.grad = None  # zero_grad(set_to_none=True)
    assert torch.equal(step(), first)
    assert weight.grad.data_ptr() == kept  # the reclaimed buffer, overwritten with this step's gradient
    weight.grad = hidden.grad = None  # not reclaimed: nothing kept, the loss makes a new one
    assert "grad-weight" not in scratch._RETURNED
    assert torch.equal(step(), first)
