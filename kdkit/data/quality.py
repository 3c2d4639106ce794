"""Quality filters and a diversity report for teacher-written data.

Items are dicts with at least "id", "input" and "output" (the prompt and the teacher's answer), and
optionally "confidence" ({"mean_logprob", "mean_entropy"}) and "score" (a judge's grade). Filters run
in a fixed order — length, confidence, judge, exact duplicates, near duplicates — on items sorted by
id, so the result depends only on the items, never on the order they were written in; each filter's
removals are counted under its name.

Near duplicates: MinHash signatures of word 3-gram shingles (character 5-grams for texts under three
words), banded locality-sensitive hashing for candidates, then the estimated Jaccard similarity
against `threshold`. The later item (by id) of a near-duplicate pair is dropped.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np

_WORD = re.compile(r"\w+", re.U)


def normalise(text: str) -> str:
    """Lower case, runs of whitespace as one space: what counts as "the same" text."""
    return re.sub(r"\s+", " ", text.strip().lower())


def pair_text(item: dict) -> str:
    return normalise(item["input"]) + "\n" + normalise(item["output"])


# ---------------------------------------------------------------- filters


def apply_filters(items: list[dict], fc) -> tuple[list[dict], dict[str, int]]:
    """(kept items sorted by id, {filter name: items it removed}) under a FilterConfig `fc`."""
    items = sorted(items, key=lambda it: it["id"])
    removed: dict[str, int] = {}

    def keep_if(name: str, predicate) -> None:
        nonlocal items
        kept = [it for it in items if predicate(it)]
        removed[name] = len(items) - len(kept)
        items = kept

    keep_if("length", lambda it: fc.min_chars <= len(it["output"]) <= (fc.max_chars or float("inf")))
    if fc.min_mean_logprob is not None:
        keep_if("confidence_logprob", lambda it: _confidence(it, "mean_logprob") >= fc.min_mean_logprob)
    if fc.max_mean_entropy is not None:
        keep_if("confidence_entropy", lambda it: _confidence(it, "mean_entropy") <= fc.max_mean_entropy)
    if fc.min_judge_score is not None:  # items never graded pass: the judge only speaks for what it saw
        keep_if("judge_score", lambda it: it.get("score") is None or it["score"] >= fc.min_judge_score)
    if fc.dedupe in ("exact", "near"):
        seen: set[str] = set()
        keep_if("exact_duplicate", lambda it: not (pair_text(it) in seen or seen.add(pair_text(it))))
    if fc.dedupe == "near":
        dropped = near_duplicates([pair_text(it) for it in items], threshold=fc.near_threshold)
        keep_if("near_duplicate", lambda it, ids={items[i]["id"] for i in dropped}: it["id"] not in ids)
    return items, removed


def _confidence(item: dict, key: str) -> float:
    """The item's confidence value; an item without log-probs cannot pass a confidence threshold."""
    conf = item.get("confidence") or {}
    value = conf.get(key)
    if value is None:
        return float("-inf") if key == "mean_logprob" else float("inf")
    return value


def confidence(token_logprobs: list | None) -> dict | None:
    """{"mean_logprob", "mean_entropy"} from [[token, logprob, [[alt, logprob], ...]], ...].

    The entropy is over each position's top-k alternatives renormalised (a lower bound of the true
    entropy when k < V; exact for the local backend's full-vocabulary value where it is stored).
    """
    if not token_logprobs:
        return None
    chosen = np.array([t[1] for t in token_logprobs], dtype=np.float64)
    entropies = []
    for _, _, alts in token_logprobs:
        lp = np.array([a[1] for a in alts] or [0.0], dtype=np.float64)
        p = np.exp(lp - lp.max())
        p /= p.sum()
        entropies.append(float(-(p * np.log(np.clip(p, 1e-30, None))).sum()))
    return {"mean_logprob": float(chosen.mean()), "mean_entropy": float(np.mean(entropies))}


# ---------------------------------------------------------------- MinHash


def shingles(text: str) -> set[str]:
    words = _WORD.findall(text.lower())
    if len(words) >= 3:
        return {" ".join(words[i : i + 3]) for i in range(len(words) - 2)}
    flat = " ".join(words)
    return {flat[i : i + 5] for i in range(max(1, len(flat) - 4))}


def minhash(text: str, *, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """(num_perm,) uint64 MinHash signature: per permutation i, the min over shingles of
    splitmix64(h(shingle) XOR r_i) — a well-mixed 64-bit hash per permutation, r_i drawn from `seed`."""
    r = np.random.default_rng(seed).integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64)
    h = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
                  for s in shingles(text)], dtype=np.uint64)  # (S,)
    return _splitmix64(h[:, None] ^ r[None, :]).min(axis=0)  # (S, P) → (P,)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, element-wise on uint64 (multiplications wrap modulo 2^64 by design)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def near_duplicates(texts: list[str], *, threshold: float, num_perm: int = 128, bands: int = 32) -> set[int]:
    """Indices of texts that nearly repeat an earlier one (estimated Jaccard ≥ threshold)."""
    rows = num_perm // bands
    sigs = [minhash(t, num_perm=num_perm) for t in texts]
    buckets: dict[tuple, list[int]] = {}
    dropped: set[int] = set()
    for i, sig in enumerate(sigs):
        candidates = set()
        for band in range(bands):
            key = (band, sig[band * rows : (band + 1) * rows].tobytes())
            candidates.update(buckets.get(key, ()))
            buckets.setdefault(key, []).append(i)
        if any(float(np.mean(sigs[j] == sig)) >= threshold for j in candidates if j not in dropped):
            dropped.add(i)
    return dropped


# ---------------------------------------------------------------- diversity report


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the texts' words (1.0: no n-gram repeats)."""
    grams = Counter(tuple(w[i : i + n]) for w in (_WORD.findall(t.lower()) for t in texts)
                    for i in range(len(w) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def diversity_report(items: list[dict], out_dir: Path, *, before: int) -> dict:
    """distinct-1/2/3, duplicate rate, answer lengths; writes OUT_DIR/diversity.json and lengths.png."""
    outputs = [it["output"] for it in items]
    pairs = [pair_text(it) for it in items]
    lengths = [len(_WORD.findall(o)) for o in outputs]
    report = {
        "items": len(items), "items_before_filters": before,
        "distinct_1": distinct_n(outputs, 1), "distinct_2": distinct_n(outputs, 2), "distinct_3": distinct_n(outputs, 3),
        "input_distinct_2": distinct_n([it["input"] for it in items], 2),
        "duplicate_rate": 1 - len(set(pairs)) / len(pairs) if pairs else 0.0,
        "answer_words": {"mean": float(np.mean(lengths)) if lengths else 0.0,
                         "min": min(lengths, default=0), "max": max(lengths, default=0)},
        "length_histogram": "lengths.png",
    }
    _plot_lengths(lengths, out_dir / "lengths.png")
    return report


def _plot_lengths(lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(lengths or [0], bins=min(30, max(1, len(set(lengths)))), color="#4477aa")
    ax.set_xlabel("answer length (words)")
    ax.set_ylabel("items")
    ax.set_title(f"{len(lengths)} items")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
