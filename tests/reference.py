"""Naive fp64 reference implementations of the losses in kdkit.losses (written apart, never imported from it).

Logits of -inf are replaced by -1e4 before anything else: in fp64, exp(-1e4 / T − max) underflows to
exactly 0 for every temperature the tests use, so those entries are probability 0 and their terms
p·log(p/q) are 0·(finite) = 0, with finite gradients, without any special-casing.
"""

from __future__ import annotations

import torch

NEG = -1e4


def probs_and_logprobs(logits, temperature):
    """Softmax written out by hand in fp64: (N, V) → p (N, V), log p (N, V)."""
    x = torch.nan_to_num(logits.double(), neginf=NEG) / temperature
    shifted = x - x.max(dim=-1, keepdim=True).values
    z = shifted.exp().sum(dim=-1, keepdim=True)
    log_p = shifted - z.log()
    return shifted.exp() / z, log_p


def kl(p, log_p, log_q):
    return (p * (log_p - log_q)).sum(dim=-1)


def log_mixture(w, log_a, log_b):
    """log(w·a + (1−w)·b), a two-term logsumexp written by hand (never log 0 here: entries ≥ NEG)."""
    u = log_a + torch.log(torch.tensor(w, dtype=torch.float64))
    v = log_b + torch.log(torch.tensor(1.0 - w, dtype=torch.float64))
    m = torch.maximum(u, v)
    return m + torch.log(torch.exp(u - m) + torch.exp(v - m))


def forward_kl(s, t, temperature=1.0):
    p_s, log_s = probs_and_logprobs(s, temperature)
    p_t, log_t = probs_and_logprobs(t, temperature)
    return kl(p_t, log_t, log_s)


def reverse_kl(s, t, temperature=1.0):
    p_s, log_s = probs_and_logprobs(s, temperature)
    p_t, log_t = probs_and_logprobs(t, temperature)
    return kl(p_s, log_s, log_t)


def jsd(s, t, beta=0.5, temperature=1.0):
    p_s, log_s = probs_and_logprobs(s, temperature)
    p_t, log_t = probs_and_logprobs(t, temperature)
    log_m = log_mixture(beta, log_t, log_s)
    return beta * kl(p_t, log_t, log_m) + (1 - beta) * kl(p_s, log_s, log_m)


def skew_forward_kl(s, t, skew=0.1, temperature=1.0):
    p_s, log_s = probs_and_logprobs(s, temperature)
    p_t, log_t = probs_and_logprobs(t, temperature)
    return kl(p_t, log_t, log_mixture(skew, log_t, log_s))


def skew_reverse_kl(s, t, skew=0.1, temperature=1.0):
    p_s, log_s = probs_and_logprobs(s, temperature)
    p_t, log_t = probs_and_logprobs(t, temperature)
    return kl(p_s, log_s, log_mixture(skew, log_s, log_t))


def tvd(s, t, temperature=1.0):
    p_s, _ = probs_and_logprobs(s, temperature)
    p_t, _ = probs_and_logprobs(t, temperature)
    return 0.5 * (p_t - p_s).abs().sum(dim=-1)


DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}


def distill_loss(s, t, labels, divergence="forward_kl", temperature=1.0, alpha=1.0, num_tokens=None, **kw):
    """Returns (total, kd, ce) as fp64 scalars, with a Python loop over the supervised rows."""
    div = DIVERGENCES[divergence](s, t, temperature=temperature, **kw)  # (N,)
    _, log_s1 = probs_and_logprobs(s, 1.0)
    kd_sum = torch.zeros((), dtype=torch.float64)
    ce_sum = torch.zeros((), dtype=torch.float64)
    count = 0
    for i in range(labels.shape[0]):
        if labels[i] == -100:
            continue
        kd_sum = kd_sum + div[i]
        ce_sum = ce_sum - log_s1[i, labels[i]]
        count += 1
    denom = max(count if num_tokens is None else int(num_tokens), 1)
    kd, ce = kd_sum / denom, ce_sum / denom
    return alpha * temperature**2 * kd + (1 - alpha) * ce, kd, ce


def bucketed(s, t, k, temperature=1.0, capture_temperature=None):
    """fp64 k + 1 buckets by hand: the teacher's top-k ids at the capture temperature, plus a tail.

    Returns (student bucket probs (N, k+1), teacher bucket probs (N, k+1)) at `temperature`; the
    teacher's top k are re-normalised to `temperature` with the tail mass kept as captured.
    """
    t_c = temperature if capture_temperature is None else capture_temperature
    p_s, _ = probs_and_logprobs(s, temperature)
    p_c, _ = probs_and_logprobs(t, t_c)
    ids = torch.argsort(p_c, dim=-1, descending=True)[:, :k]
    rows_s, rows_t = [], []
    for i in range(s.shape[0]):
        top_c = [float(p_c[i, j]) for j in ids[i]]
        tail_t = max(1.0 - sum(top_c), 0.0)
        weights = [q ** (t_c / temperature) if q > 0 else 0.0 for q in top_c]
        top_t = [w / sum(weights) * (1.0 - tail_t) for w in weights]
        chosen = set(int(j) for j in ids[i])
        top_s = [p_s[i, j] for j in ids[i]]
        tail_s = sum(p_s[i, j] for j in range(s.shape[1]) if j not in chosen)  # a loop, on purpose
        rows_s.append(torch.stack(top_s + [torch.as_tensor(tail_s, dtype=torch.float64)]))
        rows_t.append(torch.tensor(top_t + [tail_t], dtype=torch.float64))
    return torch.stack(rows_s), torch.stack(rows_t)


def bucketed_divergence(name, s, t, k, temperature=1.0, capture_temperature=None, **kw):
    """A reference divergence on the buckets: their log-probs go in as logits at T = 1 (log 0 → NEG)."""
    b_s, b_t = bucketed(s, t, k, temperature, capture_temperature)
    return DIVERGENCES[name](torch.log(b_s), torch.log(b_t), temperature=1.0, **kw)
