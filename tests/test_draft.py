"""`kdkit draft`: greedy acceptance counted from matches (by hand and against transformers' own
rounds), output identical with the draft, resume = uninterrupted, the CLI's files and its errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import chat_rows, write_jsonl
from safetensors.torch import load_file

from kdkit.config import load_config
from kdkit.eval.speculative import (greedy_continuations, greedy_matches, measure_draft, predicted_speedup,
                                    prompt_ids, simulate_rounds, speculative_decoding)
from kdkit.models.load import student_from_layers
from kdkit.models.tiny import tiny_llama, tiny_tokenizer

ROWS = [{"messages": [{"role": "user", "content": f"Say {w} and blue."}]} for w in ("red", "green", "cat", "moon")]


def test_rounds_counted_by_hand():
    m = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    # γ=3: [1 1 0] → 2 accepted + target; [1 0 .] → 1 + target; [0 . .] → 0 + target;
    # [1 1 1] → 3 accepted, and the 10th token is the target's own: 4 rounds, 6 of 12 drafts accepted
    r = simulate_rounds(m, 3)
    assert (r["drafted"], r["accepted"], r["target_forwards"]) == (12, 6, 4)
    assert r["acceptance_rate"] == 0.5 and r["tokens_per_target_forward"] == 2.5
    # a round has room for min(γ, tokens left − 1) drafts: of 7 tokens, γ=4 drafts 4 (+ the target's 5th),
    # then 1 (+ the target's 7th)
    r = simulate_rounds(torch.ones(7, dtype=torch.bool), 4)
    assert (r["drafted"], r["accepted"], r["target_forwards"]) == (5, 5, 2)
    # a text that ends at EOS (2 tokens, limit 10) which the draft proposes too: the draft stops there
    r = simulate_rounds(torch.tensor([True, True]), 3, max_new_tokens=10)
    assert (r["drafted"], r["accepted"], r["target_forwards"]) == (2, 1, 1)
    assert predicted_speedup(0.0, 4, 0.1) == pytest.approx(1 / 1.4)
    assert predicted_speedup(0.5, 1, 0.0) == pytest.approx(1.5)


@pytest.fixture(scope="module")
def pair():
    tok = tiny_tokenizer()
    # an untied head: a tiny random model with tied embeddings just repeats its last token
    teacher = tiny_llama(vocab_size=len(tok), num_layers=4, seed=1, tie_word_embeddings=False)
    return teacher, student_from_layers(teacher, [0, 3]), tok, prompt_ids(tok, ROWS)


def test_simulated_rounds_equal_transformers_rounds(pair):
    """Counts from forward hooks during real assisted generation = rounds replayed from the matches."""
    teacher, draft, tok, prompts = pair
    texts = greedy_continuations(teacher, prompts, max_new_tokens=20, pad_id=tok.pad_token_id)
    matches = greedy_matches(draft, prompts, texts, pad_id=tok.pad_token_id)
    assert 0 < sum(int(m.sum()) for m in matches) < sum(len(m) for m in matches)  # a partly right draft
    for gamma in (1, 3):
        real = speculative_decoding(teacher, draft, prompts, max_new_tokens=20, num_draft_tokens=gamma,
                                    pad_id=tok.pad_token_id)
        sims = [simulate_rounds(m, gamma, max_new_tokens=20) for m in matches]
        for key, real_key in (("drafted", "drafted"), ("accepted", "accepted"), ("target_forwards", "teacher_forwards")):
            assert sum(s[key] for s in sims) == real[real_key], (gamma, key)


def test_measured_draft_output_identical_and_best_gamma(pair):
    teacher, draft, tok, prompts = pair
    m = measure_draft(teacher, draft, prompts, gammas=[1, 2], gamma_prompts=2, speed_prompts=2, new_tokens=12,
                      pad_id=tok.pad_token_id)
    for row in [*m["gammas"].values(), m["final"]]:
        assert row["identical"] == row["prompts"] == 2  # the target's greedy text, token for token
        assert row["new_tokens"] == row["accepted"] + row["target_forwards"]
        assert row["speedup"] > 0 and row["alone_tokens_per_s"] > 0
    assert m["best_gamma"] == max(m["gammas"], key=lambda g: m["gammas"][g]["speedup"])
    assert m["c"] > 0 and 0 <= m["final"]["alpha"] <= 1


@pytest.fixture()
def draft_config(tmp_path, tiny_teacher) -> Path:
    cfg = {
        "run": {"dir": str(tmp_path / "run")}, "teacher": {"path": str(tiny_teacher), "license": "apache-2.0"},
        "data": {"max_length": 64},
        "draft": {"num_layers": 1, "data": str(write_jsonl(tmp_path / "train.jsonl", chat_rows(16))),
                  "heldout": str(write_jsonl(tmp_path / "held.jsonl", chat_rows(6, seed=1))), "onpolicy": 0.5,
                  "onpolicy_tokens": 6, "eval_every": 2, "eval_prompts": 3, "gammas": [1, 2], "gamma_prompts": 1,
                  "speed_prompts": 2, "new_tokens": 8, "speed": False, "threads": 1,
                  "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "save_every": 1,
                            "threads": 1}},
    }
    path = tmp_path / "draft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_resumed_draft_run_equals_uninterrupted(draft_config, tmp_path, monkeypatch):
    from kdkit.recipes import draft as recipe

    whole = recipe.run(load_config(draft_config, [f"draft.dir={tmp_path / 'whole'}"]))
    original = recipe.AcceptanceProbe.__call__

    def crash_at_3(self, step):
        if step == 3:  # after step 3's update, before its checkpoint: the newest checkpoint is step 2
            raise KeyboardInterrupt
        original(self, step)

    cut = [f"draft.dir={tmp_path / 'cut'}"]
    monkeypatch.setattr(recipe.AcceptanceProbe, "__call__", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        recipe.run(load_config(draft_config, cut))
    monkeypatch.setattr(recipe.AcceptanceProbe, "__call__", original)
    resumed = recipe.run(load_config(draft_config, cut), resume=True)

    a, b = (load_file(d / "draft" / "model.safetensors") for d in (tmp_path / "whole", tmp_path / "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "acceptance.jsonl").read_text() == (tmp_path / "cut" / "acceptance.jsonl").read_text()
    assert [r["step"] for r in resumed["acceptance"]] == [0, 2, 4, 6] == [r["step"] for r in whole["acceptance"]]
    assert any(h.get("mode/on_policy") for h in whole["history"])  # on-policy batches were part of it


def _kdkit(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The real command's entry point (kdkit.cli.main), in this process: (exit code, stdout, stderr)."""
    from kdkit import cli

    monkeypatch.setattr(sys, "argv", ["kdkit", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_draft_writes_draft_card_and_speedup(draft_config, tmp_path, tiny_teacher, monkeypatch, capsys):
    code, stdout, stderr = _kdkit(monkeypatch, capsys, "draft", draft_config, "draft.speed=true",
                                  "draft.train.max_steps=2", "draft.eval_every=0")
    assert code == 0, stderr[-3000:]
    out = tmp_path / "run" / "draft"
    assert (out / "draft" / "model.safetensors").is_file() and (out / "draft" / "tokenizer.json").is_file()
    card = (out / "draft" / "README.md").read_text()
    assert f"**Target:** `{tiny_teacher}`" in card and "| γ |" in card
    measured = json.loads((out / "speculative.json").read_text())
    assert measured["final"]["identical"] == measured["final"]["prompts"]
    gen = json.loads((out / "draft" / "generation_config.json").read_text())
    assert gen["num_assistant_tokens"] == measured["best_gamma"] and "speed-up" in stdout
    # kdkit eval with draft.path (no student in this run dir): the draft's speed-up alone
    code, stdout, stderr = _kdkit(monkeypatch, capsys, "eval", draft_config, f"draft.path={out / 'draft'}",
                                  "draft.gammas=[1]")
    assert code == 0, stderr[-3000:]
    again = json.loads((tmp_path / "run" / "speculative.json").read_text())
    assert again["final"]["identical"] == again["final"]["prompts"] and "| γ |" in stdout


def test_cli_narrow_draft_keeps_the_most_important_channels(draft_config, tmp_path, monkeypatch, capsys):
    """draft.hidden_size/intermediate_size: the draft is width-pruned (kdkit.prune.width) after its layers are
    chosen, its sliced embeddings and head trained with train_head; outputs stay identical with it."""
    code, _, stderr = _kdkit(monkeypatch, capsys, "draft", draft_config, "draft.hidden_size=16",
                             "draft.intermediate_size=32", "draft.train_head=true", "draft.speed=true",
                             "draft.gammas=[2]", "draft.train.max_steps=3", "draft.eval_every=0")
    assert code == 0, stderr[-3000:]
    out = tmp_path / "run" / "draft"
    saved = json.loads((out / "draft" / "config.json").read_text())
    assert (saved["hidden_size"], saved["intermediate_size"], saved["num_hidden_layers"]) == (16, 32, 1)
    weights = load_file(out / "draft" / "model.safetensors")
    assert weights["model.embed_tokens.weight"].shape[1] == 16
    measured = json.loads((out / "speculative.json").read_text())
    assert measured["final"]["identical"] == measured["final"]["prompts"] > 0
    assert "width-pruned to hidden 16, intermediate 32" in (out / "draft" / "README.md").read_text()


@pytest.mark.parametrize("override, message", [("draft.num_layers=0", "draft.num_layers"),
                                               ("draft.hidden_size=48", "only shrinks"),
                                               ("draft.hidden_size=18", "nearest hidden sizes it accepts"),
                                               ("draft.target=/no/such/dir", "draft.target"),
                                               ("draft.layers=[0,9]", "draft.layers")])
def test_cli_draft_bad_config_exits_2(draft_config, override, message, monkeypatch, capsys):
    code, _, stderr = _kdkit(monkeypatch, capsys, "draft", draft_config, override)
    assert code == 2 and message in stderr and "Traceback" not in stderr, stderr[-2000:]


def test_pipeline_drafts_for_the_student_it_made(tiny_config, tmp_path):
    from kdkit.cli import run_pipeline

    held = tmp_path / "eval.jsonl"  # tiny_config's held-out rows
    cfg = load_config(tiny_config, ["train.max_steps=2", "train.save_every=0", "eval.speed=false",
                                    "draft.pipeline=true", "draft.num_layers=1", f"draft.prompts={tmp_path / 'train.jsonl'}",
                                    "draft.prompts_limit=8", "draft.answer_tokens=8", "draft.samples=1", f"draft.heldout={held}",
                                    "draft.train.max_steps=2", "draft.train.threads=1", "draft.eval_every=0",
                                    "draft.gammas=[1]", "draft.gamma_prompts=1", "draft.speed_prompts=1",
                                    "draft.new_tokens=6", "draft.threads=1"])
    out = run_pipeline(cfg, ("distill",))
    student = Path(cfg.run.dir) / "student"
    assert f"**Target:** `{student}`" in (Path(cfg.run.dir) / "draft" / "draft" / "README.md").read_text()
    assert out["draft"]["speculative"]["final"]["identical"] == 1
    assert "with its draft" in out["table"] and "## Speculative decoding" in (Path(cfg.run.dir) / "report.md").read_text()
    # the target's fixed data: a greedy answer and one sampled answer (draft.samples=1) per prompt
    ids = [json.loads(line)["id"] for line in (Path(cfg.run.dir) / "draft" / "data" / "train.jsonl").open()]
    assert len(ids) == 16 and len(set(ids)) == 16 and sum(i.endswith("~s1") for i in ids) == 8
