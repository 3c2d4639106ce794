"""The distill recipe on tiny models: outcomes, gradient accumulation, and kill -9 / resume."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdkit.config import load_config
from kdkit.data.render import tokenize_examples
from kdkit.data.sources import load_examples
from kdkit.recipes import distill
from kdkit.signal import HeadSignal
from kdkit.teacher.online import online_signal_fn
from kdkit.train.loop import micro_batches, train_step
from kdkit.train.setup import build_student, load_teacher


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_distill_learns_and_writes_everything(tiny_config):
    cfg = load_config(tiny_config, ["train.max_steps=30", "train.save_every=0"])
    teacher = load_teacher(cfg)
    t_before = _params(teacher.model)
    out = distill.run(cfg, teacher=teacher)
    run = Path(cfg.run.dir)
    hist = out["history"]
    assert sum(h["kl"] for h in hist[-5:]) < 0.5 * sum(h["kl"] for h in hist[:5])  # loss falls
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in t_before.items())  # teacher unchanged
    m = out["metrics"]
    assert m["student_after"]["kl_to_teacher"] < m["student_before"]["kl_to_teacher"]
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "report.md", "student/model.safetensors",
                 "student/tokenizer.json", "student/README.md"):
        assert (run / name).is_file(), name
    assert "Teacher:" in (run / "student/README.md").read_text()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 31))
    assert list((run / "tb").iterdir())  # TensorBoard events
    from kdkit.losses import scratch

    assert not scratch._RETURNED and not scratch._LENT_VIEW  # nothing of training's gradients held past it


def test_grad_accumulation_4x2_equals_1x8(tiny_config):
    cfg = load_config(tiny_config)
    teacher = load_teacher(cfg)
    data = tokenize_examples(load_examples(cfg.data.train), teacher.tokenizer, max_length=64)
    signal_fn = online_signal_fn(teacher.model, vocab=len(teacher.tokenizer), provenance=teacher.provenance())
    grads, losses = [], []
    for bs, accum in ((2, 4), (8, 1)):
        student = build_student(cfg, teacher)[0]
        batches = micro_batches(data, 0, batch_size=bs, grad_accum=accum, seed=0, pad_id=0)
        assert sum(len(b["ids"]) for b in batches) == 8
        out = train_step(student, batches, signal_fn, cfg, vocab=len(teacher.tokenizer), device="cpu",
                         precision="fp32")
        losses.append(out["loss"])
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()})
    assert abs(losses[0] - losses[1]) <= 1e-6 * abs(losses[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-6, atol=1e-7)


def _run(cfg_path, *extra):
    return subprocess.Popen([sys.executable, "-m", "kdkit.cli", "distill", str(cfg_path), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _last_step(run_dir: Path) -> int:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*[0-9]"))
    return int(ckpts[-1].name.split("-")[1]) if ckpts else 0


def test_sigkill_then_resume_is_bitwise_identical(tiny_config, tmp_path):
    whole = _run(tiny_config, "run.dir=" + str(tmp_path / "whole"))
    assert whole.wait(timeout=300) == 0, whole.stderr.read()[-2000:]

    killed_dir = tmp_path / "killed"
    kill_at = random.Random(os.getpid()).randint(2, 9)
    p = _run(tiny_config, f"run.dir={killed_dir}")
    deadline = time.time() + 300
    while _last_step(killed_dir) < kill_at and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert _last_step(killed_dir) < 12, "the run finished before it could be killed"
    resumed = _run(tiny_config, f"run.dir={killed_dir}", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-2000:]

    a = load_file(tmp_path / "whole" / "student" / "model.safetensors")
    b = load_file(killed_dir / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), f"weights differ after kill at step >= {kill_at}"
    steps = [json.loads(x)["step"] for x in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_config_student_and_eval_recipe(tiny_config, tiny_teacher):
    """A randomly initialised student from a config, then `kdkit eval` on the saved result."""
    from kdkit.recipes import evaluate

    cfg = load_config(tiny_config, ["student.init=config", f"student.path={tiny_teacher}",
                                    "student.config_overrides={num_hidden_layers: 1, hidden_size: 16}",
                                    "train.max_steps=4", "train.save_every=0", "eval.harness_tasks=[kdkit_mc]",
                                    "eval.harness_limit=2", "eval.speed_prompt_tokens=16", "eval.speed_new_tokens=4"])
    out = distill.run(cfg)
    assert out["metrics"]["student_after"]["params"] < out["metrics"]["teacher"]["params"]
    ev = evaluate.run(cfg)
    assert set(ev["metrics"]) == {"teacher", "student_before", "student_after"}
    run_dir = Path(cfg.run.dir)
    for name, m in ev["metrics"].items():  # lm-eval scores and speed/memory/disk of every model
        assert 0.0 <= m["harness"]["kdkit_mc"]["acc"] <= 1.0, name
        assert m["decode_tokens_per_s"] > 0 and m["prefill_tokens_per_s"] > 0 and m["peak_memory_bytes"] > 0, name
    assert ev["metrics"]["student_after"]["disk_bytes"] == (run_dir / "student" / "model.safetensors").stat().st_size
    assert (run_dir / "eval_models" / "student_before" / "config.json").is_file()
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["student_after"]["harness"] == ev["metrics"]["student_after"]["harness"]
    assert "| kdkit_mc acc (lm-eval) |" in (run_dir / "report.md").read_text()
    assert ev["metrics"]["student_after"]["kl_to_teacher"] == pytest.approx(
        out["metrics"]["student_after"]["kl_to_teacher"], rel=1e-4)
    assert ev["metrics"]["student_before"]["kl_to_teacher"] == pytest.approx(
        out["metrics"]["student_before"]["kl_to_teacher"], rel=1e-4)


def test_sigterm_checkpoints_at_step_boundary_and_exits_143(tiny_config, tmp_path):
    run_dir = tmp_path / "pre"
    p = _run(tiny_config, f"run.dir={run_dir}", "train.save_every=0")
    deadline = time.time() + 300
    metrics = run_dir / "metrics.jsonl"
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 143, p.stderr.read()[-2000:]
    step = _last_step(run_dir)
    assert 3 <= step < 12
    resumed = _run(tiny_config, f"run.dir={run_dir}", "train.save_every=0", "--resume")
    assert resumed.wait(timeout=300) == 0
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(range(1, 13))


def test_nonfinite_step_is_skipped_untouched_or_stops(tiny_config):
    from kdkit.train.loop import distill as train_loop
    from kdkit.train.loop import optimizer_step
    from kdkit.train.optim import build_optimizer

    cfg = load_config(tiny_config, ["train.max_steps=4", "train.save_every=0", "train.warmup_steps=0"])
    teacher = load_teacher(cfg)
    data = tokenize_examples(load_examples(cfg.data.train), teacher.tokenizer, max_length=64)
    clean = online_signal_fn(teacher.model, vocab=len(teacher.tokenizer), provenance=teacher.provenance())
    calls = []

    def poisoned(batch):
        calls.append(1)
        sig = clean(batch)
        if len(calls) in (3, 4):  # both micro-batches of step 2
            sig.logits[0, 0] = float("nan")
        return sig

    student = build_student(cfg, teacher)[0]
    hist = train_loop(student, poisoned, data, cfg, run_dir=Path(cfg.run.dir), vocab=len(teacher.tokenizer),
                      pad_id=0).history
    assert [h["skipped"] for h in hist] == [False, True, False, False]
    assert all(torch.isfinite(p).all() for p in student.parameters())

    # a skipped update leaves parameters, optimizer state and schedule exactly as they were
    opt, sched = build_optimizer(student, cfg.train)
    for p in student.parameters():
        p.grad = torch.ones_like(p)
    optimizer_step(student, opt, sched, {"loss": 1.0}, cfg.train, step=1, ids=[])  # one real step first
    before = _params(student), repr(opt.state_dict()), sched.last_epoch
    for p in student.parameters():
        p.grad = torch.full_like(p, float("inf"))
    assert not optimizer_step(student, opt, sched, {"loss": 1.0}, cfg.train, step=2, ids=["a"])
    after = _params(student), repr(opt.state_dict()), sched.last_epoch
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and before[1:] == after[1:]

    calls.clear()
    cfg.train.nonfinite = "stop"
    with pytest.raises(FloatingPointError, match="step 2: non-finite"):
        train_loop(build_student(cfg, teacher)[0], poisoned, data, cfg, run_dir=Path(cfg.run.dir) / "stop",
                   vocab=len(teacher.tokenizer), pad_id=0)


def test_offline_cache_trains_like_online_and_refuses_other_data(tiny_config, tmp_path):
    """`kdkit cache` then `distill` with teacher.signal=cache: same losses as online (k = V, lossy
    1-byte log-probs aside); a cache built from other data is refused, naming the field."""
    from kdkit.errors import UserError
    from kdkit.recipes import cache as cache_recipe

    common = ["train.max_steps=4", "train.save_every=0", "train.precision=fp32", "eval.student_before=false"]
    online = distill.run(load_config(tiny_config, common + [f"run.dir={tmp_path / 'on'}"]))
    cfg = load_config(tiny_config, common + [f"run.dir={tmp_path / 'off'}", "teacher.signal=cache",
                                             "teacher.top_k=101"])
    cache_recipe.run(cfg)
    assert cache_recipe.verify(tmp_path / "off" / "cache") == []
    offline = distill.run(cfg)
    for a, b in zip(online["history"], offline["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
        assert b["top1"] == pytest.approx(a["top1"], abs=0.05)
    other = load_config(tiny_config, common + [f"run.dir={tmp_path / 'off'}", "teacher.signal=cache",
                                               "data.max_length=40"])
    with pytest.raises(UserError, match="dataset_hash"):
        distill.run(other)


def test_fused_implementation_matches_dense_in_training(tiny_config):
    """loss.implementation=fused gives the dense path's loss and gradients inside the real step."""
    cfg = load_config(tiny_config)
    teacher = load_teacher(cfg)
    data = tokenize_examples(load_examples(cfg.data.train), teacher.tokenizer, max_length=64)
    signal_fn = online_signal_fn(teacher.model, vocab=len(teacher.tokenizer), provenance=teacher.provenance())
    batches = micro_batches(data, 0, batch_size=4, grad_accum=2, seed=0, pad_id=0)
    results = []
    for impl in ("dense", "fused"):
        cfg.loss.implementation = impl
        student = build_student(cfg, teacher)[0]
        out = train_step(student, batches, signal_fn, cfg, vocab=len(teacher.tokenizer), device="cpu",
                         precision="fp32")
        results.append((out, {n: p.grad.clone() for n, p in student.named_parameters()}))
    (dense, g_dense), (fused, g_fused) = results
    # fused forward KL runs in closed form (fused_fkl), dense through torch.func: for a KL of ~6e-4 each is
    # within ~1e-4 (relative) of fp64, fp32's rounding of the log-ratios, so they agree to 2e-4, not 1e-5
    assert fused["loss"] == pytest.approx(dense["loss"], rel=2e-4)
    assert fused["kl"] == pytest.approx(dense["kl"], rel=2e-4)
    assert fused["top1"] == dense["top1"] > 0  # progress metrics computed per chunk on the fused path
    for name in g_dense:
        torch.testing.assert_close(g_fused[name], g_dense[name], rtol=1e-4, atol=1e-6)


