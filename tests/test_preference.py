"""Feedback distillation: teacher preference pairs, DPO (against fp64 and TRL), reward model, RL."""

from __future__ import annotations

import copy
import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import reference as ref
from conftest import WORDS, write_jsonl
from kdkit.config import load_config
from kdkit.data.preference import read_pairs, tokenize_pairs
from kdkit.errors import UserError
from kdkit.models.tiny import tiny_llama, tiny_tokenizer
from kdkit.recipes import dpo, feedback, rl
from kdkit.teacher.feedback import HttpTeacher, make_pairs, parse_score, score_prompts
from kdkit.teacher.generate import done_ids
from kdkit.teacher.prompts import Template
from kdkit.train.preference import dpo_loss, evaluate_pairs, optimize, pair_logps
from kdkit.train.reward import RewardModel, bradley_terry_loss, group_advantages, reward_accuracy, reward_step


def _cfg(tiny_config: Path, *overrides: str):
    return load_config(tiny_config, ["preference.samples_per_prompt=3", "preference.max_new_tokens=8",
                                     "preference.limit=6", *overrides])


def _pair_rows(n: int, *, seed: int) -> list[dict]:
    """Pairs where the chosen answer uses the first half of WORDS and the rejected one the second."""
    g = torch.Generator().manual_seed(seed)
    good, bad = WORDS[:6], WORDS[6:]
    rows = []
    for i in range(n):
        a, b = (int(j) for j in torch.randint(6, (2,), generator=g))
        rows.append({"id": f"p{seed}-{i}", "prompt": [{"role": "user", "content": f"Say {WORDS[a]}."}],
                     "chosen": f"{good[a]} {good[b]}.", "rejected": f"{bad[a]} {bad[b]}."})
    return rows


def _random_pair_batch(vocab: int = 50, pairs: int = 3, length: int = 12, *, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (2 * pairs, length), generator=g)  # (2B, T): chosen rows, then rejected
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding of different lengths
    mask[pairs + 1, -5:] = 0
    completion = torch.zeros_like(ids)
    completion[:, 5:] = 1
    completion[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(completion == 0, -100)}, completion


# ---------------------------------------------------------------- the math


@pytest.mark.parametrize("beta,smoothing", [(0.1, 0.0), (0.5, 0.0), (2.0, 0.2), (0.1, 0.45)])
def test_dpo_loss_matches_fp64_reference(beta, smoothing):
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float32) * 20 for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    losses, rew_c, rew_r = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=smoothing)
    losses.mean().backward()
    pc64, pr64 = pc.detach().double().requires_grad_(True), pr.detach().double().requires_grad_(True)
    expected = ref.dpo_sigmoid(pc64, pr64, rc, rr, beta, smoothing)
    expected.mean().backward()
    torch.testing.assert_close(losses.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pc.grad.double(), pc64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pr.grad.double(), pr64.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rew_c, beta * (pc - rc).detach())
    # identical policy and reference: margin 0, loss log 2 whatever the smoothing
    zero = dpo_loss(rc, rr, rc, rr, beta=beta, label_smoothing=smoothing)[0]
    torch.testing.assert_close(zero, torch.full_like(zero, math.log(2)))


