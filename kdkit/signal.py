"""Teacher signals: the typed values every way of querying a teacher produces and losses consume.

A loss never calls a model. Online teachers, the offline cache and served teachers all hand over
one of these, so they are interchangeable. Each signal carries its `Provenance`; a consumer refuses
a signal whose provenance does not match the run (see `Provenance.mismatches`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch


@dataclass(frozen=True)
class Provenance:
    """Where a signal came from. Two signals are interchangeable only if these agree."""

    teacher_id: str = ""
    teacher_revision: str = ""  # hash of the teacher weights (or file), "" when unknown
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


@dataclass
class DenseSignal:
    """Full-vocabulary teacher logits for N supervised tokens: `logits` (N, V), raw (T = 1).

    V is the student's vocabulary, except for cross-tokenizer signals (the teacher's; loss `uld`).
    """

    logits: torch.Tensor  # (N, V)
    provenance: Provenance = field(default_factory=Provenance)
    # (N,) per-token weight of the KD term (selective / multi-teacher / cross-tokenizer modes); None: all 1.
    # distill_loss sums weight · divergence and still divides by the supervised-token count.
    weight: torch.Tensor | None = None
    # the teacher's internals from the same forward (hidden-state / attention distillation); None: not captured
    hidden: HiddenSignal | None = None

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

    def __post_init__(self):
        if self.ids.shape != self.logprobs.shape or self.ids.dim() != 2:
            raise ValueError(
                f"SparseSignal ids {tuple(self.ids.shape)} and logprobs {tuple(self.logprobs.shape)} "
                "must both be (N, k)"
            )

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]


@dataclass
class HiddenSignal:
    """Selected teacher hidden states {layer index: (N, H)} at the supervised rows and attention
    probabilities {layer: (B, h, T, T)}, from one teacher forward (travels on `DenseSignal.hidden`)."""

    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    attentions: dict[int, torch.Tensor] = field(default_factory=dict)
    provenance: Provenance = field(default_factory=Provenance)
