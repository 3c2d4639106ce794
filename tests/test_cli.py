"""User errors through the real command: exit code 2, a message that says what and where, no traceback."""

import json
import subprocess
import sys

import yaml


def _kdkit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kdkit.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_zero_usable_rows_exit_2_and_say_why(tiny_config, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n" for i in range(5)))
    r = _kdkit("distill", tiny_config, f"data.train={bad}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "no usable rows" in r.stderr and "5 without an assistant turn" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_malformed_jsonl_names_file_and_line(tiny_config, tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    r = _kdkit("distill", tiny_config, f"data.train={bad}")
    assert r.returncode == 2 and f"{bad}" in r.stderr and "line 2" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_misspelled_override_and_missing_model(tiny_config, tmp_path):
    r = _kdkit("distill", tiny_config, "loss.temprature=2")
    assert r.returncode == 2 and "did you mean 'loss.temperature'" in r.stderr
    r = _kdkit("distill", tiny_config, f"teacher.path={tmp_path / 'missing'}")
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr


def test_config_print_shows_resolved_values_and_docs(tiny_config):
    r = _kdkit("config", "print", tiny_config, "train.lr=0.01")
    assert r.returncode == 0
    assert "lr: 0.01  # peak learning rate" in r.stdout
    assert yaml.safe_load(r.stdout)["train"]["lr"] == 0.01


def say_prompts(tmp_path, n: int):
    """A prompts file of n rows {"id": "p<i>", "prompt": "Say <i>."}."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Say {i}."}) + "\n" for i in range(n)))
    return path


def answer_ids(out):
    """The ids of a generated answers file, in file order."""
    return [json.loads(x)["id"] for x in out.read_text().splitlines()]


def test_generate_writes_messages_and_resumes(tiny_config, tmp_path):
    prompts = say_prompts(tmp_path, 5)
    out = tmp_path / "gen.jsonl"
    args = ("generate", tiny_config, f"generate.prompts={prompts}", f"generate.output={out}",
            "generate.max_new_tokens=6", "generate.batch_size=2")
    assert _kdkit(*args).returncode == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [f"p{i}" for i in range(5)]
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    # a torn last line (a kill mid-write) is cut, the missing answers redone, nothing duplicated
    out.write_text("\n".join(out.read_text().splitlines()[:2]) + '\n{"id": "p')
    assert _kdkit(*args).returncode == 0
    ids = answer_ids(out)
    assert sorted(ids) == [f"p{i}" for i in range(5)]


def test_generate_samples_adds_sampled_answers_per_prompt_and_resumes(tiny_config, tmp_path):
    """generate.samples=2: each prompt answered once as configured and twice sampled (ids ID~s1, ID~s2); a
    rerun writes nothing twice."""
    prompts = say_prompts(tmp_path, 3)
    out = tmp_path / "gen.jsonl"
    args = ("generate", tiny_config, f"generate.prompts={prompts}", f"generate.output={out}",
            "generate.max_new_tokens=8", "generate.batch_size=2", "generate.samples=2", "generate.temperature=1.5")
    assert _kdkit(*args).returncode == 0
    rows = {json.loads(x)["id"]: json.loads(x) for x in out.read_text().splitlines()}
    assert sorted(rows) == sorted(f"p{i}{s}" for i in range(3) for s in ("", "~s1", "~s2"))
    assert all(r["messages"][0]["content"] == rows[i.split("~")[0]]["messages"][0]["content"] for i, r in rows.items())
    assert len({rows[f"p{i}{s}"]["messages"][-1]["content"] for i in range(3) for s in ("", "~s1", "~s2")}) > 3
    before = out.read_text()
    assert _kdkit(*args).returncode == 0
    assert out.read_text() == before
    manifest = json.loads((tmp_path / "gen.jsonl.manifest.json").read_text())
    assert manifest["sampling"]["samples"] == 2 and manifest["rows"] == 9


def test_generate_max_seconds_answers_a_random_subset_and_reruns_keep_it(tiny_config, tmp_path):
    """generate.max_seconds: prompts in a seeded random order, 4 batches a span, no span started past the
    budget; the count is recorded and a rerun with a larger budget answers exactly the same prompts."""
    prompts = say_prompts(tmp_path, 12)
    out = tmp_path / "gen.jsonl"
    args = ["generate", tiny_config, f"generate.prompts={prompts}", f"generate.output={out}",
            "generate.max_new_tokens=3", "generate.batch_size=1", "generate.max_seconds=0.001"]
    assert _kdkit(*args).returncode == 0
    ids = sorted(answer_ids(out))
    assert len(ids) == 4 and ids != [f"p{i}" for i in range(4)]  # one span of 4 batches, not the file's first 4
    record = json.loads((tmp_path / "gen.jsonl.answered.json").read_text())
    assert record["prompts"] == 4 and record["asked"] == 12
    assert json.loads((tmp_path / "gen.jsonl.manifest.json").read_text())["prompts"] == 4
    args[-1] = "generate.max_seconds=1000"
    assert _kdkit(*args).returncode == 0
    assert sorted(answer_ids(out)) == ids


def test_generate_samples_max_seconds_stops_rounds_and_reruns_keep_the_count(tiny_config, tmp_path):
    """No round of sampled answers starts past generate.samples_max_seconds; the rounds done are recorded and a
    rerun with a larger budget does exactly those (the same data, so a cache built on it stays valid)."""
    prompts = say_prompts(tmp_path, 2)
    out = tmp_path / "gen.jsonl"
    args = ["generate", tiny_config, f"generate.prompts={prompts}", f"generate.output={out}",
            "generate.max_new_tokens=4", "generate.samples=3", "generate.samples_max_seconds=0.001"]
    assert _kdkit(*args).returncode == 0
    ids = sorted(answer_ids(out))
    assert ids == ["p0", "p0~s1", "p1", "p1~s1"]  # round 1 starts at once; round 2 would start past the budget
    assert json.loads((tmp_path / "gen.jsonl.samples.json").read_text())["rounds"] == 1
    args[-1] = "generate.samples_max_seconds=1000"
    assert _kdkit(*args).returncode == 0
    assert sorted(answer_ids(out)) == ids
