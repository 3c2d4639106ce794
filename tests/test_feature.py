"""Hidden-state and attention distillation: losses against fp64 references, attention maps against
eager attention, projectors, combined weights, and an end-to-end distill run with all three terms."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import reference as ref
from kdkit.config import load_config
from kdkit.errors import UserError
from kdkit.losses.feature import ATTENTION_LOSSES, DISTANCES, attention_loss, hidden_loss, uniform_pairs
from kdkit.models.capture import FeatureCapture
from kdkit.models.projector import Projectors, load_projectors, make_projector
from kdkit.models.tiny import tiny_llama
from kdkit.train.weighting import DominanceWatch, Weighting


def _rows(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, d, generator=g, dtype=torch.float64)
    t = torch.randn(n, d, generator=g, dtype=torch.float64)
    return s, t


def _attention_rows(n, heads, keys, seed):
    """Causal-looking attention rows (N, H, T): row i sees keys 0..(i mod T), the rest exactly 0."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, heads, keys, generator=g, dtype=torch.float64)
    visible = torch.arange(keys)[None, :] <= (torch.arange(n) % keys)[:, None]  # (N, T)
    return torch.softmax(scores.masked_fill(~visible[:, None, :], float("-inf")), -1)


# ---------------------------------------------------------------- losses vs fp64 references


@pytest.mark.parametrize("distance", DISTANCES)
def test_hidden_distances_match_reference_value_and_gradient(distance):
    s, t = _rows()
    mask = torch.tensor([True, True, False, True, True, True])
    num_tokens = 9  # the step's count: more than this micro-batch holds
    ours_s = s.float().requires_grad_()
    ours = hidden_loss(ours_s, t.float(), distance=distance, num_tokens=num_tokens, mask=mask)
    ref_s = s.clone().requires_grad_()
    want = ref.hidden_loss(distance, ref_s, t, mask, num_tokens)
    ours.backward()
    want.backward()
    assert ours.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(ours_s.grad.double(), ref_s.grad, rtol=1e-4, atol=1e-6)
    assert ours_s.grad[2].abs().sum() == 0 or distance == "mmd"  # a masked row gets no gradient (mmd: by design)


