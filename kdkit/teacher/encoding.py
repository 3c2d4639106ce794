"""The compact on-disk encoding of top-k teacher signals: k·(b + 1) + 6 bytes per token.

Per supervised token, with the k log-probs lp_1 … lp_k (valid ones finite, invalid ones -inf):

- ids      k token ids in b = `id_bytes(vocab)` bytes each, lossless: uint16 (b = 2) when the
           vocabulary has at most 2^16 entries, 3 little-endian bytes (an (N, k, 3) uint8 array) up
           to 2^24, else uint32. Caches of format v1 stored uint32 above 2^16; `decode` reads both.
- top      fp16: M = the largest valid log-prob, rounded to nearest.
- range    fp16: R = M − (smallest valid log-prob), rounded UP (so every valid lp lies in [M − R, M]);
           capped at 65504 (fp16's largest): log-probs further below M than that are stored as M − R.
- codes    k × uint8: c = round(254 · sqrt((M − lp) / R)) in 0…254, finer near the top where the
           probability mass is; 255 marks an invalid slot (-inf). Decoded lp' = M − R · (c / 254)².
- tail     fp16: the log of the mass outside the top k (-inf when there is none), rounded to nearest.

Error bound (tested): with s = sqrt((M − lp)/R), |lp' − lp| ≤ R · (2s + 1/508) / 508 + |M − fp16(M)|:
about R / 258064 at the top (s = 0) and at most R · 2.002 / 508 ≈ R / 254 at the bottom (s = 1); the
fp16 rounding of M is at most 2⁻¹¹·|M|. The tail's error is at most 2⁻¹¹·|tail| (fp16 rounding).
At k = 64: 128 + 64 + 6 = 198 bytes per token below 2^16 entries (SmolLM2's 49,152), 192 + 64 + 6 =
262 up to 2^24 (Llama 3's 128,256, Qwen2.5's 151,936, Gemma 3's 262,144).
"""

from __future__ import annotations

import numpy as np
import torch

INVALID = 255  # the code of a -inf (invalid) slot
LEVELS = 254  # codes 0 … 254 carry values
FP16_MAX = float(np.finfo(np.float16).max)

DESCRIPTION = (
    "ids: uint16 if vocab <= 2^16, 3 little-endian bytes (uint8 (N, k, 3)) if <= 2^24, else uint32 "
    "(lossless); top: fp16 max log-prob; range: fp16 "
    "(rounded up, <= 65504); codes: uint8 c = round(254*sqrt((top - lp)/range)), 255 = -inf, "
    "decoded lp = top - range*(c/254)^2; tail: fp16 log of the mass outside the top k"
)


def id_bytes(vocab: int) -> int:
    """Bytes per stored token id: the fewest of 2, 3 or 4 that hold every id below `vocab`."""
    return 2 if vocab <= 1 << 16 else 3 if vocab <= 1 << 24 else 4


def bytes_per_token(k: int, vocab: int) -> int:
    """Encoded bytes per supervised token: ids, codes, top, range and tail."""
    return k * (id_bytes(vocab) + 1) + 3 * 2


def pack_ids(ids: np.ndarray, vocab: int) -> np.ndarray:
    """Token ids (N, k), each in [0, vocab) → uint16 (N, k), uint8 (N, k, 3) little-endian, or uint32 (N, k)."""
    width = id_bytes(vocab)
    if width == 3:
        wide = ids.astype("<u4")  # (N, k) little-endian: its low 3 bytes are the id's
        return wide[..., None].view(np.uint8)[..., :3].copy()  # (N, k, 4) bytes → (N, k, 3)
    return ids.astype(np.uint16 if width == 2 else np.uint32)


def unpack_ids(stored: np.ndarray) -> np.ndarray:
    """The inverse of `pack_ids` (and v1's uint16/uint32 ids): → int64 (N, k)."""
    stored = np.asarray(stored)
    if stored.dtype == np.uint8 and stored.ndim == 3:  # (N, k, 3) little-endian bytes
        b = stored.astype(np.int64)
        return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)  # (N, k)
    return stored.astype(np.int64)


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
        "ids": pack_ids(ids.detach().cpu().numpy(), vocab),  # (N, k) or (N, k, 3)
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
    ids = torch.from_numpy(unpack_ids(arrays["ids"]))  # (N, k)
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
