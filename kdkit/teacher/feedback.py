"""Teacher feedback: the student answers each prompt several times, the teacher scores the answers.

Two scorers:
- `loglik`: the teacher's mean log-probability per answer token (chat-rendered after the prompt,
  as training data is); needs the teacher's weights here (teacher.backend=local).
- `judge`: the teacher grades each answer with a Jinja2 template (`{{ prompt }}`, `{{ answer }}`;
  built-in: kdkit/assets/templates/judge.jinja) and the score is parsed from its reply ("Score: 7"); works with a local teacher or an OpenAI-compatible
  server (teacher.backend=http). An unparseable reply scores None and that answer is left out.

Output, one line per prompt, appended and flushed as each prompt is done (the resumable part):
`{"id", "prompt", "answers", "scores", "teacher_answer", "teacher_score", "scorer"}`. Samples are
seeded by the prompt id, so a rerun after a kill writes the same rows for the missing ids and never
a duplicate. Pairs are then a pure function of that file (`make_pairs`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from kdkit.data.collate import collate
from kdkit.data.render import render_example, render_prompt
from kdkit.data.sources import Example
from kdkit.errors import UserError
from kdkit.models.sequence import id_seed, mean_logps, sample_completions
from kdkit.teacher.generate import done_ids, prompt_messages
from kdkit.teacher.prompts import Template, load_template

log = logging.getLogger(__name__)

SCORE = re.compile(r"(?:score|rating)\s*(?:is|of)?\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
LEADING_NUMBER = re.compile(r"^\s*\**\s*(\d+(?:\.\d+)?)\b")


# ---------------------------------------------------------------- the judge prompt


def load_judge_template(ref: str | None) -> Template:
    """The judge prompt: a built-in name or a Jinja2 file (default: judge); it must use prompt and answer."""
    template = load_template(ref or "judge", where="preference.judge_template")
    probe = template.render(prompt="\x00PROMPT", answer="\x00ANSWER")
    missing = [f"{{{{ {k} }}}}" for k in ("prompt", "answer") if f"\x00{k.upper()}" not in probe]
    if missing:
        raise UserError(f"preference.judge_template {template.path} lacks {' and '.join(missing)}: "
                        "the judge needs both")
    return template


def judge_messages(template: Template, prompt: list[dict], answer: str) -> list[dict]:
    """One user turn: the template with the request (its user/system turns) and the answer filled in."""
    request = "\n".join(m["content"] for m in prompt if m["role"] != "assistant")
    return [{"role": "user", "content": template.render(prompt=request, answer=answer)}]


def parse_score(text: str) -> float | None:
    """The score in a judge's reply ("Score: 7", "Rating = 8/10", "9"), or None."""
    match = SCORE.search(text) or LEADING_NUMBER.search(text)
    return float(match.group(1)) if match else None


# ---------------------------------------------------------------- the teacher, local or served