@pytest.mark.parametrize("distance", DISTANCES)
def test_hidden_all_masked_is_zero_with_zero_grads(distance):
    s, t = _rows()
    s = s.float().requires_grad_()
    loss = hidden_loss(s, t.float(), distance=distance, num_tokens=0, mask=torch.zeros(6, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("distance", ["mse", "l1", "l2", "cosine", "mmd"])
def test_hidden_identical_rows_give_zero(distance):
    s, _ = _rows()
    x = s.float().requires_grad_()
    loss = hidden_loss(x, s.float(), distance=distance, num_tokens=6)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 1e-5


@pytest.mark.parametrize("loss", ATTENTION_LOSSES)
@pytest.mark.parametrize("heads,hs,ht", [("average", 2, 4), ("map", 4, 4), ("map", 2, 4), ("map", 4, 2)])
def test_attention_losses_match_reference_value_and_gradient(loss, heads, hs, ht):
    s, t = _attention_rows(7, hs, 5, seed=1), _attention_rows(7, ht, 5, seed=2)
    mask = torch.tensor([True, False, True, True, True, True, True])
    ours_s = s.float().requires_grad_()
    ours = attention_loss(ours_s, t.float(), loss=loss, heads=heads, num_tokens=10, mask=mask)
    ref_s = s.clone().requires_grad_()
    want = ref.attention_loss(loss, ref_s, t, mask, 10, heads=heads)
    ours.backward()
    want.backward()
    assert ours.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(ours_s.grad.double(), ref_s.grad, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(ours_s.grad).all() and ours_s.grad[1].abs().sum() == 0


@pytest.mark.parametrize("loss", ATTENTION_LOSSES)
def test_attention_all_masked_and_identical(loss):
    s = _attention_rows(5, 2, 4, seed=3).float().requires_grad_()
    out = attention_loss(s, s.detach(), loss=loss, heads="map", num_tokens=0, mask=torch.zeros(5, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))
    same = attention_loss(s, s.detach(), loss=loss, heads="map", num_tokens=5)
    assert abs(same.item()) < 1e-6


def test_head_map_refuses_indivisible_heads():
    with pytest.raises(ValueError, match="divide"):
        attention_loss(_attention_rows(3, 3, 4, 0), _attention_rows(3, 2, 4, 1), loss="kl", heads="map", num_tokens=3)


def test_uniform_layer_pairs_follow_relative_depth():
    assert uniform_pairs(2, student_layers=10, teacher_layers=30) == [(4, 14), (9, 29)]
    assert uniform_pairs(3, student_layers=2, teacher_layers=4) == [(0, 1), (1, 3)]


# ---------------------------------------------------------------- attention maps from hooks


@pytest.mark.parametrize("padded", [False, True])
def test_computed_attention_maps_equal_eager_output_attentions(padded):
    model = tiny_llama(vocab_size=40, num_layers=2, num_heads=4, num_kv_heads=2, seed=3).eval()  # GQA: 2 per KV
    ids = torch.randint(4, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    if padded:
        mask[1, 6:] = 0
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    before = hooks()
    cap = FeatureCapture(model, attention_layers=[0, 1])
    assert hooks() == before + 6 and model.config._attn_implementation == "sdpa"  # sdpa: no maps returned
    with torch.no_grad(), cap.recording():
        model(input_ids=ids, attention_mask=mask)
    ours = [cap.attention_probs(i) for i in (0, 1)]
    cap.remove()
    assert hooks() == before  # remove() unhooks
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    for i in (0, 1):
        assert ours[i].shape == (2, 4, 9, 9)
        torch.testing.assert_close(ours[i], eager[i], rtol=1e-5, atol=1e-6)


def test_attention_max_seq_len_is_a_clear_error():
    model = tiny_llama(vocab_size=40, num_layers=1)
    cap = FeatureCapture(model, attention_layers=[0])
    with torch.no_grad(), cap.recording():
        model(input_ids=torch.randint(4, 40, (1, 12)))
    with pytest.raises(UserError, match="max_seq_len=8"):
        cap.attention_probs(0, max_seq_len=8)


# ---------------------------------------------------------------- projectors


def test_projector_inits_and_save_reload(tmp_path):
    ident = make_projector(3, 5, init="identity").weight
    assert torch.equal(ident, torch.eye(5, 3))  # identity, zero-padded to the wider teacher
    ortho = make_projector(3, 5, init="orthogonal").weight  # (5, 3): orthonormal columns
    torch.testing.assert_close(ortho.T @ ortho, torch.eye(3), atol=1e-5, rtol=0)
    proj = Projectors([(0, 1), (1, 3)], d_student=4, d_teacher=6, init="xavier")
    path = proj.save(tmp_path / "projector.safetensors")
    back = load_projectors(path)
    assert back.pairs == [(0, 1), (1, 3)]
    x = torch.randn(2, 4)
    for pair in back.pairs:
        torch.testing.assert_close(back[pair](x), proj[pair](x))
    with pytest.raises(UserError, match="does not exist"):
        load_projectors(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- combined objective


def test_static_weights_are_exact():
    w = Weighting("static", {"hidden": 0.5, "attention": 2.0})
    kd, h, a = torch.tensor(1.5), torch.tensor(0.25), torch.tensor(0.125)
    total, weights = w(kd, {"hidden": h, "attention": a, "anchor": torch.tensor(1.0)})
    assert float(total) == 1.5 + 0.5 * 0.25 + 2.0 * 0.125 + 1.0  # an unknown term: plain sum
    assert weights == {"hidden": 0.5, "attention": 2.0, "anchor": 1.0}


def test_balanced_rescales_each_term_to_the_kd_magnitude():
    w = Weighting("balanced", {"hidden": 1.0, "attention": 0.5})
    kd = torch.tensor(2.0, requires_grad=True)
    h = torch.tensor(400.0, requires_grad=True)
    a = torch.tensor(0.01, requires_grad=True)
    total, weights = w(kd, {"hidden": h, "attention": a})
    assert weights["hidden"] * 400.0 == pytest.approx(2.0) and weights["attention"] * 0.01 == pytest.approx(1.0)
    assert float(total) == pytest.approx(2.0 + 2.0 + 1.0)
    total.backward()  # the ratio is detached: each term's gradient is its weight, kd's stays 1
    assert float(kd.grad) == 1.0 and float(h.grad) == pytest.approx(2.0 / 400.0)


def test_uncertainty_log_variances_get_gradients_and_balance():
    w = Weighting("uncertainty", {"hidden": 1.0, "attention": 1.0})
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.0, 1.0]))
    h, a = torch.tensor(3.0), torch.tensor(0.5)
    total, weights = w(torch.tensor(1.0), {"hidden": h, "attention": a})
    assert weights["attention"] == pytest.approx(float(torch.exp(torch.tensor(-1.0))))
    assert float(total) == pytest.approx(1.0 + 3.0 + 0.0 + 0.5 * torch.exp(torch.tensor(-1.0)).item() + 1.0)
    total.backward()
    # d/ds (exp(-s)·L + s) = 1 − exp(-s)·L: negative for the big term (its σ² grows), positive for the small one
    assert w.log_vars.grad[0] == pytest.approx(1 - 3.0) and w.log_vars.grad[1] > 0


def test_dominance_warning_after_many_steps(caplog):
    watch = DominanceWatch(threshold=0.9, steps=3)
    warned = []
    with caplog.at_level(logging.WARNING, logger="kdkit.train.weighting"):
        for step in range(1, 6):
            watch.add({"kd": 0.05, "hidden": 1.0})
            warned.append(watch.end_step(step))
    assert warned == [None, None, "hidden", None, None]  # once per streak
    assert "'hidden' has been more than 90%" in caplog.text
    watch.add({"kd": 1.0, "hidden": 1.0})
    assert watch.end_step(6) is None and watch.streak == 0


# ---------------------------------------------------------------- end to end


def test_distill_with_hidden_attention_and_uncertainty_weights(tiny_config, tiny_teacher):
    from kdkit.recipes import distill

    over = ["student.init=config", f"student.path={tiny_teacher}",  # narrower, fewer heads: projector + head map
            "student.config_overrides={num_hidden_layers: 2, hidden_size: 16, intermediate_size: 32, "
            "num_attention_heads: 2, num_key_value_heads: 1, head_dim: 8}",
            "train.max_steps=8", "train.save_every=0",
            "features.hidden.weight=1.0", "features.hidden.distance=cosine", "features.hidden.projector=orthogonal",
            "features.attention.weight=0.5", "features.attention.heads=map", "features.weighting=uncertainty"]
    cfg = load_config(tiny_config, over)
    out = distill.run(cfg)
    run_dir = Path(cfg.run.dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    for key in ("kd", "term/hidden", "term/attention", "weight/hidden", "weight/attention"):
        assert all(key in r and r[key] == r[key] for r in rows), key  # present and not NaN, every step
    assert rows[-1]["weight/hidden"] != rows[0]["weight/hidden"]  # log-variances learned
    assert rows[-1]["term/hidden"] < rows[0]["term/hidden"]  # the student (and projector) learn the teacher's states
    kl = {name: m["kl_to_teacher"] for name, m in out["metrics"].items()}
    assert kl["student_after"] < kl["student_before"]  # it distils: held-out KL falls
    with safe_open(str(run_dir / "student" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys and all(k.startswith(("model.", "lm_head.")) for k in keys)  # the student only
    assert not any(s in k for k in keys for s in ("maps.", "projector", "features", "log_vars"))
    proj = load_projectors(run_dir / "projector.safetensors")
    assert proj.pairs == [(0, 1), (1, 3)] and proj[0, 1].weight.shape == (32, 16)
    with safe_open(str(next((run_dir / "checkpoints").glob("step-*")) / "model.safetensors"), framework="pt") as f:
        assert any(k.startswith("extras.features.weighting.log_vars") for k in f.keys())  # checkpointed for resume


def test_features_refuse_a_cached_teacher_and_bad_pairs(tiny_config):
    from kdkit.recipes import distill

    with pytest.raises(UserError, match="teacher.signal=online"):
        load_config(tiny_config, ["teacher.signal=cache", "features.hidden.weight=1"])
    cfg = load_config(tiny_config, ["features.attention.weight=1", "features.attention.pairs=[[0, 7]]"])
    with pytest.raises(UserError, match=r"\[0, 7\] is out of range"):
        distill.run(cfg)


def test_feature_terms_keep_grad_accumulation_exact(tiny_config):
    """2×4 = 8×1 for the combined objective (hidden + attention, static weights), projector included."""
    from kdkit.data.render import tokenize_examples
    from kdkit.data.sources import load_examples
    from kdkit.teacher.online import online_signal_fn
    from kdkit.train.features import feature_plugins
    from kdkit.train.loop import Plugins, micro_batches, train_step
    from kdkit.train.setup import build_student, load_teacher

    cfg = load_config(tiny_config, ["features.hidden.weight=0.7", "features.hidden.projector=xavier",
                                    "features.attention.weight=0.3", "features.attention.loss=mse"])
    teacher = load_teacher(cfg)
    data = tokenize_examples(load_examples(cfg.data.train), teacher.tokenizer, max_length=64)
    inner = online_signal_fn(teacher.model, vocab=len(teacher.tokenizer), provenance=teacher.provenance())
    grads, losses = [], []
    for bs, accum in ((2, 4), (8, 1)):
        torch.manual_seed(0)  # the same projector init in both runs
        student = build_student(cfg, teacher)[0]
        plugins = Plugins()
        signal_fn, kd = feature_plugins(cfg, teacher, student, inner, plugins)
        batches = micro_batches(data, 0, batch_size=bs, grad_accum=accum, seed=0, pad_id=0)
        out = train_step(student, batches, signal_fn, cfg, vocab=len(teacher.tokenizer), device="cpu",
                         precision="fp32", plugins=plugins)
        kd.finish(Path("unused"), save=False)
        losses.append((out["loss"], out["term/hidden"], out["term/attention"]))
        params = {**dict(student.named_parameters()), **dict(kd.trainable.named_parameters())}
        grads.append({n: p.grad.clone() for n, p in params.items()})
    for a, b in zip(*losses):
        assert a == pytest.approx(b, rel=1e-5)
    assert losses[0][1] > 0 and losses[0][2] > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)
    assert not any(m._forward_hooks for m in teacher.model.modules())  # finish() unhooked the shared teacher
