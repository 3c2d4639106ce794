"""Data layer: file reading, row formats, chat labels, collation, packing, order; tiny models."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kdkit.data import (
    IGNORE,
    Example,
    TokenizedData,
    batch_order,
    collate,
    load_examples,
    pack,
    read_rows,
    render_example,
    render_prompt,
    to_example,
    tokenize_examples,
)
from kdkit.errors import UserError
from kdkit.models.tiny import save_tiny_model, tiny_llama, tiny_tokenizer

ROWS = [
    {"id": "a", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"id": 7, "text": "plain text"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def chat(*turns: str) -> Example:
    """Alternating user/assistant messages from positional strings."""
    roles = ["user", "assistant"]
    return Example(id="c", messages=[{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)])


def supervised_text(tok, ids, labels) -> str:
    return tok.decode([i for i, label in zip(ids, labels) if label != IGNORE])


# ---------------------------------------------------------------- row formats


def test_text_row():
    ex = to_example({"text": "abc"}, index=3, source="s")
    assert ex == Example(id="3", messages=None, text="abc")


@pytest.mark.parametrize("answer_key", ["completion", "response"])
def test_prompt_completion_rows(answer_key):
    ex = to_example({"prompt": "P", answer_key: "C", "id": 5}, index=0, source="s")
    assert ex.id == "5"
    assert ex.messages == [{"role": "user", "content": "P"}, {"role": "assistant", "content": "C"}]


def test_prompt_only_row_is_a_prompt():
    ex = to_example({"prompt": "P"}, index=0, source="s")
    assert ex.messages == [{"role": "user", "content": "P"}]


def test_openai_messages_row():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    ex = to_example({"messages": msgs}, index=1, source="s")
    assert ex.messages == msgs and ex.text is None and ex.id == "1"


def test_sharegpt_roles_are_remapped():
    conv = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "U"},
        {"from": "gpt", "value": "A"},
        {"from": "user", "value": "U2"},
        {"from": "assistant", "value": "A2"},
    ]
    ex = to_example({"conversations": conv}, index=0, source="s")
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in ex.messages] == ["S", "U", "A", "U2", "A2"]


def test_sharegpt_unknown_speaker_is_a_user_error():
    with pytest.raises(UserError, match="'bot'.*human"):
        to_example({"conversations": [{"from": "bot", "value": "x"}]}, index=0, source="s")


def test_alpaca_with_input():
    ex = to_example({"instruction": "I", "input": "X", "output": "O"}, index=0, source="s")
    assert ex.messages == [{"role": "user", "content": "I\n\nX"}, {"role": "assistant", "content": "O"}]


@pytest.mark.parametrize("row", [{"instruction": "I", "output": "O"}, {"instruction": "I", "input": "", "output": "O"}])
def test_alpaca_without_input(row):
    ex = to_example(row, index=0, source="s")
    assert ex.messages == [{"role": "user", "content": "I"}, {"role": "assistant", "content": "O"}]


def test_alpaca_without_output_is_a_prompt():
    ex = to_example({"instruction": "I", "input": "X"}, index=0, source="s")
    assert ex.messages == [{"role": "user", "content": "I\n\nX"}]


def test_unrecognised_row_names_source_row_keys_and_formats():
    with pytest.raises(UserError) as e:
        to_example({"question": "q", "answer": "a"}, index=4, source="train.jsonl")
    msg = str(e.value)
    assert "train.jsonl" in msg and "row 5" in msg and "answer, question" in msg and "conversations" in msg


@pytest.mark.parametrize(
    "messages, needle",
    [
        ([{"role": "tool", "content": "x"}], "role 'tool'"),
        ([{"role": "user", "content": ["part"]}], "content must be a string"),
        ([{"role": "user"}], "'role' and 'content'"),
    ],
)
def test_bad_messages_are_user_errors(messages, needle):
    with pytest.raises(UserError, match=needle):
        to_example({"messages": messages}, index=0, source="s")


# ---------------------------------------------------------------- files


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # trailing blank line


def test_jsonl_round_trip_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    _write_jsonl(path, ROWS)
    assert read_rows(path) == ROWS
    examples = load_examples(path)
    assert [e.id for e in examples] == ["a", "7"] and examples[1].text == "plain text"


def test_json_round_trip(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS))
    assert read_rows(path) == ROWS


def test_json_must_be_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": ROWS}))
    with pytest.raises(UserError, match="list of row objects"):
        read_rows(path)


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "d.parquet"
    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": None}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert read_rows(path) == rows
    examples = load_examples(path)
    assert len(examples[0].messages) == 2 and len(examples[1].messages) == 1  # None = prompt only


def test_save_to_disk_round_trip(tmp_path):
    import datasets

    rows = [{"text": "one"}, {"text": "two"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert read_rows(tmp_path / "ds") == rows
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    assert read_rows(tmp_path / "dd") == rows


def test_dataset_dict_without_train_lists_splits(tmp_path):
    import datasets

    split = datasets.Dataset.from_list([{"text": "x"}])
    datasets.DatasetDict({"test": split, "validation": split}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match="splits: test, validation"):
        read_rows(tmp_path / "dd")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(UserError) as e:
        read_rows(path)
    assert str(path) in str(e.value) and "line 3" in str(e.value) and "Expecting value" in str(e.value)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(UserError, match="line 2.*list"):
        read_rows(path)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_rows(tmp_path / "nope.jsonl")
    path = tmp_path / "d.csv"
    path.write_text("text\nx\n")
    with pytest.raises(UserError, match=r"'\.csv'.*\.jsonl, \.json, \.parquet"):
        read_rows(path)


def test_plain_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="save_to_disk"):
        read_rows(tmp_path)


# ---------------------------------------------------------------- rendering and labels


def test_single_turn_labels_only_the_answer(tok):
    ex = Example(id="x", messages=[{"role": "system", "content": "Be brief."}, *chat("Hi there", "Hello!").messages])
    ids, labels = render_example(ex, tok, max_length=512)
    assert len(ids) == len(labels)
    assert supervised_text(tok, ids, labels) == "Hello!<|im_end|>\n"
    # Every supervised label is the token itself (no shift here), everything else is IGNORE.
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels))
    prompt_len = len(render_prompt(ex, tok))
    assert set(labels[:prompt_len]) == {IGNORE} and IGNORE not in labels[prompt_len:]


def test_multi_turn_supervises_both_assistant_turns_not_the_user(tok):
    ids, labels = render_example(chat("Q1", "A1", "Q2", "A2"), tok, max_length=512)
    assert supervised_text(tok, ids, labels) == "A1<|im_end|>\nA2<|im_end|>\n"
    full = tok.decode(ids)
    assert full.count("<|im_start|>") == 4
    # The second user turn lies between the two supervised runs and is not supervised.
    runs, prev = [], IGNORE
    for label in labels:
        if label != IGNORE and prev == IGNORE:
            runs.append(1)
        prev = label
    assert len(runs) == 2


def test_text_example_is_fully_supervised(tok):
    ids, labels = render_example(Example(id="t", text="a b\nc"), tok, max_length=512)
    assert labels == ids and tok.decode(ids) == "a b\nc"


def test_truncation_keeps_max_length_tokens(tok):
    ids, labels = render_example(chat("Q", "A" * 100), tok, max_length=40)
    assert len(ids) == len(labels) == 40
    full_ids, _ = render_example(chat("Q", "A" * 100), tok, max_length=10_000)
    assert ids == full_ids[:40]  # right truncation


@pytest.mark.parametrize(
    "example, reason",
    [
        (Example(id="e", text="  "), "empty"),
        (Example(id="e", messages=[]), "empty"),
        (chat("only a question"), "no assistant turn"),
        (Example(id="e", messages=[{"role": "assistant", "content": "hi"}]), "no assistant turn"),
        (chat("Q" * 50, "A"), "over-long: no supervised tokens within max_length"),
    ],
)
def test_drop_reasons(tok, example, reason):
    assert render_example(example, tok, max_length=20) == reason


def test_render_prompt_ends_with_generation_prompt(tok):
    for ex in (chat("Q1", "A1", "Q2", "A2"), chat("Q1", "A1", "Q2")):
        text = tok.decode(render_prompt(ex, tok))
        assert text.endswith("Q2<|im_end|>\n<|im_start|>assistant\n") and "A2" not in text


def test_chat_rows_need_a_chat_template(tok):
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        render_example(chat("Q", "A"), bare, max_length=64)


def test_template_that_rewrites_earlier_turns_is_refused():
    rewriting = tiny_tokenizer()
    # Drops the content of every assistant turn but the last: prefixes are no longer prefixes.
    rewriting.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(UserError, match="prefixes"):
        render_example(chat("Q1", "A1", "Q2", "A2"), rewriting, max_length=512)


# ---------------------------------------------------------------- tokenize_examples


def test_tokenize_examples_counts_drops(tok, caplog):
    examples = [chat("Q", "A"), chat("Q", "B"), chat("question only"), Example(id="e", text="")]
    with caplog.at_level("INFO", logger="kdkit.data.render"):
        data = tokenize_examples(examples, tok, max_length=64, max_drop_fraction=0.5, source="d.jsonl")
    assert "d.jsonl: kept 2 of 4 rows, 1 empty, 1 without an assistant turn, 0 over-long" in caplog.text
    assert data.total == 4 and len(data.input_ids) == 2 == len(data.labels) == len(data.ids)
    assert data.dropped == {"no assistant turn": 1, "empty": 1}
    assert data.num_supervised_tokens == 2 * 3  # "A" / "B", "<|im_end|>", "\n" in each


def test_zero_usable_rows_is_a_user_error_with_counts(tok):
    examples = [chat("x"), Example(id="e", text=""), chat("Q" * 50, "A"), chat("Q" * 50, "A")]
    with pytest.raises(UserError) as e:
        tokenize_examples(examples, tok, max_length=20, source="train.jsonl")
    msg = str(e.value)
    assert "no usable rows in train.jsonl" in msg
    assert "4 rows, 1 empty, 1 without an assistant turn, 2 over-long (max_length=20)" in msg


def test_drop_fraction_threshold(tok):
    examples = [chat("Q", "A"), chat("x"), chat("y")]  # 2 of 3 dropped
    with pytest.raises(UserError, match="data.max_drop_fraction=0.5"):
        tokenize_examples(examples, tok, max_length=64, max_drop_fraction=0.5)
    data = tokenize_examples(examples, tok, max_length=64, max_drop_fraction=0.7)
    assert len(data.input_ids) == 1


# ---------------------------------------------------------------- collate, pack, order


def test_collate_right_padding():
    batch = collate([[5, 6, 7], [8]], [[IGNORE, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_left_padding():
    batch = collate([[5, 6, 7], [8]], [[5, 6, 7], [8]], pad_id=9, side="left")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[5, 6, 7], [IGNORE, IGNORE, 8]]


def _shifted_targets(labels: list[list[int]]) -> list[int]:
    """The labels a next-token loss actually uses (position 0 of a sequence never is)."""
    return [label for row in labels for label in row[1:] if label != IGNORE]


def test_pack_keeps_every_supervised_token(tok):
    examples = [chat(f"Q{i}", "A" * i) for i in range(1, 8)] + [Example(id="t", text="some text")]
    data = tokenize_examples(examples, tok, max_length=64)
    packed = pack(data, max_length=64)
    assert len(packed.input_ids) < len(data.input_ids)
    assert all(len(ids) <= 64 for ids in packed.input_ids)
    assert [len(i) for i in packed.input_ids] == [len(lab) for lab in packed.labels]
    assert sum(packed.input_ids, []) == sum(data.input_ids, [])  # order and tokens kept
    assert _shifted_targets(packed.labels) == _shifted_targets(data.labels)
    assert "+".join(packed.ids).split("+") == data.ids


def test_pack_does_not_target_the_next_documents_first_token():
    data = TokenizedData(ids=["a", "b"], input_ids=[[1, 2], [3, 4]], labels=[[1, 2], [3, 4]], dropped={}, total=2)
    packed = pack(data, max_length=8)
    assert packed.ids == ["a+b"] and packed.labels == [[1, 2, IGNORE, 4]]


def test_batch_order_is_a_deterministic_permutation():
    order = batch_order(50, seed=3, epoch=1)
    assert sorted(order) == list(range(50))
    assert order == batch_order(50, seed=3, epoch=1)
    assert order != batch_order(50, seed=3, epoch=2) and order != batch_order(50, seed=4, epoch=1)
    assert order != list(range(50))


# ---------------------------------------------------------------- tiny models


@pytest.mark.parametrize("text", ["Hello, world!", "  two  spaces\nand\n\nnewlines\t ", "~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./"])
def test_tiny_tokenizer_round_trip(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert tok.decode(enc["input_ids"]) == text
    assert len(enc["input_ids"]) == len(text)  # one token per character
    assert enc["offset_mapping"] == [(i, i + 1) for i in range(len(text))]


def test_tiny_tokenizer_special_tokens(tok):
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<|im_start|>", "<|im_end|>", "<unk>")
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    assert tok("<|im_end|>", add_special_tokens=False)["input_ids"] == [tok.eos_token_id]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_llama_is_seeded(tok):
    a, b = tiny_llama(vocab_size=len(tok), seed=1), tiny_llama(vocab_size=len(tok), seed=1)
    c = tiny_llama(vocab_size=len(tok), seed=2)
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc) and wa.dtype == torch.float32
    logits = a(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, len(tok))


@pytest.mark.parametrize("vocab_pad_to", [None, 128])
def test_save_tiny_model_loads_with_auto_classes(tmp_path, tok, vocab_pad_to):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = save_tiny_model(tmp_path / "m", num_layers=1, vocab_pad_to=vocab_pad_to)
    assert (directory / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(directory)
    loaded = AutoTokenizer.from_pretrained(directory)
    expected_rows = vocab_pad_to or len(tok)
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size == expected_rows
    assert len(loaded) == len(tok) and model.config.num_hidden_layers == 1
    assert loaded.decode(loaded("a b\nc", add_special_tokens=False)["input_ids"]) == "a b\nc"
    assert loaded.chat_template == tok.chat_template and loaded.pad_token_id == tok.pad_token_id
    ids = torch.tensor([loaded("abc")["input_ids"]])
    assert model(ids).logits.shape == (1, 3, expected_rows)
    # The loaded weights are the ones save_tiny_model built, not a fresh init.
    fresh = tiny_llama(vocab_size=expected_rows, num_layers=1)
    assert torch.equal(model.get_input_embeddings().weight, fresh.get_input_embeddings().weight)


def test_vocab_pad_to_below_tokenizer_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="below"):
        save_tiny_model(tmp_path / "m", vocab_pad_to=10)


def test_no_held_out_prompt_or_near_duplicate_reaches_the_quickstart_training_prompts():
    """The shipped instructions: no train prompt is a MinHash near-duplicate (est. Jaccard ≥ 0.5 on
    word 3-shingles) or a normalised exact copy of a held-out one, nor of the 40 prompts of
    benchmarks/unseen_eval.py (the check on prompts the project has never trained on); the same for the
    1,399 extra prompts of benchmarks/data/more_prompts.jsonl (README: more prompts at equal wall clock)."""
    from importlib.resources import files
    from pathlib import Path

    from kdkit.data.quality import normalise

    root = files("kdkit") / "assets" / "instructions"
    read = lambda path: [json.loads(x)["prompt"] for x in path.read_text().splitlines() if x.strip()]
    held, train = read(root / "heldout.jsonl"), read(root / "train.jsonl")
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "data"
    unseen, more = read(bench / "unseen_prompts.jsonl"), read(bench / "more_prompts.jsonl")
    assert len(held) == 48 and len(unseen) == 40 and len(train) >= 1500 and len(more) >= 1300
    assert len({normalise(t) for t in train + more}) == len(train) + len(more)  # no prompt twice
    assert near_copies(train, held) == [] and near_copies(train, unseen) == []
    assert near_copies(more, held) == [] and near_copies(more, unseen) == []  # the extra prompts' experiment
    # the check itself can fail: a held-out prompt with one word changed is caught
    probe = held[0].replace(held[0].split()[-1], "today?")
    assert near_copies([probe, "Name a colour."], held) == [(probe, held[0])]


def near_copies(texts: list[str], reference: list[str]) -> list[tuple[str, str]]:
    """(text, reference) for each text that is a MinHash near-duplicate (≥ 0.5) or a normalised copy of a
    reference text."""
    import numpy as np

    from kdkit.data.quality import minhash, normalise

    sigs, norms = np.stack([minhash(t) for t in reference]), {normalise(t) for t in reference}
    return [(t, reference[int((sigs == minhash(t)).mean(-1).argmax())]) for t in texts
            if (sigs == minhash(t)).mean(-1).max() >= 0.5 or normalise(t) in norms]
