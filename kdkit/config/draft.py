"""The config section of `kdkit draft` (and of the speculative-decoding measurement in `kdkit eval`):
`draft`. A draft is trained by the one distill loop; what it needs of its own is here, including its
own `train` section (a pipeline's `train` is the student's)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdkit.config.sections import Section, TrainConfig


def _draft_train() -> TrainConfig:
    # a 2-layer draft learns fast and must finish within minutes on a CPU: short, high learning rate
    return TrainConfig(max_steps=150, batch_size=8, lr=1e-3, warmup_steps=10, save_every=25)


class DraftConfig(Section):
    target: str | None = Field(
        None, description="the model the draft serves: null = teacher.path; or a directory kdkit saved (a student)")
    dir: str | None = Field(None, description="where `kdkit draft` writes (default: RUN_DIR/draft); the draft is DIR/draft")
    path: str | None = Field(
        None, description="kdkit eval: a trained draft directory to measure against its target (null: no speculative "
        "decoding measurement)")
    pipeline: bool = Field(False, description="kdkit pipeline: after distill, also distil a draft for the new student")
    init: Literal["target_layers", "prune"] = Field(
        "target_layers", description="target_layers: a copy of `num_layers` of the target's layers (uniform, or "
        "`layers`); prune: the `num_layers` most important layers (kdkit.prune, ranked on the fixed data)")
    num_layers: int = Field(2, ge=1, description="decoder layers of the draft (its cost ratio c to the target is what pays)")
    layers: list[int] | None = Field(None, description="init=target_layers: explicit target layer indices to keep (num_layers is then ignored)")
    prune_metric: Literal["cosine", "ppl"] = Field(
        "cosine", description="init=prune: layer ranking (cosine: one pass; ppl: one pass per layer skipped)")
    hidden_size: int | None = Field(
        None, ge=1, description="embedding channels of the draft (null: the target's): its most important ones "
        "(kdkit.prune.width, scored on the fixed data). The V x H head is most of a few-layer draft's forward, so a "
        "narrow draft costs a fraction of a full-width one (c is what pays); train_head then trains the sliced "
        "embeddings and head")
    intermediate_size: int | None = Field(
        None, ge=1, description="MLP neurons per draft layer (null: the target's): its most important ones")
    prune_tokens: int = Field(
        16384, ge=1, description="hidden_size/intermediate_size: fixed-data tokens the channel and neuron "
        "importances are scored on (one forward of the target)")
    train_head: bool = Field(
        False, description="also train the embeddings and head (tied in SmolLM2); off: they stay the target's and "
        "only the draft's layers and final norm learn (a fifth of the parameters: faster steps, a stable start)")
    divergence: Literal["tvd", "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"] = Field(
        "tvd", description="per-token divergence to the target (kdkit.losses): TVD bounds the greedy rejection rate")
    alpha: float = Field(1.0, ge=0.0, le=1.0, description="weight of the divergence; 1 - alpha: CE on the data's tokens")
    onpolicy: float = Field(
        0.5, ge=0.0, le=1.0, description="share of micro-batches whose answers are the draft's own continuations "
        "(scored by the target; modes.onpolicy); the rest is the fixed data (the target's answers)")
    onpolicy_greedy: bool = Field(True, description="on-policy continuations: greedy (what a draft proposes) or sampled")
    onpolicy_tokens: int = Field(32, ge=1, description="tokens per on-policy continuation")
    data: str | None = Field(
        None, description="fixed data: the target's answers (messages jsonl); null: the target answers `prompts` "
        "(greedy) into DIR/data/train.jsonl")
    prompts: str | None = Field(None, description="prompts the target answers (null: kdkit's packaged training prompts)")
    prompts_limit: int | None = Field(None, ge=1, description="answer only the first N prompts")
    answer_tokens: int = Field(96, ge=1, description="tokens per target answer of the fixed data")
    answer_batch: int = Field(32, ge=1, description="prompts per batch when the target writes the fixed data")
    samples: int = Field(
        0, ge=0, description="fixed data: this many more answers per prompt, sampled at `sample_temperature` "
        "(ids ID~s1, ...): more prefixes where the target's greedy next token is learnt, against memorising")
    sample_temperature: float = Field(0.7, gt=0.0, description="temperature of the `samples` answers")
    heldout: str | None = Field(
        None, description="held-out prompts for acceptance and speed (null: kdkit's packaged held-out prompts)")
    eval_every: int = Field(
        50, ge=0, description="log acceptance on `eval_prompts` held-out prompts every N steps (and at steps 0 and "
        "the last; 0: off): the draft's greedy matches along the target's own greedy text, exact for greedy decoding")
    eval_prompts: int = Field(8, ge=1, description="held-out prompts of the in-training acceptance")
    speed: bool = Field(True, description="measure the speed-up at the end (kdkit draft) / in kdkit eval")
    speed_prompts: int = Field(12, ge=1, description="held-out prompts of the final speed-up measurement")
    gamma_prompts: int = Field(4, ge=1, description="held-out prompts of each γ tried before the final measurement")
    gammas: list[int] = Field(default_factory=lambda: list(range(1, 9)),
                              description="draft lengths γ (num_assistant_tokens, constant schedule) tried")
    new_tokens: int = Field(64, ge=1, description="greedy tokens generated per prompt in the speed measurement")
    threads: int | None = Field(2, ge=1, description="torch CPU threads of the speed measurement (null: unchanged)")
    train: TrainConfig = Field(default_factory=_draft_train, description="optimisation of the draft")

    @model_validator(mode="after")
    def _check(self):
        if any(g < 1 for g in self.gammas) or not self.gammas:
            raise ValueError(f"draft.gammas must be positive draft lengths, got {self.gammas}")
        return self
