"""Reading rows from local files and normalising the common row formats into `Example`s.

Files: `.jsonl`, `.json` (a list of objects), `.parquet`, or a directory written by HF
`datasets`' `save_to_disk`. Row formats: plain `text`; `prompt`/`completion` (or `response`);
OpenAI `messages`; ShareGPT `conversations`; Alpaca `instruction`/`input`/`output`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdkit.errors import UserError

SUPPORTED_FILES = (".jsonl, .json, .parquet, a `datasets` save_to_disk directory, or a `kdkit generate` "
                   "directory (shard-*.jsonl + manifest.json)")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
ACCEPTED_FORMATS = (
    "'messages' (OpenAI: [{role, content}]), 'conversations' (ShareGPT: [{from, value}]), "
    "'prompt' + optional 'completion'/'response', 'instruction' + optional 'input'/'output' (Alpaca), "
    "or 'text' (plain text)"
)


@dataclass
class Example:
    """One normalised row: exactly one of `messages` (chat) or `text` (plain text) is set."""

    id: str
    messages: list[dict] | None = None  # [{"role": "system"|"user"|"assistant", "content": str}, ...]
    text: str | None = None


# ---------------------------------------------------------------- reading files


def read_rows(path: str | Path) -> list[dict]:
    """Read every row of a local data file or `save_to_disk` directory as a dict."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file not found: {path}. Check the path (relative paths start at {Path.cwd()}).")
    if path.is_dir():
        shards = sorted(path.glob("shard-*.jsonl"))
        if shards and (path / "manifest.json").is_file():  # a `kdkit generate` dataset: its shards in order
            return [row for shard in shards for row in _read_jsonl(shard)]
        return _read_dataset_dir(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise UserError(f"unsupported data file {path}: extension {suffix or '(none)'!r}. Supported: {SUPPORTED_FILES}.")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (often a trailing one) carry no row
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path}, line {line_number}: not valid JSON ({e.msg} at column {e.colno}). "
                    "Each line of a .jsonl file must be one complete JSON object; fix or delete that line."
                ) from None
            if not isinstance(row, dict):
                raise UserError(
                    f"{path}, line {line_number}: expected a JSON object ({{...}}), got {type(row).__name__}. "
                    "Each line of a .jsonl file must be one object with the row's fields."
                )
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}). Fix the file.") from None
    if not isinstance(data, list):
        raise UserError(
            f"{path}: a .json data file must hold a list of row objects ([{{...}}, ...]), "
            f"got {type(data).__name__}. Wrap the rows in a list, or write one object per line as .jsonl."
        )
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{path}: element {i} of the list is {type(row).__name__}, not an object ({{...}}).")
    return data


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowInvalid, OSError) as e:
        raise UserError(f"{path}: cannot read as Parquet ({e}). Check that the file is a complete Parquet file.") from None
    return table.to_pylist()


