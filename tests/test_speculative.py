"""The student as a draft for its teacher: greedy text identical with and without it, and the
acceptance counts agree with what the draft must score (itself: all accepted; a stranger: none)."""

from __future__ import annotations

import copy

import pytest

from kdkit.eval.speculative import prompt_ids, speculative_decoding
from kdkit.models.load import student_from_layers
from kdkit.models.tiny import tiny_llama, tiny_tokenizer

ROWS = [{"messages": [{"role": "user", "content": f"Say {w} and blue."}, {"role": "assistant", "content": "ok"}]}
        for w in ("red", "green", "cat", "moon")]


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    # an untied head: a tiny random model with tied embeddings just repeats its last token, which any draft guesses
    teacher = tiny_llama(vocab_size=len(tok), num_layers=4, seed=1, tie_word_embeddings=False)
    return teacher, tok, prompt_ids(tok, ROWS)


@pytest.mark.parametrize("draft_kind", ["itself", "its_layers", "stranger"])
def test_greedy_output_identical_with_and_without_draft(setup, draft_kind):
    teacher, tok, prompts = setup
    draft = {"itself": lambda: copy.deepcopy(teacher), "its_layers": lambda: student_from_layers(teacher, [0, 1, 3]),
             "stranger": lambda: tiny_llama(vocab_size=len(tok), num_layers=2, seed=7, tie_word_embeddings=False)}
    r = speculative_decoding(teacher, draft[draft_kind](), prompts, max_new_tokens=24, num_draft_tokens=4,
                             pad_id=tok.pad_token_id)
    assert r["identical"] == r["prompts"] == 4  # the teacher's greedy text, token for token
    assert r["new_tokens"] == r["accepted"] + r["teacher_forwards"]  # each round: accepted + 1 teacher token
    assert 0 <= r["accepted"] <= r["drafted"]
    if draft_kind == "itself":
        # rounds of 4 drafts + 1 teacher token: 24 tokens take 5 teacher forwards per prompt (the last drafts 3)
        assert r["acceptance_rate"] == 1.0 and r["teacher_forwards"] == 4 * 5
    elif draft_kind == "stranger":
        assert r["acceptance_rate"] < 0.2 and r["tokens_per_teacher_forward"] < 1.3
    else:
        assert 0.2 < r["acceptance_rate"] < 1.0


def test_prompt_ids_stop_before_the_answer(setup):
    _, tok, prompts = setup
    text = tok.decode(prompts[0])
    assert text.endswith("<|im_start|>assistant\n") and "Say red and blue." in text and "ok" not in text
