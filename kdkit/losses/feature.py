"""Hidden-state and attention-map distillation: per-row distances, their reduction, and layer maps.

Pure tensor math. Hidden-state distances take the student's rows (already projected to the teacher's
width) and the teacher's rows, both (N, D), and give one value per row (N,). Attention losses take
per-query rows of attention probabilities (N, H, T) and also give (N,). `hidden_loss` and
`attention_loss` then mask and normalise through `reduce.py` by the step's supervised-token count,
so accumulated gradients equal the full-batch gradient (MMD aside: see `mmd_rows`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reduce import masked_row_mean, masked_sum, normalize

DISTANCES = ("mse", "cosine", "l1", "l2", "ce", "mmd")
ATTENTION_LOSSES = ("kl", "mse", "cosine")
HEAD_MODES = ("average", "map")
EPS = 1e-8
TINY = 1e-30  # floor of a probability before its log: finite, and clamp's backward stops the gradient there


# ---------------------------------------------------------------- layer maps


def depth_map(index: int, *, count: int, total: int) -> int:
    """The layer of a `total`-layer stack at the same relative depth as layer `index` of `count` layers:
    layer i's output is the stack's output after (i + 1)/count of its depth (TinyBERT's g(m) = k·m)."""
    return max(0, min(total - 1, round((index + 1) * total / count) - 1))


def uniform_pairs(k: int, *, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """`k` (student layer, teacher layer) pairs: student layers spread evenly up to the last one, each
    paired with the teacher layer at the same relative depth. 2 of 10 → 30 layers: [(4, 14), (9, 29)]."""
    k = min(k, student_layers)
    students = [depth_map(j, count=k, total=student_layers) for j in range(k)]
    return [(s, depth_map(s, count=student_layers, total=teacher_layers)) for s in students]


# ---------------------------------------------------------------- hidden-state distances, (N, D) → (N,)


def mse_rows(s: Tensor, t: Tensor) -> Tensor:
    """Mean over features of the squared difference."""
    return (s - t).pow(2).mean(-1)


def l1_rows(s: Tensor, t: Tensor) -> Tensor:
    """Mean over features of the absolute difference."""
    return (s - t).abs().mean(-1)


def l2_rows(s: Tensor, t: Tensor) -> Tensor:
    """Euclidean distance ‖s − t‖₂; exactly 0 with a zero gradient where s == t (sqrt's slope is
    infinite at 0, so the double `where` keeps it out of the graph)."""
    sq = (s - t).pow(2).sum(-1)  # (N,)
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, 1.0).sqrt(), 0.0)


def cosine_rows(s: Tensor, t: Tensor) -> Tensor:
    """1 − cos(s, t); norms floored at EPS so a zero row is finite."""
    dot = (s * t).sum(-1)
    norms = s.norm(dim=-1).clamp_min(EPS) * t.norm(dim=-1).clamp_min(EPS)
    return 1.0 - dot / norms


