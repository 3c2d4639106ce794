"""`kdkit export DIR --format gguf|hf`: a student (or any llama-family model) as a shippable artefact.

DIR is a model directory, a run directory (its `student/` is exported), a .gguf file or a teacher
alias. `gguf` writes one llama.cpp file (f16, q8_0 or q4_0); `hf` writes a clean Hugging Face
directory: safetensors, config, tokenizer, chat template and a model card, nothing else.
"""

from __future__ import annotations

from pathlib import Path

from kdkit.errors import UserError
from kdkit.models.gguf_export import QUANTS, export_gguf
from kdkit.models.load import count_parameters, load_model, load_tokenizer, resolve
from kdkit.train.setup import save_student

FORMATS = ("gguf", "hf")


def run(src: str, *, fmt: str = "gguf", quant: str = "f16", out: str | None = None) -> Path:
    """Export `src`; returns the written file (gguf) or directory (hf)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "gguf" and quant not in QUANTS:
        raise UserError(f"unknown GGUF quantization {quant!r}: use one of {', '.join(QUANTS)}")
    path = Path(src)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "student").is_dir():
        path = path / "student"  # a run directory: ship its student
    source = resolve(str(path))
    model, tok = load_model(source), load_tokenizer(source)
    stem = source.alias or (Path(source.gguf_file).stem if source.gguf_file else source.directory.name)
    # default next to a model directory; in the working directory for a .gguf file or an alias
    base = Path(".") if source.gguf_file else source.directory.parent
    if fmt == "gguf":
        return export_gguf(model, tok, Path(out) if out else base / f"{stem}-{quant}.gguf", quant=quant, name=stem)
    card_path = source.directory / "README.md"
    card = card_path.read_text() if not source.gguf_file and card_path.is_file() else _minimal_card(stem, model)
    return save_student(model, tok, Path(out) if out else base / f"{stem}-hf", card=card)


def _minimal_card(name: str, model) -> str:
    return "\n".join([
        "---", "library_name: transformers", "tags: [kdkit]", "---", "", f"# {name}", "",
        f"- **Architecture:** {model.config.model_type}, {model.config.num_hidden_layers} layers, "
        f"{count_parameters(model):,} parameters",
        "- Exported with `kdkit export --format hf`.", "",
    ])
