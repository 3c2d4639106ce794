"""Teacher signals: the typed values every way of querying a teacher produces and losses consume.

A loss never calls a model. Online teachers, the offline cache and served teachers all hand over
one of these, so they are interchangeable. Each signal carries its `Provenance`; a consumer refuses
a signal whose provenance does not match the run (see `Provenance.mismatches`).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, fields

import torch


# how an error message names each Provenance field
FIELD_LABELS = {"teacher_id": "teacher id", "teacher_revision": "teacher weights hash",
                "tokenizer_hash": "tokenizer hash", "chat_template_hash": "chat template hash",
                "temperature": "temperature", "top_k": "top-k"}


@dataclass(frozen=True)
class Provenance:
    """Where a signal came from. Two signals are interchangeable only if these agree."""

    teacher_id: str = ""  # where the teacher came from (its path or alias; a served model's name)
    # its weights' content hash (kdkit.models.fingerprint: "files:…" / "tensors:…"; a served cache:
    # "served"), "" when unknown; the same weights at another path hash alike
    teacher_revision: str = ""
    tokenizer_hash: str = ""
    chat_template_hash: str = ""
    temperature: float = 1.0
    top_k: int | None = None  # None: full vocabulary

    def mismatches(self, other: "Provenance", *, ignore: tuple[str, ...] = ()) -> dict[str, tuple]:
        """Fields that differ, as {name: (self_value, other_value)}; empty when compatible."""
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name not in ignore and a != b:
                out[f.name] = (a, b)
        return out

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VocabMap:
    """Each teacher token id → the student token its text starts with, -1 where none (built by
    `kdkit.models.vocab_map.vocab_map`); what cross-tokenizer metrics compare through."""

    to_student: torch.Tensor  # (V_t,) int64

    def to(self, device) -> "VocabMap":
        return VocabMap(self.to_student.to(device))


@dataclass
class DenseSignal:
    """Full-vocabulary teacher logits for N supervised tokens: `logits` (N, V), raw (T = 1).

    V is the student's vocabulary, except for cross-tokenizer signals (the teacher's; loss `uld`),
    which carry `vocab_map`: the progress metrics compare the two vocabularies through it.
    """

    logits: torch.Tensor  # (N, V)
    provenance: Provenance = field(default_factory=Provenance)
    # (N,) per-token weight of the KD term (selective / multi-teacher / cross-tokenizer modes); None: all 1.
    # distill_loss sums weight · divergence and still divides by the supervised-token count.
    weight: torch.Tensor | None = None
    # the teacher's internals from the same forward (hidden-state / attention distillation); None: not captured
    hidden: HiddenSignal | None = None
    vocab_map: VocabMap | None = None  # cross-tokenizer: teacher id → student id (kdkit.models.vocab_map)

    def __post_init__(self):
        if self.logits.dim() != 2:
            raise ValueError(f"DenseSignal.logits must be (N, V), got {tuple(self.logits.shape)}")

    @property
    def num_tokens(self) -> int:
        return self.logits.shape[0]


@dataclass
class SparseSignal:
    """Top-k teacher log-probs for N tokens: ids (N, k) int, logprobs (N, k) at the capture temperature.

    `tail` (N,) is the log of the probability mass outside the top k (log(1 - sum(exp(logprobs)))),
    or None when the producer did not report it.
    """

    ids: torch.Tensor  # (N, k) int64
    logprobs: torch.Tensor  # (N, k) float
    tail: torch.Tensor | None = None  # (N,)
    provenance: Provenance = field(default_factory=Provenance)
    weight: torch.Tensor | None = None  # (N,) per-token KD weight, as DenseSignal.weight
    # every id lies in [0, id_bound), checked on the host where the signal was read (kdkit.teacher.cache), so
    # the loss need not read the device's ids back (a host sync per step); None: the loss checks them
    id_bound: int | None = None

    def __post_init__(self):
        if self.ids.shape != self.logprobs.shape or self.ids.dim() != 2:
            raise ValueError(
                f"SparseSignal ids {tuple(self.ids.shape)} and logprobs {tuple(self.logprobs.shape)} "
                "must both be (N, k)"
            )

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    def check_ids(self, vocab: int) -> None:
        """Refuse ids outside [0, vocab): from `id_bound` where the producer checked them, else from the ids
        where they lie (on a device, reading their min and max waits for it)."""
        if self.id_bound is not None:
            bad = self.id_bound > vocab
        else:
            bad = bool(self.ids.numel()) and bool(self.ids.min() < 0 or self.ids.max() >= vocab)
        if bad:
            raise ValueError(f"signal ids must lie in [0, {vocab}), the student's vocabulary")


@dataclass
class HeadSignal:
    """The online teacher as its last hidden rows and its lm_head: logits = rows @ head[:vocab]ᵀ (+ bias).

    The fused loss forms these logits chunk by chunk and never holds them whole; `.logits` forms
    them all at once, (N, vocab), for the dense path and for the modes that read them (cached).
    """

    rows: torch.Tensor  # (N, H_t) the teacher's final hidden states at the supervised positions
    head: torch.Tensor  # (V_t, H_t) its lm_head weight
    head_bias: torch.Tensor | None = None  # (V_t,)
    vocab: int | None = None  # the shared vocabulary: logits keep the first `vocab` columns
    provenance: Provenance = field(default_factory=Provenance)
    weight: torch.Tensor | None = None  # (N,) per-token KD weight, as DenseSignal.weight
    hidden: HiddenSignal | None = None  # the teacher's internals, as DenseSignal.hidden

    @property
    def num_tokens(self) -> int:
        return self.rows.shape[0]

    @functools.cached_property
    def logits(self) -> torch.Tensor:
        """(N, vocab) the whole logits: O(N × V) memory."""
        v = self.vocab or self.head.shape[0]
        bias = None if self.head_bias is None else self.head_bias[:v]
        return torch.nn.functional.linear(self.rows, self.head[:v], bias)

    def dense(self) -> DenseSignal:
        return DenseSignal(self.logits, self.provenance, weight=self.weight, hidden=self.hidden)


@dataclass
class HiddenSignal:
    """Selected teacher hidden states {layer index: (N, H)} at the supervised rows and attention
    probabilities {layer: (B, h, T, T)}, from one teacher forward (travels on `DenseSignal.hidden`)."""

    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)
    provenance: Provenance = field(default_factory=Provenance)
