"""Glue shared by the recipes: teacher, student, data and the saved student with its model card."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import torch

from kdkit.config import Config
from kdkit.data.render import TokenizedData, tokenize_examples
from kdkit.data.sources import load_examples
from kdkit.errors import UserError
from kdkit.models import load as M
from kdkit.models.fingerprint import TENSORS, files_hash, tensors_hash
from kdkit.models.license import describe as describe_license
from kdkit.models.license import license_card_lines
from kdkit.signal import Provenance

log = logging.getLogger(__name__)


class Teacher:
    """The teacher's tokenizer at once, its weights only when first used (a run that reads a
    signal cache and starts from a pretrained student never loads them)."""

    def __init__(self, cfg: Config):
        tc = cfg.teacher
        self.source = M.resolve(tc.path, gguf_file=tc.gguf_file)
        self.trust_remote_code = tc.trust_remote_code
        self.tokenizer = M.load_tokenizer(self.source, trust_remote_code=tc.trust_remote_code)
        self.license = M.read_license(self.source, tc.license)
        self._model = None
        self._held = None  # (dtype, device, model): the forward-only copy `held` made

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            log.info("loading teacher %s", self.source.id)
            self._model = M.freeze(M.load_model(self.source, trust_remote_code=self.trust_remote_code))
        return self._model

    @property
    def num_parameters(self) -> int:
        """The teacher's parameter count (a model card's), from the held copy where the weights as loaded
        were released: counting them must not load them again (a second de-quantised teacher at the end
        of a run without evaluation was its peak memory)."""
        return M.count_parameters(self._held[2] if self._held is not None else self.model)

    def reload(self) -> None:
        """Drop the weights (e.g. FSDP2 shards, unusable once training ends); `model` loads them again."""
        self._model = self._held = None

    def held(self, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        """The teacher for forward-only work (generation, the signal cache) in the run's compute dtype on its
        device: `model` itself where that already matches, else a copy cast once and kept, so that
        evaluation still compares every student with the teacher's own fp32 weights."""
        if self._held is not None and self._held[:2] == (dtype, device):
            return self._held[2]  # without `model`: the weights as loaded may have been released
        model = self.model
        if model.dtype == dtype and model.device == device:
            return model
        self._held = None  # the old copy freed before the new one is made
        # the copy's parameters are cast as they are copied (a deepcopy memo): never a second full fp32 teacher
        memo = {id(p): torch.nn.Parameter(p.detach().to(device, dtype if p.is_floating_point() else p.dtype),
                                          requires_grad=p.requires_grad) for p in model.parameters()}
        self._held = (dtype, device, M.contiguous_head(copy.deepcopy(model, memo).to(device=device, dtype=dtype)))
        return self._held[2]

    def release_loaded(self) -> bool:
        """Free the weights as loaded while only the held copy computes (an online signal in bf16: the
        fp32 weights are two thirds of the teacher's memory, idle all through training); `model` loads
        them again when evaluation asks. False, and nothing freed, where there is no separate held copy."""
        if self._held is None or self._model is None:
            return False
        self._model = None
        return True

    def weights_hash(self, like: str = "") -> str:
        """The teacher's weights as a content hash (kdkit.models.fingerprint), of the kind of `like`
        (a cache's): `tensors:` hashes the loaded state_dict (a cache built from a model in memory, or
        by kdkit < cache v2), anything else the weight files, without loading them."""
        if like.startswith(TENSORS):
            return tensors_hash(self.model)
        return files_hash(self.source.directory, self.source.gguf_file)  # memoised per file state

    def provenance(self, temperature: float = 1.0) -> Provenance:
        return Provenance(
            teacher_id=self.source.id, tokenizer_hash=M.tokenizer_hash(self.tokenizer),
            chat_template_hash=M.chat_template_hash(self.tokenizer), temperature=temperature,
        )


def forward_teacher(cfg: Config, teacher: Teacher) -> torch.nn.Module:
    """The teacher that generates answers and computes the signal cache: the run's device, and its
    precision policy (`teacher_dtype`: bf16 where the step computes in bf16)."""
    from kdkit.train.loop import pick_device

    device = pick_device(cfg.train.device)
    return teacher.held(teacher_dtype(cfg, device), device)


