"""The compact on-disk encoding of top-k teacher signals: 2k + k + 6 bytes per token (V ≤ 65536).

Per supervised token, with the k log-probs lp_1 … lp_k (valid ones finite, invalid ones -inf):

- ids      k × uint16 when the vocabulary has at most 65536 entries, else k × uint32: lossless.
- top      fp16: M = the largest valid log-prob, rounded to nearest.
- range    fp16: R = M − (smallest valid log-prob), rounded UP (so every valid lp lies in [M − R, M]);
           capped at 65504 (fp16's largest): log-probs further below M than that are stored as M − R.
- codes    k × uint8: c = round(254 · sqrt((M − lp) / R)) in 0…254, finer near the top where the
           probability mass is; 255 marks an invalid slot (-inf). Decoded lp' = M − R · (c / 254)².
- tail     fp16: the log of the mass outside the top k (-inf when there is none), rounded to nearest.

Error bound (tested): with s = sqrt((M − lp)/R), |lp' − lp| ≤ R · (2s + 1/508) / 508 + |M − fp16(M)|:
about R / 258064 at the top (s = 0) and at most R · 2.002 / 508 ≈ R / 254 at the bottom (s = 1); the
fp16 rounding of M is at most 2⁻¹¹·|M|. The tail's error is at most 2⁻¹¹·|tail| (fp16 rounding).
At k = 64: 128 + 64 + 6 = 198 bytes per token.
"""

from __future__ import annotations

import numpy as np
import torch

INVALID = 255  # the code of a -inf (invalid) slot
LEVELS = 254  # codes 0 … 254 carry values
FP16_MAX = float(np.finfo(np.float16).max)

DESCRIPTION = (
    "ids: uint16 if vocab <= 65536 else uint32 (lossless); top: fp16 max log-prob; range: fp16 "
    "(rounded up, <= 65504); codes: uint8 c = round(254*sqrt((top - lp)/range)), 255 = -inf, "
    "decoded lp = top - range*(c/254)^2; tail: fp16 log of the mass outside the top k"
)


def id_dtype(vocab: int) -> np.dtype:
    """The narrowest unsigned integer dtype that holds every token id below `vocab`."""
    return np.dtype(np.uint16) if vocab <= 65536 else np.dtype(np.uint32)


def bytes_per_token(k: int, vocab: int) -> int:
    """Encoded bytes per supervised token: ids, codes, top, range and tail."""
    return k * (id_dtype(vocab).itemsize + 1) + 3 * 2


def _fp16_up(x: np.ndarray) -> np.ndarray:
    """The smallest fp16 ≥ x (x ≥ 0, finite), element-wise."""
    h = x.astype(np.float16)
    low = h.astype(np.float64) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def encode(ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor, *, vocab: int) -> dict[str, np.ndarray]:
    """ids (N, k), logprobs (N, k), tail (N,) → {"ids", "codes", "top", "range", "tail"} numpy arrays."""
    lp = logprobs.detach().double().cpu().numpy()  # (N, k) fp64: the encoding's own rounding is the only error
    valid = np.isfinite(lp)  # (N, k)
    any_valid = valid.any(axis=1)  # (N,)
    top = np.where(any_valid, np.where(valid, lp, -np.inf).max(axis=1, initial=-np.inf), 0.0)  # (N,)
    top16 = top.astype(np.float16)  # (N,)
    low = np.where(valid, lp, np.inf).min(axis=1, initial=np.inf)  # (N,)
    spread = np.where(any_valid, top16.astype(np.float64) - low, 0.0)  # (N,)
    range16 = _fp16_up(np.clip(spread, 0.0, FP16_MAX))  # (N,)
    range16[range16 == 0] = np.float16(1.0)  # all valid slots equal (or none): any positive range works
    depth = (top16.astype(np.float64)[:, None] - np.where(valid, lp, 0.0)) / range16.astype(np.float64)[:, None]
    codes = np.rint(LEVELS * np.sqrt(np.clip(depth, 0.0, 1.0)))  # (N, k)
    codes = np.where(valid, codes, INVALID).astype(np.uint8)  # (N, k)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab})")
    return {
        "ids": ids.detach().cpu().numpy().astype(id_dtype(vocab)),  # (N, k)
        "codes": codes,
        "top": top16,
        "range": range16,
        "tail": tail.detach().double().cpu().numpy().astype(np.float16),  # (N,)
    }


def decode(arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `encode`: → ids (N, k) int64, logprobs (N, k) fp32, tail (N,) fp32."""
    codes = torch.from_numpy(np.asarray(arrays["codes"]).astype(np.int64))  # (N, k)
    top = torch.from_numpy(np.asarray(arrays["top"]).astype(np.float32)).unsqueeze(1)  # (N, 1)
    span = torch.from_numpy(np.asarray(arrays["range"]).astype(np.float32)).unsqueeze(1)  # (N, 1)
    frac = codes.float() / LEVELS  # (N, k)
    lp = torch.where(codes == INVALID, -torch.inf, top - span * frac * frac)  # (N, k)
    ids = torch.from_numpy(np.asarray(arrays["ids"]).astype(np.int64))  # (N, k)
    tail = torch.from_numpy(np.asarray(arrays["tail"]).astype(np.float32))  # (N,)
    return ids, lp, tail


def error_bound(logprobs: torch.Tensor, arrays: dict[str, np.ndarray]) -> torch.Tensor:
    """The documented bound on |decoded − original| per slot: (N, k) fp64 (inf-free for valid slots)."""
    lp = logprobs.double()  # (N, k)
    top = torch.from_numpy(arrays["top"].astype(np.float64)).unsqueeze(1)  # (N, 1)
    span = torch.from_numpy(arrays["range"].astype(np.float64)).unsqueeze(1)  # (N, 1)
    true_top = torch.where(torch.isfinite(lp), lp, -torch.inf).amax(dim=1, keepdim=True)  # (N, 1)
    s = ((top - lp) / span).clamp(0.0, 1.0).sqrt()  # (N, k)
    return span * (2 * s + 1 / (2 * LEVELS)) / (2 * LEVELS) + (top - true_top).abs()
