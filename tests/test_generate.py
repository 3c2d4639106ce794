"""Black-box distillation: elicitation strategies, parsers, filters, the licence gate, resume, `kdkit sft`.

Tiny models write junk, so the strategies are tested with a scripted backend whose answers depend
on the prompt (prompts built from templates, parsers, checks, counts, ids), and the plumbing through
the real command on a tiny model (stage files, shards, manifest, kill -9 + resume, sft).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kdkit.cli import main as cli_main
from kdkit.config import Config, FilterConfig, TaskConfig, build_config
from kdkit.data.quality import apply_filters, confidence, distinct_n, near_duplicates
from kdkit.data.sources import load_examples
from kdkit.errors import UserError
from kdkit.models.license import FLAG, REASON, license_gate, license_from_url
from kdkit.recipes import generate, sft
from kdkit.teacher import parse as P
from kdkit.teacher.dataset import read_manifest
from kdkit.teacher.elicit import run_task
from kdkit.teacher.generate import answer_row

from conftest import write_jsonl
from test_http_teacher import serve  # noqa: F401  (the fault-injecting server fixture)

QUESTIONS = ["What is 12 + 7?", "What is 9 * 6?", "What is (3 + 5) * 2?", "Name a colour."]
DEMOS = [{"prompt": f"demo question {i}?", "completion": f"demo answer {i}."} for i in range(4)]


# ---------------------------------------------------------------- parsers


def test_parsers_read_what_they_should_and_name_why_not():
    assert P.parse_json('Sure!\n```json\n{"input": "Why?"}\n```', field="input").value == "Why?"
    assert P.parse_json('{"a": 1} trailing', field="input").reason == "json: no field 'input'"
    assert P.parse_json("no json here").reason == "json: no object"
    assert P.parse_regex("Title: Hello\n", P.compile_pattern(r"Title: (.+)", where="t")).value == "Hello"
    assert P.parse_regex("nothing", P.compile_pattern(r"Title: (.+)", where="t")).reason == "regex: no match"
    with pytest.raises(UserError, match="needs a group"):
        P.compile_pattern("Title", where="t")
    cot = P.parse_answer("3 + 5 is 8, and 8 * 2 is 16.\nAnswer: 16.")
    assert cot.value == {"reasoning": "3 + 5 is 8, and 8 * 2 is 16.", "answer": "16"}
    assert P.parse_answer("#### 42").value["answer"] == "42" and P.parse_answer(r"so \boxed{7}").value["answer"] == "7"
    assert P.parse_answer("I think it is big").reason == "answer: no final answer"
    assert P.parse_score("Score: 8/10").value == 8.0 and P.parse_score("Score: 42").reason == "score: out of range"
    assert P.parse_text("   ").reason == P.EMPTY


def test_safe_arithmetic_never_evaluates_code():
    assert P.safe_eval("(3 + 5) * 2") == 16 and P.safe_eval("7 × 6") == 42 and P.safe_eval("2^10") == 1024
    assert P.find_expression("What is (3 + 5) * 2?") == "(3 + 5) * 2"
    assert P.find_expression("Name a colour.") is None
    for bad in ['__import__("os").system("echo hi")', "a + 1", "2 ** 100000", "1 / 0", "[1] * 3"]:
        with pytest.raises(ValueError):
            P.safe_eval(bad)
    assert P.same_answer("1,000", "1000.0") and P.same_answer("Paris.", "paris") and not P.same_answer("17", "16")


# ---------------------------------------------------------------- filters and report


def _item(i, output, inp=None, **extra):
    return {"id": f"t-{i:05d}", "task": "t", "strategy": "labelling", "input": inp or f"question {i}",
            "output": output, **extra}


def test_filters_count_what_each_removed():
    base = "the quick brown fox jumps over the lazy dog near the river bank today"
    items = [
        _item(0, base), _item(1, base, inp="question 0"),  # exact duplicate of 0
        _item(2, base + " again", inp="question 0"),  # near duplicate of 0
        _item(3, "x"),  # too short
        _item(4, "a confident but different answer about planets", confidence={"mean_logprob": -0.1}),
        _item(5, "an unsure answer about rivers and seas", confidence={"mean_logprob": -9.0}),
        _item(6, "a graded answer that the judge disliked a lot", score=2.0),
        _item(7, "a graded answer that the judge liked very much", score=9.0),
    ]
    fc = FilterConfig(min_chars=3, dedupe="near", near_threshold=0.7, min_mean_logprob=-5.0, min_judge_score=5)
    kept, removed = apply_filters(list(reversed(items)), fc)
    assert [it["id"] for it in kept] == ["t-00004"]  # items without log-probs cannot pass a confidence threshold
    assert removed == {"length": 1, "confidence_logprob": 6, "judge_score": 0, "exact_duplicate": 0,
                       "near_duplicate": 0}
    # without the confidence filter (items 0-2, 6, 7 carry no log-probs and would fail it):
    fc = FilterConfig(min_chars=3, dedupe="near", near_threshold=0.7, min_judge_score=5)
    kept, removed = apply_filters(list(reversed(items)), fc)
    assert [it["id"] for it in kept] == ["t-00000", "t-00004", "t-00005", "t-00007"]
    assert removed == {"length": 1, "judge_score": 1, "exact_duplicate": 1, "near_duplicate": 1}
    fc = FilterConfig(min_chars=0, dedupe="none", min_mean_logprob=-5.0)
    kept, removed = apply_filters(items, fc)
    assert [it["id"] for it in kept] == ["t-00004"] and removed["confidence_logprob"] == 7


def test_minhash_finds_near_duplicates_only():
    a = ("the teacher writes a long answer about the water cycle: the sun warms the sea, water rises as vapour, "
         "cools into clouds high in the sky and falls again as rain on the hills and rivers")
    texts = [a, a.replace("clouds", "cloud"), "a completely different sentence on the history of rome and its emperors"]
    assert near_duplicates(texts, threshold=0.6) == {1}
    assert near_duplicates(texts, threshold=0.99) == set()
    assert distinct_n(["a a a a"], 1) == 0.25 and distinct_n(["a b c"], 2) == 1.0
    conf = confidence([["a", -0.5, [["a", -0.5], ["b", -1.5]]], ["b", -1.5, [["a", -0.5], ["b", -1.5]]]])
    assert conf["mean_logprob"] == pytest.approx(-1.0) and 0 < conf["mean_entropy"] < 0.7


# ---------------------------------------------------------------- licence gate


@pytest.mark.parametrize("licence", ["llama2", "llama3", "llama3.1", "gemma", "cc-by-nc-4.0", "CC BY-NC-SA 4.0",
                                     "cc-by-nd-4.0", "openai-terms", "anthropic", "mnpl"])
def test_restricted_licences_are_refused_unless_allowed_with_a_reason(licence):
    with pytest.raises(UserError) as err:
        license_gate(licence)
    assert licence in str(err.value) and FLAG in str(err.value) and REASON in str(err.value)
    with pytest.raises(UserError, match=REASON):
        license_gate(licence, allow=True, reason="  ")
    decision = license_gate(licence, allow=True, reason="written permission from the licensor")
    assert decision["status"] == "restricted-allowed" and decision["reason"] == "written permission from the licensor"


def test_permissive_and_unknown_licences_pass():
    for licence in ("apache-2.0", "mit", "cc-by-4.0", "cc-by-sa-4.0"):
        assert license_gate(licence)["status"] == "permitted"
    assert license_gate(None)["status"] == "unknown"
    assert license_from_url("https://api.openai.com/v1") == "openai-terms" and license_from_url("http://x:1/v1") is None


# ---------------------------------------------------------------- strategies, scripted teacher


def scripted(prompt: str) -> str:
    """A deterministic 'teacher' for the strategies' plumbing."""
    if "Write one new question" in prompt:
        n = sum(map(ord, prompt)) % 7
        if n % 2:  # a preamble line, then a labelled question: read without JSON
            return f"Here is a new question:\nQuestion: new question {n} from demos?"
        return "demo question 0?" if n == 0 else json.dumps({"input": f"new question {n} from demos?"})
    if "Topic:" in prompt:
        topic = prompt.split("Topic:")[1].splitlines()[0].strip()
        return f'```json\n{{"input": "Tell me about {topic}."}}\n```'
    if "Rate the answer" in prompt:
        return "Score: 2" if "9 * 6" in prompt else "Score: 8"
    if "step by step" in prompt:
        q = prompt.rsplit("Question:", 1)[1]
        return {"12 + 7": "12 plus 7 is 19.\nAnswer: 19", "9 * 6": "9 times 6 is 56.\nAnswer: 56",
                "(3 + 5) * 2": "It is 16.\nAnswer: 16"}.get(next((k for k in ("12 + 7", "9 * 6", "(3 + 5) * 2")
                                                                   if k in q), ""), "I do not know.")
    return f"reply to [{prompt[-40:]}]"