class _NoWholeLogits(HeadSignal):
    """A HeadSignal whose whole logits must never be formed (the fused path's promise)."""

    @property
    def logits(self):
        raise AssertionError("the (N, V) teacher logits were formed")


@pytest.mark.parametrize("impl,compiled", [("fused", False), ("fused", True), ("dense", False)])
def test_the_online_teacher_as_rows_and_head_matches_its_logits(tiny_config, impl, compiled):
    """online_signal_fn(lazy=True) hands over the teacher's rows + lm_head (HeadSignal): the same loss,
    metrics and gradients as its dense logits, on the fused path (eager and compiled) without ever
    forming the teacher's (N, V) logits, and on the dense path (formed there, as it must)."""
    cfg = load_config(tiny_config)
    teacher = load_teacher(cfg)
    data = tokenize_examples(load_examples(cfg.data.train), teacher.tokenizer, max_length=64)
    vocab = len(teacher.tokenizer)
    dense_fn = online_signal_fn(teacher.model, vocab=vocab, provenance=teacher.provenance())
    lazy_fn = online_signal_fn(teacher.model, vocab=vocab, provenance=teacher.provenance(), lazy=True)
    assert isinstance(lazy_fn(next(iter(micro_batches(data, 0, batch_size=4, grad_accum=1, seed=0, pad_id=0)))),
                      HeadSignal)

    def guarded(batch):
        s = lazy_fn(batch)
        return _NoWholeLogits(**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)})

    batches = micro_batches(data, 0, batch_size=4, grad_accum=2, seed=0, pad_id=0)
    cfg.loss.implementation, cfg.loss.compile = impl, compiled
    results = []
    for fn in (dense_fn, guarded if impl == "fused" else lazy_fn):
        student = build_student(cfg, teacher)[0]
        out = train_step(student, batches, fn, cfg, vocab=vocab, device="cpu", precision="fp32")
        results.append((out, {n: p.grad.clone() for n, p in student.named_parameters()}))
    (a, g_a), (b, g_b) = results
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["kl"] == pytest.approx(a["kl"], rel=1e-5)
    assert b["top1"] == a["top1"] > 0
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-4, atol=1e-6)


