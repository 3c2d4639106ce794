"""Direct preference optimisation (DPO) of the student against a frozen reference, as plain functions.

The loss matches TRL's `DPOTrainer` (loss_type="sigmoid"): a sequence's log-probability is the SUM
of its completion tokens' log-probs (the prompt masked), the margin is
(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)), and the loss per pair is
−(1 − ε)·log σ(β·margin) − ε·log σ(−β·margin) (ε: label smoothing, cDPO), averaged over pairs.

`optimize` is the small loop every preference objective here shares (DPO, the reward model, RL):
a `step_fn(step)` does one step's forward/backward and returns its metrics; checkpoints, resume,
the optimizer and schedule, non-finite handling, preemption and metrics come from `kdkit.train`.
"""

from __future__ import annotations

import copy
import logging
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kdkit.config import Config, TrainConfig, save_config
from kdkit.data.collate import batch_order
from kdkit.data.preference import PairData, pair_batch
from kdkit.models import load as M
from kdkit.models.attention import train_attention
from kdkit.models.sequence import sequence_logps
from kdkit.train.checkpoint import load_latest, save_checkpoint
from kdkit.train.loop import Preemption, SaveCadence, autocast, optimizer_step, pick_device
from kdkit.train.metrics import MetricsWriter
from kdkit.train.optim import build_optimizer
from kdkit.train.setup import build_student, load_teacher

log = logging.getLogger(__name__)


def default_pairs_path(cfg: Config) -> Path:
    """preference.pairs, or RUN_DIR/data/pairs.jsonl (where `kdkit feedback` writes)."""
    return Path(cfg.preference.pairs) if cfg.preference.pairs else Path(cfg.run.dir) / "data" / "pairs.jsonl"


def setup_policy(cfg: Config, teacher=None):
    """Shared start of `kdkit dpo` and `kdkit rl`: (run_dir, teacher, student, tokenizer, init, device,
    frozen reference), with the resolved config saved in the run directory."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.run.dir)
    save_config(cfg, run_dir / "config.yaml")
    teacher = teacher or load_teacher(cfg)
    student, tok, init = build_student(cfg, teacher)
    device = pick_device(cfg.train.device)
    student.to(device)
    return run_dir, teacher, student, tok, init, device, build_reference(cfg, student).to(device)


def build_reference(cfg: Config, student) -> torch.nn.Module:
    """The frozen reference: a copy of the starting student, or the model preference.reference names."""
    ref = cfg.preference.reference
    if ref == "student":
        model = copy.deepcopy(student)
    else:
        model = M.load_model(M.resolve(ref), trust_remote_code=cfg.teacher.trust_remote_code)
    return M.freeze(model)


def card_section(cfg: Config, *, method: str, results: dict) -> str:
    """Model-card lines for a preference-trained student: the method, its settings and its results."""
    pc = cfg.preference
    lines = ["## Feedback distillation", "", f"- **Method:** {method}",
             f"- **Preferences:** `{default_pairs_path(cfg)}` (teacher scorer: {pc.scorer})",
             f"- **Reference:** {pc.reference} (frozen)"]
    lines += [f"- **{k}:** {v:.4g}" if isinstance(v, float) else f"- **{k}:** {v}" for k, v in results.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the math


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float, label_smoothing: float = 0.0):
    """Per-pair sigmoid DPO losses (B,), and the implicit rewards β·(log π − log π_ref) of each side (B,).

    Inputs are summed completion log-probs per sequence (B,)."""
    chosen_ratio = policy_chosen - ref_chosen  # (B,)
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    logits = beta * (chosen_ratio - rejected_ratio)  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of a `pair_batch` (chosen rows, then rejected): (B,), (B,)."""
    sums, _ = sequence_logps(model, batch)  # (2B,)
    return sums.chunk(2)


