"""Elicitation strategies: how a task of `generate.tasks` gets knowledge out of a black-box teacher.

Each strategy is a few rounds ("stages") of teacher calls. A stage is a list of (id, prompt) requests
answered by `complete(examples, path, top_logprobs=k, max_new_tokens=n)` — the local, served or vLLM
backend; n is the task's `max_new_tokens` — into
its own resumable jsonl file (RUN_DIR/data/stages/TASK.STAGE.jsonl); a rerun after a kill skips the
ids already answered, and since every id comes from the task name and a seed index, an interrupted
and an uninterrupted run end with the same ids.

- labelling: the teacher answers the task's inputs (`answer` template: instruction + few-shot
  demonstrations picked per item).
- expansion: from a handful of demonstrations the teacher writes `count` new inputs (`input`
  template, a different demonstration sample per item), then answers them.
- curation: from meta-information (`domain`, `topics`, taken in turn) the teacher writes `count`
  inputs, then answers them.
- feature: labelling that also keeps the teacher's top-k log-probs of every answer token
  ("teacher_logprobs" in each row); for the full offline signal over the data, run `kdkit cache`
  with data.train pointing at the output.
- self_knowledge: the teacher answers, then reviews its own answer (`review` template): `grade`
  gives a 1-10 score read by the judge filter, `refine` replaces the answer by its rewrite.
- chain_of_thought: reasoning traces ending in "Answer: X"; the final answer is kept apart and
  checked against the input's reference answer, or by safely evaluating an arithmetic expression
  found in the input; wrong answers are rejected.

What the teacher wrote is read by the task's parser; every rejected item is counted by reason.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Callable

from kdkit.data.quality import confidence
from kdkit.data.sources import Example
from kdkit.errors import UserError
from kdkit.teacher import parse as P
from kdkit.teacher.prompts import Seed, item_id, load_template, pick, read_demonstrations, read_seeds

# strategy → its template slots and their built-in defaults
SLOTS = {
    "labelling": {"answer": "labelling"},
    "feature": {"answer": "labelling"},
    "expansion": {"input": "expansion", "answer": "labelling"},
    "curation": {"input": "curation", "answer": "labelling"},
    "self_knowledge": {"answer": "labelling", "review": "self_grade"},
    "chain_of_thought": {"answer": "chain_of_thought"},
}
CONFIDENCE_K = 5  # top-k asked for when only the confidence filters need log-probs


class Stages:
    """Runs one task's stages through the backend, each into its own resumable jsonl file."""

    def __init__(self, complete: Callable, stage_dir: Path, task: str, *, max_new_tokens: int | None = None):
        self.complete, self.stage_dir, self.task = complete, stage_dir, task
        self.max_new_tokens = max_new_tokens  # the task's answer length (None: generate.max_new_tokens)

    def __call__(self, stage: str, prompts: dict[str, str], *, top_logprobs: int = 0) -> dict[str, dict]:
        """{id: {"text", "logprobs"}} for every id of `prompts` (id → the user message sent)."""
        path = self.stage_dir / f"{self.task}.{stage}.jsonl"
        self._check_prompts(path, prompts, top_logprobs=top_logprobs)
        examples = [Example(id=i, messages=[{"role": "user", "content": p}]) for i, p in prompts.items()]
        if examples:
            self.complete(examples, path, top_logprobs=top_logprobs, max_new_tokens=self.max_new_tokens)
        rows = {}
        for row in _rows(path):
            rows[row["id"]] = {"text": row["messages"][-1]["content"], "logprobs": row.get("teacher_logprobs")}
        return {i: rows[i] for i in prompts}

    @staticmethod
    def _check_prompts(path: Path, prompts: dict[str, str], *, top_logprobs: int) -> None:
        """A resumed stage must have been asked the same prompts (same templates, inputs, demonstrations),
        with log-probs when they are wanted now."""
        stale = [row["id"] for row in _rows(path)
                 if row["id"] in prompts and (row["messages"][0]["content"] != prompts[row["id"]]
                                              or (top_logprobs and "teacher_logprobs" not in row))]
        if stale:
            raise UserError(f"{path} holds answers to other prompts for {len(stale)} ids (e.g. {stale[0]}): the "
                            "task's templates, inputs or demonstrations changed since it was written (or log-probs "
                            "are wanted now and it has none). Delete that file to regenerate the stage, or use a "
                            "new run.dir.")


