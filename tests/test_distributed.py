"""2 processes = 1 process: `kdkit distill` under torchrun (gloo, CPU) on tiny models.

The global micro-batch is split between the ranks and every loss is normalised by the global
supervised-token count, so a 2-process run follows the 1-process run step for step: the same loss
curve and (ddp) the same final weights, up to float summation order. An FSDP2 run shards the
student and the frozen teacher (half of each on each rank), trains, gathers a plain saved student,
and resumes from its sharded (DCP) checkpoint to the same weights; with the fused loss, trainable
plugins (projectors, learned loss weights) and per-head q/k norms it follows the 1-process curve too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import chat_rows, write_jsonl
from kdkit.config import load_config
from kdkit.errors import UserError
from kdkit.recipes import distill

STEPS = 4


@pytest.fixture(scope="module")
def dist_config(tmp_path_factory, tiny_teacher) -> Path:
    """Batch 4 × accumulation 2 per step (global); fp32, no held-out eval: just the training."""
    root = tmp_path_factory.mktemp("dist")
    cfg = {
        "teacher": {"path": str(tiny_teacher)},
        "student": {"init": "config", "path": str(tiny_teacher),  # random init: a loss far from 0
                    "config_overrides": {"num_hidden_layers": 2}},
        "data": {"train": str(write_jsonl(root / "train.jsonl", chat_rows(24))), "max_length": 64},
        "train": {"max_steps": STEPS, "batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 1,
                  "threads": 1, "precision": "fp32", "save_every": 0},
    }
    path = root / "dist.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def one_process(dist_config, tmp_path_factory) -> Path:
    """The reference: the same config in this (single) process."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    distill.run(load_config(dist_config, [f"run.dir={run_dir}"]))
    return run_dir


# `kdkit distill` with a look at the teacher: each rank writes PROBE_OUT/rank-R.json about the module
# `shard_teacher` returned (its local shard, gradients) and the loop's optimizer, after the run
PROBE = """
import json, os, sys
import kdkit.train.dist as D, kdkit.train.loop as L
from kdkit.cli import main

seen = {}
shard, build = D.shard_teacher, L.build_optimizer
D.shard_teacher = lambda *a, **k: seen.setdefault("teacher", shard(*a, **k))
L.build_optimizer = lambda *a, **k: seen.setdefault("opt", build(*a, **k))
try:
    main()
except SystemExit as e:
    code = e.code
params = list(seen["teacher"].parameters())
in_opt = {id(p) for g in seen["opt"][0].param_groups for p in g["params"]}
with open(os.path.join(os.environ["PROBE_OUT"], f"rank-{os.environ['RANK']}.json"), "w") as f:
    json.dump({"local": sum(p.to_local().numel() for p in params), "total": sum(p.numel() for p in params),
               "requires_grad": any(p.requires_grad for p in params), "grads": any(p.grad is not None for p in params),
               "in_optimizer": any(id(p) in in_opt for p in params)}, f)
sys.exit(code)
"""


def torchrun(config: Path, *overrides: str, resume: bool = False,
             probe: Path | None = None) -> subprocess.CompletedProcess:
    cli = [str(probe)] if probe else ["-m", "kdkit.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *cli, "distill", str(config), *overrides, *(["--resume"] if resume else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           **({"PROBE_OUT": str(probe.parent)} if probe else {})}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows}


def assert_same_curves(ref: Path, got: Path, *keys: str, rel: float) -> None:
    """The metrics `keys` of run `got` follow run `ref`'s step for step."""
    for key in keys:
        a, b = losses(ref, key), losses(got, key)
        assert list(b) == list(a) == list(range(1, STEPS + 1)), key
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=rel), (key, step, a, b)


def one_and_two(config: Path, tmp_path: Path, *overrides: str) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """(the run in this process, the fsdp2 run on 2 processes, its output) of `config` + `overrides`."""
    one, two = tmp_path / "one", tmp_path / "two"
    distill.run(load_config(config, [f"run.dir={one}", *overrides]))
    return one, two, torchrun(config, f"run.dir={two}", "train.distributed=fsdp2", *overrides)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "student" / "model.safetensors")