def scripted_complete(examples, out: Path, *, top_logprobs: int = 0, max_new_tokens: int | None = None):
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        for e in examples:
            lp = [["tok", -0.25, [["tok", -0.25]] * top_logprobs]] if top_logprobs else None
            f.write(answer_row(e, scripted(e.messages[-1]["content"]), **({"teacher_logprobs": lp} if lp else {})))
    return out


def _task(**kw) -> TaskConfig:
    return TaskConfig(**kw)


def test_every_strategy_builds_prompts_parses_checks_and_counts(tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"prompt": q} for q in QUESTIONS])
    demos = write_jsonl(tmp_path / "demos.jsonl", DEMOS)
    stages = tmp_path / "stages"
    run = lambda task, **kw: run_task(task, complete=scripted_complete, stage_dir=stages, seed=0,  # noqa: E731
                                      want_confidence=False, **kw)

    label = run(_task(name="label", inputs=str(questions), demonstrations=str(demos), num_demonstrations=2,
                      instruction="Answer briefly."))
    assert [it["id"] for it in label["items"]] == [f"label-{i:05d}" for i in range(4)]
    sent = [json.loads(line)["messages"][0]["content"] for line in (stages / "label.answers.jsonl").open()]
    assert all(s.startswith("Answer briefly.") and s.count("demo question") == 2 for s in sent)
    assert label["templates"]["answer"]["ref"] == "labelling" and len(label["templates"]["answer"]["sha256"]) == 16

    expand = run(_task(name="expand", strategy="expansion", demonstrations=str(demos), count=12))
    c = expand["counts"]
    assert c["seeds"] + sum(c["rejected"].values()) == 12 and c["rejected"].get("input: copies a demonstration")
    assert all(it["input"].startswith("new question") for it in expand["items"])

    curate = run(_task(name="curate", strategy="curation", domain="science", topics=["moon", "rain"], count=4))
    assert [it["input"] for it in curate["items"]] == ["Tell me about moon.", "Tell me about rain.", "Tell me about moon.",
                                                      "Tell me about rain."]

    cot = run(_task(name="cot", strategy="chain_of_thought", inputs=str(questions)))
    assert cot["counts"]["rejected"] == {"answer: no final answer": 1, "check: wrong answer": 1}
    assert {it["answer"]: it["checked"] for it in cot["items"]} == {"19": True, "16": True}
    assert cot["items"][0]["reasoning"] == "12 plus 7 is 19." and cot["items"][0]["output"].endswith("Answer: 19")

    graded = run(_task(name="self", strategy="self_knowledge", inputs=str(questions)))
    assert [it["score"] for it in graded["items"]] == [8.0, 2.0, 8.0, 8.0]
    refined = run(_task(name="refine", strategy="self_knowledge", review="refine", inputs=str(questions), count=2))
    assert all(it["draft"] != it["output"] for it in refined["items"]) and (stages / "refine.review.jsonl").exists()

    feature = run(_task(name="feat", strategy="feature", inputs=str(questions), count=2, top_logprobs=3))
    assert all(len(it["teacher_logprobs"][0][2]) == 3 and it["confidence"]["mean_logprob"] == -0.25
               for it in feature["items"])

    regex = run(_task(name="rx", inputs=str(questions), parser="regex", parse_pattern=r"reply to \[(\w+)"))
    assert [it["output"] for it in regex["items"]] == ["What", "What", "What", "Name"]
    as_json = run(_task(name="js", inputs=str(questions), parser="json", parse_field="answer"))
    assert as_json["counts"]["rejected"] == {"json: no object": 4} and as_json["items"] == []


