"""`kdkit plan CONFIG`: peak memory per device of a distill run, before running it.

Shapes come from the model configs alone (models are built on the meta device: parameter counts
are exact, no weights are read). Per device, with W processes (fsdp2 divides the student's
weights, gradients and AdamW state by W and gathers one layer at a time; it shards the online
teacher's weights too, unless a cross-tokenizer teacher, and gathers its root and one layer in
its forward):

    persistent       student weights 4·P_s (fp32 master), AdamW state 8·P_train, teacher weights 4·P_t
                     (online teacher only: frozen, no grads, no optimizer state; fsdp2: ÷W), a runtime
                     allowance
    gradients        4·P_train: persistent under accumulation; else alive from backward to the step
    forward/backward activations b·T·L·(c_h·H + c_i·I + c_a·heads·T)·4 (checkpointing: b·T·L·H·4 +
                     one layer), the teacher's forward (fsdp2: + its gathered root and one layer),
                     logits (dense: ~6 fp32 (N, V); fused: ~5 (chunk, V), the teacher's (N, V) ×2 instead
                     of one of them when fsdp2 shards the teacher),
                     and the head's gradient (written first)
    optimizer step   AdamW's (foreach=False) ~2 temporaries of the largest parameter

The peak is the persistent parts plus the larger of the two phases (zero_grad frees the gradients,
backward frees the activations). b is the per-device micro-batch, T the tokens per example and N
the supervised rows. The activation coefficients are those of a Llama-style block in eager fp32;
`benchmarks/plan_vs_measured.py` compares the estimate with measured peak RSS on CPU runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kdkit.config import Config
from kdkit.errors import UserError
from kdkit.losses.fused import DEFAULT_MEMORY_BUDGET, auto_chunk_size
from kdkit.models import load as M

GIB = 2**30
C_HIDDEN, C_INTER, C_ATTN = 14, 5, 2  # fp32 values saved per token per layer (H-, I-, T-sized)
DENSE_LOGITS = 6  # (N, V) fp32 tensors alive at the dense loss's peak
FUSED_CHUNK = 4  # (chunk, V) fp32 tensors alive in a fused chunk step (measured 3-4 on CPU; fused.py budgets 8)
RUNTIME_BYTES = 64 * 2**20


@dataclass
class Shapes:
    """What the estimate needs of one model."""

    params: int
    layer_params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    largest: int  # elements of the biggest parameter tensor (the embedding, usually)


STEP_PARTS = ("optimizer step",)  # alive only while AdamW steps
PASS_PARTS = ("activations", "teacher forward", "logits", "head gradient")  # alive only in forward/backward


@dataclass
class MemoryPlan:
    """Bytes per device by part. Persistent parts add up; the forward/backward parts and the
    optimizer step's temporaries are never alive together, so the peak takes the larger phase."""

    parts: dict[str, int]
    batch_size: int  # global micro-batch it was made for
    world: int
    chunk_size: int | None
    step_parts: tuple[str, ...] = STEP_PARTS
    notes: list[str] = field(default_factory=list)

    @property
    def phase_peak(self) -> int:
        return max(sum(self.parts.get(k, 0) for k in PASS_PARTS), sum(self.parts.get(k, 0) for k in self.step_parts))

    @property
    def total(self) -> int:
        persistent = sum(v for k, v in self.parts.items() if k not in PASS_PARTS + self.step_parts)
        return persistent + self.phase_peak

    def table(self) -> str:
        def phase(name):
            return (" (forward/backward)" if name in PASS_PARTS else
                    " (optimizer step)" if name in self.step_parts else "")

        rows = [f"| {name}{phase(name)} | {v / GIB:.3f} GiB |" for name, v in self.parts.items()]
        return "\n".join(["| per device | bytes |", "| --- | --- |", *rows,
                          f"| **peak** (persistent + the larger phase) | **{self.total / GIB:.3f} GiB** |"])


def shapes_of(hf_config) -> Shapes:
    """Exact parameter counts of a causal LM built on the meta device (tied weights counted once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    params = sum(p.numel() for p in model.parameters())  # .parameters() yields a tied weight once
    layers = model.get_decoder().layers
    return Shapes(params=params, layer_params=sum(p.numel() for p in layers[0].parameters()),
                  hidden=hf_config.hidden_size, intermediate=getattr(hf_config, "intermediate_size", 4 * hf_config.hidden_size),
                  layers=hf_config.num_hidden_layers, heads=hf_config.num_attention_heads, vocab=hf_config.vocab_size,
                  largest=max(p.numel() for p in model.parameters()))


def model_configs(cfg: Config):
    """(teacher HF config, student HF config) from the kdkit config, reading no weights."""
    from transformers import AutoConfig

    src = M.resolve(cfg.teacher.path, gguf_file=cfg.teacher.gguf_file)
    teacher = AutoConfig.from_pretrained(src.directory, gguf_file=src.gguf_file,
                                         trust_remote_code=cfg.teacher.trust_remote_code)
    sc = cfg.student
    if sc.init == "teacher_layers":
        student = teacher.__class__.from_dict(teacher.to_dict())
        student.num_hidden_layers = len(sc.layers) if sc.layers else min(sc.num_layers or teacher.num_hidden_layers,
                                                                         teacher.num_hidden_layers)
        return teacher, student
    ssrc = M.resolve(sc.path)
    student = AutoConfig.from_pretrained(ssrc.directory, gguf_file=ssrc.gguf_file,
                                         trust_remote_code=cfg.teacher.trust_remote_code)
    for key, value in (sc.config_overrides if sc.init == "config" else {}).items():
        setattr(student, key, value)
    return teacher, student


def activation_bytes(s: Shapes, *, rows: int, seq: int, checkpointing: bool) -> int:
    """Saved-for-backward bytes of the student's decoder for `rows` examples of `seq` tokens."""
    per_layer = rows * seq * (C_HIDDEN * s.hidden + C_INTER * s.intermediate + C_ATTN * s.heads * seq) * 4
    if checkpointing:  # each layer keeps only its input; one layer is recomputed at a time
        return rows * seq * s.hidden * 4 * s.layers + per_layer
    return per_layer * s.layers