def test_time_budget_fixes_the_step_count_and_a_resumed_run_keeps_it(tiny_config, monkeypatch):
    """train.max_seconds: the steps that fit, measured over the warm-up after the first step, written once
    and reused."""
    from kdkit.train import loop

    clock = iter(float(i) for i in range(10**6))  # every perf_counter call: one second later
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    cfg = load_config(tiny_config, ["train.max_steps=500", "train.max_seconds=60", "train.save_every=0",
                                    "train.warmup_steps=6", "eval.student_before=false", "eval.speed=false"])
    out = distill.run(cfg)
    budget = json.loads((Path(cfg.run.dir) / "budget.json").read_text())
    assert budget["at_step"] > 6 and budget["measured_steps"] == budget["at_step"] - 6  # re-planned after the probe
    assert 6 < out["history"][-1]["step"] == budget["max_steps"] < 60  # far below max_steps, above the probe
    assert [h["step"] for h in out["history"]] == list(range(1, budget["max_steps"] + 1))
    lr = [h["lr"] for h in out["history"]]
    assert lr[-1] < 0.2 * max(lr)  # the cosine spans the budgeted steps: it ends near its floor
    again = distill.run(cfg, resume=True)  # resumes at the end: the same count, nothing measured anew
    assert again["history"] == [] and json.loads((Path(cfg.run.dir) / "budget.json").read_text()) == budget


