"""Data-parallel training on the one loop: DDP-style replication or FSDP2 sharding of the student
(and of the frozen online teacher).

Started by `torchrun` or `accelerate launch` (both set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*),
a run initialises the process group from the environment (gloo on CPU, nccl on CUDA). The rules:

- `train.batch_size` is the GLOBAL micro-batch: `micro_batches(step)` stays a pure function of the
  step and every rank takes its contiguous slice of each micro-batch, so a run on N processes sees
  the examples of a run on 1 process, and resume is exact at any world size.
- Every loss is normalised by the supervised-token count of the whole step on every rank (an
  all-reduced sum), so gradients SUMMED over ranks are the full-batch gradient.
- ddp: the student is replicated; gradients are all-reduced (sum) once per optimizer step, after
  the accumulation (DDP with `no_sync` over the micro-batches). Not torch's DDP wrapper: the fused
  loss and the plugins call the decoder and the head directly, never the wrapped forward.
- fsdp2: every decoder layer and the student are `fully_shard`ed; the loss is scaled by the world
  size before backward, undoing the reduce-scatter's average. The student's root (embeddings, final
  norm, head) stays gathered from its forward to its backward, so the loss, dense or fused, uses the
  head after the decoder and its gradient is reduce-scattered with the rest. Parameters outside the
  shards (plugin projectors, learned loss weights, per-head q/k norms) are replicated: their
  gradients are summed over ranks like ddp's (`sync_grads`), and `clip_grad_norm` combines both
  kinds into the one global norm.
- The online teacher is frozen (requires_grad=False, run under no_grad, never in the optimizer).
  ddp/none: replicated on every device. fsdp2 (`shard_teacher`): sharded like the student, each
  decoder layer gathered for its forward and freed after it. Its embeddings, final norm and head
  belong to a `RootCall` root: `decoder_hidden(root)` runs through the root's forward, which gathers
  them (the root, `reshard_after_forward=False`, keeps them gathered after it), and `project(root,
  rows)` then calls the gathered head, whose forward hook reshards the root (frees them) until the
  next micro-batch. So at rest every rank holds 1/world of the teacher; at peak, its embeddings and
  head plus one layer. `train.teacher_offload` keeps the shards in CPU memory (CPUOffloadPolicy: each
  group is copied to the GPU as it is gathered); on a CPU-only run it has nothing to do.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from kdkit.errors import UserError
from kdkit.train.checkpoint import load_latest, save_checkpoint
from kdkit.train.checkpoint_dcp import load_sharded_latest, save_sharded

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """Where this process stands: mode (none, ddp, fsdp2), rank and world size."""

    mode: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_mode(requested: str) -> str:
    """train.distributed → the mode of this process (auto: ddp under a launcher with WORLD_SIZE > 1)."""
    world = env_world_size()
    if requested == "auto":
        return "ddp" if world > 1 else "none"
    if requested in ("ddp", "fsdp2") and world == 1 and not dist.is_initialized():
        if requested == "fsdp2":
            return "fsdp2"  # a one-process FSDP2 group is valid (and what resume tests compare)
        return "none"
    if requested == "none" and world > 1:
        raise UserError(f"train.distributed=none but WORLD_SIZE={world}: every process would train alone. "
                        "Use train.distributed=auto|ddp|fsdp2 or launch one process")
    return requested


def init(requested: str) -> DistContext:
    """Initialise (once) the process group the launcher describes; a no-op for one process."""
    mode = resolve_mode(requested)
    if mode == "none":
        return DistContext()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistContext(mode=mode, rank=dist.get_rank(), world=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def finish(ctx: DistContext) -> None:
    """Wait for every rank, then tear the process group down."""
    if ctx.mode != "none" and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.mode != "none":
        dist.barrier()


def _comm_device(ctx: DistContext) -> torch.device:
    return torch.device("cuda", ctx.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a list of floats (float64, so token counts stay exact)."""
    if ctx.mode == "none":
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_rank(ctx: DistContext, flag: bool) -> bool:
    """True on every rank when it is true on one (a SIGTERM reaches the ranks at different times)."""
    return bool(all_sum(ctx, [float(flag)])[0]) if ctx.mode != "none" else flag


