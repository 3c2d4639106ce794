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
    """TRL's generalized JSD: β = 0 is KL(p_T ‖ p_S), β = 1 is KL(p_S ‖ p_T), else the mixture form."""
    p_s, log_s = probs_and_logprobs(s, temperature)
    p_t, log_t = probs_and_logprobs(t, temperature)
    if beta == 0:
        return kl(p_t, log_t, log_s)
    if beta == 1:
        return kl(p_s, log_s, log_t)
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
    # T² on the KL family only: tvd's logit gradient shrinks as 1/T, not 1/T²
    scale = 1.0 if divergence in ("tvd", "uld") else temperature**2
    return alpha * scale * kd + (1 - alpha) * ce, kd, ce


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


# ---------------------------------------------------------------- preference losses (kdkit.train.preference)


def completion_logps(logits, input_ids, completion_mask):
    """fp64 sum of log p(token) over the completion, one sequence at a time, by loops.

    logits (B, T, V): position t predicts input_ids[t + 1]; completion_mask (B, T) is 1 on completion tokens."""
    out = []
    for b in range(logits.shape[0]):
        total = torch.zeros((), dtype=torch.float64)
        for t in range(1, logits.shape[1]):
            if completion_mask[b, t]:
                _, log_p = probs_and_logprobs(logits[b, t - 1][None], 1.0)
                total = total + log_p[0, input_ids[b, t]]
        out.append(total)
    return torch.stack(out)


def dpo_sigmoid(pc, pr, rc, rr, beta, label_smoothing=0.0):
    """fp64 DPO (sigmoid) per pair: −(1−ε)·log σ(β·m) − ε·log σ(−β·m), m the difference of log-ratios,
    with log σ(x) = −log(1 + e^{−x}) written out."""
    m = (pc.double() - rc.double()) - (pr.double() - rr.double())
    x = beta * m
    log_sig = lambda z: -torch.log1p(torch.exp(-z))  # noqa: E731
    return -(1 - label_smoothing) * log_sig(x) - label_smoothing * log_sig(-x)


def bradley_terry(rc, rr):
    """fp64 −log σ(r_c − r_r)."""
    return torch.log1p(torch.exp(-(rc.double() - rr.double())))


def uld(s, t, temperature=1.0):
    """ULD, naively: sort each row's probabilities in decreasing order, pad the shorter with zeros,
    sum |difference| (fp64, loops over rows)."""
    rows = []
    for i in range(s.shape[0]):
        p = sorted(torch.softmax(s[i].double() / temperature, -1), key=lambda x: -float(x.detach()))
        q = sorted(torch.softmax(t[i].double() / temperature, -1), key=lambda x: -float(x.detach()))
        width = max(len(p), len(q))
        zero = torch.zeros((), dtype=torch.float64)
        p, q = p + [zero] * (width - len(p)), q + [zero] * (width - len(q))
        rows.append(sum((a - b).abs() for a, b in zip(p, q)))
    return torch.stack(rows)


# ---------------------------------------------------------------- hidden states and attention maps


def _softmax_rows(x):
    """Softmax over the last axis by hand, fp64."""
    shifted = x - x.max(dim=-1, keepdim=True).values
    e = shifted.exp()
    return e / e.sum(dim=-1, keepdim=True)


def _row_distance(name, a, b, eps=1e-8):
    """One row's distance, written out: a, b (D,) fp64."""
    d = a - b
    if name == "mse":
        return (d * d).sum() / d.numel()
    if name == "l1":
        return d.abs().sum() / d.numel()
    if name == "l2":
        return torch.sqrt((d * d).sum())
    if name == "cosine":
        na, nb = torch.sqrt((a * a).sum()), torch.sqrt((b * b).sum())
        return 1 - (a * b).sum() / (torch.clamp(na, min=eps) * torch.clamp(nb, min=eps))
    if name == "ce":
        p_b = _softmax_rows(b)
        log_q = torch.log(_softmax_rows(a))
        return -(p_b * log_q).sum()
    raise ValueError(name)


def mmd2(x, y, bandwidths=(0.25, 1.0, 4.0)):
    """Biased squared MMD of two row sets with Gaussian kernels, every pair by a loop; the bandwidth
    scale is the detached mean cross distance."""
    n = len(x)
    sq = lambda a, b: ((a - b) ** 2).sum()  # noqa: E731
    scale = sum(float(sq(x[i], y[j]).detach()) for i in range(n) for j in range(n)) / (n * n) + 1e-8
    k = lambda a, b: sum(torch.exp(-sq(a, b) / (w * scale)) for w in bandwidths)  # noqa: E731
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            total = total + k(x[i], x[j]) + k(y[i], y[j]) - 2 * k(x[i], y[j])
    return total / (n * n)


def hidden_loss(name, s, t, mask, num_tokens):
    """Σ over kept rows of the distance / num_tokens (mmd: n_kept · MMD² of the kept rows / num_tokens)."""
    s, t = s.double(), t.double()
    keep = [i for i in range(s.shape[0]) if mask[i]]
    if name == "mmd":
        total = torch.zeros((), dtype=torch.float64)
        if keep:
            total = len(keep) * mmd2([s[i] for i in keep], [t[i] for i in keep])
    else:
        total = sum((_row_distance(name, s[i], t[i]) for i in keep), torch.zeros((), dtype=torch.float64))
    return total / max(num_tokens, 1)


def _group_mean(rows, groups):
    """(H, T) → (groups, T): contiguous blocks of heads averaged."""
    size = rows.shape[0] // groups
    return torch.stack([rows[g * size:(g + 1) * size].mean(0) for g in range(groups)])


def attention_loss(name, s, t, mask, num_tokens, heads="average"):
    """Per query row (H, T): heads aligned by hand, then kl / mse / cosine over keys, mean over heads."""
    s, t = s.double(), t.double()
    total = torch.zeros((), dtype=torch.float64)
    for i in range(s.shape[0]):
        if not mask[i]:
            continue
        a, b = s[i], t[i]
        if heads == "average":
            a, b = a.mean(0, keepdim=True), b.mean(0, keepdim=True)
        elif a.shape[0] > b.shape[0]:
            a = _group_mean(a, b.shape[0])
        elif b.shape[0] > a.shape[0]:
            b = _group_mean(b, a.shape[0])
        per_head = []
        for h in range(a.shape[0]):
            if name == "kl":
                per_head.append(sum(b[h, k] * (torch.log(b[h, k]) - torch.log(a[h, k]))
                                    for k in range(a.shape[1]) if b[h, k] > 0))
            elif name == "mse":
                per_head.append(((a[h] - b[h]) ** 2).sum())
            else:
                per_head.append(_row_distance("cosine", a[h], b[h]))
        total = total + sum(per_head) / len(per_head)
    return total / max(num_tokens, 1)