def teacher_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype the online teacher's weights are held in: `teacher.dtype`, or on auto the run's own
    `train.precision` policy (bf16 where the step computes in bf16)."""
    from kdkit.train.loop import compute_dtype  # the one precision policy

    chosen = cfg.teacher.dtype
    if chosen == "auto":
        return compute_dtype(device, cfg.train.precision)
    return torch.bfloat16 if chosen == "bf16" else torch.float32


def load_teacher(cfg: Config) -> Teacher:
    return Teacher(cfg)


def signal_vocab(teacher: Teacher) -> int:
    """The vocabulary a teacher's own top-k signal covers: its tokenizer's ids that its head has rows for."""
    return M.shared_vocab_size(teacher.tokenizer, teacher.tokenizer, M.head_rows(teacher.model), len(teacher.tokenizer))


def cache_dir(cfg: Config) -> Path:
    return Path(cfg.teacher.cache_dir) if cfg.teacher.cache_dir else Path(cfg.run.dir) / "cache"


def build_student(cfg: Config, teacher: Teacher):
    """(student model, student tokenizer, a one-line description of how it was made)."""
    sc = cfg.student
    torch.manual_seed(cfg.train.seed)
    if sc.init == "teacher_layers":
        total = teacher.model.config.num_hidden_layers
        layers = sc.layers if sc.layers is not None else M.uniform_layers(total, sc.num_layers or total)
        student = M.student_from_layers(teacher.model, layers)
        return student, teacher.tokenizer, f"teacher layers {layers} of {total}"
    src = M.resolve(sc.path)
    tok = M.load_tokenizer(src, trust_remote_code=cfg.teacher.trust_remote_code)
    if sc.init == "pretrained":
        return M.load_model(src, trust_remote_code=cfg.teacher.trust_remote_code), tok, f"pretrained {sc.path}"
    student = M.student_from_config(str(src.directory), sc.config_overrides, seed=cfg.train.seed,
                                    trust_remote_code=cfg.teacher.trust_remote_code)
    return student, tok, f"random init from the config of {sc.path} {sc.config_overrides or ''}".strip()


def tokenize_file(path: str | None, tokenizer, cfg: Config, *, key: str) -> TokenizedData:
    if not path:
        raise UserError(f"{key} is not set: give a data file (e.g. `{key}=data/train.jsonl`)")
    data = tokenize_examples(load_examples(path), tokenizer, max_length=cfg.data.max_length,
                             max_drop_fraction=cfg.data.max_drop_fraction, source=path)
    if cfg.data.packing and key == "data.train":
        from kdkit.data.collate import pack

        data = pack(data, max_length=cfg.data.max_length)
    return data


def save_student(student, tokenizer, out_dir: Path, *, card: str) -> Path:
    """HF directory (safetensors, tokenizer, chat template) + README.md model card, atomically."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(card)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def model_card(*, teacher: Teacher, init: str, student_params: int, teacher_params: int, cfg: Config,
               eval_table: str | None = None, steps: int | None = None,
               license_decision: dict | None = None) -> str:
    """README.md of a saved student; the licence decision is the recipe's gate's (else recomputed)."""
    lc, tc = cfg.loss, cfg.train
    decision = license_decision or describe_license(teacher.license, cfg.teacher)
    lines = [
        "---", f"license: {teacher.license}", "library_name: transformers", "tags: [kdkit, distillation]", "---",
        "", "# Student distilled with kdkit", "",
        f"- **Teacher:** `{teacher.source.id}` (licence: {teacher.license}), {teacher_params:,} parameters",
        *license_card_lines(decision),
        f"- **Student initialisation:** {init}; {student_params:,} parameters "
        f"({student_params / teacher_params:.0%} of the teacher)",
        f"- **Objective:** {lc.divergence}, temperature {lc.temperature}, alpha {lc.alpha} "
        f"(loss = alpha·T²·KD + (1 − alpha)·CE)",
        f"- **Training:** {steps if steps is not None else tc.max_steps} steps, batch {tc.batch_size} × "
        f"accumulation {tc.grad_accum}, AdamW lr {tc.lr} (warm-up {tc.warmup_steps}, cosine), seed {tc.seed}",
        f"- **Data:** {cfg.data.train}", "",
    ]
    if eval_table:
        lines += ["## Evaluation (held-out)", "", eval_table, ""]
    return "\n".join(lines)
