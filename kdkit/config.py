"""The typed config tree: YAML ↔ pydantic models, dotted overrides, errors that point at the line.

One tree serves every verb (`distill`, `generate`, `eval`, `quickstart`); each verb reads the
sections it needs, so a pipeline is one file. Every field is documented once, in its
`Field(description=...)`; `kdkit config print` and the error messages come from that.

Unknown keys are errors (with a did-you-mean), wrong types are errors, and both name the key, and
for YAML the file and line.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdkit.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherConfig(Section):
    path: str = Field(
        "smollm2-135m-instruct",
        description="teacher: an alias (smollm2-135m-instruct), a local HF directory, or a .gguf file",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` when `path` is a directory")
    trust_remote_code: bool = Field(False, description="run model code shipped with the checkpoint (off: safer)")
    license: str | None = Field(None, description="the teacher's licence id, when its files do not say")
    signal: Literal["online", "cache"] = Field(
        "online", description="online: run the teacher in every step; cache: read top-k signals from cache_dir"
    )
    cache_dir: str | None = Field(None, description="top-k signal cache (default: RUN_DIR/cache); `kdkit cache` writes it")
    top_k: int = Field(64, ge=1, description="kdkit cache: teacher log-probs kept per token")
    cache_shard_size: int = Field(256, ge=1, description="kdkit cache: examples per shard")
    backend: Literal["local", "http"] = Field(
        "local", description="generate: local runs `path` here; http asks an OpenAI-compatible server (vLLM, ...)"
    )
    base_url: str = Field("http://127.0.0.1:8000/v1", description="http: the server's API root (…/v1)")
    model: str | None = Field(None, description="http: the served model name (null: the first one /models lists)")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="http: NAME of the environment variable holding the API key (never the key)"
    )
    concurrency: int = Field(4, ge=1, description="http: requests in flight at once")
    timeout_s: float = Field(120.0, gt=0.0, description="http: seconds one request may take in all (connect + answer)")
    max_retries: int = Field(5, ge=0, description="http: retries of a request after 429/5xx, connection errors, timeouts")


class StudentConfig(Section):
    init: Literal["teacher_layers", "pretrained", "config"] = Field(
        "teacher_layers",
        description="teacher_layers: a subset of the teacher's layers; pretrained: load `path`; config: random init from `path`'s config",
    )
    path: str | None = Field(None, description="student directory (init=pretrained) or config source (init=config)")
    num_layers: int | None = Field(
        10, ge=1, description="init=teacher_layers: keep this many layers, spread uniformly (first and last kept)"
    )
    layers: list[int] | None = Field(None, description="init=teacher_layers: explicit teacher layer indices to keep")
    config_overrides: dict[str, Any] = Field(
        default_factory=dict, description="init=config: fields replaced in the config (e.g. num_hidden_layers)"
    )


class DataConfig(Section):
    train: str | None = Field(None, description="training data: .jsonl, .json, .parquet or a datasets save_to_disk dir")
    eval: str | None = Field(None, description="held-out data for evaluation (same formats)")
    max_length: int = Field(512, ge=8, description="tokens per example; longer rows are truncated on the right")
    max_drop_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="fail when more than this fraction of rows is unusable"
    )
    packing: bool = Field(False, description="concatenate examples into max_length sequences")


class LossConfig(Section):
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"] = Field(
        "forward_kl", description="per-token divergence between teacher and student distributions"
    )
    temperature: float = Field(1.0, gt=0.0, description="softens teacher and student alike; soft term scaled by T²")
    alpha: float = Field(1.0, ge=0.0, le=1.0, description="weight of the KD term; 1 - alpha weighs hard-label CE")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd: mixture weight of the teacher, M = β·p_T + (1-β)·p_S")
    skew: float = Field(0.1, ge=0.0, le=1.0, description="skew_*: DistiLLM's α, the share of the first distribution in the mix")
    implementation: Literal["dense", "fused"] = Field(
        "dense", description="dense: student logits (N, V) at once; fused: chunked from hidden states + lm_head (less memory)"
    )


class TrainConfig(Section):
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(5e-4, gt=0.0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine schedule floor, as a fraction of lr")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    max_grad_norm: float | None = Field(1.0, description="clip the gradient norm to this (null: no clipping)")
    seed: int = Field(0, description="seed for initialisation, data order and sampling")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast where the device has native bf16 (CUDA, AVX512-BF16/AMX CPUs), else fp32"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    log_every: int = Field(1, ge=1, description="write metrics every N steps")
    save_every: int = Field(0, ge=0, description="write a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="step checkpoints kept on disk")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (null: torch's default)")
    nonfinite: Literal["skip", "stop"] = Field(
        "skip", description="a NaN/Inf loss or gradient: skip the update (weights, optimizer, schedule untouched) or stop"
    )
    max_bad_steps: int = Field(3, ge=1, description="abort after this many non-finite steps in a row")


class GenerateConfig(Section):
    prompts: str | None = Field(None, description="prompts to answer (any data format; answers are ignored)")
    eval_prompts: str | None = Field(None, description="held-out prompts to answer as well (for data.eval)")
    output: str | None = Field(None, description="jsonl written in the `messages` format (default: RUN_DIR/data/train.jsonl)")
    max_new_tokens: int = Field(128, ge=1, description="tokens generated per answer")
    batch_size: int = Field(16, ge=1, description="prompts per generation batch (left-padded)")
    do_sample: bool = Field(False, description="sample instead of greedy decoding")
    temperature: float = Field(0.7, gt=0.0, description="sampling temperature (do_sample only)")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="nucleus sampling (do_sample only)")
    limit: int | None = Field(None, ge=1, description="answer only the first N prompts")
    eval_limit: int | None = Field(None, ge=1, description="answer only the first N held-out prompts")
    top_logprobs: int = Field(
        0, ge=0, description="http: also store the teacher's top-k log-probs per answer token (0: off)"
    )


class EvalConfig(Section):
    batch_size: int = Field(8, ge=1, description="examples per evaluation batch")
    limit: int | None = Field(None, ge=1, description="evaluate only the first N held-out examples")
    student_before: bool = Field(True, description="also evaluate the student before distillation")
    harness_tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks run on every model: shipped kdkit_mc (multiple choice, acc) and "
                    "kdkit_arith (generation, exact_match), or paths to lm-eval task YAMLs over local files; "
                    "empty = off (needs `pip install 'kdkit[eval]'`)")
    harness_limit: int | None = Field(None, ge=1, description="run only the first N documents of each harness task")
    speed: bool = Field(True, description="measure prefill/decode tokens/s, latency per token, peak memory and "
                                          "size on disk of every model")
    speed_prompt_tokens: int = Field(128, ge=1, description="speed: prompt length of the prefill measurement")
    speed_new_tokens: int = Field(32, ge=1, description="speed: greedy tokens decoded one at a time on the KV cache")


class PruneConfig(Section):
    method: Literal["none", "depth", "width", "both"] = Field(
        "none",
        description="none: no pruning; depth: drop whole layers; width: shrink heads/MLP/hidden; both: depth then "
        "width. Set, `kdkit prune` writes RUN_DIR/pruned and distill/eval start from it (student.init=pretrained)",
    )
    target_params: float | None = Field(
        None, gt=0.0,
        description="parameter target: a count (e.g. 67e6) or, when <= 1, a fraction of the teacher's; the free "
        "dimensions are chosen to come closest to it (width: MLP and hidden shrink by one ratio)",
    )
    num_layers: int | None = Field(None, ge=1, description="depth: layers kept (the most important ones)")
    layer_metric: Literal["ppl", "cosine"] = Field(
        "ppl", description="depth ranking: ppl = perplexity increase when the layer is skipped; cosine = 1 - cos(in, out)"
    )
    intermediate_size: int | None = Field(None, ge=1, description="width: MLP neurons kept per layer")
    num_heads: int | None = Field(None, ge=1, description="width: query heads kept per layer (kept attention heads)")
    num_kv_heads: int | None = Field(
        None, ge=1,
        description="width: KV heads (GQA groups) kept; null: all groups when num_heads divides evenly among them "
        "(query heads pruned within groups), else whole groups",
    )
    hidden_size: int | None = Field(None, ge=1, description="width: embedding channels kept (every norm, embedding, head)")
    round_to: int = Field(8, ge=1, description="target_params: chosen widths are multiples of this (64 suits GPUs)")
    calibration: str | None = Field(None, description="calibration data for importance (default: data.train)")
    calibration_samples: int = Field(64, ge=1, description="examples of the calibration data used")
    batch_size: int = Field(8, ge=1, description="calibration examples per forward pass")


class RunConfig(Section):
    dir: str = Field("runs/kdkit", description="run directory: config, metrics, checkpoints, student, report")
    student_dir: str | None = Field(None, description="eval: the distilled student to evaluate (default: RUN_DIR/student)")


class Config(Section):
    """The whole kdkit configuration."""

    run: RunConfig = Field(default_factory=RunConfig, description="where outputs go")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="the teacher model")
    student: StudentConfig = Field(default_factory=StudentConfig, description="how the student is made")
    data: DataConfig = Field(default_factory=DataConfig, description="datasets and tokenisation")
    loss: LossConfig = Field(default_factory=LossConfig, description="the distillation objective")
    train: TrainConfig = Field(default_factory=TrainConfig, description="optimisation")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="teacher-written data")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="pruning the teacher into the student")

    @model_validator(mode="after")
    def _check(self):
        if self.student.init in ("pretrained", "config") and not self.student.path:
            raise ValueError(f"student.path is required when student.init is {self.student.init!r}")
        return self


# ---------------------------------------------------------------- loading


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map every key path in a YAML mapping tree to its 1-based line number."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = path + (k.value,)
                lines[key] = k.start_mark.line + 1
                walk(v, key)

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass  # the real parse below reports the error
    return lines


def _fields_at(loc: tuple) -> list[str]:
    """Field names valid at a location of the tree, for did-you-mean."""
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return list(model.model_fields)
        model = ann
    return list(model.model_fields)


def _describe(err: dict, *, origin: str, lines: dict[tuple, int], overridden: set[tuple]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    key = ".".join(loc) or "(top level)"
    if loc in overridden:
        where = "command line"
    else:
        line = lines.get(loc) or lines.get(loc[:-1])
        where = f"{origin}, line {line}" if line else origin
    if err["type"] == "extra_forbidden":
        known = _fields_at(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.5)
        hint = f"did you mean '{'.'.join(loc[:-1] + (close[0],))}'?" if close else f"known keys here: {', '.join(known)}"
        return f"{where}: unknown key '{key}'; {hint}"
    return f"{where}: {key}: {err['msg']} (got {err.get('input')!r})"


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """'train.lr=1e-4' → (('train', 'lr'), 0.0001); the value is read as YAML."""
    if "=" not in item:
        raise UserError(f"override {item!r} is not KEY=VALUE (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as e:
        raise UserError(f"override {item!r}: the value is not valid YAML ({e})") from None
    # YAML 1.1 reads "1e-4" as a string; pydantic turns numeric strings into floats where a float is due
    return tuple(key.strip().split(".")), value


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        node = tree.get(part)
        if not isinstance(node, dict):
            node = tree[part] = {}
        tree = node
    tree[path[-1]] = value


def build_config(data: dict, *, overrides: list[str] = (), origin: str = "config", lines=None) -> Config:
    """Validate a config mapping plus dotted overrides; UserError on any problem."""
    data = dict(data or {})
    overridden = set()
    for item in overrides:
        path, value = parse_override(item)
        _set(data, path, value)
        overridden.add(path)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = [_describe(err, origin=origin, lines=lines or {}, overridden=overridden) for err in e.errors()]
        raise UserError("invalid config:\n  " + "\n  ".join(problems)) from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config file (None: the defaults) and apply dotted overrides."""
    if path is None:
        return build_config({}, overrides=overrides)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: the top level must be a mapping of sections (run, teacher, student, ...)")
    cfg = build_config(data, overrides=overrides, origin=str(p), lines=_yaml_lines(text))
    return resolve_paths(cfg, p.parent)