def test_baseline_layers_adds_the_untrained_reference_and_the_ce_gap_closed(tiny_config):
    cfg = load_config(tiny_config, ["train.max_steps=20", "train.save_every=0", "eval.baseline_layers=1",
                                    "eval.speed=false"])
    m = distill.run(cfg)["metrics"]
    assert list(m) == ["teacher", "baseline", "student_before", "student_after"]
    assert m["baseline"]["ce_gap_closed"] == pytest.approx(0.0) and m["teacher"]["ce_gap_closed"] == pytest.approx(1.0)
    gap = (m["baseline"]["ce"] - m["student_after"]["ce"]) / (m["baseline"]["ce"] - m["teacher"]["ce"])
    assert m["student_after"]["ce_gap_closed"] == pytest.approx(gap)
    assert "CE gap closed" in (Path(cfg.run.dir) / "report.md").read_text()


def test_run_max_seconds_gives_training_what_the_pipeline_left(tiny_config):
    """run.max_seconds: train.max_seconds becomes the rest of the budget less the reserve (the lower of the two
    when both are set), at least 60 s."""
    from kdkit.cli import fit_training_to_budget

    cfg = load_config(tiny_config, ["run.max_seconds=900", "run.reserve_seconds=75"])
    fit_training_to_budget(cfg, 300.0)
    assert cfg.train.max_seconds == pytest.approx(525.0)
    cfg = load_config(tiny_config, ["run.max_seconds=900", "train.max_seconds=200"])
    fit_training_to_budget(cfg, 300.0)
    assert cfg.train.max_seconds == 200.0
    cfg = load_config(tiny_config, ["run.max_seconds=100"])
    fit_training_to_budget(cfg, 300.0)
    assert cfg.train.max_seconds == 60.0
    cfg = load_config(tiny_config, [])
    fit_training_to_budget(cfg, 300.0)
    assert cfg.train.max_seconds is None