def shard_batch(batch: dict, ctx: DistContext) -> dict:
    """This rank's contiguous slice of a global micro-batch (tensors along dim 0, and the ids)."""
    if not ctx.active:
        return batch
    n = len(batch["ids"])
    if n % ctx.world:
        raise UserError(f"train.batch_size={n} is the global micro-batch and must divide among "
                        f"{ctx.world} processes; use a multiple of {ctx.world}")
    per = n // ctx.world
    lo, hi = ctx.rank * per, (ctx.rank + 1) * per
    return {k: (v[lo:hi] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}


def reduce_metrics(ctx: DistContext, out: dict) -> dict:
    """Sum this step's metrics over ranks: each rank's loss is its share of the global mean."""
    if not ctx.active:
        return out
    keys = [k for k, v in out.items() if isinstance(v, (int, float)) and k != "supervised_tokens"
            and not k.startswith("weight/")]
    summed = all_sum(ctx, [float(out[k]) for k in keys])
    for k, v in zip(keys, summed):
        v = v / ctx.world if k.startswith("mode/") else v  # per-rank means (training modes' reports)
        out[k] = int(v) if isinstance(out[k], int) else v
    return out


def broadcast_params(ctx: DistContext, model: torch.nn.Module) -> None:
    """Start every replica from rank 0's weights (ddp)."""
    if ctx.mode == "ddp" and ctx.active:
        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)


def sync_grads(ctx: DistContext, model: torch.nn.Module) -> None:
    """Sum every replicated gradient over ranks, in one flat buffer per dtype, once per optimizer
    step (ddp: all of them; fsdp2: those outside the shards, e.g. plugin projectors, learned loss
    weights, per-head q/k norms). fsdp2 scaled the loss by `grad_scale` for its reduce-scatter: the
    replicated gradients are divided by it again, so they too are the full-batch gradient."""
    if ctx.mode == "none" or not ctx.active:
        return
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]
    scale = grad_scale(ctx)
    for p in params:
        if p.grad is None:  # every rank must reduce the same buffers
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])  # (Σ numel,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if scale != 1.0:
            flat /= scale
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_grad_norm(params, max_norm: float, *, fold_into: torch.optim.Optimizer | None = None) -> torch.Tensor | float:
    """Clip the gradients to `max_norm` (inf: measure only); returns the global L2 norm before
    clipping: one process or ddp, a () tensor (not read here: the loop reads it with the step's
    metrics, one host sync); fsdp2, a float. Under fsdp2 a gradient is either a DTensor shard (its norm reduced over the ranks) or
    a replicated tensor, equal on every rank after `sync_grads` (counted once): torch's
    clip_grad_norm_ refuses such a mix, so the two kinds are measured apart and combined.

    `fold_into`: a fused optimizer about to step (one process or ddp). The clip is then left to it: its
    kernel divides each gradient by `grad_scale` as it reads it (the attribute GradScaler sets), so the
    gradients are not multiplied in a pass of their own (64 M fp32 of them in the quickstart: ~6 ms of its
    CPU step). The caller steps, then drops `grad_scale`. Same update as clipping first, to rounding."""
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if not sharded:  # one process, ddp (replicated, synced)
        if math.isinf(max_norm):
            return torch.nn.utils.get_total_norm(grads)  # clip_grad_norm_ would multiply every gradient by 1
        if fold_into is not None and fold_into.defaults.get("fused"):
            norm = torch.nn.utils.get_total_norm(grads)
            # g / max(1, (‖g‖ + 1e-6) / max_norm) = g · min(1, max_norm / (‖g‖ + 1e-6)): clip_grad_norm_'s formula
            fold_into.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)
            return norm
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    whole = [g for g in grads if not isinstance(g, DTensor)]
    sq = torch.nn.utils.get_total_norm(sharded).full_tensor().double() ** 2  # full_tensor: over every shard
    if whole:
        sq = sq + torch.nn.utils.get_total_norm(whole).to(sq.device).double() ** 2
    norm = float(sq.sqrt())
    coef = max_norm / (norm + 1e-6)  # torch's clip_grad_norm_ formula
    if coef < 1.0:  # a non-finite norm is not clipped: that step is skipped
        for g in grads:
            g.mul_(coef)  # a Python float: fine for DTensor and tensor alike
    return norm


