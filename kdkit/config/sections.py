"""The config sections of the model, data and training: teacher, student, data, loss, train, generate,
eval, prune. Every field is documented once, in its `Field(description=...)`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="online teacher: the dtype its weights are held in for training (cast once, not per "
        "step); auto: bf16 where train.precision resolves to bf16, else fp32")
    signal: Literal["online", "cache"] = Field(
        "online", description="online: run the teacher in every step; cache: read top-k signals from cache_dir"
    )
    cache_dir: str | None = Field(None, description="top-k signal cache (default: RUN_DIR/cache); `kdkit cache` writes it")
    top_k: int = Field(64, ge=1, description="kdkit cache: teacher log-probs kept per token")
    cache_shard_size: int = Field(256, ge=1, description="kdkit cache: examples per shard")
    cache_from_generation: bool = Field(
        True, description="signal: cache with a local teacher that answers generate.prompts greedily: keep the "
        "teacher's top-k rows of every answer while it writes them, so the cache runs the teacher only on answers "
        "whose text re-tokenises differently (one teacher pass fewer; off: the cache recomputes every example)")
    cache_batch_size: int = Field(
        16, ge=1, description="kdkit cache: examples per teacher forward (batches of like length within a shard; "
        "forward-only, so larger than train.batch_size pays: 19 examples/s at 16 against 15.5 at 8 on 2 CPU cores)")
    backend: Literal["local", "http", "vllm"] = Field(
        "local", description="generate: local runs `path` here (transformers); http asks an OpenAI-compatible server "
                             "(vLLM, ...); vllm runs `path` in vLLM's offline engine here (needs vllm installed)"
    )
    base_url: str = Field("http://127.0.0.1:8000/v1", description="http: the server's API root (…/v1)")
    base_urls: list[str] = Field(
        default_factory=list, description="http: several servers serving the same teacher (replicas); requests are "
        "spread over them, each with its own `concurrency`; set, it replaces base_url")
    model: str | None = Field(None, description="http: the served model name (null: the first one /models lists)")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="http: NAME of the environment variable holding the API key (never the key)"
    )
    concurrency: int = Field(4, ge=1, description="http: requests in flight at once")
    timeout_s: float = Field(120.0, gt=0.0, description="http: seconds one request may take in all (connect + answer)")
    max_retries: int = Field(5, ge=0, description="http: retries of a request after 429/5xx, connection errors, timeouts")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="vllm: keyword arguments for vllm.LLM (e.g. tensor_parallel_size: 2, "
        "dtype: bfloat16, max_model_len: 4096, gpu_memory_utilization: 0.85, enforce_eager: true)")
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
    temperature: float = Field(
        1.0, gt=0.0, description="softens teacher and student alike; the KD term is scaled by T² for the KL family "
        "(forward/reverse KL, jsd, skew_*), whose gradients shrink as 1/T², not for tvd/uld (∝ 1/T)")
    alpha: float = Field(1.0, ge=0.0, le=1.0, description="weight of the KD term; 1 - alpha weighs hard-label CE")
    beta: float = Field(
        0.5, ge=0.0, le=1.0, description="jsd, as TRL's generalized_jsd_loss: 0 = forward KL(p_T ‖ p_S), 1 = reverse "
        "KL(p_S ‖ p_T), between: β·KL(p_T ‖ M) + (1-β)·KL(p_S ‖ M) with M = β·p_T + (1-β)·p_S (0.5: the usual JSD)")
    skew: float = Field(
        0.1, description="skew_*: DistiLLM's α in [0, 1), the share of the first distribution in the mix: "
        "skew_forward_kl = KL(p_T ‖ α·p_T + (1-α)·p_S), skew_reverse_kl = KL(p_S ‖ α·p_S + (1-α)·p_T); 0 = the plain KL")

    @field_validator("skew")
    @classmethod
    def _check_skew(cls, skew: float) -> float:
        # skew = 1 mixes a distribution with itself only: KL(p ‖ p) = 0 for every input, a loss that trains nothing
        if not 0.0 <= skew < 1.0:
            raise ValueError(f"skew must be in [0, 1) (0: the plain KL); {skew} "
                             + ("makes the skew KL 0 for every input" if skew == 1.0 else "is out of range"))
        return skew

    implementation: Literal["dense", "fused"] = Field(
        "fused", description="fused: the loss chunk by chunk from hidden states + lm_head, never the (N, V) logits "
        "(less memory; falls back to dense, logged, where it cannot apply, e.g. softcapped heads); dense: "
        "student logits (N, V) at once. An online teacher is handed over as its hidden rows + lm_head, so neither "
        "model's (N, V) logits exist"
    )
    compile: bool = Field(
        False, description="fused: run each chunk's divergence and gradient through torch.compile (~3x faster per "
        "chunk on CPU; the first step compiles for tens of seconds)")


class TrainConfig(Section):
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    max_seconds: float | None = Field(
        None, gt=0.0, description="wall-clock budget of the training loop: after its first steps the loop measures "
        "seconds per step and trains as many steps as fit (at most max_steps), the schedule spanning them; the "
        "step count is written to RUN_DIR/budget.json, so a resumed run keeps it")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    group_by_length: int = Field(
        0, ge=0, description="G > 1: micro-batches of like-length rows (the example stream cut into spans of G "
        "micro-batches, each sorted by length, cut, and its micro-batches shuffled), so little of a batch is padding; "
        "0 or 1: plain shuffled batches")
    lr: float = Field(5e-4, gt=0.0, description="peak learning rate (AdamW)")
    schedule: Literal["cosine", "linear"] = Field(
        "cosine", description="after the warm-up the lr falls to min_lr_ratio·lr over the run's steps, on a cosine "
        "or on a straight line")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="the schedule's floor, as a fraction of lr")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    max_grad_norm: float | None = Field(1.0, description="clip the gradient norm to this (null: no clipping)")
    seed: int = Field(0, description="seed for initialisation, data order and sampling")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16: every GEMM of the step in bf16 with fp32 accumulation (autocast forwards, the fused "
        "loss's head products, the online teacher held in bf16), softmaxes/divergences/optimizer in fp32; auto: bf16 "
        "where the device has native bf16 (CUDA Ampere+, AVX512-BF16/AMX CPUs), else fp32. CUDA fp32 matmuls use TF32"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    log_every: int = Field(1, ge=1, description="write metrics every N steps")
    save_every: int = Field(0, ge=0, description="write a resumable checkpoint every N steps (0: only at the end)")
    compile: bool = Field(
        False, description="torch.compile the student's decoder layers (dynamic shapes, one graph for every layer and "
        "batch length): on a 2-core CPU the quickstart's step at 1.25x the tokens/s (1.13x over a whole run) after "
        "~30 s of compiling; needs a C++ compiler on CPU (without one: a warning, eager); single-process runs "
        "without gradient checkpointing")
    save_every_seconds: float | None = Field(
        None, gt=0.0, description="also write one at the first step boundary this many seconds after the last began "
        "(a checkpoint of a 64M student and its AdamW state took 1-3 s on 2 CPU cores: a cadence in time bounds the "
        "work a kill loses and what the checkpoints cost on any machine)")
    keep_checkpoints: int = Field(2, ge=1, description="step checkpoints kept on disk")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (null: torch's default)")
    nonfinite: Literal["skip", "stop"] = Field(
        "skip", description="a NaN/Inf loss or gradient: skip the update (weights, optimizer, schedule untouched) or stop"
    )
    max_bad_steps: int = Field(3, ge=1, description="abort after this many non-finite steps in a row")
    distributed: Literal["auto", "none", "ddp", "fsdp2"] = Field(
        "auto", description="under torchrun/accelerate launch: ddp replicates the student (and the teacher), fsdp2 "
        "shards the student AND the frozen online teacher (fully_shard per layer); auto: ddp when WORLD_SIZE > 1. "
        "batch_size is then the GLOBAL micro-batch"
    )
    teacher_offload: bool = Field(
        False, description="fsdp2: keep the frozen teacher's shards in CPU memory, gathered to the device per layer "
        "(FSDP2 CPUOffloadPolicy); no effect on CPU-only runs"
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
    max_new_tokens: int | None = Field(None, ge=1, description="tokens generated per teacher answer in this task's "
                                       "stages (null: generate.max_new_tokens); e.g. long for chain_of_thought")
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
    max_seconds: float | None = Field(None, gt=0.0, description="prompts: answer the training prompts in a seeded "
                                      "random order, a span of 4 batches at a time (sorted by length within it), "
                                      "and start no span after this many seconds: a slower machine answers a random "
                                      "subset and trains more steps on it; the prompts answered are kept in "
                                      "OUT.answered.json, which reruns follow")
    samples: int = Field(0, ge=0, description="prompts: this many extra answers per training prompt, sampled at "
                         "`temperature`/`top_p` beside the main one (ids ID~s1, ID~s2, ...): more distinct training "
                         "sequences from the same prompts, for students that would otherwise memorise few answers")
    samples_max_seconds: float | None = Field(None, gt=0.0, description="samples: no further round of sampled "
                                              "answers starts after this many seconds of them (a slower machine gets "
                                              "fewer); the rounds done are kept in OUT.samples.json, which reruns follow")
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
    baseline_layers: int | None = Field(
        None, ge=1, description="also evaluate the untrained student keeping this many of the teacher's layers "
        "(spread uniformly): the reference of `CE gap closed` = (CE_baseline - CE) / (CE_baseline - CE_teacher)")
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
    round_to: int = Field(
        32, ge=1,
        description="target_params: chosen hidden/intermediate sizes are multiples of this that the architecture "
        "accepts (32: GGUF's quant blocks; 64 or 128 suit GPU kernels best)",
    )
    calibration: str | None = Field(None, description="calibration data for importance (default: data.train)")
    calibration_samples: int = Field(64, ge=1, description="examples of the calibration data used")
    batch_size: int = Field(8, ge=1, description="calibration examples per forward pass")
    ppl_tokens: int = Field(
        512, ge=1,
        description="layer_metric ppl: calibration tokens (leading examples) the per-layer skip perplexities are "
        "computed on; they cost about L/2 forward passes per token, the other scores one",
    )