def test_time_budget_probes_the_warm_up_then_replans_at_the_steady_rate(tmp_path, monkeypatch):
    """Slow first steps (10 s) then fast ones (2 s): the probe over the warm-up plans for 10 s/step, the
    re-plan a third of the way through the rest extends the run to what the budget fits at 2 s/step; steps
    that slow down later (2.4 s from step 100 on) are caught by the re-plans half-way through each rest."""
    from types import SimpleNamespace

    from kdkit.train import loop
    from kdkit.train.dist import DistContext

    def run(slow_from: int):
        now = [0.0]
        monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
        tc = SimpleNamespace(max_seconds=400.0, max_steps=1000, warmup_steps=6)
        budget = loop.TimeBudget(tc, tmp_path, resume=False)
        budget.start()
        done, ctx, plans = 0, DistContext(), []
        while done < tc.max_steps:
            now[0] += 10.0 if done < 6 else 2.0 if done < slow_from else 2.4
            done += 1
            budget.after_step(done, ctx, main=True)
            plans.append(tc.max_steps)
            if done == 6:  # the probe, steps 2..6 at 10 s: (400 - 60) / 10 more
                assert tc.max_steps == 6 + 34
            if done == 17:  # re-planned at step 6 + 34 // 3 = 17 (82 s spent): (400 - 82) / 2 = 159 more steps
                assert tc.max_steps == 17 + 159
        return done, now[0], plans

    done, spent, plans = run(slow_from=10**6)
    assert done == 176 and set(plans[16:]) == {176}  # a steady rate: later re-plans keep the count
    assert spent == pytest.approx(400.0, abs=2.0)  # the budget is used, not 20% of it left
    assert json.loads((tmp_path / "budget.json").read_text())["at_step"] == 156  # 17, 96, 136, 156
    again = loop.TimeBudget(SimpleNamespace(max_seconds=400.0, max_steps=1000, warmup_steps=6), tmp_path, resume=True)
    assert again.tc.max_steps == 176 and not again.pending  # a resumed run keeps the count
    done, spent, _ = run(slow_from=100)
    assert done < 176 and 397.6 <= spent <= 400.0 + 2.4  # fewer steps, the budget kept to within a step


def test_online_bf16_teacher_frees_its_fp32_weights_while_training(tiny_config, monkeypatch):
    """An online signal from the teacher's bf16 copy: the fp32 weights as loaded are freed for training
    (two thirds of the teacher's memory) and loaded again for evaluation, which still compares with them."""
    cfg = load_config(tiny_config, ["train.max_steps=3", "train.save_every=0", "teacher.dtype=bf16"])
    teacher = load_teacher(cfg)
    fp32 = _params(teacher.model)
    seen = {}
    inner = distill.distill

    def spy(*a, **k):
        seen["loaded"], seen["held"] = teacher._model, teacher._held
        return inner(*a, **k)

    monkeypatch.setattr(distill, "distill", spy)
    out = distill.run(cfg, teacher=teacher)
    assert seen["loaded"] is None and seen["held"][0] == torch.bfloat16  # training held the bf16 copy only
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in fp32.items())  # evaluation: fp32 again
    assert out["metrics"]["teacher"]["kl_to_teacher"] == 0.0 and out["metrics"]["teacher"]["top1_agreement"] == 1.0
    assert teacher.held(torch.bfloat16, torch.device("cpu")) is seen["held"][2]  # the copy kept, not re-made