def plan_memory(cfg: Config, *, world: int = 1, seq_len: int | None = None, supervised: float | None = None,
                teacher: Shapes | None = None, student: Shapes | None = None,
                trainable: int | None = None) -> MemoryPlan:
    """Peak bytes per device of `kdkit distill` with `cfg` on `world` processes.

    `seq_len`: tokens per example (default data.max_length, an upper bound); `supervised`: supervised
    tokens per example (default seq_len); `trainable`: trained parameters (default: all of the
    student's; LoRA: the adapters')."""
    tc = cfg.train
    if tc.batch_size % world:
        raise UserError(f"train.batch_size={tc.batch_size} (global) does not divide among {world} devices")
    if teacher is None or student is None:
        t_cfg, s_cfg = model_configs(cfg)
        teacher, student = teacher or shapes_of(t_cfg), student or shapes_of(s_cfg)
    b, seq = tc.batch_size // world, seq_len or cfg.data.max_length
    rows = int(b * (supervised or seq))  # N of the (N, V) logits per device
    vocab = min(teacher.vocab, student.vocab)
    trainable = student.params if trainable is None else trainable
    shard = world if tc.distributed == "fsdp2" else 1
    online = cfg.teacher.signal == "online"
    # fsdp2 shards the online teacher too (kdkit/train/dist.py shard_teacher); a cross-tokenizer teacher stays whole
    t_shard = shard if online and not cfg.modes.cross_tokenizer.enabled else 1
    # a sharded teacher's forward gathers its root (embeddings, final norm, head) and one layer at a time
    t_root = teacher.params - teacher.layers * teacher.layer_params
    t_gathered = 4 * (t_root + teacher.layer_params) if t_shard > 1 else 0
    parts = {
        "student weights": 4 * student.params // shard + (4 * student.layer_params if shard > 1 else 0),
        "gradients": 4 * trainable // shard,
        "AdamW state": 8 * trainable // shard,
        "teacher weights": 4 * teacher.params // t_shard if online else 0,
        "activations": activation_bytes(student, rows=b, seq=seq, checkpointing=tc.gradient_checkpointing),
        "teacher forward": b * seq * (4 * teacher.hidden + 2 * teacher.intermediate) * 4 + t_gathered if online else 0,
    }
    chunk = None
    fused = cfg.loss.implementation == "fused" and online
    if fused:
        chunk = min(auto_chunk_size(vocab), rows)
        # the online teacher comes as rows + head (HeadSignal): its logits per chunk, one more (chunk, V) buffer;
        # a sharded teacher (fsdp2) gives its (N, V) logits whole (kdkit/teacher/online.py), + their softmax
        teacher_logits = rows * vocab * 4 * 2 if t_shard > 1 else chunk * vocab * 4
        parts["logits"] = teacher_logits + chunk * vocab * 4 * FUSED_CHUNK
    else:
        parts["logits"] = rows * vocab * 4 * (DENSE_LOGITS if online else 3)
    # AdamW (foreach=False) makes ~2 temporaries of each parameter in turn: the largest one counts
    parts["optimizer step"] = 2 * 4 * (student.largest if trainable == student.params else 0) // shard
    # backward writes the head's gradient first, while the logits and activations are still alive
    parts["head gradient"] = 4 * student.vocab * student.hidden // shard if trainable == student.params else 0
    parts["runtime"] = RUNTIME_BYTES
    # zero_grad(set_to_none): without accumulation the gradients live only from backward to the step
    step_parts = STEP_PARTS + (("gradients",) if tc.grad_accum == 1 else ())
    return MemoryPlan(parts=parts, batch_size=tc.batch_size, world=world, chunk_size=chunk, step_parts=step_parts)


def suggest(cfg: Config, *, device_bytes: int, world: int = 1, seq_len: int | None = None,
            headroom: float = 0.9) -> dict:
    """The largest global micro-batch (a multiple of `world`) whose plan fits `headroom` of the
    device, with grad_accum keeping the step's examples, and the fused loss's chunk rows."""
    t_cfg, s_cfg = model_configs(cfg)
    t, s = shapes_of(t_cfg), shapes_of(s_cfg)
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    best = None
    for b in range(world, max(per_step, world) + 1, world):
        trial = cfg.model_copy(deep=True)
        trial.train.batch_size = b
        if plan_memory(trial, world=world, seq_len=seq_len, teacher=t, student=s).total <= headroom * device_bytes:
            best = b
    vocab = min(t.vocab, s.vocab)
    return {"batch_size": best, "grad_accum": (max(1, -(-per_step // best)) if best else None),
            "chunk_size": auto_chunk_size(vocab, memory_budget_bytes=min(DEFAULT_MEMORY_BUDGET, int(device_bytes * 0.05)))}