def _read_dataset_dir(path: Path) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UserError(
            f"{path} is a directory but not one written by `datasets`' save_to_disk. "
            f"Point data paths at a file or such a directory. Supported: {SUPPORTED_FILES}."
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            splits = ", ".join(sorted(loaded)) or "(none)"
            raise UserError(
                f"{path} holds a DatasetDict without a 'train' split (splits: {splits}). "
                f"Point the data path at one split's directory, e.g. {path}/<split>."
            )
        loaded = loaded["train"]
    return loaded.to_list()


# ---------------------------------------------------------------- row formats


def to_example(row: dict, *, index: int, source: str) -> Example:
    """Normalise one row (any accepted format) into an `Example`; `index` counts rows from 0."""
    where = f"{source}, row {index + 1}"
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with named fields, got {type(row).__name__}.")
    example_id = str(row["id"]) if row.get("id") is not None else f"{index}"
    # `is not None`, not `in`: Parquet and `datasets` rows carry every column, absent ones as None.
    if row.get("messages") is not None:
        messages = _openai_messages(row["messages"], where=where)
    elif row.get("conversations") is not None:
        messages = _sharegpt_messages(row["conversations"], where=where)
    elif row.get("prompt") is not None:
        messages = _prompt_messages(row, where=where)
    elif row.get("instruction") is not None:
        messages = _alpaca_messages(row, where=where)
    elif row.get("text") is not None:
        text = row["text"]
        if not isinstance(text, str):
            raise UserError(f"{where}: 'text' must be a string, got {type(text).__name__}.")
        return Example(id=example_id, text=text)
    else:
        keys = ", ".join(sorted(str(k) for k, v in row.items() if v is not None)) or "(none)"
        raise UserError(
            f"{where}: unrecognised row format (keys: {keys}). Accepted formats: {ACCEPTED_FORMATS}. "
            "Rename the columns to one of these."
        )
    return Example(id=example_id, messages=messages)


def _openai_messages(value: Any, *, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects, got {type(value).__name__}.")
    messages = []
    for turn, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"{where}: messages[{turn}] must be an object with 'role' and 'content', got {message!r}.")
        messages.append(_message(message["role"], message["content"], where=f"{where}, messages[{turn}]"))
    return messages


def _sharegpt_messages(value: Any, *, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise UserError(f"{where}: 'conversations' must be a list of {{from, value}} objects, got {type(value).__name__}.")
    messages = []
    for turn, message in enumerate(value):
        at = f"{where}, conversations[{turn}]"
        if not isinstance(message, dict):
            raise UserError(f"{at}: expected an object with 'from' and 'value', got {message!r}.")
        # ShareGPT proper uses from/value; some exports mix in OpenAI's role/content.
        role = message.get("from", message.get("role"))
        content = message.get("value", message.get("content"))
        if role is None or content is None:
            raise UserError(f"{at}: expected keys 'from' and 'value', got {sorted(message)}.")
        if role not in SHAREGPT_ROLES:
            known = ", ".join(SHAREGPT_ROLES)
            raise UserError(f"{at}: unknown speaker {role!r}. Accepted 'from' values: {known}.")
        messages.append(_message(SHAREGPT_ROLES[role], content, where=at))
    return messages


def _prompt_messages(row: dict, *, where: str) -> list[dict]:
    answer = row.get("completion", row.get("response"))
    messages = _system_message(row, where=where)
    messages.append(_message("user", row["prompt"], where=f"{where}, 'prompt'"))
    if answer is not None:  # prompt-only rows are valid: they are prompts for generation
        messages.append(_message("assistant", answer, where=f"{where}, 'completion'"))
    return messages


def _alpaca_messages(row: dict, *, where: str) -> list[dict]:
    instruction, extra = row["instruction"], row.get("input")
    if not isinstance(instruction, str):
        raise UserError(f"{where}: 'instruction' must be a string, got {type(instruction).__name__}.")
    if extra is not None and not isinstance(extra, str):
        raise UserError(f"{where}: 'input' must be a string, got {type(extra).__name__}.")
    user = instruction + "\n\n" + extra if extra else instruction
    messages = _system_message(row, where=where)
    messages.append({"role": "user", "content": user})
    if row.get("output") is not None:  # no output: a prompt for generation
        messages.append(_message("assistant", row["output"], where=f"{where}, 'output'"))
    return messages


def _system_message(row: dict, *, where: str) -> list[dict]:
    """An optional 'system' column of prompt/Alpaca rows becomes a leading system message."""
    if not row.get("system"):
        return []
    return [_message("system", row["system"], where=f"{where}, 'system'")]


def _message(role: Any, content: Any, *, where: str) -> dict:
    if role not in ROLES:
        raise UserError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}. Map other roles before training.")
    if not isinstance(content, str):
        raise UserError(
            f"{where}: content must be a string, got {type(content).__name__}. "
            "Multi-part or structured content is not supported; flatten it to text."
        )
    return {"role": role, "content": content}


def load_examples(path: str | Path) -> list[Example]:
    """Read a data file and normalise every row; errors name the file and row."""
    source = str(path)
    return [to_example(row, index=i, source=source) for i, row in enumerate(read_rows(path))]
