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
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

# the sections live in two modules; `from kdkit.config import XConfig` keeps working
from kdkit.config.modes import (  # noqa: F401
    AnchorConfig, AttentionFeatureConfig, CrossTokenizerConfig, FeaturesConfig, HiddenFeatureConfig,
    ModesConfig, OnPolicyConfig, PreferenceConfig, ProgressiveConfig, ReplayConfig, SelectiveConfig,
    SelfDistillConfig, TeacherSpec, TeachersConfig,
)
from kdkit.config.draft import DraftConfig  # noqa: F401
from kdkit.config.sections import (  # noqa: F401
    DataConfig, EvalConfig, FilterConfig, GenerateConfig, LoraConfig, LossConfig, PruneConfig, Section,
    StudentConfig, TaskConfig, TeacherConfig, TrainConfig,
)
from kdkit.errors import UserError


class RunConfig(Section):
    dir: str = Field("runs/kdkit", description="run directory: config, metrics, checkpoints, student, report")
    student_dir: str | None = Field(None, description="eval: the distilled student to evaluate (default: RUN_DIR/student)")
    max_seconds: float | None = Field(
        None, gt=0.0, description="wall-clock budget of a pipeline (`kdkit pipeline`, `kdkit quickstart`): training "
        "gets what the stages before it (teacher load, generate, prune, cache) left, less reserve_seconds for the "
        "evaluation after it, as train.max_seconds (the lower of the two when both are set); a slower machine "
        "trains fewer steps instead of overrunning")
    reserve_seconds: float = Field(
        90.0, ge=0.0, description="with max_seconds: the share kept for what runs after training (evaluation, report)")


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
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig,
                                         description="feedback distillation: teacher preferences, dpo, rl")
    modes: ModesConfig = Field(default_factory=ModesConfig, description="training modes (all off by default)")
    features: FeaturesConfig = Field(default_factory=FeaturesConfig,
                                     description="white-box distillation: hidden states, attention maps")
    draft: DraftConfig = Field(default_factory=DraftConfig, description="kdkit draft: a speculative-decoding draft")

    @model_validator(mode="after")
    def _check(self):
        if self.student.init in ("pretrained", "config") and not self.student.path:
            raise ValueError(f"student.path is required when student.init is {self.student.init!r}")
        _check_modes(self)
        _check_kd_term(self)
        if self.features.enabled and self.teacher.signal != "online":
            raise ValueError("features (hidden/attention distillation) read the teacher's internals in every step: "
                             "they need teacher.signal=online (or set features.*.weight to 0)")
        return self


def _check_modes(cfg: "Config") -> None:
    """Combinations of modes and loss settings that cannot work together."""
    m, lc = cfg.modes, cfg.loss
    if m.cross_tokenizer.enabled != (lc.divergence == "uld"):
        raise ValueError("modes.cross_tokenizer.enabled and loss.divergence=uld go together (uld compares sorted "
                         "probabilities, the one divergence defined across vocabularies)")
    dense_only = (m.selective.by != "off" or m.cross_tokenizer.enabled or m.teachers.combine == "sum"
                  or m.anchor.weight > 0)
    if dense_only and lc.implementation == "fused":
        if "implementation" in lc.model_fields_set:  # asked for explicitly: say why it cannot be
            raise ValueError("modes.selective / cross_tokenizer / teachers.combine=sum / anchor need the student's "
                             "logits: use loss.implementation=dense")
        lc.implementation = "dense"  # the default (fused) gives way: these modes read the student's logits
    if m.cross_tokenizer.enabled and (m.teachers.extra or m.self_distill.teacher != "off" or m.progressive.num_layers):
        raise ValueError("modes.cross_tokenizer runs one teacher: turn off teachers.extra, self_distill and progressive")
    if m.replay.ratio > 0 and not m.replay.data:
        raise ValueError("modes.replay.ratio > 0 needs modes.replay.data (general data to replay)")
    if m.self_distill.teacher != "off" and m.teachers.extra:
        raise ValueError("modes.self_distill replaces the teacher: modes.teachers.extra must be empty")
    if cfg.teacher.signal == "cache" and (m.onpolicy.fraction > 0 or m.teachers.extra or m.self_distill.teacher != "off"):
        raise ValueError("on-policy, multi-teacher and self-distillation need teacher.signal=online "
                         "(a cache holds signals for the dataset's own answers only)")


def _check_kd_term(cfg: "Config") -> None:
    """Pre-flight: refuse a run whose whole loss (loss.alpha = 1) is a KD term that is 0 for every input."""
    lc, sel = cfg.loss, cfg.modes.selective
    if lc.alpha != 1.0:
        return
    # (loss.skew = 1, the other such case, is refused by its field whatever alpha is: LossConfig._check_skew)
    if sel.by == "max_prob" and sel.threshold > 1.0:
        raise ValueError(f"loss.alpha=1 gives all the weight to the KD term, but modes.selective.by=max_prob with "
                         f"modes.selective.threshold={sel.threshold} > 1 keeps no token (a probability is at most "
                         "1): lower the threshold, or set loss.alpha < 1")


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
        if isinstance(part, int) or str(part).isdigit():
            continue  # an index into a list of sections (generate.tasks[0])
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        args = getattr(ann, "__args__", ())
        if getattr(ann, "__origin__", None) is list and args and isinstance(args[0], type):
            ann = args[0]  # list[Section]: the fields of one element
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
    """Set a dotted path; a number indexes into a list that is already there (generate.tasks.0.count=2)."""
    for part in path[:-1]:
        if isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
            continue
        if isinstance(tree, list):
            raise UserError(f"override {'.'.join(path)}: {part!r} is not an index of the {len(tree)} items there")
        node = tree.get(part)
        if not isinstance(node, (dict, list)):
            node = tree[part] = {}
        tree = node
    if isinstance(tree, list) and path[-1].isdigit() and int(path[-1]) < len(tree):
        tree[int(path[-1])] = value
    else:
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
                         ("prune", "calibration"), ("preference", "prompts"),
                         ("preference", "pairs"), ("preference", "judge_template"),
                         ("draft", "target"), ("draft", "path"), ("draft", "data"), ("draft", "prompts"),
                         ("draft", "heldout")):
        part = getattr(cfg, section)
        setattr(part, key, fix(getattr(part, key)))
    for part, key in ((cfg.modes.replay, "data"), (cfg.modes.replay, "eval"),
                      *((spec, "path") for spec in cfg.modes.teachers.extra)):
        setattr(part, key, fix(getattr(part, key)))
    for task in cfg.generate.tasks:  # task files and template files beside the config, too
        task.inputs, task.demonstrations = fix(task.inputs), fix(task.demonstrations)
        task.templates = {slot: fix(value) for slot, value in task.templates.items()}
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
            if isinstance(value, list) and value and isinstance(value[0], BaseModel):  # generate.tasks
                value = [v.model_dump(mode="json") for v in value]
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
