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
    allow_restricted_license: bool = Field(
        False, description="train on a teacher whose licence restricts it (Llama, Gemma, OpenAI terms, *-nc, *-nd); "
                           "needs restricted_license_reason")
    restricted_license_reason: str | None = Field(
        None, description="why training on this teacher's outputs is permitted (recorded in manifests and model card)")


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="adapter rank")
    alpha: float = Field(16.0, gt=0.0, description="adapter scale numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[str] | str = Field(
        "all-linear", description="module names given adapters (e.g. [q_proj, v_proj]) or 'all-linear'"
    )
    load_in_4bit: bool = Field(False, description="QLoRA: base weights in 4-bit NF4 (needs bitsandbytes and a GPU)")


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
    lora: LoraConfig | None = Field(
        None, description="train LoRA adapters (peft) instead of every weight; merged into the saved student"
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
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "uld"] = Field(
        "forward_kl", description="per-token divergence between teacher and student distributions (uld: "
        "cross-tokenizer only)"
    )
    temperature: float = Field(1.0, gt=0.0, description="softens teacher and student alike; soft term scaled by T²")
    alpha: float = Field(1.0, ge=0.0, le=1.0, description="weight of the KD term; 1 - alpha weighs hard-label CE")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd: mixture weight of the teacher, M = β·p_T + (1-β)·p_S")
    skew: float = Field(0.1, ge=0.0, le=1.0, description="skew_*: DistiLLM's α, the share of the first distribution in the mix")
    implementation: Literal["dense", "fused"] = Field(
        "fused", description="fused: the loss chunk by chunk from hidden states + lm_head, never the (N, V) logits "
        "(less memory; falls back to dense, logged, where it cannot apply, e.g. softcapped heads); dense: "
        "student logits (N, V) at once"
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
    distributed: Literal["auto", "none", "ddp", "fsdp2"] = Field(
        "auto", description="under torchrun/accelerate launch: ddp replicates the student, fsdp2 shards it "
        "(fully_shard per layer); auto: ddp when WORLD_SIZE > 1. batch_size is then the GLOBAL micro-batch"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in backward (less memory, ~30% slower)"
    )


class TaskConfig(Section):
    """One elicitation task of `generate.tasks` (the strategies are documented in kdkit/teacher/elicit.py)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="task name: the prefix of every item id")
    strategy: Literal["labelling", "expansion", "curation", "feature", "self_knowledge", "chain_of_thought"] = Field(
        "labelling", description="labelling: answer given inputs; expansion: write new inputs from demonstrations, "
        "then answer; curation: write inputs from a domain and topics, then answer; feature: labelling + the "
        "teacher's top-k log-probs per token; self_knowledge: answer, then grade or refine its own answer; "
        "chain_of_thought: reasoning + a separated final answer, checked where a checker exists")
    count: int | None = Field(None, ge=1, description="items: inputs used (labelling-like) or written (expansion, "
                                                       "curation); null = every input")
    inputs: str | None = Field(None, description="file of inputs to answer (any data format; answers are references)")
    demonstrations: str | None = Field(None, description="file of demonstrations (input + answer rows): few-shot "
                                                         "examples and expansion seeds")
    num_demonstrations: int = Field(2, ge=0, description="demonstrations shown per prompt (picked by the item's seed)")
    instruction: str = Field("", description="instruction shown to the teacher above each input")
    domain: str = Field("", description="curation: what the data is about")
    topics: list[str] = Field(default_factory=list, description="curation: topics, used in turn")
    templates: dict[str, str] = Field(
        default_factory=dict, description="template slot → built-in name or file path (slots: answer, input, "
        "review); defaults in kdkit/assets/templates")
    parser: Literal["text", "json", "regex", "answer"] = Field(
        "text", description="how the teacher's answer is read: text (as is), json (parse_field of the first JSON "
        "object), regex (parse_pattern's first group), answer (reasoning + final answer)")
    parse_field: str = Field("answer", description="parser=json: the field read")
    parse_pattern: str | None = Field(None, description="parser=regex: pattern with one group")
    input_field: str = Field("input", description="expansion/curation: JSON field of a written input")
    checker: Literal["auto", "none", "reference", "arithmetic"] = Field(
        "auto", description="chain_of_thought: reference (the input's answer), arithmetic (safe evaluation of the "
        "expression in the input), auto (reference, else arithmetic, else unchecked)")
    review: Literal["grade", "refine"] = Field("grade", description="self_knowledge: grade (a 1-10 score for the "
                                                                    "judge filter) or refine (a rewritten answer)")
    top_logprobs: int = Field(5, ge=1, description="feature: teacher log-probs kept per token")
    system: str | None = Field(None, description="system turn of the training rows (null: none)")


class FilterConfig(Section):
    """Quality filters applied to every generated item; what each removed is counted in the manifest."""

    min_chars: int = Field(1, ge=0, description="drop answers shorter than this")
    max_chars: int | None = Field(None, ge=1, description="drop answers longer than this")
    dedupe: Literal["none", "exact", "near"] = Field(
        "near", description="exact: drop repeated (input, answer) pairs; near: also MinHash near-duplicates")
    near_threshold: float = Field(0.85, gt=0.0, le=1.0, description="near: estimated Jaccard similarity that "
                                                                    "counts as a duplicate")
    min_mean_logprob: float | None = Field(None, description="drop answers whose mean token log-prob is below "
                                                             "this (teacher confidence)")
    max_mean_entropy: float | None = Field(None, ge=0.0, description="drop answers whose mean token entropy "
                                                                     "(over the top-k) is above this")
    min_judge_score: float | None = Field(None, description="drop graded items scored below this (1-10)")


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
    tasks: list[TaskConfig] = Field(
        default_factory=list, description="elicitation tasks (strategy, templates, count each); set, they replace "
        "`prompts` and write jsonl shards + manifest.json to `output` (default RUN_DIR/data/train)")
    filters: FilterConfig = Field(default_factory=FilterConfig, description="quality filters on task items")
    shard_size: int = Field(1000, ge=1, description="tasks: rows per jsonl shard")


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


class OnPolicyConfig(Section):
    fraction: float = Field(
        0.0, ge=0.0, le=1.0,
        description="λ: share of micro-batches whose answers are sampled from the current student (GKD); 0: off",
    )
    max_new_tokens: int = Field(64, ge=1, description="tokens sampled per on-policy answer")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of the student's answers")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling of the student's answers")


class TeacherSpec(Section):
    path: str = Field(..., description="an extra teacher: alias, HF directory or .gguf file (same tokenizer)")
    gguf_file: str | None = Field(None, description="GGUF file name inside `path` when it is a directory")
    weight: float = Field(1.0, ge=0.0, description="this teacher's weight (normalised over all teachers)")


class TeachersConfig(Section):
    extra: list[TeacherSpec] = Field(
        default_factory=list, description="teachers besides `teacher.path` (empty: one teacher); all share a tokenizer"
    )
    weight: float = Field(1.0, ge=0.0, description="the weight of `teacher.path` among the teachers")
    combine: Literal["mixture", "confidence", "sum"] = Field(
        "mixture",
        description="mixture: KD to Σ w_i·p_i; confidence: per-token w_i ∝ weight_i · teacher i's max prob; "
        "sum: Σ w_i · KD(teacher i) (the per-teacher losses, each logged)",
    )


class SelfDistillConfig(Section):
    teacher: Literal["off", "initial", "ema"] = Field(
        "off", description="initial: a frozen copy of the student's initial weights is the teacher; ema: an EMA of the student"
    )
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0, description="ema: teacher ← decay·teacher + (1 − decay)·student per step")


class ProgressiveConfig(Section):
    num_layers: list[int] = Field(
        default_factory=list,
        description="a chain of students (e.g. [20, 10]): stage i distils stage i−1's student (stage 0: the teacher) "
        "into its layers; each stage is evaluated and saved in RUN_DIR/stage-i; empty: off",
    )


class SelectiveConfig(Section):
    by: Literal["off", "max_prob", "entropy", "disagreement"] = Field(
        "off",
        description="keep the KD term on tokens where the teacher's max prob ≥ threshold, its entropy (nats) ≤ "
        "threshold, or teacher and student top-1 disagree; CE is untouched",
    )
    threshold: float = Field(0.5, ge=0.0, description="max_prob: minimum; entropy: maximum (nats)")
    level: Literal["token", "sequence"] = Field(
        "token", description="sequence: keep or drop whole sequences by their mean score"
    )


class CrossTokenizerConfig(Section):
    enabled: bool = Field(
        False, description="teacher and student tokenizers differ: positions aligned by character offsets, "
        "loss.divergence must be uld (sorted-probability Wasserstein)"
    )


class ReplayConfig(Section):
    data: str | None = Field(None, description="general data mixed into every micro-batch (anti-forgetting)")
    ratio: float = Field(0.0, ge=0.0, le=0.9, description="share of each micro-batch's examples drawn from replay data")
    eval: str | None = Field(None, description="held-out general data evaluated before and after (forgetting)")


class AnchorConfig(Section):
    weight: float = Field(
        0.0, ge=0.0, description="weight of KL(original student ‖ student) on supervised tokens (anti-forgetting); 0: off"
    )


class ModesConfig(Section):
    onpolicy: OnPolicyConfig = Field(default_factory=OnPolicyConfig, description="on-policy distillation (GKD)")
    teachers: TeachersConfig = Field(default_factory=TeachersConfig, description="multi-teacher distillation")
    self_distill: SelfDistillConfig = Field(default_factory=SelfDistillConfig, description="self-distillation")
    progressive: ProgressiveConfig = Field(default_factory=ProgressiveConfig, description="progressive chain")
    selective: SelectiveConfig = Field(default_factory=SelectiveConfig, description="selective distillation")
    cross_tokenizer: CrossTokenizerConfig = Field(
        default_factory=CrossTokenizerConfig, description="cross-tokenizer distillation"
    )
    replay: ReplayConfig = Field(default_factory=ReplayConfig, description="anti-forgetting: replay of general data")
    anchor: AnchorConfig = Field(default_factory=AnchorConfig, description="anti-forgetting: KL to the original model")


class PreferenceConfig(Section):
    prompts: str | None = Field(None, description="feedback: prompts the student answers (default: data.train)")
    pairs: str | None = Field(None, description="preference pairs jsonl: feedback writes it, dpo/rl read it "
                                                "(default: RUN_DIR/data/pairs.jsonl)")
    limit: int | None = Field(None, ge=1, description="feedback: use only the first N prompts")
    samples_per_prompt: int = Field(4, ge=2, description="student answers sampled per prompt (feedback; the rl group size)")
    max_new_tokens: int = Field(64, ge=1, description="tokens per sampled student answer")
    temperature: float = Field(1.0, gt=0.0, description="student sampling temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="student nucleus sampling")
    scorer: Literal["loglik", "judge"] = Field(
        "loglik", description="how the teacher scores answers: loglik = its mean log-prob per answer token "
                              "(local teacher); judge = it grades each answer with judge_template (local or http)")
    judge_template: str | None = Field(
        None, description="judge prompt: a built-in template name or a Jinja2 file using {{ prompt }} and "
                           "{{ answer }} (null: kdkit/assets/templates/judge.jinja)")
    judge_max_new_tokens: int = Field(16, ge=1, description="judge: tokens the teacher may write before its score")
    teacher_pairs: bool = Field(True, description="also pair the teacher's answer (chosen) with the worst student answer")
    student_pairs: bool = Field(True, description="pair the student's best answer (chosen) with its worst; off: only "
                                                   "teacher-vs-student pairs (a likelihood scorer favours repetitive answers)")
    min_margin: float = Field(0.0, ge=0.0, description="keep a student-vs-student pair only when the scores differ by more")
    beta: float = Field(0.1, gt=0.0, description="dpo: strength of the implicit KL to the reference (DPO's beta)")
    loss: Literal["sigmoid"] = Field("sigmoid", description="dpo loss: sigmoid = -log σ(β·margin) (TRL's default)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="dpo: assumed share of flipped labels (cDPO)")
    reference: str = Field("student", description="frozen reference: 'student' (a copy of the starting student) "
                                                  "or a model directory / alias")
    reward: Literal["reward_model", "teacher"] = Field(
        "reward_model", description="rl reward: a reward model trained on the pairs (Bradley-Terry) or the "
                                    "teacher's mean log-prob per answer token")
    reward_steps: int = Field(50, ge=1, description="rl: reward model training steps (batch train.batch_size pairs)")
    reward_lr: float = Field(3e-4, gt=0.0, description="rl: reward model learning rate")
    kl_coef: float = Field(0.05, ge=0.0, description="rl: weight of the per-token KL(policy ‖ reference) penalty")
    rl_prompts: int = Field(2, ge=1, description="rl: prompts per step (each answered samples_per_prompt times)")


LayerPair = list[int]  # [student_layer, teacher_layer], 0-based decoder layers


class _LayerMapConfig(Section):
    layers: int = Field(2, ge=1, description="student layers distilled, spread evenly up to the last, each paired with "
                                              "the teacher layer at the same relative depth (ignored when pairs is set)")
    pairs: list[LayerPair] | None = Field(None, description="explicit [student_layer, teacher_layer] pairs (0-based)")
    pair_weights: list[float] | None = Field(None, description="λ per pair (default: 1/number of pairs, a mean)")

    @model_validator(mode="after")
    def _check_pairs(self):
        if self.pairs is not None and (not self.pairs or any(len(p) != 2 or min(p) < 0 for p in self.pairs)):
            raise ValueError("pairs must be a non-empty list of [student_layer, teacher_layer] with indices >= 0")
        count = len(self.pairs) if self.pairs is not None else self.layers
        if self.pair_weights is not None and len(self.pair_weights) != count:
            raise ValueError(f"pair_weights has {len(self.pair_weights)} entries for {count} layer pairs")
        return self


class HiddenFeatureConfig(_LayerMapConfig):
    weight: float = Field(0.0, ge=0.0, description="β: weight of the hidden-state term (0: off)")
    distance: Literal["mse", "cosine", "l1", "l2", "ce", "mmd"] = Field(
        "mse", description="per-token distance (mmd: kernel two-sample statistic over each micro-batch's tokens)")
    position: Literal["pre", "post"] = Field(
        "pre", description="pre: a layer's output (residual stream, before any norm); post: after the norm that "
                           "reads it (the next layer's input norm, or the final norm)")
    projector: Literal["identity", "xavier", "orthogonal", "none"] = Field(
        "identity", description="init of the learned student→teacher width projection (trained with the student, "
                                "saved as RUN_DIR/projector.safetensors, never exported); none: no projection "
                                "(equal widths only)")


class AttentionFeatureConfig(_LayerMapConfig):
    weight: float = Field(0.0, ge=0.0, description="γ: weight of the attention-map term (0: off)")
    loss: Literal["kl", "mse", "cosine"] = Field("kl", description="per-query loss between attention rows")
    heads: Literal["average", "map"] = Field(
        "average", description="average: compare head-averaged maps; map: head to head, the side with more heads "
                               "averaged in contiguous (GQA-group) blocks")
    max_seq_len: int = Field(1024, ge=1, description="longest batch allowed: maps cost batch·heads·T² floats per layer")


class FeaturesConfig(Section):
    hidden: HiddenFeatureConfig = Field(default_factory=HiddenFeatureConfig, description="hidden-state distillation")
    attention: AttentionFeatureConfig = Field(default_factory=AttentionFeatureConfig,
                                              description="attention-map transfer")
    kd_weight: float = Field(1.0, ge=0.0, description="weight of the logit (KD) objective in the combined loss")
    weighting: Literal["static", "balanced", "uncertainty"] = Field(
        "static", description="static: L = kd_weight·L_kd + β·L_hidden + γ·L_att; balanced: each term rescaled to "
                              "β (γ) times the KD term's detached magnitude; uncertainty: β·exp(-s)·L + s with "
                              "learned log-variances s (Kendall et al.)")
    dominance_threshold: float = Field(0.9, gt=0.5, le=1.0,
                                       description="warn when one term is more than this share of the total ...")
    dominance_steps: int = Field(50, ge=1, description="... for this many optimizer steps in a row")

    @property
    def enabled(self) -> bool:
        return self.hidden.weight > 0 or self.attention.weight > 0

    @model_validator(mode="after")
    def _check_weighting(self):
        if self.weighting == "balanced" and self.enabled and self.kd_weight == 0:
            raise ValueError("weighting=balanced scales terms to the KD term's magnitude: it needs kd_weight > 0")
        return self


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
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig,
                                         description="feedback distillation: teacher preferences, dpo, rl")
    modes: ModesConfig = Field(default_factory=ModesConfig, description="training modes (all off by default)")
    features: FeaturesConfig = Field(default_factory=FeaturesConfig,
                                     description="white-box distillation: hidden states, attention maps")

    @model_validator(mode="after")
    def _check(self):
        if self.student.init in ("pretrained", "config") and not self.student.path:
            raise ValueError(f"student.path is required when student.init is {self.student.init!r}")
        _check_modes(self)
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
                         ("preference", "pairs"), ("preference", "judge_template")):
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
