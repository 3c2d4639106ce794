"""Templates and task inputs for elicitation: Jinja2 files under kdkit/assets/templates, or the user's own.

A template reference is a built-in name (`labelling`, `expansion`, ...: a file of that name in
kdkit/assets/templates) or a path to a file. Undefined variables are errors, named with the template.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import jinja2

from kdkit.data.sources import Example, load_examples
from kdkit.errors import UserError

BUILTIN = Path(str(files("kdkit") / "assets" / "templates"))
_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)


@dataclass
class Template:
    ref: str  # as configured
    path: Path
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def render(self, **variables) -> str:
        try:
            return _ENV.from_string(self.text).render(**variables).strip()
        except jinja2.UndefinedError as e:
            raise UserError(f"template {self.path}: {e.message}; variables available: "
                            f"{', '.join(sorted(variables))}") from None
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"template {self.path}, line {e.lineno}: {e.message}") from None


def load_template(ref: str, *, where: str) -> Template:
    """A built-in template by name, or a template file by path."""
    for candidate in (BUILTIN / ref, BUILTIN / f"{ref}.jinja", Path(ref).expanduser()):
        if candidate.is_file():
            return Template(ref, candidate, candidate.read_text(encoding="utf-8"))
    names = ", ".join(sorted(p.stem for p in BUILTIN.glob("*.jinja")))
    raise UserError(f"{where}: template {ref!r} is neither a built-in ({names}) nor an existing file. "
                    "Give a path to your own Jinja2 file (relative paths start at the config's folder).")


# ---------------------------------------------------------------- inputs and demonstrations


@dataclass
class Seed:
    """One input to answer: its stable id, the text, and a reference answer when the file had one."""

    id: str
    input: str
    reference: str | None = None
    source_id: str | None = None


def split_example(example: Example) -> tuple[str, str | None]:
    """(the prompt text: the last user turn or the plain text, the final assistant turn or None)."""
    if example.text is not None:
        return example.text, None
    messages = example.messages or []
    reference = messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else None
    users = [m["content"] for m in messages if m["role"] == "user"]
    return (users[-1] if users else ""), reference


def read_seeds(path: str | None, *, task: str, count: int | None, key: str) -> list[Seed]:
    """The first `count` rows of a task's input file, with ids TASK-00000, TASK-00001, ..."""
    if not path:
        raise UserError(f"generate.tasks[{task}].{key} is not set: give a file of inputs (any data format)")
    seeds = []
    for i, example in enumerate(load_examples(path)[:count]):
        text, reference = split_example(example)
        seeds.append(Seed(item_id(task, i), text, reference, source_id=example.id))
    if not seeds:
        raise UserError(f"generate.tasks[{task}].{key}: {path} holds no rows")
    return seeds


def read_demonstrations(path: str | None) -> list[dict]:
    """[{"input", "output"}] from a file of answered rows (rows without an answer are skipped)."""
    if not path:
        return []
    demos = []
    for example in load_examples(path):
        text, reference = split_example(example)
        if text and reference:
            demos.append({"input": text, "output": reference})
    return demos


def pick(demos: list, k: int, *, seed: int, key: str) -> list:
    """k demonstrations chosen by (seed, key): the same item always sees the same ones."""
    if k <= 0 or not demos:
        return []
    return random.Random(f"{seed}:{key}").sample(demos, min(k, len(demos)))


def item_id(task: str, index: int) -> str:
    """The stable id of a task's index-th item: from the task and the seed index, never from timing."""
    return f"{task}-{index:05d}"
