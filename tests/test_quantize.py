"""Weight-only int8 / int4 quantization: codes round-trip within half a step, tied weights stay tied,
the model shrinks, and quality falls in order (fp32 > int8 > int4) on held-out data."""

from __future__ import annotations

import pytest
import torch

from kdkit.eval.quantize import _dequantize, _quantize, model_bytes, quantize_weights
from kdkit.eval.retention import evaluate_models
from kdkit.models.load import load_model, load_tokenizer, resolve, student_from_layers
from kdkit.train.setup import tokenize_file
from kdkit.config import load_config


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_round_trip_within_half_a_step(bits):
    w = torch.randn(24, 64) * torch.logspace(-2, 1, 24)[:, None]  # rows of very different scales
    codes, scale = _quantize(w, bits, 32)
    back = _dequantize(codes, scale, bits, torch.float32)
    step = scale[:, None] if bits == 8 else scale.repeat_interleave(32, dim=1)  # (out, 1) / (out, in)
    assert ((back - w).abs() <= step / 2 + 1e-6).all()
    assert codes.numel() == w.numel() * bits // 8  # int4: two values per byte


def test_quantized_student_smaller_tied_and_ordered(tiny_config):
    cfg = load_config(tiny_config)
    src = resolve(cfg.teacher.path)
    teacher, tok = load_model(src), load_tokenizer(src)
    student = student_from_layers(teacher, [0, 3])
    q8, q4 = quantize_weights(student, bits=8), quantize_weights(student, bits=4)
    assert q8.lm_head.codes is q8.model.embed_tokens.codes  # the tie survives quantization
    assert model_bytes(q4) < model_bytes(q8) < 0.35 * model_bytes(student)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), student_from_layers(teacher, [0, 3]).state_dict().values()))
    data = tokenize_file(cfg.data.eval, tok, cfg, key="data.eval")
    # quality drop = KL(unquantized student ‖ quantized) on held-out data: the student is the reference
    m = evaluate_models({"int8": q8, "int4": q4}, student, data, vocab=len(tok), pad_id=tok.pad_token_id)
    assert 0 < m["int8"]["kl_to_teacher"] < m["int4"]["kl_to_teacher"]
    assert m["int8"]["kl_to_teacher"] < 0.05 * m["int4"]["kl_to_teacher"]  # 8 bits: ~16x finer steps than 4
    assert m["int8"]["top1_agreement"] >= 0.97


def test_int8_kernel_path_for_bf16_matches_dequantized_matmul():
    from kdkit.eval.quantize import QuantLinear

    w, x = torch.randn(64, 96), torch.randn(3, 5, 96)
    codes, scale = _quantize(w, 8, 32)
    layer = QuantLinear(codes, scale, 8)
    ref = x @ _dequantize(codes, scale, 8, torch.float32).T  # (3, 5, 64)
    assert torch.equal(layer(x), ref)  # fp32: dequantize + matmul
    torch.testing.assert_close(layer(x.bfloat16()).float(), ref, atol=0.05 * ref.abs().max().item(), rtol=0.02)