def test_a_run_without_evaluation_never_loads_the_released_teacher_again(tiny_config, monkeypatch):
    """With no held-out data nothing needs the fp32 weights after training: the model card's parameter
    count comes from the bf16 copy (loading them again to count them was the peak memory of such a run)."""
    import kdkit.models.load as M

    cfg = load_config(tiny_config, ["train.max_steps=2", "train.save_every=0", "teacher.dtype=bf16", "data.eval=null"])
    teacher = load_teacher(cfg)
    expected = M.count_parameters(teacher.model)
    loads, real = [], M.load_model
    monkeypatch.setattr(M, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    out = distill.run(cfg, teacher=teacher)
    assert loads == [] and teacher._model is None  # released for training, not loaded again after it
    assert f"{expected:,} parameters" in (out["student_dir"] / "README.md").read_text()


def test_length_grouped_batches_pad_less_cover_the_stream_and_are_a_pure_function_of_the_step():
    from collections import Counter

    from kdkit.data.render import TokenizedData

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 120, (203,), generator=g).tolist()
    data = TokenizedData(ids=[f"e{i}" for i in range(203)], input_ids=[[7] * n for n in lengths],
                         labels=[[3] * n for n in lengths], dropped={}, total=203)

    def run(group, steps):
        return [micro_batches(data, s, batch_size=4, grad_accum=2, seed=1, pad_id=0, group_by_length=group)
                for s in range(steps)]

    def padding(steps):
        real = sum(int(b["attention_mask"].sum()) for st in steps for b in st)
        return 1 - real / sum(b["attention_mask"].numel() for st in steps for b in st)

    plain, grouped = run(0, 100), run(8, 100)  # spans of 8 micro-batches of 4: 32 stream positions
    assert padding(grouped) < padding(plain) / 3
    stream = [i for st in plain for b in st for i in b["ids"]]
    seen = [i for st in grouped for b in st for i in b["ids"]]
    assert Counter(seen) == Counter(stream)  # 800 positions = 25 whole spans: the same examples, regrouped
    assert seen != stream
    again = micro_batches(data, 37, batch_size=4, grad_accum=2, seed=1, pad_id=0, group_by_length=8)
    assert [b["ids"] for b in again] == [b["ids"] for b in grouped[37]]  # resuming at step 37 sees the same rows



def _loop(cfg, **kw):
    """kdkit.train.loop.distill on the tiny teacher, its fresh student and data, with the online signal."""
    from kdkit.train.loop import distill as train

    teacher = load_teacher(cfg)
    student = build_student(cfg, teacher)[0]
    data = tokenize_examples(load_examples(cfg.data.train), teacher.tokenizer, max_length=64)
    signal_fn = online_signal_fn(teacher.model, vocab=len(teacher.tokenizer), provenance=teacher.provenance())
    return train(student, signal_fn, data, cfg, run_dir=Path(cfg.run.dir), vocab=len(teacher.tokenizer),
                 pad_id=teacher.tokenizer.pad_token_id, **kw)

