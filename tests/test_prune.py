"""Pruning on tiny models: valid HF output, exact invariance when pruning zero units, parameter targets,
importance rankings, and the `kdkit prune` / `kdkit pipeline` verbs."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdkit.config import PruneConfig
from kdkit.errors import UserError
from kdkit.models.load import count_parameters
from kdkit.models.tiny import tiny_llama
from kdkit.prune import (Importance, compute_importance, param_count, plot_layer_importance, prune_depth, prune_model,
                         prune_width)

V = 101


def _batches(n=3, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(4, V, (4, 16), generator=g)} for _ in range(n)]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _model(**kw):
    return tiny_llama(vocab_size=V, num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, **kw).eval()


@pytest.fixture()
def ids():
    return torch.randint(4, V, (2, 12), generator=torch.Generator().manual_seed(7))


def _assert_same_after(model, ids, **dims):
    imp = compute_importance(model, _batches(), pad_id=0)
    pruned = prune_width(model, imp, **dims).eval()
    torch.testing.assert_close(_logits(pruned, ids), _logits(model, ids), atol=1e-5, rtol=1e-4)
    return imp, pruned


@torch.no_grad()
def test_zeroed_mlp_neurons_pruned_leave_outputs_unchanged(ids):
    m = _model()
    for layer in m.model.layers:
        layer.mlp.up_proj.weight[::2] = 0  # every even neuron outputs act(gate)·0 = 0
    imp, pruned = _assert_same_after(m, ids, intermediate_size=32)
    assert pruned.config.intermediate_size == 32 and max(imp.mlp[0][::2]) == 0 < min(imp.mlp[0][1::2])


@torch.no_grad()
def test_zeroed_query_heads_pruned_within_groups(ids):
    m = _model()
    d = 8
    for layer in m.model.layers:  # query heads 1 and 3: one in each GQA group, output weights zero
        layer.self_attn.o_proj.weight[:, 1 * d:2 * d] = 0
        layer.self_attn.o_proj.weight[:, 3 * d:4 * d] = 0
    imp, pruned = _assert_same_after(m, ids, num_heads=2)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (2, 2)
    assert pruned.config.head_dim == d and imp.heads[0][1] == imp.heads[0][3] == 0


@torch.no_grad()
def test_zeroed_kv_group_pruned_whole(ids):
    m = _model()
    for layer in m.model.layers:  # KV head 0 has zero values: query heads 0 and 1 contribute nothing
        layer.self_attn.v_proj.weight[:8] = 0
    _, pruned = _assert_same_after(m, ids, num_heads=2, num_kv_heads=1)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (2, 1)


@torch.no_grad()
def test_zeroed_hidden_channels_pruned_leave_outputs_unchanged(ids):
    m = _model()
    gone = torch.arange(0, 32, 4)  # 8 residual channels that nothing writes to
    m.model.embed_tokens.weight[:, gone] = 0  # tied head: these logit inputs are zero too
    for layer in m.model.layers:
        layer.self_attn.o_proj.weight[gone] = 0
        layer.mlp.down_proj.weight[gone] = 0
    imp, pruned = _assert_same_after(m, ids, hidden_size=24)
    assert max(imp.hidden[i] for i in gone) == 0
    assert pruned.model.norm.weight.shape == (24,) and pruned.lm_head.weight.shape == (V, 24)


@torch.no_grad()
def test_untied_head_and_every_width_at_once(ids):
    m = _model(tie_word_embeddings=False)
    imp = compute_importance(m, _batches(), pad_id=0)
    pruned = prune_width(m, imp, num_heads=2, intermediate_size=48, hidden_size=16)
    assert count_parameters(pruned) == param_count(m, num_attention_heads=2, num_key_value_heads=2,
                                                   intermediate_size=48, hidden_size=16)
    assert _logits(pruned, ids).shape == (2, 12, V)


def test_gqa_misfit_is_a_user_error():
    m = _model()
    imp = compute_importance(m, _batches(1), pad_id=0)
    with pytest.raises(UserError, match="GQA"):
        prune_width(m, imp, num_heads=3)


@torch.no_grad()
def test_importance_ranks_an_identity_layer_lowest():
    m = _model()
    m.model.layers[1].self_attn.o_proj.weight.zero_()  # the block adds nothing to the residual stream
    m.model.layers[1].mlp.down_proj.weight.zero_()
    imp = compute_importance(m, _batches(), pad_id=0)
    assert imp.cosine_distance[1] == pytest.approx(0, abs=1e-6) and min(imp.cosine_distance) == imp.cosine_distance[1]
    assert imp.ppl_increase[1] == pytest.approx(0, abs=1e-6)
    pruned, keep = prune_depth(m, imp, 2, metric="cosine")
    assert keep == [0, 2] and pruned.config.num_hidden_layers == 2


def test_importance_json_roundtrip_and_subset(tmp_path):
    imp = compute_importance(_model(), _batches(1), pad_id=0)
    back = Importance.load(imp.save(tmp_path / "imp.json"))
    assert back == imp
    assert len(back.subset([0, 2]).mlp) == 2 and len(back.kv_group_scores()[0]) == 2
    assert plot_layer_importance(imp, tmp_path / "full.png").stat().st_size > 0
    cheap = compute_importance(_model(), _batches(1), pad_id=0, layer_ppl=False)
    assert cheap.ppl_increase == [] and cheap.heads == imp.heads and cheap.base_ppl == pytest.approx(imp.base_ppl)
    assert plot_layer_importance(cheap, tmp_path / "cosine.png").stat().st_size > 0


@pytest.mark.parametrize("method", ["depth", "width", "both"])
def test_parameter_target_is_hit_and_reported(method, tmp_path):
    m = _model()
    total = count_parameters(m)
    imp = compute_importance(m, _batches(1), pad_id=0)
    pruned, summary = prune_model(m, imp, PruneConfig(method=method, target_params=0.5, round_to=8))
    assert summary["params_after"] == count_parameters(pruned)
    assert summary["target_params"] == int(0.5 * total)
    assert abs(summary["params_after"] - summary["target_params"]) < 0.15 * total  # one step of the discrete dims
    assert count_parameters(m) == total  # the original is untouched
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert count_parameters(loaded) == summary["params_after"]
    out = loaded.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def _kdkit(*args):
    return subprocess.run([sys.executable, "-m", "kdkit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_prune_verb_writes_a_loadable_model(tiny_config, tiny_teacher, tmp_path):
    r = _kdkit("prune", tiny_config, "prune.method=width", "prune.target_params=0.6", "prune.calibration_samples=8",
               "prune.round_to=8")  # the tiny teacher is 32 wide: the default 32 leaves no smaller hidden size
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run" / "pruned"
    summary = json.loads((out / "prune.json").read_text())
    assert summary["params_after"] < summary["params_before"]
    assert (out / "importance.png").stat().st_size > 0 and "heads" in json.loads((out / "importance.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert count_parameters(model) == summary["params_after"]
    r = _kdkit("prune", tiny_config)
    assert r.returncode == 2 and "prune.method" in r.stderr


def test_pipeline_prunes_then_distills_the_pruned_student(tiny_config, tmp_path):
    from kdkit.cli import run_pipeline
    from kdkit.config import load_config

    cfg = load_config(tiny_config, ["prune.method=both", "prune.num_layers=3", "prune.intermediate_size=32",
                                    "train.max_steps=3", "train.save_every=0", "prune.calibration_samples=8"])
    out = run_pipeline(cfg, ("prune", "distill"))
    student = AutoModelForCausalLM.from_pretrained(out["student_dir"])
    assert (student.config.num_hidden_layers, student.config.intermediate_size) == (3, 32)
    assert cfg.student.init == "pretrained" and cfg.student.path.endswith("pruned")
    assert out["metrics"]["student_before"] and out["metrics"]["student_after"]