def test_templates_are_files_overridable_by_path(tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"prompt": q} for q in QUESTIONS[:2]])
    mine = tmp_path / "mine.jinja"
    mine.write_text("MY TEMPLATE: {{ input }}")
    out = run_task(_task(name="t", inputs=str(questions), templates={"answer": str(mine)}),
                   complete=scripted_complete, stage_dir=tmp_path / "s", seed=0, want_confidence=False)
    sent = [json.loads(line)["messages"][0]["content"] for line in (tmp_path / "s" / "t.answers.jsonl").open()]
    assert sent == [f"MY TEMPLATE: {q}" for q in QUESTIONS[:2]] and out["templates"]["answer"]["ref"] == str(mine)
    with pytest.raises(UserError, match="no slot"):
        run_task(_task(name="u", inputs=str(questions), templates={"review": str(mine)}),
                 complete=scripted_complete, stage_dir=tmp_path / "s", seed=0, want_confidence=False)
    mine.write_text("{{ nothing_like_this }}")
    with pytest.raises(UserError, match="nothing_like_this"):
        run_task(_task(name="v", inputs=str(questions), templates={"answer": str(mine)}),
                 complete=scripted_complete, stage_dir=tmp_path / "s", seed=0, want_confidence=False)


# ---------------------------------------------------------------- the real command on a tiny teacher


