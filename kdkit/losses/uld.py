"""Universal Logit Distillation (Boizard et al., 2024): a divergence defined across vocabularies.

Teacher and student may have different tokenizers, so their distributions live on different
outcome sets. ULD compares them through what is invariant to relabelling: the probabilities
sorted in decreasing order. The shorter sorted vector is padded with zeros, and the per-token
value is the L1 distance between the two sorted vectors (the closed form of the Wasserstein-1
distance ULD uses, with unit ground cost between ranks):

    uld(s, t) = Σ_r | sort↓(p_S)_r − sort↓(p_T)_r |,   p = softmax(logits / T)

Properties: 0 for identical (or permuted) distributions, ≤ 2, finite for -inf logits (probability
0), differentiable almost everywhere (through the sort's permutation). Not scaled by T², not
masked, not reduced (`reduce.py` does that), like every divergence of `divergences.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .divergences import _check_temperature, _log_probs


def uld(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Σ_r |sort↓ p_S − sort↓ p_T| per token: (N, V_s), (N, V_t) → (N,) fp32; V_s may differ from V_t."""
    _check_temperature(temperature)
    if student_logits.dim() != 2 or teacher_logits.dim() != 2 or student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must be (N, V_s) and (N, V_t) with the same N")
    p_s = _log_probs(student_logits, temperature).exp().sort(dim=-1, descending=True).values  # (N, V_s)
    p_t = _log_probs(teacher_logits, temperature).exp().sort(dim=-1, descending=True).values  # (N, V_t)
    width = max(p_s.shape[1], p_t.shape[1])
    p_s = torch.nn.functional.pad(p_s, (0, width - p_s.shape[1]))  # (N, W): zero probability past V_s
    p_t = torch.nn.functional.pad(p_t, (0, width - p_t.shape[1]))  # (N, W)
    return (p_s - p_t).abs().sum(dim=-1)  # (N,)


CROSS_VOCAB = {"uld": uld}  # divergences that accept different vocabularies
