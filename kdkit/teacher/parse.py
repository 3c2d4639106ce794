"""Reading what a teacher wrote: JSON, regex, final-answer and score parsers, and a safe arithmetic checker.

Every parser returns `Parsed(value, reason)`: `value` when the text was usable, else `reason`, a short
fixed string the manifest counts rejected items by ("json: no object", "regex: no match", ...).
No parser ever calls `eval`: arithmetic is evaluated by walking a restricted Python AST.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from dataclasses import dataclass
from typing import Any

from kdkit.errors import UserError


@dataclass(frozen=True)
class Parsed:
    value: Any = None
    reason: str | None = None  # None: accepted

    @property
    def ok(self) -> bool:
        return self.reason is None


EMPTY = "empty answer"
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)
# final answers: "Answer: X", "Final answer: X", "#### X", "\boxed{X}" (the last one in the text wins)
_ANSWER = re.compile(r"(?:final answer|answer)\s*[:=]\s*(.+)|####\s*(.+)|\\boxed\{([^{}]+)\}", re.I)
_SCORE = re.compile(r"score\s*[:=]?\s*(-?\d+(?:\.\d+)?)", re.I)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_text(text: str) -> Parsed:
    """The text itself, stripped; empty text is rejected."""
    text = (text or "").strip()
    return Parsed(text) if text else Parsed(reason=EMPTY)


def parse_json(text: str, *, field: str | None = None) -> Parsed:
    """The first JSON object in the text (inside ``` fences or bare), or its `field` (a non-empty string)."""
    if not (text or "").strip():
        return Parsed(reason=EMPTY)
    obj = _first_json_object(text)
    if obj is None:
        return Parsed(reason="json: no object")
    if field is None:
        return Parsed(obj)
    value = obj.get(field)
    if not isinstance(value, str) or not value.strip():
        return Parsed(reason=f"json: no field {field!r}")
    return Parsed(value.strip())


def _first_json_object(text: str) -> dict | None:
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for chunk in candidates:
        for start in (m.start() for m in re.finditer(r"\{", chunk)):
            try:
                obj, _ = decoder.raw_decode(chunk, start)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def compile_pattern(pattern: str | None, *, where: str) -> re.Pattern:
    """A user's regex, checked once: it must compile and have at least one group."""
    if not pattern:
        raise UserError(f"{where}: parser=regex needs parse_pattern (a regex with one group, e.g. 'Title: (.+)')")
    try:
        compiled = re.compile(pattern, re.S)
    except re.error as e:
        raise UserError(f"{where}: parse_pattern {pattern!r} is not a valid regex ({e})") from None
    if compiled.groups < 1:
        raise UserError(f"{where}: parse_pattern {pattern!r} needs a group, e.g. '({pattern})'")
    return compiled


def parse_regex(text: str, pattern: re.Pattern) -> Parsed:
    """The first group of the first match, stripped."""
    m = pattern.search(text or "")
    if m is None:
        return Parsed(reason="regex: no match")
    value = (m.group(1) or "").strip()
    return Parsed(value) if value else Parsed(reason="regex: empty group")


def parse_answer(text: str) -> Parsed:
    """{"reasoning", "answer"} from a reasoning trace that ends in a final answer line."""
    text = (text or "").strip()
    if not text:
        return Parsed(reason=EMPTY)
    matches = list(_ANSWER.finditer(text))
    if not matches:
        return Parsed(reason="answer: no final answer")
    last = matches[-1]
    answer = next(g for g in last.groups() if g is not None).strip().rstrip(".").strip()
    if not answer:
        return Parsed(reason="answer: empty final answer")
    return Parsed({"reasoning": text[: last.start()].strip(), "answer": answer})


def parse_score(text: str, *, low: float = 1.0, high: float = 10.0) -> Parsed:
    """A grade: "Score: 7" (or the first number in the text), within [low, high]."""
    m = _SCORE.search(text or "") or _NUMBER.search(text or "")
    if m is None:
        return Parsed(reason="score: no number")
    score = float(m.group(1) if m.groups() else m.group(0))
    if not low <= score <= high:
        return Parsed(reason="score: out of range")
    return Parsed(score)


# ---------------------------------------------------------------- safe arithmetic

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
        ast.USub: operator.neg, ast.UAdd: operator.pos}
_EXPRESSION = re.compile(r"[-+]?\(*\s*\d[\d\s.+\-*/()x×÷^%]*\d\s*\)*")
MAX_POWER = 64


def safe_eval(expression: str) -> float:
    """Evaluate + - * / // % ** on numbers (x × ÷ ^ accepted); ValueError on anything else. No eval()."""
    expr = expression.replace("×", "*").replace("x", "*").replace("÷", "/").replace("^", "**")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    try:
        return float(_walk(tree.body))
    except OverflowError:
        raise ValueError(f"too large: {expression!r}") from None


def _walk(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_walk(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _walk(node.left), _walk(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_POWER:
            raise ValueError("exponent too large")
        try:
            return _OPS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("too large") from None
    raise ValueError(f"not allowed in arithmetic: {type(node).__name__}")


def find_expression(text: str) -> str | None:
    """The longest arithmetic expression in a question ("What is 12 * (3 + 4)?" → "12 * (3 + 4)")."""
    found = [m.group(0).strip() for m in _EXPRESSION.finditer(text or "")]
    found = [f for f in found if re.search(r"\d\s*[-+*/x×÷^%]\s*[\d(]", f)]
    return max(found, key=len) if found else None


def same_answer(answer: str, expected: str) -> bool:
    """Numbers compare by value (1e-6 relative), anything else by normalised text."""
    a, e = _as_number(answer), _as_number(expected)
    if a is not None and e is not None:
        return math.isclose(a, e, rel_tol=1e-6, abs_tol=1e-9)
    norm = lambda s: re.sub(r"\s+", " ", s.strip().lower().rstrip("."))  # noqa: E731
    return norm(answer) == norm(expected)


def _as_number(text: str) -> float | None:
    m = re.fullmatch(r"\s*\$?\s*(-?[\d,]*\.?\d+)\s*%?\s*", text or "")
    if m is None:
        return None
    try:
        return float(m.group(1).replace(",", ""))
    except ValueError:
        return None