def _tiny_generate_config(tmp_path, tiny_teacher, run_dir: Path, *, only=None, **teacher) -> Path:
    questions = write_jsonl(tmp_path / "q.jsonl", [{"prompt": q} for q in QUESTIONS])
    demos = write_jsonl(tmp_path / "demos.jsonl", DEMOS)
    strategies = {"label": {"strategy": "labelling", "inputs": str(questions), "demonstrations": str(demos)},
                  "expand": {"strategy": "expansion", "demonstrations": str(demos), "count": 5},
                  "curate": {"strategy": "curation", "domain": "colours", "topics": ["red", "blue"], "count": 3},
                  "feat": {"strategy": "feature", "inputs": str(questions), "count": 2, "top_logprobs": 3},
                  "self": {"strategy": "self_knowledge", "inputs": str(questions), "count": 2},
                  "cot": {"strategy": "chain_of_thought", "inputs": str(questions), "count": 3}}
    cfg = {"run": {"dir": str(run_dir)}, "teacher": {"path": str(tiny_teacher), **teacher},
           "student": {"init": "teacher_layers", "num_layers": 2},
           "data": {"train": str(run_dir / "data" / "train"), "max_length": 96, "max_drop_fraction": 1.0},
           "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "threads": 1},
           "generate": {"max_new_tokens": 6, "batch_size": 1, "shard_size": 4, "do_sample": True,
                        "filters": {"dedupe": "near"},
                        "tasks": [{"name": n, **t} for n, t in strategies.items() if not only or n in only]}}
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _ids(out_dir: Path) -> list[str]:
    return [json.loads(line)["id"] for shard in sorted(out_dir.glob("shard-*.jsonl")) for line in shard.open()]


def _stage_ids(run_dir: Path) -> dict[str, list[str]]:
    return {p.name: sorted(json.loads(line)["id"] for line in p.open())
            for p in sorted((run_dir / "data" / "stages").glob("*.jsonl"))}