def test_checkpoints_follow_save_every_seconds(tiny_config, monkeypatch):
    """train.save_every_seconds: a checkpoint at the first step boundary that long after the last began, on a
    clock the test drives (each step takes 10 s), beside or instead of save_every; the last step's is the loop's."""
    import kdkit.train.loop as loop

    clock = {"t": 0.0}
    seen = []

    def tick(step):  # the clock advances 10 s per optimizer step
        clock["t"] += 10.0
        seen.append(step)

    monkeypatch.setattr(loop.SaveCadence, "clock", staticmethod(lambda: clock["t"]))
    plugins = loop.Plugins()
    plugins.after_step.append(tick)
    cases = {("train.save_every=0", "train.save_every_seconds=25"): [3, 6, 9, 10],
             ("train.save_every=4", "train.save_every_seconds=25"): [3, 4, 7, 8, 10],
             ("train.save_every=0",): [10]}
    for overrides, expected in cases.items():
        clock["t"], seen[:] = 0.0, []
        cfg = load_config(tiny_config, ["train.max_steps=10", "train.keep_checkpoints=20", *overrides,
                                        f"run.dir={tiny_config.parent / ('cadence-' + '-'.join(overrides))}"])
        _loop(cfg, plugins=plugins)
        steps = sorted(int(p.name.split("-")[1]) for p in (Path(cfg.run.dir) / "checkpoints").iterdir())
        assert steps == expected, overrides


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_compiled_layers_train_as_the_eager_ones(tiny_config, precision, tol):
    """train.compile: the student's decoder layers run through torch.compile (one dynamic-shape graph for every
    layer and batch length) and train to the eager run's losses and weights; the eager forwards are back after."""
    import torch._dynamo

    import kdkit.train.loop as loop
    from kdkit.models.capture import decoder_layers

    runs = {}
    for flag in ("false", "true"):
        cfg = load_config(tiny_config, ["train.max_steps=4", "train.save_every=0", f"train.precision={precision}",
                                        f"train.compile={flag}",
                                        f"run.dir={tiny_config.parent / f'compile-{precision}-{flag}'}"])
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        out = _loop(cfg)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        runs[flag] = ([h["loss"] for h in out.history], _params(out.student), graphs)
        assert all("forward" not in layer.__dict__ for layer in decoder_layers(out.student))  # eager again
    (eager_loss, eager_w, eager_graphs), (comp_loss, comp_w, comp_graphs) = runs["false"], runs["true"]
    assert eager_graphs == 0 and comp_graphs >= 1  # compiled only when asked
    assert comp_loss == pytest.approx(eager_loss, rel=tol)
    # bf16: inductor's softmax rounds an attention probability to bf16 the other way now and then, which can
    # flip the sign of a near-zero gradient entry, and AdamW then moves that weight by up to the peak lr (3e-3)
    atol = tol / 10 if precision == "fp32" else 3e-3
    bad = {k: float((comp_w[k] - eager_w[k]).abs().max())
           for k in eager_w if not torch.allclose(comp_w[k], eager_w[k], rtol=10 * tol, atol=atol)}
    assert not bad, bad


@pytest.mark.parametrize("fused", [True, False])
def test_the_clip_left_to_the_fused_adamw_step_updates_as_clipping_first(fused, monkeypatch):
    """optimizer_step leaves the clip to a fused AdamW (grad_scale: no pass of its own over the gradients);
    the update is clip_grad_norm_'s then step's, to rounding; grad_scale is gone after the step; a non-fused
    optimizer is clipped in place as before."""
    import types

    from kdkit.train.loop import optimizer_step

    def setup():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
        for p in params:
            p.grad = torch.randn_like(p) * 10  # norm ~ 250: clipped to 1
        opt = torch.optim.AdamW(params, lr=1e-2, **({"fused": True} if fused else {"foreach": False}))
        return params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    ref, opt = setup()[:2]
    norm_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    opt.step()
    params, opt, sched = setup()
    model = torch.nn.ParameterList(params)
    if fused:  # no clip pass over the gradients of its own
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: pytest.fail("clipped in a pass"))
    m = {"loss": torch.tensor(2.0)}
    tc = types.SimpleNamespace(max_grad_norm=1.0, nonfinite="skip")
    assert optimizer_step(model, opt, sched, m, tc, step=1, ids=[])
    assert m["grad_norm"] == pytest.approx(norm_ref.item(), rel=1e-6) and m["grad_norm"] > 100
    assert "grad_scale" not in opt.__dict__
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