def test_sequence_logps_match_reference_and_sum_only_the_completion():
    model = tiny_llama(vocab_size=50, seed=1)
    batch, completion = _random_pair_batch()
    chosen, rejected = pair_logps(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = ref.completion_logps(logits, batch["input_ids"], completion)
    torch.testing.assert_close(torch.cat([chosen, rejected]).double(), expected, rtol=1e-5, atol=1e-5)
    # a prompt token changed changes the context, but masking it out of the labels never counts it
    assert torch.all(torch.cat([chosen, rejected]) < 0)


def test_dpo_loss_matches_trl():
    pytest.importorskip("trl", reason="TRL is not installed (`pip install trl`); the fp64 tests still run")
    from trl.trainer.dpo_trainer import DPOTrainer

    try:  # checked against trl 1.16: its loss lives in DPOTrainer._compute_loss, with a fused LM head
        from trl.trainer.utils import add_fused_lm_head
    except ImportError:
        pytest.skip("this trl has no add_fused_lm_head (the test follows trl 1.16's DPOTrainer._compute_loss)")
    if not hasattr(DPOTrainer, "_compute_loss"):
        pytest.skip("this trl has no DPOTrainer._compute_loss (the test follows trl 1.16)")

    policy, reference = tiny_llama(vocab_size=50, seed=1), tiny_llama(vocab_size=50, seed=2)
    batch, completion = _random_pair_batch(seed=1)
    beta = 0.3
    pc, pr = pair_logps(policy, batch)
    with torch.no_grad():
        rc, rr = pair_logps(reference, batch)
    ours = dpo_loss(pc, pr, rc, rr, beta=beta)[0].mean()

    # TRL's own loss code on the same inputs: DPOTrainer._compute_loss with the trainer state it reads
    trl_policy, trl_ref = copy.deepcopy(policy), copy.deepcopy(reference)
    for m in (trl_policy, trl_ref):
        add_fused_lm_head(m, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    accel = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(
        model=trl_policy, ref_model=trl_ref, accelerator=accel, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=False, f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": completion}
    theirs = DPOTrainer._compute_loss(trainer, trl_policy, inputs, return_outputs=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    for (name, a), b in zip(policy.named_parameters(), trl_policy.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bradley_terry_and_group_advantages():
    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(8, generator=g), torch.randn(8, generator=g)
    torch.testing.assert_close(bradley_terry_loss(rc, rr).double(), ref.bradley_terry(rc, rr), rtol=1e-5, atol=1e-6)
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3)
    torch.testing.assert_close(adv[3:], torch.zeros(3))  # a group of equal rewards teaches nothing
    assert adv[0] < 0 < adv[2] and abs(float(adv[:3].sum())) < 1e-5


# ---------------------------------------------------------------- preference data


def test_parse_score():
    assert parse_score("Score: 7") == 7.0
    assert parse_score("I'd give it a rating of 8/10.") == 8.0
    assert parse_score("**Score:** 9") == 9.0
    assert parse_score("6") == 6.0
    assert parse_score("The answer is fine.") is None


def test_feedback_writes_pairs_and_resumes_without_duplicates(tiny_config):
    cfg = _cfg(tiny_config)
    out = feedback.run(cfg)
    scored, pairs = out["scored"], out["pairs"]
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["answers"]) == 3 and len(r["scores"]) == 3 for r in rows)
    pair_rows = read_pairs(pairs)
    assert out["num_pairs"] == len(pair_rows) > 0
    assert len({p["id"] for p in pair_rows}) == len(pair_rows)
    teacher_pairs = [p for p in pair_rows if p["source"] == "teacher-student"]
    assert len(teacher_pairs) == 6  # the prompts file holds an answer for every prompt
    for p in pair_rows:
        assert p["chosen"] != p["rejected"]
        if p["source"] == "student-student":
            assert p["scores"]["chosen"] > p["scores"]["rejected"]
    manifest = json.loads(pairs.with_name(pairs.name + ".manifest.json").read_text())
    assert manifest["pairs"] == len(pair_rows) and manifest["scored_rows"] == 6

    # kill -9 mid-write: two whole rows and a torn third survive; the rerun completes the same rows
    original_scored, original_pairs = scored.read_text(), pairs.read_text()
    lines = original_scored.splitlines(keepends=True)
    scored.write_text("".join(lines[:2]) + lines[2][:25])
    pairs.unlink()
    feedback.run(_cfg(tiny_config))
    again = scored.read_text().splitlines()
    assert len(again) == 6 and len(done_ids(scored)) == 6
    assert sorted(again) == sorted(original_scored.splitlines())  # same samples, same scores: seeded by id
    assert pairs.read_text() == original_pairs


def test_judge_scores_pairs_through_a_served_teacher():
    replies = iter(["Score: 3", "Score: 9", "no idea", "Score: 10"])

    class Client:
        def chat(self, messages, **kw):
            assert messages[0]["content"].startswith("Q: q\nA: ans")
            return {"text": next(replies)}

    template = Template("t", Path("t"), "Q: {{ prompt }}\nA: {{ answer }}\nScore?")
    judge = HttpTeacher(Client(), model="m", template=template, judge_max_new_tokens=4)
    assert judge.scores([{"role": "user", "content": "q"}], ["ans1", "ans2", "ans3"]) == [3.0, 9.0, None]
    row = {"id": "x", "prompt": [{"role": "user", "content": "q"}], "answers": ["a", "b", "c"],
           "scores": [3.0, 9.0, None], "teacher_answer": "t", "teacher_score": 10.0, "scorer": "judge"}
    pairs = make_pairs(row)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("b", "a"), ("t", "a")]
    assert make_pairs({**row, "scores": [5.0, 5.0, None]}, min_margin=0.0)[0]["source"] == "teacher-student"
    assert [p["source"] for p in make_pairs(row, student_pairs=False)] == ["teacher-student"]


def test_local_judge_renders_the_template_and_parses_each_reply(tiny_teacher):
    from kdkit.models.load import load_model, resolve
    from kdkit.teacher.feedback import LocalTeacher, load_judge_template

    template = load_judge_template(None)
    assert template.path.name == "judge.jinja"
    judge = LocalTeacher(load_model(resolve(str(tiny_teacher))), tiny_tokenizer(), scorer="judge", template=template,
                         judge_max_new_tokens=3, max_length=64)
    judge._greedy = lambda convs, n: [f"Score: {len(c[0]['content']) % 10}" for c in convs]  # a scripted judge
    scores = judge.scores([{"role": "user", "content": "q"}], ["a", "bb"])
    assert scores == [float(len(template.render(prompt="q", answer=a)) % 10) for a in ("a", "bb")]


def test_judge_template_without_placeholders_is_a_user_error(tmp_path):
    from kdkit.teacher.feedback import load_judge_template

    bad = tmp_path / "judge.jinja"
    bad.write_text("Rate this: {{ answer }}")
    with pytest.raises(UserError, match="lacks {{ prompt }}"):
        load_judge_template(str(bad))


def test_feedback_refuses_loglik_with_a_served_teacher(tiny_config):
    with pytest.raises(UserError, match="scorer=judge"):
        feedback.run(_cfg(tiny_config, "teacher.backend=http"))


def test_score_prompts_skips_done_ids(tmp_path):
    from kdkit.data.sources import Example

    calls = []
    teacher = SimpleNamespace(scores=lambda p, a: [float(len(x)) for x in a], answer=lambda p, n: "t")

    def sample(example):
        calls.append(example.id)
        return ["a", "bb"]

    examples = [Example(id=f"e{i}", messages=[{"role": "user", "content": "hi"}]) for i in range(3)]
    out = tmp_path / "s.jsonl"
    score_prompts(examples[:2], out, sample_fn=sample, teacher=teacher, scorer="x", teacher_pairs=True,
                  max_new_tokens=4)
    score_prompts(examples, out, sample_fn=sample, teacher=teacher, scorer="x", teacher_pairs=True, max_new_tokens=4)
    assert calls == ["e0", "e1", "e2"] and len(out.read_text().splitlines()) == 3


# ---------------------------------------------------------------- training


def test_dpo_increases_the_margin_and_saves_a_student(tiny_config, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", _pair_rows(16, seed=0))
    cfg = _cfg(tiny_config, f"preference.pairs={pairs}", "train.max_steps=10", "train.lr=1e-2",
               "preference.beta=0.5", "train.save_every=0")
    out = dpo.run(cfg)
    assert out["pairs_after"]["margin"] > out["pairs_before"]["margin"] + 1.0
    assert out["pairs_after"]["accuracy"] > out["pairs_before"]["accuracy"]
    history = out["history"]
    assert history[-1]["loss"] < history[0]["loss"] and history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    card = (out["student_dir"] / "README.md").read_text()
    assert "Feedback distillation" in card and "DPO" in card
    assert (out["run_dir"] / "checkpoints").is_dir() and out["metrics"]["student_after"]
    logged = [json.loads(line) for line in (out["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, 11)) and "reward_margin" in logged[0]


def test_dpo_resume_equals_uninterrupted(tiny_config, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", _pair_rows(8, seed=0))
    common = [f"preference.pairs={pairs}", "train.max_steps=4", "train.batch_size=2", "data.eval=null"]
    full = dpo.run(_cfg(tiny_config, *common, f"run.dir={tmp_path / 'a'}"))
    dpo.run(_cfg(tiny_config, *common, f"run.dir={tmp_path / 'b'}", "train.max_steps=2"))
    resumed = dpo.run(_cfg(tiny_config, *common, f"run.dir={tmp_path / 'b'}"), resume=True)
    assert len(resumed["history"]) == 2  # only steps 3 and 4 ran
    assert resumed["history"][-1]["loss"] == pytest.approx(full["history"][-1]["loss"], rel=1e-5)


def test_reward_model_ranks_held_out_pairs_better_than_chance(tiny_config):
    cfg = _cfg(tiny_config, "train.max_steps=30", "train.lr=3e-3", "train.warmup_steps=2", "train.batch_size=8",
               "train.grad_accum=1")
    tok = tiny_tokenizer()
    train = tokenize_pairs(_pair_rows(32, seed=0), tok, max_length=64)
    held = tokenize_pairs(_pair_rows(16, seed=1), tok, max_length=64)
    rm = RewardModel(tiny_llama(vocab_size=len(tok), hidden_size=32, num_layers=2, seed=0))
    assert reward_accuracy(rm, held, pad_id=tok.pad_token_id) == 0.0  # zero head: all ties, none ranked
    history = optimize(rm, lambda step: reward_step(rm, train, step, tc=cfg.train, pad_id=tok.pad_token_id,
                                                   device=torch.device("cpu")),
                       cfg.train, run_dir=Path(cfg.run.dir) / "rm", desc="rm")
    assert history[-1]["loss"] < history[0]["loss"]
    assert reward_accuracy(rm, held, pad_id=tok.pad_token_id) >= 0.8


@pytest.mark.parametrize("reward", ["teacher", "reward_model"])
def test_rl_runs_and_logs_the_kl_to_the_reference(tiny_config, tmp_path, reward):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", _pair_rows(10, seed=0))
    cfg = _cfg(tiny_config, f"preference.reward={reward}", f"preference.pairs={pairs}", "train.max_steps=4",
               "train.lr=1e-2", "preference.reward_steps=3", "preference.kl_coef=0.1", "train.warmup_steps=1")
    out = rl.run(cfg)
    logged = [json.loads(line) for line in (out["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert all(math.isfinite(m["kl"]) and math.isfinite(m["reward"]) and m["kl_k3"] >= 0 for m in logged)
    assert logged[0]["kl_k3"] == pytest.approx(0.0, abs=1e-6)  # step 1 samples from π = π_ref
    assert logged[-1]["kl_k3"] > 0  # the policy moved away from the reference
    assert (out["student_dir"] / "README.md").read_text().count("KL penalty") == 1
    if reward == "reward_model":
        assert "reward model held-out accuracy" in out and (out["run_dir"] / "reward_model" / "checkpoints").is_dir()


def test_evaluate_pairs_counts_the_margin():
    tok = tiny_tokenizer()
    data = tokenize_pairs(_pair_rows(4, seed=2), tok, max_length=64)
    model = tiny_llama(vocab_size=len(tok), seed=0)
    result = evaluate_pairs(model, data, pad_id=tok.pad_token_id)
    assert 0.0 <= result["accuracy"] <= 1.0 and math.isfinite(result["margin"])


def test_cli_dpo_without_pairs_exits_2_and_says_what_to_do(tiny_config, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "kdkit.cli", "dpo", str(tiny_config),
                        f"preference.pairs={tmp_path / 'none.jsonl'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "kdkit feedback" in r.stderr and "Traceback" not in r.stderr
