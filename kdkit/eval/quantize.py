"""Weight-only quantization after distillation, on CPU: int8 per channel and int4 per group.

- int8: one symmetric scale per output row; bf16 activations run on torch's int8 weight-only kernel
  (`aten._weight_int8pack_mm`, the one gpt-fast/torchao use); fp32 ones dequantize the weight
  (measured here: that kernel is ~9x slower than dequantize + matmul for fp32 inputs on CPU).
- int4: one symmetric scale per group of `group_size` input columns, two values packed per byte,
  dequantized on the fly (a size and quality measurement: there is no fast int4 CPU kernel here).

Embeddings are quantized too (they are half of a small LM); a tied head shares the embedding's
quantized tensors, so tying survives. `model_bytes` counts what the model holds in memory.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

BITS = (8, 4)


def _quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales): int8 (out, in) + (out,) for 8 bits; packed uint8 (out, in/2) + (out, in/g) for 4."""
    w = w.detach().float()
    if bits == 8:
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale
    out, inp = w.shape
    groups = w.view(out, inp // group_size, group_size)  # (out, G, g)
    scale = groups.abs().amax(dim=2).clamp(min=1e-12) / 7  # (out, G)
    q = torch.round(groups / scale[..., None]).clamp(-8, 7).to(torch.int16) + 8  # 0..15, (out, G, g)
    q = q.view(out, inp).to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale  # low nibble: even column, high nibble: odd column


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int, dtype) -> torch.Tensor:
    if bits == 8:
        return codes.to(dtype) * scale[:, None].to(dtype)
    low, high = (codes & 0x0F).to(torch.int16) - 8, (codes >> 4).to(torch.int16) - 8
    q = torch.stack((low, high), dim=-1).view(codes.shape[0], -1)  # (out, in), columns interleaved back
    out, inp = q.shape
    groups = q.view(out, scale.shape[1], -1).to(dtype) * scale[..., None].to(dtype)  # (out, G, g)
    return groups.view(out, inp)


class QuantLinear(nn.Module):
    def __init__(self, codes, scale, bits: int, bias=None):
        super().__init__()
        self.bits, self.out_features = bits, codes.shape[0]
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 8 and x.dtype == torch.bfloat16 and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            flat = x.reshape(-1, x.shape[-1]).contiguous()  # (N, in)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.codes, self.scale.to(x.dtype)).view(*x.shape[:-1], -1)
        else:
            y = nn.functional.linear(x, _dequantize(self.codes, self.scale, self.bits, x.dtype))
        return y if self.bias is None else y + self.bias


class QuantEmbedding(nn.Module):
    def __init__(self, codes, scale, bits: int):
        super().__init__()
        self.bits = bits
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = ids.reshape(-1)
        codes, scale = self.codes[rows], self.scale[rows]  # only the looked-up rows are dequantized
        return _dequantize(codes, scale, self.bits, torch.float32).view(*ids.shape, -1)


def quantize_weights(model: nn.Module, *, bits: int = 8, group_size: int = 32) -> nn.Module:
    """A copy of `model` with every Linear and Embedding weight quantized (norms stay float)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    model = copy.deepcopy(model).float().eval()
    done: dict[int, tuple] = {}  # id(weight) → (codes, scale): tied weights are quantized once, shared

    def codes_for(weight):
        if id(weight) not in done:
            if bits == 4 and weight.shape[1] % group_size:
                raise ValueError(f"int4 needs input sizes divisible by group_size={group_size}: {tuple(weight.shape)}")
            done[id(weight)] = _quantize(weight, bits, group_size)
        return done[id(weight)]

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            new = QuantLinear(*codes_for(module.weight), bits, bias=module.bias)
        elif isinstance(module, nn.Embedding):
            new = QuantEmbedding(*codes_for(module.weight), bits)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of the distinct tensors (parameters and buffers) a model holds; shared storage counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
