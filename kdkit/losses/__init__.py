"""Pure loss math, importable without a trainer: divergences, masking/normalisation, the KD objective."""

from .divergences import DIVERGENCES, forward_kl, jsd, reverse_kl, skew_forward_kl, skew_reverse_kl, tvd
from .objective import LossParts, distill_loss
from .reduce import masked_sum, normalize, token_mean

__all__ = [
    "DIVERGENCES",
    "LossParts",
    "distill_loss",
    "forward_kl",
    "jsd",
    "masked_sum",
    "normalize",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "token_mean",
    "tvd",
]