def decoder_layers(student: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (the units FSDP2 shards and checkpointing recomputes)."""
    layers = getattr(student.get_decoder(), "layers", None)
    if layers is None:
        raise UserError(f"{type(student).__name__}: no decoder `.layers` to shard; use train.distributed=ddp")
    return list(layers)


class RootCall(torch.nn.Module):
    """The FSDP2 root around the student: its decoder is called through `self(...)`, so the root's
    hooks gather the embeddings, final norm and head, and the layers' hooks gather each block."""

    def __init__(self, student: torch.nn.Module, *, head_gathered: bool = False):
        super().__init__()
        self.student = student
        self.config = student.config
        # the root keeps its parameters gathered from its forward to its backward (reshard_after_forward=False),
        # so after `self(...)` the head's weight is a plain full Parameter the fused loss can use
        self.head_gathered = head_gathered

    def forward(self, **kwargs):
        return self.student.get_decoder()(**kwargs)

    def get_decoder(self):
        return self

    def get_output_embeddings(self):
        return self.student.get_output_embeddings()


def shard_student(ctx: DistContext, student: torch.nn.Module) -> torch.nn.Module:
    """fsdp2: fully_shard every decoder layer, then the root; returns the module to call and train."""
    from torch.distributed.fsdp import fully_shard

    if hasattr(student, "peft_config"):
        raise UserError("student.lora with train.distributed=fsdp2 is not supported; use ddp (adapters are small)")
    for layer in decoder_layers(student):
        whole = _per_head_norms(layer)  # whole on every rank, trained as replicated params (sync_grads)
        fully_shard(layer, **({"ignored_params": whole} if whole else {}))
    # the root (embeddings, final norm, head) stays gathered after its forward: the loss calls the head
    # (dense) or multiplies by its weight (fused) after the decoder; its backward would gather it again anyway
    return fully_shard(RootCall(student, head_gathered=True), reshard_after_forward=False)


def head_gathered(model: torch.nn.Module) -> bool:
    """Whether `model` is a sharded student whose head weight is a plain full Parameter after its forward."""
    return bool(getattr(model, "head_gathered", False))


def _per_head_norms(layer: torch.nn.Module) -> set[torch.nn.Parameter]:
    """The per-head q/k norms of a layer (Qwen3, OLMo-2): attention distillation applies them to the
    captured q/k after the forward (kdkit/models/capture.py), when a sharded copy would be unusable."""
    attn = getattr(layer, "self_attn", None)
    return {p for name in ("q_norm", "k_norm") if (m := getattr(attn, name, None)) is not None for p in m.parameters()}


def shard_teacher(ctx: DistContext, teacher: torch.nn.Module, *, offload: bool = False) -> torch.nn.Module:
    """fsdp2: fully_shard every teacher decoder layer, then a `RootCall` root; returns the module the
    online signal calls (`decoder_hidden`, `project`). `offload`: shards in CPU memory (CUDA only)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    if offload and _comm_device(ctx).type != "cuda":
        if ctx.main:  # once per run
            log.warning("train.teacher_offload has no effect on a CPU-only run: the teacher's shards are in CPU "
                        "memory already")
        offload = False
    policy = {"offload_policy": CPUOffloadPolicy()} if offload else {}
    for layer in decoder_layers(teacher):
        whole = _per_head_norms(layer)  # a few head_dim vectors, whole on every rank
        for p in whole:
            p.data = p.data.to(_comm_device(ctx))  # FSDP2 leaves its ignored parameters where they are
        fully_shard(layer, reshard_after_forward=True,  # forward only: free each layer after it
                    **({"ignored_params": whole} if whole else {}), **policy)
    # the root keeps the embeddings/norm/head gathered after its forward: `project` needs the head then
    root = fully_shard(RootCall(teacher).eval(), reshard_after_forward=False, **policy)
    # `project` calls the head after the root's forward: free the gathered embeddings/norm/head right after
    # (reset_iter_state also drops FSDP's per-forward bookkeeping, which only a backward would clear)
    release = getattr(root, "reset_iter_state", root.reshard)  # older torch: reshard() alone
    teacher.get_output_embeddings().register_forward_hook(lambda module, args, output: release())
    for p in root.parameters():
        p.requires_grad_(False)  # frozen: no gradients, never in an optimizer
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in root.parameters())
    log.info("teacher sharded over %d processes%s: %d of %d parameter elements on rank %d", ctx.world,
             " (CPU-offloaded)" if offload else "", local, sum(p.numel() for p in root.parameters()), ctx.rank)
    return root


def check_teacher_offload(ctx: DistContext, tc) -> None:
    if tc.teacher_offload and ctx.mode != "fsdp2":
        raise UserError(f"train.teacher_offload=true needs train.distributed=fsdp2 (this run is {ctx.mode!r}): only "
                        "a sharded teacher can keep its shards in CPU memory; set it to false or use fsdp2")


def prepare_teacher(teacher: torch.nn.Module, ctx: DistContext, tc, device) -> torch.nn.Module:
    """The frozen online teacher on this run's device: the module the signal calls (fsdp2: sharded)."""
    check_teacher_offload(ctx, tc)
    if ctx.mode == "fsdp2":
        return shard_teacher(ctx, teacher, offload=tc.teacher_offload)
    return teacher.to(device)


def grad_scale(ctx: DistContext) -> float:
    """What a rank's loss is multiplied by before backward: FSDP2's reduce-scatter AVERAGES over
    ranks, while each rank's loss is its share of the global mean (a sum is due). A divide factor
    of 1 would need PREMUL_SUM, which gloo lacks; for 2^n ranks the scaling is exact."""
    return float(ctx.world) if ctx.mode == "fsdp2" else 1.0


def full_state(ctx: DistContext, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fsdp2: the whole (unsharded) state dict on CPU, on rank 0 (empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def checkpointing(ctx: DistContext, ckpt_dir: Path, *, model, opt, sched, keep: int):
    """(save(step), load() -> step or None) for this run's mode: one process or ddp rank 0 writes the
    atomic single-file checkpoint (every ddp rank reads it); fsdp2 ranks write and read DCP shards."""
    parts = dict(model=model, optimizer=opt, scheduler=sched)
    if ctx.mode == "fsdp2":
        return (lambda step: save_sharded(ckpt_dir, step, keep=keep, **parts),
                lambda: load_sharded_latest(ckpt_dir, **parts))

    def save(step: int):
        if ctx.main:
            save_checkpoint(ckpt_dir, step, keep=keep, **parts)
        barrier(ctx)

    return save, lambda: load_latest(ckpt_dir, **parts)


def prepare_student(student, ctx: DistContext, tc, device):
    """Checkpointing switch, device, and the FSDP2 shards: returns the module the step calls."""
    check_teacher_offload(ctx, tc)
    if tc.gradient_checkpointing:  # recompute each layer in backward; no KV cache while training
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5 names it so
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.to(device)
    return shard_student(ctx, student) if ctx.mode == "fsdp2" else student


def plain_student(ctx: DistContext, student, runner):
    """The trained student as an ordinary module on rank 0 (FSDP2: gathered from every shard)."""
    if ctx.mode != "fsdp2":
        return student if ctx.main else None
    state = full_state(ctx, runner)  # a collective: every rank takes part
    if not ctx.main:
        return None
    plain = type(student)(student.config)  # the shards live in RootCall's tree; this class is plain
    state = {k.removeprefix("student."): v for k, v in state.items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if unexpected or {m for m in missing if not m.endswith("lm_head.weight")}:
        raise RuntimeError(f"gathered state does not fit the student: {missing} {unexpected}")
    return plain.eval()
