"""Write a llama-family Hugging Face model as a GGUF file that llama.cpp and transformers read.

What llama.cpp expects, and what this writes (after llama.cpp's `convert_hf_to_gguf.py`):
- tensor names `token_embd`, `blk.{i}.attn_q`, …, `output_norm`, `output` (omitted when the head is tied);
- q_proj / k_proj rows permuted per head (llama.cpp's rotary layout pairs rows differently from HF's);
- norms in f32, 2-D weights in f16, Q8_0 or Q4_0 (numpy quantizers of the `gguf` package); a weight
  whose rows are not a multiple of the 32-value block falls back to f16, as llama.cpp does;
- the tokenizer as metadata: byte-level BPE (`tokenizer.ggml.model = gpt2`) tokens, token types,
  merges, bos/eos/unk/pad ids and the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from kdkit.errors import UserError

QUANTS = {  # name → (GGML type of 2-D weights, GGML type of the (tied) embedding, llama.cpp file type)
    "f16": (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    # Like llama-quantize, the embedding (which is also the head when tied) keeps more bits in Q4_0.
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}

LAYER_NAMES = {  # HF name inside `model.layers.{i}.` → llama.cpp name inside `blk.{i}.`
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

SUPPORTED = ("llama",)


def export_gguf(model, tokenizer, out: str | Path, *, quant: str = "f16", name: str | None = None,
                tokenizer_pre: str | None = None) -> Path:
    """Write `model` (a loaded llama-family causal LM) and its tokenizer to `out`; returns the path.

    `tokenizer_pre` names llama.cpp's pre-tokenizer (e.g. "smollm", "llama-bpe"); by default it is
    read off the tokenizer's own pre-tokenizer.
    """
    if quant not in QUANTS:
        raise UserError(f"unknown GGUF quantization {quant!r}: use one of {', '.join(QUANTS)}")
    cfg = model.config
    if cfg.model_type not in SUPPORTED:
        raise UserError(f"GGUF export supports {', '.join(SUPPORTED)} models, not {cfg.model_type!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    _write_config(writer, cfg, name or getattr(cfg, "_name_or_path", "") or out.stem, QUANTS[quant][2])
    _write_tokenizer(writer, tokenizer, cfg.vocab_size, tokenizer_pre)
    for gguf_name, array, qtype in _tensors(model, quant):
        writer.add_tensor(gguf_name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)  # atomic: a half-written file never carries the final name
    return out


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise UserError(f"GGUF export does not handle rope_type {rope_type!r} yet (only plain RoPE)")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _write_config(writer, cfg, name: str, file_type) -> None:
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise UserError("GGUF export does not handle llama models with attention/MLP biases yet")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:  # llama.cpp infers it otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)


# ---------------------------------------------------------------- tokenizer


def _write_tokenizer(writer, tokenizer, vocab_size: int, pre: str | None) -> None:
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    bpe = state["model"]
    if bpe.get("type") != "BPE" or "ByteLevel" not in json.dumps(state.get("pre_tokenizer")):
        raise UserError("GGUF export handles byte-level BPE tokenizers (GPT-2 style, as SmolLM2, Llama 3 and "
                        f"Qwen use); this one is {bpe.get('type')} with pre-tokenizer "
                        f"{(state.get('pre_tokenizer') or {}).get('type')}")
    tokens, types = _token_list(tokenizer, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]  # (a, b) or "a b"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or _guess_pre(state.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, key, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_eos_token(bool(getattr(tokenizer, "add_eos_token", False)))
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _token_list(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id, padded with `[PADi]` to the model's rows; types NORMAL/CONTROL/USER_DEFINED/UNUSED."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise UserError(f"the tokenizer has {len(by_id)} tokens but the model only {vocab_size} embedding rows")
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # padded rows of the embedding matrix
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(T.NORMAL)
    return tokens, types


def _guess_pre(pre_tokenizer: dict | None) -> str:
    """llama.cpp's pre-tokenizer name from the HF pre-tokenizer: digits split one by one → SmolLM's."""
    text = json.dumps(pre_tokenizer or {})
    if '"Digits"' in text and '"individual_digits": true' in text:
        return "smollm"
    if r"\\p{N}{1,3}" in text:
        return "llama-bpe"
    return "gpt-2"


# ---------------------------------------------------------------- tensors


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF → llama.cpp row order for q/k: per head, rows (2, d/2) become (d/2, 2) (convert_hf_to_gguf)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model, quant: str):
    """(llama.cpp name, array, GGML type) for every weight, q/k permuted, quantized as asked."""
    cfg = model.config
    weight_type, embed_type, _ = QUANTS[quant]
    state = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in model.state_dict().items()}
    tied = getattr(cfg, "tie_word_embeddings", False)
    named = {"token_embd.weight": state.pop("model.embed_tokens.weight"),
             "output_norm.weight": state.pop("model.norm.weight")}
    head = state.pop("lm_head.weight", None)
    if not tied:
        named["output.weight"] = head
    for key, value in state.items():
        if "rotary_emb" in key:
            continue  # buffers recomputed from the config
        parts = key.split(".")
        if parts[:2] != ["model", "layers"] or ".".join(parts[3:]) not in LAYER_NAMES:
            raise UserError(f"GGUF export: unexpected weight {key!r} for a llama model")
        local = ".".join(parts[3:])
        if local == "self_attn.q_proj.weight":
            value = _permute(value, cfg.num_attention_heads)
        elif local == "self_attn.k_proj.weight":
            value = _permute(value, cfg.num_key_value_heads)
        named[f"blk.{parts[2]}.{LAYER_NAMES[local]}"] = value
    for name, value in named.items():
        qtype = embed_type if name == "token_embd.weight" else weight_type
        yield (name, *_encode(value, qtype))


def _encode(value: np.ndarray, qtype) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    Q = gguf.GGMLQuantizationType
    if value.ndim == 1:
        return value.astype(np.float32), Q.F32  # norms stay f32, as llama.cpp keeps them
    if qtype == Q.F16 or value.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return value.astype(np.float16), Q.F16
    return gguf.quants.quantize(value, qtype), qtype
