"""GGUF export read back by transformers (f16 exact up to fp16 rounding, q8_0/q4_0 close), llama.cpp
tensor names, and the `kdkit export` command (gguf and a clean HF directory; user errors exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdkit.models.gguf_export import export_gguf
from kdkit.models.tiny import save_tiny_model, tiny_bpe_tokenizer, tiny_llama

TEXTS = ["Say red and blue.", "What is 12 + 30? It is 42.\n\té ü 😀", "<|im_start|>user\nhi<|im_end|>\n"]


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory) -> Path:
    # 4 query heads / 2 KV heads: both the q and the (GQA) k permutations are exercised
    return save_tiny_model(tmp_path_factory.mktemp("bpe"), num_layers=2, hidden_size=64, seed=3, bpe=True)


def _load(directory: Path):
    return AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


def _read_back(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _greedy(model, tok, n=24) -> str:
    prompt = tok.apply_chat_template([{"role": "user", "content": "Say red and blue."}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, prompt["input_ids"].shape[1]:])


@torch.no_grad()
def test_f16_round_trip_weights_logits_text_tokenizer(bpe_model, tmp_path):
    model, tok = _load(bpe_model)
    path = export_gguf(model, tok, tmp_path / "m-f16.gguf", quant="f16")
    back, back_tok = _read_back(path)
    assert back.config.tie_word_embeddings and back.config.num_key_value_heads == 2
    # weights: exactly the fp16-rounded originals (the q/k permutation is undone bit for bit)
    ref = {k: v.half().float() if v.ndim == 2 else v for k, v in model.state_dict().items()}
    for key, value in back.state_dict().items():
        assert torch.equal(value, ref[key]), key
    ids = tok(TEXTS[1], return_tensors="pt").input_ids
    a, b = model(ids).logits, back(ids).logits
    assert (a - b).abs().max() <= 1e-2 * a.abs().max()  # fp16 rounding of the weights only
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert _greedy(model, tok) == _greedy(back, back_tok)
    # tokenizer: same ids for plain, non-ASCII and special-token text; same template and special ids
    assert back_tok.get_vocab() == tok.get_vocab()
    for text in TEXTS:
        assert back_tok(text).input_ids == tok(text).input_ids, text
    assert back_tok.chat_template == tok.chat_template
    assert (back_tok.bos_token_id, back_tok.eos_token_id, back_tok.pad_token_id) == (1, 2, 0)


@torch.no_grad()
def test_q8_0_and_q4_0_read_back_close_and_smaller(bpe_model, tmp_path):
    model, tok = _load(bpe_model)
    ids = tok(" ".join(TEXTS), return_tensors="pt").input_ids
    ref = model(ids).logits
    sizes, errors = {}, {}
    for quant in ("f16", "q8_0", "q4_0"):
        path = export_gguf(model, tok, tmp_path / f"m-{quant}.gguf", quant=quant)
        sizes[quant] = path.stat().st_size
        logits = _read_back(path)[0](ids).logits
        errors[quant] = float((logits - ref).abs().max() / ref.abs().max())
        agree = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
        assert agree >= {"f16": 1.0, "q8_0": 0.95, "q4_0": 0.7}[quant], (quant, agree)
    assert errors["f16"] < errors["q8_0"] < errors["q4_0"] < 0.3, errors
    assert errors["q8_0"] < 0.03, errors
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f16"], sizes


def test_llama_cpp_tensor_names_types_and_untied_head(tmp_path):
    tok = tiny_bpe_tokenizer()
    model = tiny_llama(vocab_size=len(tok) + 12, hidden_size=64, tie_word_embeddings=False, seed=5)  # padded rows
    path = export_gguf(model, tok, tmp_path / "u.gguf", quant="q8_0")
    reader = gguf.GGUFReader(str(path))
    allowed = {gguf.TENSOR_NAMES[t].format(bid=b) + ".weight"
               for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.LLAMA] for b in range(2)}
    names = {t.name: t.tensor_type for t in reader.tensors}
    assert set(names) <= allowed and "output.weight" in names and "blk.1.attn_k.weight" in names
    assert names["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert names["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == len(tok) + 12 and tokens[-1] == f"[PAD{len(tok) + 11}]"
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert not back.config.tie_word_embeddings
    torch.testing.assert_close(back.lm_head.weight, model.lm_head.weight, atol=0.02, rtol=0.02)
    assert not torch.equal(back.lm_head.weight, back.model.embed_tokens.weight)


def _kdkit(*args):
    return subprocess.run([sys.executable, "-m", "kdkit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_cli_export_gguf_and_clean_hf_dir(bpe_model, tmp_path):
    run = tmp_path / "run"
    student = save_tiny_model(run / "student", num_layers=2, hidden_size=64, seed=3, bpe=True)
    (student / "README.md").write_text("# Student distilled with kdkit\n\n| metric | teacher |\n")
    (student / "optimizer.pt").write_bytes(b"junk a clean export must not carry")
    r = _kdkit("export", run, "--format", "gguf", "--quant", "q8_0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "student-q8_0.gguf").is_file() and str(run / "student-q8_0.gguf") in r.stdout
    r = _kdkit("export", student, "--format", "hf", "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr[-2000:]
    hf = tmp_path / "hf"
    files = {p.name for p in hf.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files and "optimizer.pt" not in files
    assert "distilled with kdkit" in (hf / "README.md").read_text()
    original, exported = load_file(student / "model.safetensors"), load_file(hf / "model.safetensors")
    assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)


def test_cli_export_user_errors_exit_2(tiny_teacher, bpe_model, tmp_path):
    r = _kdkit("export", bpe_model, "--quant", "q5_k", "--out", tmp_path / "x.gguf")
    assert r.returncode == 2 and "q5_k" in r.stderr and "q8_0" in r.stderr and "Traceback" not in r.stderr
    r = _kdkit("export", bpe_model, "--format", "onnx")
    assert r.returncode == 2 and "onnx" in r.stderr and "Traceback" not in r.stderr
    r = _kdkit("export", tiny_teacher, "--out", tmp_path / "c.gguf")  # character-level vocabulary
    assert r.returncode == 2 and "byte-level BPE" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "c.gguf").exists()


@pytest.mark.integration
@torch.no_grad()
def test_smollm2_layers_f16_round_trip(tmp_path):
    from kdkit.models.load import load_model, load_tokenizer, resolve, student_from_layers

    src = resolve("smollm2-135m-instruct")
    teacher, tok = load_model(src), load_tokenizer(src)
    model = student_from_layers(teacher, [0, 1, 2, 29]).eval()
    path = export_gguf(model, tok, tmp_path / "smol-f16.gguf", quant="f16")
    back, back_tok = _read_back(path)
    for text in TEXTS:
        assert back_tok(text).input_ids == tok(text).input_ids, text
    assert back_tok.chat_template == tok.chat_template
    ids = tok(TEXTS[0] + " " + TEXTS[1], return_tensors="pt").input_ids
    a, b = model(ids).logits, back(ids).logits
    assert (a - b).abs().max() <= 1e-2 * a.abs().max()
    assert _greedy(model, tok, n=16) == _greedy(back, back_tok, n=16)