def resolve_paths(cfg: Config, base: Path) -> Config:
    """Input paths are read from the current directory when they exist there, else from the config
    file's folder (so shipped configs can name files beside them)."""

    def fix(value):
        if value and not Path(value).is_absolute() and not Path(value).exists() and (base / value).exists():
            return str((base / value).resolve())
        return value

    for section, key in (("data", "train"), ("data", "eval"), ("generate", "prompts"),
                         ("generate", "eval_prompts"), ("teacher", "path"), ("student", "path"),
                         ("prune", "calibration")):
        part = getattr(cfg, section)
        setattr(part, key, fix(getattr(part, key)))
    return cfg


# ---------------------------------------------------------------- printing


def dump_config(cfg: BaseModel, *, docs: bool = True, indent: int = 0) -> str:
    """The resolved config as YAML, each field followed by its one-line doc."""
    out = []
    pad = "  " * indent
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        doc = f"  # {field.description}" if docs and field.description else ""
        if isinstance(value, BaseModel):
            out.append(f"{pad}{name}:{doc}")
            out.append(dump_config(value, docs=docs, indent=indent + 1))
        else:
            if isinstance(value, tuple):
                value = list(value)
            text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
            text = text.removesuffix("\n...").removesuffix("...").strip()
            out.append(f"{pad}{name}: {text}{doc}")
    return "\n".join(out)


def save_config(cfg: Config, path: Path) -> None:
    """Keep the resolved config beside the run's outputs (plain YAML, reloadable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    tmp.replace(path)
