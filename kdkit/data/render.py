"""Chat rendering and tokenisation with labels: -100 on every token the student should not learn.

A chat example is rendered once with the tokenizer's chat template; the character spans of the
assistant turns come from rendering prefixes of the conversation, and a token is supervised when
its character span overlaps an assistant span. So labels follow the template exactly, whatever the
template (ChatML, Llama 3, ...), as long as rendering a prefix of a conversation gives a prefix of
the full rendering.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kdkit.data.sources import Example
from kdkit.errors import UserError

log = logging.getLogger(__name__)

IGNORE = -100  # the label that losses skip (see losses/reduce.py)
EMPTY, NO_ASSISTANT, OVER_LONG = "empty", "no assistant turn", "over-long: no supervised tokens within max_length"


@dataclass
class TokenizedData:
    """Tokenised examples, aligned by index, plus how many rows were dropped and why."""

    ids: list[str]
    input_ids: list[list[int]]
    labels: list[list[int]]  # same lengths as input_ids; IGNORE where not supervised
    dropped: dict[str, int]  # drop reason -> count
    total: int  # rows before dropping

    @property
    def num_supervised_tokens(self) -> int:
        """Labels that are not IGNORE (before the next-token shift)."""
        return sum(label != IGNORE for labels in self.labels for label in labels)


# ---------------------------------------------------------------- one example


def render_example(example: Example, tokenizer, *, max_length: int) -> tuple[list[int], list[int]] | str:
    """(input_ids, labels) of one example, right-truncated to max_length, or a drop reason.

    Chat: only assistant turns (content + end-of-turn tokens) are supervised. Text: every token.
    """
    if example.text is not None:
        if not example.text.strip():
            return EMPTY
        input_ids = tokenizer(example.text, add_special_tokens=True)["input_ids"]
        labels = list(input_ids)
    else:
        if not example.messages:
            return EMPTY
        if not any(m["role"] == "assistant" for m in example.messages[1:]):
            return NO_ASSISTANT  # an opening assistant turn is context only (see _assistant_spans)
        input_ids, labels = _render_chat(example, tokenizer)
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if not input_ids:
        return EMPTY
    if all(label == IGNORE for label in labels):
        return OVER_LONG  # the assistant turns all start past max_length
    return input_ids, labels


def _render_chat(example: Example, tokenizer) -> tuple[list[int], list[int]]:
    text = _apply_template(tokenizer, example.messages, add_generation_prompt=False, example=example)
    spans = _assistant_spans(example, tokenizer, full_text=text)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    # Overlap, not containment: a token that straddles a span edge (BPE merging across it) is
    # still a token the assistant wrote, and dropping it would leave the first word unlearned.
    labels = [
        token if any(start < end_span and end > start_span for start_span, end_span in spans) else IGNORE
        for token, (start, end) in zip(input_ids, encoding["offset_mapping"])
    ]
    return input_ids, labels


def _assistant_spans(example: Example, tokenizer, *, full_text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the assistant turns in the full rendering."""
    messages, spans = example.messages, []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            # A conversation-opening assistant turn has no prompt before it; templates refuse to
            # render an empty conversation, so it stays context rather than a target.
            continue
        prompt = _apply_template(tokenizer, messages[:i], add_generation_prompt=True, example=example)
        upto = _apply_template(tokenizer, messages[: i + 1], add_generation_prompt=False, example=example)
        if not upto.startswith(prompt) or not full_text.startswith(upto):
            raise UserError(
                f"example {example.id}: the chat template does not render prefixes of a conversation as "
                f"prefixes of the whole (turn {i}), so assistant tokens cannot be located for labels. "
                "Templates that rewrite earlier turns (e.g. strip reasoning from past assistant messages) "
                "cause this; use a template that renders each turn independently, or train on one "
                "assistant turn per row."
            )
        spans.append((len(prompt), len(upto)))
    return spans


def _apply_template(tokenizer, messages: list[dict], *, add_generation_prompt: bool, example: Example) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"example {example.id} is a chat row, but the tokenizer "
            f"({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}) has no chat template. "
            "Set one (tokenizer.chat_template / chat_template.jinja in the model directory), use a model "
            "that ships one (an instruct/chat variant), or provide plain 'text' rows."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_prompt(example: Example, tokenizer) -> list[int]:
    """Token ids of the prompt for generation: every message before the final assistant turn.

    Text examples are continued as they are (the text is the prompt).
    """
    if example.text is not None:
        return tokenizer(example.text, add_special_tokens=True)["input_ids"]
    messages = example.messages or []
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # generation rewrites the reference answer
    if not messages:
        raise UserError(f"example {example.id}: no prompt messages to generate from. Give it a user turn.")
    text = _apply_template(tokenizer, messages, add_generation_prompt=True, example=example)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- many examples


def tokenize_examples(
    examples: list[Example], tokenizer, *, max_length: int, max_drop_fraction: float = 0.5, source: str = "data"
) -> TokenizedData:
    """Render every example; refuse data where nothing, or too much, survives."""
    data = TokenizedData(ids=[], input_ids=[], labels=[], dropped={}, total=len(examples))
    for example in examples:
        rendered = render_example(example, tokenizer, max_length=max_length)
        if isinstance(rendered, str):
            data.dropped[rendered] = data.dropped.get(rendered, 0) + 1
            continue
        data.ids.append(example.id)
        data.input_ids.append(rendered[0])
        data.labels.append(rendered[1])
    breakdown = _breakdown(data, max_length=max_length)
    if not data.input_ids:
        raise UserError(
            f"no usable rows in {source}: {breakdown}. Chat rows need an assistant turn to learn from; "
            "raise data.max_length if rows are over-long, or check that the file holds the data you meant."
        )
    num_dropped = data.total - len(data.input_ids)
    if num_dropped / data.total > max_drop_fraction:
        raise UserError(
            f"too many rows dropped from {source} ({num_dropped / data.total:.0%} > "
            f"data.max_drop_fraction={max_drop_fraction}): {breakdown}. Fix the data or raise "
            "data.max_length; set data.max_drop_fraction higher to accept the loss."
        )
    log.info("%s: kept %d of %s", source, len(data.input_ids), breakdown)
    return data


def _breakdown(data: TokenizedData, *, max_length: int) -> str:
    return (
        f"{data.total} rows, {data.dropped.get(EMPTY, 0)} empty, "
        f"{data.dropped.get(NO_ASSISTANT, 0)} without an assistant turn, "
        f"{data.dropped.get(OVER_LONG, 0)} over-long (max_length={max_length})"
    )
