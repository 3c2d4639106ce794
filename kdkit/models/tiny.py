"""Tiny models built in code, for tests that must run on a CPU in seconds with no network.

`tiny_tokenizer()` is a character-level tokenizer with a ChatML chat template (the shape SmolLM2
uses), `tiny_llama()` a randomly initialised Llama of a few thousand parameters, and
`save_tiny_model()` writes both as a Hugging Face directory that `AutoModelForCausalLM` and
`AutoTokenizer` load like any hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<|im_start|>", "<|im_end|>", "<unk>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]
# Ids follow from SPECIAL_TOKENS being the first vocabulary entries.
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# ChatML, as SmolLM2 renders it, minus SmolLM2's default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MAX_POSITIONS = 2048


def _characters() -> list[str]:
    """Tab, newline and printable ASCII (space to '~'): one token each."""
    return ["\t", "\n"] + [chr(code) for code in range(32, 127)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: every ASCII character is one token, anything else is <unk>.

    decode(encode(s)) == s for ASCII text (spaces and newlines included), offsets map each token
    to its one character, and the ChatML template matches SmolLM2's turn format.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + _characters())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    # Split before every character; `[\s\S]` (not `.`) so newlines are split too.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # concatenate tokens with no separator
    # Special tokens are matched whole in the input before the per-character split.
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=MAX_POSITIONS,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


BPE_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Say red and blue. green cat, dog sun moon tree fish bird "
    "rain snow. What is 12 + 30? It is 42. Hello, world! How are you today? I am fine, thank you.\n"
)


def tiny_bpe_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) trained in code on a fixed sentence.

    The special tokens of `tiny_tokenizer()` (same ids) plus GPT-2's `<|endoftext|>`, which GPT-2-style
    readers (transformers' GGUF reader) add when it is missing; ChatML template; every byte is representable,
    and the merges make it a real BPE (GGUF export and llama.cpp need this kind, not a char vocabulary).
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, "<|endoftext|>"],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([BPE_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN,
                                        eos_token=EOS_TOKEN, unk_token=UNK_TOKEN, model_max_length=MAX_POSITIONS)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(
    *,
    vocab_size: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> LlamaForCausalLM:
    """A randomly initialised fp32 Llama; the same arguments always give the same weights.

    pad/bos/eos ids are those of `tiny_tokenizer()`.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    # fork_rng: seed the init without disturbing the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32)


def save_tiny_model(
    directory: str | Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 32,
    seed: int = 0,
    vocab_pad_to: int | None = None,
    bpe: bool = False,
) -> Path:
    """Write a tiny Llama + `tiny_tokenizer()` as a loadable HF directory; returns its path.

    `vocab_pad_to`: the model's vocab_size (embedding rows), which must be >= len(tokenizer);
    the extra rows stand for the padded vocabularies real checkpoints ship (e.g. to a multiple of 64).
    `bpe`: use `tiny_bpe_tokenizer()` instead of the character-level one.
    """
    tokenizer = tiny_bpe_tokenizer() if bpe else tiny_tokenizer()
    vocab_size = len(tokenizer) if vocab_pad_to is None else vocab_pad_to
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_pad_to={vocab_pad_to} is below the tokenizer's {len(tokenizer)} tokens")
    model = tiny_llama(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
