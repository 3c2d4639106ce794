"""Data: reading rows, chat rendering with labels, collation and packing."""

from kdkit.data.collate import batch_order, collate, pack
from kdkit.data.render import IGNORE, TokenizedData, render_example, render_prompt, tokenize_examples
from kdkit.data.sources import Example, load_examples, read_rows, to_example

__all__ = [
    "IGNORE",
    "Example",
    "TokenizedData",
    "batch_order",
    "collate",
    "load_examples",
    "pack",
    "read_rows",
    "render_example",
    "render_prompt",
    "to_example",
    "tokenize_examples",
]