def assert_same_weights(a: dict, b: dict, *, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_ddp_two_processes_equal_one(dist_config, one_process, tmp_path):
    run_dir = tmp_path / "ddp"
    torchrun(dist_config, f"run.dir={run_dir}", "train.distributed=ddp")
    ref, got = losses(one_process), losses(run_dir)
    assert list(got) == list(range(1, STEPS + 1))  # rank 0 alone logs: one line per step
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step
    assert got[STEPS] < 0.9 * got[1]  # it learns
    assert_same_weights(weights(one_process), weights(run_dir), atol=2e-5)
    assert (run_dir / "student" / "README.md").is_file() and (run_dir / "config.yaml").is_file()


def test_fsdp2_trains_and_resumes_from_sharded_checkpoint(dist_config, one_process, tmp_path):
    whole = tmp_path / "fsdp"
    probe = tmp_path / "probe" / "probe.py"
    probe.parent.mkdir()
    probe.write_text(PROBE)
    out = torchrun(dist_config, f"run.dir={whole}", "train.distributed=fsdp2", "train.save_every=2",
                   "train.keep_checkpoints=3", "train.teacher_offload=true", probe=probe)
    ref, got = losses(one_process), losses(whole)
    for step in ref:  # sharded student and teacher: the same curve
        assert got[step] == pytest.approx(ref[step], rel=1e-4), step
    assert_same_curves(one_process, whole, "grad_norm", rel=1e-4)  # the head's gradient reaches the shards
    teacher = [json.loads((probe.parent / f"rank-{r}.json").read_text()) for r in range(2)]
    total = teacher[0]["total"]
    assert sum(t["local"] for t in teacher) == total  # every element on exactly one rank ...
    for t in teacher:  # ... about half on each (FSDP2 pads dim 0 to a multiple of the world size)
        assert abs(t["local"] - total / 2) < 0.01 * total, t
        assert not t["requires_grad"] and not t["grads"] and not t["in_optimizer"], t
    assert "teacher_offload has no effect on a CPU-only run" in out.stderr  # CPU: nothing to offload to
    # the fused loss (the default, as in the 1-process run) uses the sharded student's head, gathered by its forward
    assert "loss.implementation=fused falls back" not in out.stderr, out.stderr[-4000:]
    ckpt = whole / "checkpoints" / "step-00000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["extra"]["sharded"] and any(n.endswith(".distcp") for n in meta["sha256"])
    assert_same_weights(weights(one_process), weights(whole), atol=1e-4)

    resumed = tmp_path / "resumed"  # a run that stopped after step 2, resumed at the same world size
    shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
    torchrun(dist_config, f"run.dir={resumed}", "train.distributed=fsdp2", "train.save_every=2", resume=True)
    assert list(losses(resumed)) == list(range(3, STEPS + 1))
    for step in range(3, STEPS + 1):
        assert losses(resumed)[step] == pytest.approx(losses(whole)[step], rel=1e-6)
    assert_same_weights(weights(whole), weights(resumed), atol=1e-6)


def test_teacher_offload_needs_fsdp2(dist_config, tmp_path):
    with pytest.raises(UserError, match="train.distributed=fsdp2"):
        distill.run(load_config(dist_config, [f"run.dir={tmp_path / 'run'}", "train.teacher_offload=true"]))


def test_fsdp2_trains_projectors_and_learned_weights_like_one_process(dist_config, tmp_path):
    """Trainable plugins (a hidden-state projector, learned loss weights) beside a sharded student:
    their replicated gradients are summed over ranks, and the gradient norm spans both kinds."""
    one, two, out = one_and_two(dist_config, tmp_path, "features.hidden.weight=1.0",
                                "features.hidden.projector=xavier", "features.weighting=uncertainty")
    assert_same_curves(one, two, "loss", "term/hidden", "grad_norm", rel=1e-4)
    assert "falls back" not in out.stderr  # the fused loss (the default) on the sharded student
    assert (two / "projector.safetensors").is_file()
    for k, v in load_file(one / "projector.safetensors").items():
        torch.testing.assert_close(load_file(two / "projector.safetensors")[k], v, rtol=0, atol=1e-4, msg=k)


@pytest.fixture(scope="module")
def qwen3_student(tmp_path_factory) -> Path:
    """A tiny Qwen3 (per-head q/k norms) with the tiny teacher's tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from kdkit.models.tiny import BOS_ID, EOS_ID, PAD_ID, tiny_tokenizer

    tok = tiny_tokenizer()
    config = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
                         pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    directory = tmp_path_factory.mktemp("qwen3")
    Qwen3ForCausalLM(config).save_pretrained(directory)  # its weights are unused: student.init=config
    tok.save_pretrained(directory)
    return directory


def test_fsdp2_attention_features_with_per_head_norms(dist_config, qwen3_student, tmp_path):
    """A student whose attention applies per-head q/k norms (Qwen3, OLMo-2): the attention term
    re-applies them after the forward, so they stay whole on every rank (and train like one process).
    The dense loss here: the sharded student's head called after its forward (the fused loss: above)."""
    one, two, _ = one_and_two(dist_config, tmp_path, f"student.path={qwen3_student}",
                              "features.attention.weight=1.0", "loss.implementation=dense")
    assert_same_curves(one, two, "loss", "term/attention", "grad_norm", rel=1e-4)
    assert_same_weights(weights(one), weights(two), atol=1e-4)