class LocalTeacher:
    """Scores and answers with the teacher's weights here."""

    def __init__(self, model, tokenizer, *, scorer: str, template: Template | None, judge_max_new_tokens: int,
                 max_length: int):
        self.model, self.tok, self.scorer = model, tokenizer, scorer
        self.template, self.judge_max_new_tokens, self.max_length = template, judge_max_new_tokens, max_length

    @torch.no_grad()
    def scores(self, prompt: list[dict], answers: list[str]) -> list[float | None]:
        if self.scorer == "judge":
            replies = self._greedy([judge_messages(self.template, prompt, a) for a in answers],
                                   self.judge_max_new_tokens)
            return [parse_score(r) for r in replies]
        rows = [render_example(Example(id="s", messages=prompt + [{"role": "assistant", "content": a}]),
                               self.tok, max_length=self.max_length) for a in answers]
        keep = [i for i, r in enumerate(rows) if not isinstance(r, str)]  # an empty answer scores None
        out: list[float | None] = [None] * len(answers)
        if keep:
            batch = collate([rows[i][0] for i in keep], [rows[i][1] for i in keep], pad_id=self.tok.pad_token_id)
            batch = {k: v.to(self.model.device) for k, v in batch.items()}
            for i, value in zip(keep, mean_logps(self.model, batch).tolist()):
                out[i] = value if math.isfinite(value) else None
        return out

    @torch.no_grad()
    def answer(self, prompt: list[dict], max_new_tokens: int) -> str:
        return self._greedy([prompt], max_new_tokens)[0]

    def _greedy(self, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
        ids = [render_prompt(Example(id="j", messages=c), self.tok) for c in conversations]
        batch = collate(ids, None, pad_id=self.tok.pad_token_id, side="left")
        out = self.model.generate(input_ids=batch["input_ids"].to(self.model.device),
                                  attention_mask=batch["attention_mask"].to(self.model.device),
                                  max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                  top_k=None, pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
        return [self.tok.decode(row, skip_special_tokens=True).strip() for row in out[:, batch["input_ids"].shape[1]:]]


class HttpTeacher:
    """Scores (judge only) and answers through an OpenAI-compatible server (`kdkit.teacher.http.ChatClient`)."""

    def __init__(self, client, *, model: str, template: Template, judge_max_new_tokens: int):
        self.client, self.model_name = client, model
        self.template, self.judge_max_new_tokens = template, judge_max_new_tokens

    def scores(self, prompt: list[dict], answers: list[str]) -> list[float | None]:
        return [parse_score(self.client.chat(judge_messages(self.template, prompt, a), model=self.model_name,
                                             max_tokens=self.judge_max_new_tokens, temperature=0.0,
                                             top_p=1.0)["text"]) for a in answers]

    def answer(self, prompt: list[dict], max_new_tokens: int) -> str:
        return self.client.chat(prompt, model=self.model_name, max_tokens=max_new_tokens, temperature=0.0,
                                top_p=1.0)["text"]


# ---------------------------------------------------------------- sampling and scoring, resumable


def sample_answers(student, tokenizer, example: Example, *, n: int, max_new_tokens: int, temperature: float,
                   top_p: float, seed: int) -> list[str]:
    """n sampled student answers to the example's prompt, seeded by its id (same on every run)."""
    prompt = render_prompt(Example(id=example.id, messages=prompt_messages(example)), tokenizer)
    completions = sample_completions(student, prompt, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                                     seed=id_seed(example.id, seed))
    return [tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]


def file_answer(example: Example) -> str | None:
    """The assistant answer the prompts file already holds (a teacher's, from `kdkit generate`), if any."""
    msgs = example.messages or []
    return msgs[-1]["content"] if msgs and msgs[-1]["role"] == "assistant" else None


def score_prompts(examples: list[Example], out_path: Path, *, sample_fn: Callable[[Example], list[str]], teacher,
                  scorer: str, teacher_pairs: bool, max_new_tokens: int) -> Path:
    """For each example not yet in `out_path`: sample, score, append one row (flushed)."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out_path)
    todo = [e for e in examples if e.id not in done]
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc="feedback", unit="prompt")
    with open(out_path, "a") as f:
        for example in todo:
            prompt = prompt_messages(example)
            answers = sample_fn(example)
            scores = teacher.scores(prompt, answers)
            row = {"id": example.id, "prompt": prompt, "answers": answers, "scores": scores,
                   "teacher_answer": None, "teacher_score": None, "scorer": scorer}
            if teacher_pairs:
                row["teacher_answer"] = file_answer(example) or teacher.answer(prompt, max_new_tokens)
                row["teacher_score"] = teacher.scores(prompt, [row["teacher_answer"]])[0]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()  # a kill loses at most this line (cut off on resume)
            bar.update(1)
    bar.close()
    return out_path


# ---------------------------------------------------------------- pairs


def make_pairs(row: dict, *, min_margin: float = 0.0, student_pairs: bool = True) -> list[dict]:
    """A scored row → best-vs-worst student pair, and teacher-vs-worst when the row has a teacher answer."""
    scored = [(s, a) for s, a in zip(row["scores"], row["answers"]) if s is not None and a.strip()]
    if not scored:
        return []
    best = max(scored, key=lambda x: x[0])
    worst = min(scored, key=lambda x: x[0])  # the first of equal scores, so ties are deterministic
    pairs = []
    if student_pairs and best[0] - worst[0] > min_margin and best[1] != worst[1]:
        pairs.append({"id": f"{row['id']}:best-worst", "prompt": row["prompt"], "chosen": best[1],
                      "rejected": worst[1], "scores": {"chosen": best[0], "rejected": worst[0]},
                      "source": "student-student", "scorer": row["scorer"]})
    teacher = row.get("teacher_answer")
    if teacher and teacher.strip() and teacher != worst[1]:
        pairs.append({"id": f"{row['id']}:teacher-worst", "prompt": row["prompt"], "chosen": teacher,
                      "rejected": worst[1], "scores": {"chosen": row.get("teacher_score"), "rejected": worst[0]},
                      "source": "teacher-student", "scorer": row["scorer"]})
    return pairs


def write_pairs(scored_path: Path, pairs_path: Path, *, min_margin: float = 0.0, student_pairs: bool = True) -> int:
    """Rewrite `pairs_path` (atomically) from the scored rows; returns the number of pairs."""
    rows = [json.loads(line) for line in scored_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows.sort(key=lambda r: r["id"])  # resumed or not, the same file
    pairs = [p for row in rows for p in make_pairs(row, min_margin=min_margin, student_pairs=student_pairs)]
    tmp = pairs_path.with_name(pairs_path.name + ".tmp")
    tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    tmp.replace(pairs_path)
    return len(pairs)


def scored_path_for(pairs_path: Path) -> Path:
    """Where the per-prompt scored samples behind a pairs file live."""
    return pairs_path.with_name(pairs_path.name.removesuffix(".jsonl") + ".scored.jsonl")