def pair_indices(n: int, step: int, *, batch_size: int, grad_accum: int, seed: int) -> list[list[int]]:
    """Pair indices of each micro-batch of `step`: a pure function of (step, seed), so a resumed run
    sees exactly the pairs an uninterrupted one would (as `kdkit.train.loop.micro_batches`)."""
    out = []
    for m in range(grad_accum):
        ks = [step * batch_size * grad_accum + m * batch_size + j for j in range(batch_size)]
        out.append([batch_order(n, seed=seed, epoch=k // n)[k % n] for k in ks])
    return out


@torch.no_grad()
def evaluate_pairs(model, data: PairData, *, pad_id: int, batch_size: int = 8) -> dict:
    """Mean log π(chosen) − log π(rejected) over the pairs, and the share where it is > 0."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    margins = []
    for start in range(0, len(data.ids), batch_size):
        idx = list(range(start, min(start + batch_size, len(data.ids))))
        batch = {k: v.to(device) for k, v in pair_batch(data, idx, pad_id=pad_id).items()}
        chosen, rejected = pair_logps(model, batch)
        margins.append(chosen - rejected)
    model.train(was_training)
    m = torch.cat(margins)
    return {"margin": float(m.mean()), "accuracy": float((m > 0).float().mean())}


# ---------------------------------------------------------------- one DPO step


def dpo_step(policy, reference, data: PairData, step: int, *, pc, tc: TrainConfig, pad_id: int, device) -> dict:
    """Forward/backward of one optimizer step over its micro-batches; the loss is the mean over all
    the step's pairs (each micro-batch's sum is divided by the step's pair count: accum-invariant)."""
    micro = pair_indices(len(data.ids), step, batch_size=tc.batch_size, grad_accum=tc.grad_accum, seed=tc.seed)
    total_pairs = sum(len(i) for i in micro)
    m = {"loss": 0.0, "reward_chosen": 0.0, "reward_rejected": 0.0, "reward_margin": 0.0, "accuracy": 0.0,
         "logps_chosen": 0.0, "logps_rejected": 0.0, "ids": []}
    for idx in micro:
        batch = {k: v.to(device) for k, v in pair_batch(data, idx, pad_id=pad_id).items()}
        with autocast(device, tc.precision):
            with torch.no_grad():
                ref_c, ref_r = pair_logps(reference, batch)
            pol_c, pol_r = pair_logps(policy, batch)
            losses, rew_c, rew_r = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=pc.beta,
                                            label_smoothing=pc.label_smoothing)
        (losses.sum() / total_pairs).backward()
        m["loss"] += float(losses.detach().sum()) / total_pairs
        m["reward_chosen"] += float(rew_c.sum()) / total_pairs
        m["reward_rejected"] += float(rew_r.sum()) / total_pairs
        m["reward_margin"] += float((rew_c - rew_r).sum()) / total_pairs
        m["accuracy"] += float((rew_c > rew_r).float().sum()) / total_pairs
        m["logps_chosen"] += float(pol_c.detach().sum()) / total_pairs
        m["logps_rejected"] += float(pol_r.detach().sum()) / total_pairs
        m["ids"] += [data.ids[i] for i in idx]
    return m


def train_dpo(policy, reference, data: PairData, cfg: Config, *, run_dir: Path, pad_id: int,
              resume: bool = False) -> list[dict]:
    """DPO for cfg.train.max_steps steps; `reference` stays frozen. Returns the per-step metrics."""
    device = next(policy.parameters()).device
    reference.requires_grad_(False).eval()
    step_fn = partial(dpo_step, policy, reference, data, pc=cfg.preference, tc=cfg.train, pad_id=pad_id,
                      device=device)
    return optimize(policy, step_fn, cfg.train, run_dir=run_dir, resume=resume, desc="dpo")


# ---------------------------------------------------------------- the shared loop


def optimize(model: torch.nn.Module, step_fn: Callable[[int], dict], tc: TrainConfig, *, run_dir: Path,
             resume: bool = False, desc: str = "train") -> list[dict]:
    """tc.max_steps optimizer steps of `step_fn` on `model`, checkpointed in RUN_DIR/checkpoints and
    logged to RUN_DIR/metrics.jsonl; with `resume`, continues from the newest whole checkpoint."""
    train_attention(model)
    model.train()
    opt, sched = build_optimizer(model, tc)
    ckpt_dir = run_dir / "checkpoints"
    save = partial(save_checkpoint, ckpt_dir, model=model, optimizer=opt, scheduler=sched, keep=tc.keep_checkpoints)
    start = 0
    restored = load_latest(ckpt_dir, model=model, optimizer=opt, scheduler=sched) if resume else None
    if restored is not None:
        start = restored[0]
    else:
        torch.manual_seed(tc.seed)
    writer = MetricsWriter(run_dir, start_step=start)
    checkpoint_due = SaveCadence(tc)
    history, bad_in_a_row = [], 0
    bar = tqdm(range(start, tc.max_steps), initial=start, total=tc.max_steps, desc=desc, unit="step")
    with Preemption() as preempt:
        for step in bar:
            m = step_fn(step)
            ids = m.pop("ids", [])
            stepped = optimizer_step(model, opt, sched, m, tc, step=step + 1, ids=ids)
            bad_in_a_row = 0 if stepped else bad_in_a_row + 1
            if bad_in_a_row >= tc.max_bad_steps:
                raise FloatingPointError(f"{bad_in_a_row} non-finite steps in a row (train.max_bad_steps); "
                                         "lower the learning rate or check the data")
            m.update(step=step + 1, skipped=not stepped)
            history.append(m)
            bar.set_postfix(loss=f"{m['loss']:.3f}")
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.max_steps:
                writer.write(m)
            if preempt.requested:
                save(step + 1)
                writer.close()
                log.warning("preempted: checkpoint at step %d written; rerun with --resume", step + 1)
                raise SystemExit(143)
            if checkpoint_due(step + 1):
                save(step + 1)
    if start < tc.max_steps or not restored:
        save(tc.max_steps)
    writer.close()
    model.eval()
    return history
