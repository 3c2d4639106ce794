"""Pure loss math, importable without a trainer: divergences, masking/normalisation, the KD objective."""

from .divergences import DIVERGENCES, forward_kl, jsd, reverse_kl, skew_forward_kl, skew_reverse_kl, tvd
from .fused import fused_distill_loss
from .objective import LossParts, distill_loss, sparse_distill_loss
from .reduce import masked_row_mean, masked_sum, normalize, token_mean
from .sparse import sparse_divergence, student_buckets, teacher_buckets
from .uld import CROSS_VOCAB, uld

__all__ = [
    "CROSS_VOCAB",
    "DIVERGENCES",
    "LossParts",
    "distill_loss",
    "forward_kl",
    "fused_distill_loss",
    "jsd",
    "masked_row_mean",
    "masked_sum",
    "normalize",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sparse_distill_loss",
    "sparse_divergence",
    "student_buckets",
    "teacher_buckets",
    "token_mean",
    "tvd",
    "uld",
]
