"""Cheaper students: LoRA (peft) trains only adapters and saves a merged plain HF model;
activation checkpointing trades compute for memory without changing the gradients."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

from kdkit.config import load_config  # noqa: E402
from kdkit.errors import UserError  # noqa: E402
from kdkit.models.lora import apply_lora, check_4bit  # noqa: E402
from kdkit.recipes import distill  # noqa: E402
from kdkit.train.setup import build_student, load_teacher  # noqa: E402

LORA = "student.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"


def test_lora_trains_adapters_only_and_saves_a_merged_student(tiny_config):
    from transformers import AutoModelForCausalLM

    cfg = load_config(tiny_config, [LORA, "train.max_steps=4", "train.save_every=0", "data.eval=",
                                    "train.lr=1e-2"])
    teacher = load_teacher(cfg)
    init = {k: v.clone() for k, v in build_student(cfg, teacher)[0].state_dict().items()}
    wrapped = apply_lora(build_student(cfg, teacher)[0], cfg.student.lora)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    out = distill.run(cfg, teacher=teacher)
    saved = load_file(out["student_dir"] / "model.safetensors")
    assert not any("lora" in k for k in saved)
    changed = {k for k in saved if not torch.equal(saved[k], init[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed
    plain = AutoModelForCausalLM.from_pretrained(out["student_dir"])
    assert type(plain).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(plain.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                               saved["model.layers.0.self_attn.q_proj.weight"])


def test_lora_errors_are_user_errors(tiny_config):
    cfg = load_config(tiny_config, ["student.lora={target_modules: [no_such_layer]}"])
    with pytest.raises(UserError, match="student.lora"):
        apply_lora(build_student(cfg, load_teacher(cfg))[0], cfg.student.lora)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="GPU"):
            check_4bit()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config):
    """train.gradient_checkpointing recomputes activations in backward: same loss, same gradients."""
    from kdkit.data.render import tokenize_examples
    from kdkit.data.sources import load_examples
    from kdkit.teacher.online import online_signal_fn
    from kdkit.train.dist import DistContext
    from kdkit.train.dist import prepare_student as _prepare_student
    from kdkit.train.loop import micro_batches, train_step

    cfg = load_config(tiny_config, ["train.precision=fp32"])
    teacher = load_teacher(cfg)
    data = tokenize_examples(load_examples(cfg.data.train), teacher.tokenizer, max_length=64)
    signal_fn = online_signal_fn(teacher.model, vocab=len(teacher.tokenizer), provenance=teacher.provenance())
    batches = micro_batches(data, 0, batch_size=4, grad_accum=1, seed=0, pad_id=0)
    results = []
    for on in (False, True):
        cfg.train.gradient_checkpointing = on
        student = _prepare_student(build_student(cfg, teacher)[0], DistContext(), cfg.train, "cpu").train()
        assert getattr(student, "is_activation_checkpointing", student.is_gradient_checkpointing) == on
        out = train_step(student, batches, signal_fn, cfg, vocab=len(teacher.tokenizer), device="cpu",
                         precision="fp32")
        results.append((out["loss"], {n: p.grad.clone() for n, p in student.named_parameters()}))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-5, atol=1e-7)