def _rows(path: Path) -> list[dict]:
    """The complete lines of a stage file (a torn last line from a kill is left to the backend to cut)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    return [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]


def run_task(task, *, complete: Callable, stage_dir: Path, seed: int, want_confidence: bool) -> dict:
    """One task, all its stages: {"items": accepted items, "counts": ..., "templates": {slot: info}}."""
    where = f"generate.tasks[{task.name}]"
    refs = _template_refs(task, where=where)
    templates = {slot: load_template(ref, where=f"{where}.templates.{slot}") for slot, ref in refs.items()}
    demos = read_demonstrations(task.demonstrations)
    rejected: Counter = Counter()
    stages = Stages(complete, stage_dir, task.name, max_new_tokens=task.max_new_tokens)
    if task.strategy in ("expansion", "curation"):
        seeds = _write_inputs(task, templates["input"], demos, stages, rejected, seed=seed, where=where)
    else:
        seeds = read_seeds(task.inputs, task=task.name, count=task.count, key="inputs")
    k = task.top_logprobs if task.strategy == "feature" else (CONFIDENCE_K if want_confidence else 0)
    prompts = {s.id: templates["answer"].render(
        instruction=task.instruction, input=s.input,
        demonstrations=pick(demos, task.num_demonstrations, seed=seed, key=s.id)) for s in seeds}
    answers = stages("answers", prompts, top_logprobs=k)
    items = []
    for s in seeds:
        item = _read_answer(task, s, answers[s.id], rejected)
        if item is not None:
            items.append(item)
    if task.strategy == "self_knowledge":
        items = _review(task, templates["review"], items, stages, rejected)
    counts = {"seeds": len(seeds), "rejected": dict(sorted(rejected.items())), "accepted": len(items)}
    if task.strategy == "chain_of_thought":
        counts["checked"] = dict(Counter(str(it["checked"]) for it in items))
    info = {slot: {"ref": t.ref, "sha256": t.sha256} for slot, t in templates.items()}
    return {"items": items, "counts": counts, "templates": info}


def _template_refs(task, *, where: str) -> dict[str, str]:
    """The task's template per slot: the strategy's defaults, overridden by `templates`."""
    refs = dict(SLOTS[task.strategy])
    if task.strategy == "self_knowledge" and task.review == "refine":
        refs["review"] = "self_refine"
    unknown = set(task.templates) - set(refs)
    if unknown:
        raise UserError(f"{where}.templates: no slot {sorted(unknown)} for strategy {task.strategy!r}; "
                        f"its slots: {', '.join(refs)}")
    return {**refs, **task.templates}


def _write_inputs(task, template, demos, stages, rejected: Counter, *, seed: int, where: str) -> list[Seed]:
    """Stage "inputs": the teacher writes `count` new inputs (expansion: from demos; curation: from topics)."""
    if task.strategy == "expansion" and not demos:
        raise UserError(f"{where}: strategy expansion needs demonstrations (a file of answered examples)")
    if task.strategy == "curation" and not (task.domain or task.topics):
        raise UserError(f"{where}: strategy curation needs a domain and/or topics")
    count = task.count or (len(task.topics) if task.strategy == "curation" else None)
    if not count:
        raise UserError(f"{where}: set count, the number of inputs the teacher writes")
    prompts = {}
    for i in range(count):
        key = item_id(task.name, i)
        if task.strategy == "expansion":
            shown = pick(demos, max(task.num_demonstrations, 1), seed=seed, key=f"{key}/inputs")
            prompts[key] = template.render(instruction=task.instruction, demonstrations=shown, index=i,
                                           input_field=task.input_field)
        else:
            topics = task.topics or [task.domain]
            prompts[key] = template.render(domain=task.domain or topics[0], topic=topics[i % len(topics)],
                                           topics=topics, index=i, input_field=task.input_field)
    written = stages("inputs", prompts)
    known = {d["input"].strip().lower() for d in demos}
    seeds = []
    for key in prompts:
        text = _read_input(written[key]["text"], field=task.input_field)
        if text is None:
            rejected["input: unreadable"] += 1
        elif text.strip().lower() in known:
            rejected["input: copies a demonstration"] += 1
        elif len(text) > 20 and text.strip().lower() in prompts[key].lower():
            rejected["input: copies the prompt"] += 1  # the instruction echoed back, not a new input
        else:
            seeds.append(Seed(key, text))
    return seeds


_LABEL = re.compile(r"^(new |the )?(task|question|instruction|input)\s*\d*\s*[:.-]\s*", re.I)


def _read_input(text: str, *, field: str) -> str | None:
    """A written input: the JSON field when there is one, else the first line that is not a preamble
    ("Here is a task:") — bullets, quotes and a leading "Question:" label cut."""
    parsed = P.parse_json(text, field=field)
    if parsed.ok:
        return parsed.value
    for line in (text or "").splitlines():
        line = _LABEL.sub("", line.strip().lstrip("-*•").strip()).strip().strip('"').strip()
        if line and not line.endswith(":") and not line.startswith(("{", "```", "}")):
            return line
    return None


def _read_answer(task, s: Seed, answer: dict, rejected: Counter) -> dict | None:
    """Parse (and for chain_of_thought check) one answer into an item, or count why it was rejected."""
    text = answer["text"]
    item = {"id": s.id, "task": task.name, "strategy": task.strategy, "input": s.input}
    if s.source_id is not None:
        item["source_id"] = s.source_id
    if task.strategy == "chain_of_thought" or task.parser == "answer":
        parsed = P.parse_answer(text)
        if parsed.ok:
            item.update(output=text.strip(), reasoning=parsed.value["reasoning"], answer=parsed.value["answer"])
    elif task.parser == "json":
        parsed = P.parse_json(text, field=task.parse_field)
        item["output"] = parsed.value
    elif task.parser == "regex":
        parsed = P.parse_regex(text, P.compile_pattern(task.parse_pattern, where=f"generate.tasks[{task.name}]"))
        item["output"] = parsed.value
    else:
        parsed = P.parse_text(text)
        item["output"] = parsed.value
    if not parsed.ok:
        rejected[parsed.reason] += 1
        return None
    if task.strategy == "chain_of_thought":
        item["checked"] = _check(task, s, item["answer"])
        if item["checked"] is False:
            rejected["check: wrong answer"] += 1
            return None
    item["confidence"] = confidence(answer["logprobs"])
    if task.strategy == "feature":
        item["teacher_logprobs"] = answer["logprobs"]
    return item


def _check(task, s: Seed, answer: str) -> bool | None:
    """True/False when a checker applies (reference answer, arithmetic), None when none does."""
    if task.checker in ("auto", "reference") and s.reference:
        ref = P.parse_answer(s.reference)  # a reference may itself be a worked solution
        return P.same_answer(answer, ref.value["answer"] if ref.ok else s.reference)
    if task.checker in ("auto", "arithmetic"):
        expression = P.find_expression(s.input)
        if expression is not None:
            try:
                expected = P.safe_eval(expression)
            except ValueError:
                return None
            return P.same_answer(answer, repr(expected))
    return None


def _review(task, template, items: list[dict], stages, rejected: Counter) -> list[dict]:
    """self_knowledge: the teacher grades (score) or refines (rewrites) its own answers."""
    prompts = {it["id"]: template.render(input=it["input"], answer=it["output"]) for it in items}
    reviews = stages("review", prompts)
    kept = []
    for it in items:
        text = reviews[it["id"]]["text"]
        parsed = P.parse_score(text) if task.review == "grade" else P.parse_text(text)
        if not parsed.ok:
            rejected[f"review: {parsed.reason}"] += 1
            continue
        if task.review == "grade":
            it["score"] = parsed.value
        else:
            it["draft"], it["output"] = it["output"], parsed.value
        kept.append(it)
    return kept
