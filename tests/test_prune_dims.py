"""Width solving against what each architecture accepts (Llama/SmolLM2, Qwen2, Qwen3, Mistral, Gemma 3 text),
exactness of width pruning on each, the cached per-layer skip perplexities, and the exit-2 path."""

import math
import subprocess
import sys

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config,
                          Qwen3Config)

from kdkit.config import PruneConfig
from kdkit.errors import UserError
from kdkit.models.load import count_parameters
from kdkit.prune import compute_importance, plan_prune, prune_model, prune_width, solve_width
from kdkit.prune.dims import check_dims, rejection, valid_hidden_sizes
from kdkit.prune.importance import calibration_batches, first_tokens, layer_ppl_increase

V = 101
# SmolLM2's shape scaled down: 9 query heads in 3 KV groups, head_dim 16, so hidden % 9 is a real constraint
SHAPE = dict(vocab_size=V, hidden_size=144, intermediate_size=384, num_hidden_layers=3, num_attention_heads=9,
             num_key_value_heads=3, head_dim=16, max_position_embeddings=64)
ARCHS = {
    "llama": lambda: LlamaConfig(**SHAPE, tie_word_embeddings=True),
    "qwen2": lambda: Qwen2Config(**SHAPE, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**SHAPE, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**SHAPE, tie_word_embeddings=False),
    "gemma3_text": lambda: Gemma3TextConfig(**SHAPE, sliding_window=8, query_pre_attn_scalar=16,
                                            layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
}
HEADS_DIVIDE_HIDDEN = {"llama", "gemma3_text"}  # validate_architecture: hidden % heads, even with head_dim set


def _model(arch, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(ARCHS[arch]()).eval()
    with torch.no_grad():  # non-trivial norm gains, so the sqrt(H/H') rescaling is exercised
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(4, V, (3, 12), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_sizes_are_what_the_class_accepts(arch):
    c = ARCHS[arch]()
    sizes = valid_hidden_sizes(c, step=16, num_attention_heads=9, num_key_value_heads=3)
    # lcm(16, 9) = 144 where the class needs hidden % heads; every multiple of 16 elsewhere
    assert sizes == ([144] if arch in HEADS_DIVIDE_HIDDEN else list(range(16, 145, 16)))
    assert (rejection(c, hidden_size=80) is None) == (arch not in HEADS_DIVIDE_HIDDEN)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fraction", [0.45, 0.7])
def test_solved_widths_are_accepted_and_hit_the_target(arch, fraction):
    m = _model(arch)
    target = int(fraction * count_parameters(m))
    dims = solve_width(m, target, round_to=16)
    assert rejection(m.config, **dims) is None
    assert dims["hidden_size"] % 16 == 0 and dims["intermediate_size"] % 16 == 0
    if arch in HEADS_DIVIDE_HIDDEN:
        assert dims["hidden_size"] % 9 == 0
    imp = compute_importance(m, _batches(1), pad_id=0, layer_ppl=False)
    pruned = prune_width(m, imp, num_heads=dims["num_attention_heads"], num_kv_heads=dims["num_key_value_heads"],
                         intermediate_size=dims["intermediate_size"], hidden_size=dims["hidden_size"])
    assert abs(count_parameters(pruned) - target) <= 0.03 * target + 16 * 3 * dims["hidden_size"] * 3


@pytest.mark.parametrize("arch", ARCHS)
def test_width_pruned_model_saves_loads_and_generates(arch, tmp_path):
    m = _model(arch)
    imp = compute_importance(m, _batches(1), pad_id=0, layer_ppl=False)
    pruned = prune_width(m, imp, num_heads=6, intermediate_size=128, hidden_size=144 if arch in HEADS_DIVIDE_HIDDEN
                         else 96)
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert count_parameters(loaded) == count_parameters(pruned)
    out = loaded.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_zeroed_hidden_channels_pruned_leave_outputs_unchanged(arch):
    """Gemma 3's sqrt(H)-scaled embedding and (1 + w) norms included. qwen3/gemma3 keep eps (their per-head
    norms share it), which is then exact only as eps → 0: a tiny eps here isolates the rest."""
    cfg = ARCHS[arch]()
    cfg.num_attention_heads, cfg.num_key_value_heads = 4, 2  # any hidden size is then a multiple of the heads
    if arch in ("qwen3", "gemma3_text"):
        cfg.rms_norm_eps = 1e-12
    m = AutoModelForCausalLM.from_config(cfg).eval()
    gone = torch.arange(0, 144, 3)  # 48 residual channels that nothing writes to
    m.get_input_embeddings().weight[:, gone] = 0
    if m.get_output_embeddings().weight is not m.get_input_embeddings().weight:
        m.get_output_embeddings().weight[:, gone] = 0
    for layer in m.model.layers:
        layer.self_attn.o_proj.weight[gone] = 0
        layer.mlp.down_proj.weight[gone] = 0
    imp = compute_importance(m, _batches(), pad_id=0, layer_ppl=False)
    pruned = prune_width(m, imp, hidden_size=96).eval()
    ids = torch.randint(4, V, (2, 10), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(pruned(ids).logits, m(ids).logits, atol=1e-5, rtol=1e-4)


def _perplexity(model, batches):
    from kdkit.models.forward import supervised_logits

    nll, n = 0.0, 0
    for b in batches:
        logits, targets = supervised_logits(model, b)  # (N, V), (N,)
        nll, n = nll + float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum")), n + len(targets)
    return math.exp(nll / n)


def _skip(module, args, kwargs, output):
    x_in = args[0] if args else kwargs["hidden_states"]
    return (x_in, *output[1:]) if isinstance(output, tuple) else x_in


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@torch.no_grad()
def test_cached_skip_perplexities_equal_skipping_with_a_hook(arch):
    """The recorded-forward shortcut gives what running the whole model with the block bypassed gives."""
    m = _model(arch)
    batches = calibration_batches(_batches(), pad_id=0)
    base, increase = layer_ppl_increase(m, batches)
    assert base == pytest.approx(_perplexity(m, batches), rel=1e-5)
    for i, layer in enumerate(m.model.layers):
        handle = layer.register_forward_hook(_skip, with_kwargs=True)
        try:
            assert increase[i] == pytest.approx(_perplexity(m, batches) - base, rel=1e-4, abs=1e-4)
        finally:
            handle.remove()


def test_ppl_tokens_budget_takes_the_leading_examples():
    from kdkit.data.render import TokenizedData

    data = TokenizedData(ids=list("abcd"), input_ids=[[1] * 10, [1] * 10, [1] * 10, [1] * 10],
                         labels=[[1] * 10] * 4, dropped={}, total=4)
    assert len(first_tokens(data, 15).input_ids) == 2 and len(first_tokens(data, 1).input_ids) == 1
    assert len(first_tokens(_batches(3), 36)) == 1  # each batch holds 3 × 12 tokens
    m = _model("llama")
    imp = compute_importance(m, _batches(3), pad_id=0, ppl_tokens=36)
    assert len(imp.ppl_increase) == 3 and imp.tokens == 3 * 36  # activation scores still see every token


def test_rejected_explicit_hidden_size_names_the_nearest_valid_ones():
    c = ARCHS["llama"]()
    with pytest.raises(UserError, match=r"LlamaConfig rejects .*hidden_size=100.*nearest hidden sizes it accepts: "
                                        r"99, 108 \(multiples of 16: 144\)"):
        check_dims(c, step=16, hidden_size=100, num_attention_heads=9)
    check_dims(ARCHS["qwen2"](), step=16, hidden_size=100, num_attention_heads=9)  # qwen2 accepts it


@pytest.mark.parametrize("method", ["width", "both"])
def test_plan_rejects_bad_sizes_before_importance(method):
    m = _model("llama")
    with pytest.raises(UserError, match="nearest hidden sizes"):
        plan_prune(m, PruneConfig(method=method, hidden_size=100, num_layers=2))
    with pytest.raises(UserError, match="not below the model's"):
        plan_prune(m, PruneConfig(method=method, target_params=2.0 * count_parameters(m)))


def test_both_on_a_target_hits_it():
    m = _model("llama")
    imp = compute_importance(m, _batches(1), pad_id=0)
    pruned, summary = prune_model(m, imp, PruneConfig(method="both", target_params=0.5, round_to=16))
    assert summary["params_after"] == count_parameters(pruned)
    assert abs(summary["params_after"] - summary["target_params"]) < 0.1 * summary["target_params"]
    assert pruned.config.hidden_size % 9 == 0 and not math.isnan(imp.base_ppl)


def test_cli_exits_2_on_a_rejected_size_without_a_traceback(tiny_config, tmp_path):
    # the tiny teacher has 4 heads: hidden 30 is no multiple of them
    r = subprocess.run([sys.executable, "-m", "kdkit.cli", "prune", str(tiny_config), "prune.method=width",
                        "prune.hidden_size=30"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "nearest hidden sizes it accepts: 28, 32" in r.stderr
    assert not (tmp_path / "run" / "pruned").exists()