def ce_rows(s: Tensor, t: Tensor, temperature: float = 1.0) -> Tensor:
    """Cross-entropy H(softmax(t/τ), softmax(s/τ)) over the feature axis (a cross-entropy, not a KL:
    identical rows give the teacher's feature entropy, with a zero gradient)."""
    p_t = torch.softmax(t / temperature, dim=-1)
    return -(p_t * torch.log_softmax(s / temperature, dim=-1)).sum(-1)


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances (N, D), (M, D) → (N, M), without the (N, M, D) intermediate."""
    d = a.pow(2).sum(-1)[:, None] + b.pow(2).sum(-1)[None, :] - 2.0 * a @ b.T
    return d.clamp_min(0.0)  # rounding can push a zero distance below 0


def mmd_rows(s: Tensor, t: Tensor, mask: Tensor, *, bandwidths=(0.25, 1.0, 4.0)) -> Tensor:
    """Each row's share of the squared MMD (biased V-statistic) between the student's and the teacher's
    row sets, with a sum of Gaussian kernels exp(−d² / (b·m)), m the detached mean cross distance.

    Row i gives r_i = mean_j [k(s_i, s_j) + k(t_i, t_j) − k(s_i, t_j) − k(t_i, s_j)] over the rows j
    the mask keeps, so mean_i r_i = MMD². MMD is a statistic of a set: with gradient accumulation
    each micro-batch is its own set (the token-weighted mean of per-micro-batch MMD², not one MMD²).
    """
    ss, tt, st = _sq_dists(s, s), _sq_dists(t, t), _sq_dists(s, t)  # (N, N) each
    pairs = (mask[:, None] & mask[None, :]).flatten()  # (N·N,)
    scale = (normalize(masked_sum(st.detach().flatten(), pairs), pairs.sum()) + EPS)  # () mean cross distance

    def kernel(d: Tensor) -> Tensor:
        return sum(torch.exp(-d / (b * scale)) for b in bandwidths)

    k = kernel(ss) + kernel(tt) - kernel(st) - kernel(st.T)  # (N, N)
    return masked_row_mean(k, mask)


HIDDEN_DISTANCES = {"mse": mse_rows, "cosine": cosine_rows, "l1": l1_rows, "l2": l2_rows, "ce": ce_rows}


def hidden_loss(s: Tensor, t: Tensor, *, distance: str, num_tokens: int | Tensor, mask: Tensor | None = None) -> Tensor:
    """Σ over kept rows of distance(s_i, t_i) / num_tokens. s, t (N, D) (float32 used); mask (N,) bool."""
    if s.shape != t.shape or s.dim() != 2:
        raise ValueError(f"student rows {tuple(s.shape)} and teacher rows {tuple(t.shape)} must both be (N, D)")
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; choose one of {DISTANCES}")
    s, t = s.float(), t.float()
    mask = torch.ones(s.shape[0], dtype=torch.bool, device=s.device) if mask is None else mask
    rows = mmd_rows(s, t, mask) if distance == "mmd" else HIDDEN_DISTANCES[distance](s, t)  # (N,)
    return normalize(masked_sum(rows, mask), num_tokens)


# ---------------------------------------------------------------- attention maps, (N, H, T) → (N,)


def align_heads(s: Tensor, t: Tensor, *, heads: str) -> tuple[Tensor, Tensor]:
    """Bring student (N, Hs, T) and teacher (N, Ht, T) attention rows to the same heads.

    average: every map is averaged over its heads → (N, 1, T). map: head for head when Hs == Ht;
    otherwise the side with more heads is averaged in contiguous groups onto the other's heads. Query
    heads that share a KV head (GQA) are contiguous, so a group never splits one KV group of the
    smaller model among several of the larger one's heads more than the ratio requires.
    """
    if heads == "average":
        return s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    if heads != "map":
        raise ValueError(f"unknown head mode {heads!r}; choose one of {HEAD_MODES}")
    hs, ht = s.shape[1], t.shape[1]
    if hs == ht:
        return s, t
    if max(hs, ht) % min(hs, ht):
        raise ValueError(f"heads=map needs one head count to divide the other (student {hs}, teacher {ht}); "
                         "use heads=average")
    if ht > hs:
        return s, t.unflatten(1, (hs, ht // hs)).mean(2)  # (N, Hs, T)
    return s.unflatten(1, (ht, hs // ht)).mean(2), t  # (N, Ht, T)


def attention_kl_rows(s: Tensor, t: Tensor) -> Tensor:
    """KL(teacher row ‖ student row) per query, summed over keys, averaged over heads."""
    log_t = torch.log(t.clamp_min(TINY))
    log_s = torch.log(s.clamp_min(TINY))
    # where, not t·(…): a key the teacher cannot see (p = 0) contributes exactly 0, gradient too
    return torch.where(t > 0, t * (log_t - log_s), 0.0).sum(-1).mean(-1)


def attention_mse_rows(s: Tensor, t: Tensor) -> Tensor:
    """Squared error summed over keys (each query row is a distribution), averaged over heads."""
    return (s - t).pow(2).sum(-1).mean(-1)


def attention_cosine_rows(s: Tensor, t: Tensor) -> Tensor:
    """1 − cos between the student's and the teacher's rows over keys, averaged over heads."""
    return cosine_rows(s, t).mean(-1)


ATTENTION_ROWS = {"kl": attention_kl_rows, "mse": attention_mse_rows, "cosine": attention_cosine_rows}


def attention_loss(s: Tensor, t: Tensor, *, loss: str, heads: str, num_tokens: int | Tensor,
                   mask: Tensor | None = None) -> Tensor:
    """Σ over kept query rows of loss(student row, teacher row) / num_tokens.

    s (N, Hs, T), t (N, Ht, T): attention probabilities of N query positions over T keys; mask (N,) bool.
    """
    if s.dim() != 3 or t.dim() != 3 or s.shape[0] != t.shape[0] or s.shape[2] != t.shape[2]:
        raise ValueError(f"attention rows must be (N, H, T) with equal N and T: {tuple(s.shape)} vs {tuple(t.shape)}")
    if loss not in ATTENTION_ROWS:
        raise ValueError(f"unknown attention loss {loss!r}; choose one of {ATTENTION_LOSSES}")
    s, t = align_heads(s.float(), t.float(), heads=heads)
    mask = torch.ones(s.shape[0], dtype=torch.bool, device=s.device) if mask is None else mask
    return normalize(masked_sum(ATTENTION_ROWS[loss](s, t), mask), num_tokens)
