"""The memory planner's arithmetic on a tiny model: exact parameter bytes, sharding, switches."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from kdkit.cli import app
from kdkit.config import load_config
from kdkit.models.load import count_parameters
from kdkit.train.plan import model_configs, plan_memory, shapes_of, suggest
from kdkit.train.setup import build_student, load_teacher


def test_parameter_bytes_are_exact(tiny_config):
    cfg = load_config(tiny_config, ["train.distributed=none"])
    t_cfg, s_cfg = model_configs(cfg)
    teacher = load_teacher(cfg)
    student = build_student(cfg, teacher)[0]
    t, s = shapes_of(t_cfg), shapes_of(s_cfg)
    assert (t.params, s.params) == (count_parameters(teacher.model), count_parameters(student))
    assert s.layers == 2 and s.layer_params == sum(p.numel() for p in student.model.layers[0].parameters())
    plan = plan_memory(cfg)
    assert plan.parts["student weights"] == 4 * s.params
    assert plan.parts["gradients"] == 4 * s.params and plan.parts["AdamW state"] == 8 * s.params
    assert plan.parts["teacher weights"] == 4 * t.params
    p = plan.parts  # grad_accum=2: gradients persist across micro-batches; the larger phase peaks
    passes = p["activations"] + p["teacher forward"] + p["logits"] + p["head gradient"]
    assert p["head gradient"] == 4 * s.vocab * s.hidden and p["optimizer step"] == 8 * s.largest
    assert plan.total == (p["student weights"] + p["gradients"] + p["AdamW state"] + p["teacher weights"]
                          + p["runtime"] + max(passes, p["optimizer step"]))
    single = plan_memory(load_config(tiny_config, ["train.grad_accum=1"]), teacher=t, student=s)
    assert single.total == (p["student weights"] + p["AdamW state"] + p["teacher weights"] + p["runtime"]
                            + max(passes, p["gradients"] + p["optimizer step"]))


def test_sharding_batch_and_switches_move_the_estimate(tiny_config):
    cfg = load_config(tiny_config, ["train.batch_size=8", "train.distributed=fsdp2"])
    one, two = plan_memory(cfg, world=1), plan_memory(cfg, world=2)
    assert two.parts["AdamW state"] == one.parts["AdamW state"] // 2
    assert two.parts["activations"] == one.parts["activations"] // 2  # half the micro-batch per device
    t, _ = (shapes_of(c) for c in model_configs(cfg))
    assert one.parts["teacher weights"] == 4 * t.params  # the frozen teacher is sharded too ...
    assert two.parts["teacher weights"] == 4 * t.params // 2
    gathered = 4 * (t.params - t.layers * t.layer_params + t.layer_params)  # ... its root and a layer gathered
    assert two.parts["teacher forward"] == one.parts["teacher forward"] // 2 + gathered
    ddp = load_config(tiny_config, ["train.batch_size=8", "train.distributed=ddp"])
    cross = load_config(tiny_config, ["train.batch_size=8", "train.distributed=fsdp2", "loss.divergence=uld",
                                      "modes.cross_tokenizer.enabled=true"])
    for replicated in (ddp, cross):  # a whole teacher on every device
        assert plan_memory(replicated, world=2).parts["teacher weights"] == 4 * t.params
    ckpt = plan_memory(load_config(tiny_config, ["train.gradient_checkpointing=true", "data.max_length=512"]))
    full = plan_memory(load_config(tiny_config, ["data.max_length=512"]))
    assert ckpt.parts["activations"] < 0.6 * full.parts["activations"]  # 2 layers: ~1 kept
    cached = plan_memory(load_config(tiny_config, ["teacher.signal=cache"]))
    assert cached.parts["teacher weights"] == 0
    lora = plan_memory(cfg, trainable=1000)
    assert lora.parts["AdamW state"] == 8000
    fit = suggest(load_config(tiny_config), device_bytes=one.total * 4)
    assert fit["batch_size"] >= 4 and fit["chunk_size"] >= 1


def test_plan_verb_prints_a_table(tiny_config):
    out = CliRunner().invoke(app, ["plan", str(tiny_config), "--devices", "2", "--memory", "1",
                                   "train.distributed=fsdp2"])
    assert out.exit_code == 0, out.output
    assert "| AdamW state |" in out.output and "suggested: train.batch_size=" in out.output
    bad = CliRunner().invoke(app, ["plan", str(tiny_config), "--devices", "3"])
    assert bad.exit_code != 0  # batch 4 does not divide among 3 devices