def test_kill_9_then_resume_ends_with_the_ids_of_an_uninterrupted_run(tmp_path, tiny_teacher):
    from kdkit.config import load_config

    only = ("label", "expand", "curate")
    whole = tmp_path / "whole"
    out = generate.run(load_config(_tiny_generate_config(tmp_path, tiny_teacher, whole, only=only)))["train"]
    assert _stage_ids(whole)["expand.inputs.jsonl"] == [f"expand-{i:05d}" for i in range(5)]

    killed = tmp_path / "killed"
    config = _tiny_generate_config(tmp_path, tiny_teacher, killed, only=only)
    cmd = [sys.executable, "-m", "kdkit.cli", "generate", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the in-process run uses one thread (conftest): same numerics
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    stage = killed / "data" / "stages" / "expand.inputs.jsonl"  # killed in the middle of the second task
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not stage.exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert not (killed / "data" / "train" / "manifest.json").exists(), "the kill came too late"
    generate.run(load_config(config))  # the rerun (in this process: one interpreter start less)
    assert _stage_ids(killed) == _stage_ids(whole)
    assert _ids(killed / "data" / "train") == _ids(out) and _ids(out)


def test_sft_trains_on_generated_data_and_the_card_records_the_licence(tmp_path, tiny_teacher):
    from kdkit.config import load_config

    run_dir = tmp_path / "run"
    config = _tiny_generate_config(tmp_path, tiny_teacher, run_dir, license="llama3",
                                   allow_restricted_license=True, restricted_license_reason="test fixture")
    cfg = load_config(config, ["generate.filters.dedupe=none", "generate.max_new_tokens=12"])
    next(t for t in cfg.generate.tasks if t.name == "feat").max_new_tokens = 5  # a task's own answer length
    out = generate.run(cfg)["train"]
    manifest = read_manifest(out)
    assert manifest["license"]["status"] == "restricted-allowed" and manifest["teacher"]["backend"] == "local"
    assert set(manifest["tasks"]) == {"label", "expand", "curate", "feat", "self", "cot"}
    assert manifest["counts"]["rows"] == len(_ids(out)) == sum(s["rows"] for s in manifest["shards"])
    assert set(manifest["counts"]["removed_by_filter"]) == {"length"}
    for name, task in manifest["tasks"].items():  # every seed is accepted or rejected for a counted reason
        assert task["accepted"] + sum(task["rejected"].values()) >= task["seeds"] > 0, name
        assert all(len(t["sha256"]) == 16 for t in task["templates"].values())
    assert (out / "diversity.json").exists() and (out / "lengths.png").stat().st_size > 1000
    stages = run_dir / "data" / "stages"
    assert {p.name for p in stages.glob("*.jsonl")} >= {"expand.inputs.jsonl", "curate.inputs.jsonl",
                                                       "self.review.jsonl", "cot.answers.jsonl"}
    feat = [json.loads(line) for line in (stages / "feat.answers.jsonl").open()]
    assert all(len(r["teacher_logprobs"][0][2]) == 3 for r in feat)  # local backend: top-3 per token
    assert max(len(r["teacher_logprobs"]) for r in feat) == 5  # feat's max_new_tokens, not the 12 of the others
    assert manifest["tasks"]["feat"]["max_new_tokens"] == 5 and manifest["tasks"]["label"]["max_new_tokens"] == 12
    rows = load_examples(out)
    assert rows and all(r.messages[-1]["role"] == "assistant" for r in rows)
    result = sft.run(cfg)
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert all(abs(h["kd"] - h["ce"]) < 1e-3 for h in result["history"])  # one-hot teacher: KL = CE
    card = (result["student_dir"] / "README.md").read_text()
    assert "license: llama3" in card and "restricted-allowed" in card and "test fixture" in card
    assert (result["student_dir"] / "model.safetensors").exists()


def test_a_restricted_licence_exits_2_naming_licence_and_flag(tmp_path, tiny_teacher, monkeypatch, capsys):
    config = _tiny_generate_config(tmp_path, tiny_teacher, tmp_path / "run", license="cc-by-nc-4.0")
    for verb in ("generate", "cache", "distill", "sft"):
        monkeypatch.setattr(sys, "argv", ["kdkit", verb, str(config)])
        with pytest.raises(SystemExit) as exit_:
            cli_main()
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "cc-by-nc-4.0" in err and FLAG in err and "Traceback" not in err, verb
    assert not (tmp_path / "run" / "data" / "stages").exists()  # refused before the teacher wrote anything


def test_generate_config_validates_tasks():
    with pytest.raises(UserError, match="strategy"):
        build_config({"generate": {"tasks": [{"name": "a", "strategy": "telepathy"}]}})
    with pytest.raises(UserError, match="did you mean"):
        build_config({"generate": {"tasks": [{"name": "a", "temlates": {}}]}})
    cfg = build_config({"generate": {"tasks": [{"name": "a", "inputs": "x.jsonl"}]}})
    assert isinstance(cfg, Config) and cfg.generate.tasks[0].strategy == "labelling"
    with pytest.raises(UserError, match="unique"):
        generate.run(build_config({"generate": {"tasks": [{"name": "a"}, {"name": "a"}]},
                                   "teacher": {"path": os.devnull}}))


def test_a_stage_resumed_with_other_prompts_is_refused(tmp_path):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"prompt": q} for q in QUESTIONS[:2]])
    task = _task(name="t", inputs=str(questions))
    run_task(task, complete=scripted_complete, stage_dir=tmp_path / "s", seed=0, want_confidence=False)
    task.instruction = "A new instruction."  # the template now renders other prompts for the same ids
    with pytest.raises(UserError, match="t.answers.jsonl holds answers to other prompts"):
        run_task(task, complete=scripted_complete, stage_dir=tmp_path / "s", seed=0, want_confidence=False)


def test_tasks_through_a_served_teacher(tmp_path, serve):
    srv = serve(["503"])  # one retryable fault on the way
    questions = write_jsonl(tmp_path / "q.jsonl", [{"prompt": q} for q in QUESTIONS])
    cfg = build_config({"run": {"dir": str(tmp_path / "run")},
                        "teacher": {"backend": "http", "base_url": srv.url, "max_retries": 2, "timeout_s": 5},
                        "generate": {"tasks": [{"name": "served", "inputs": str(questions), "count": 3}]}})
    out = generate.run(cfg)["train"]
    rows = [r for r in map(json.loads, (out / "shard-00000.jsonl").open())]
    assert [r["id"] for r in rows] == ["served-00000", "served-00001", "served-00002"]
    assert rows[0]["messages"][-1]["content"] == f"answer to: {QUESTIONS[0]}"  # the labelling template, no demos
    manifest = read_manifest(out)
    assert manifest["teacher"]["backend"] == "http" and manifest["license"]["status"] == "unknown"
    assert manifest["tasks"]["served"]["accepted"] == 3
