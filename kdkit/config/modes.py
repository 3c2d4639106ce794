"""The config sections of the training modes, feedback distillation and white-box objectives:
`modes`, `preference`, `features` (all off by default)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kdkit.config.sections import Section


class OnPolicyConfig(Section):
    fraction: float = Field(
        0.0, ge=0.0, le=1.0,
        description="λ: share of micro-batches whose answers are sampled from the current student (GKD); 0: off",
    )
    max_new_tokens: int = Field(64, ge=1, description="tokens sampled per on-policy answer")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature of the student's answers")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling of the student's answers")
    greedy: bool = Field(False, description="greedy continuations instead of samples (a speculative draft's proposals)")


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
