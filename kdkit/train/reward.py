"""A reward model trained on the teacher's preferences, and policy optimisation of the student.

- `RewardModel`: a copy of the student's decoder with a scalar head on the mean of the answer's
  hidden states (the answer = positions whose labels are not -100); trained with the Bradley–Terry
  loss −log σ(r(chosen) − r(rejected)).
- `rl_step`: GRPO-style policy gradient. Each prompt is answered `group` times by the current
  policy; rewards are normalised within each group (advantage = (r − mean) / (std + 1e-4)); the loss
  per answer is the mean over its tokens of −A·log π(token) + kl_coef·k3, where
  k3 = exp(log π_ref − log π) − (log π_ref − log π) − 1 ≥ 0 is the per-token KL(π ‖ π_ref) estimate
  GRPO uses. The reward is any `reward_fn(batch) -> (B,)`: this reward model, or the teacher's mean
  log-likelihood (handed in by the recipe: train never calls the teacher itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit.data.preference import PairData, completion_batch, pair_batch
from kdkit.models.forward import decoder_hidden
from kdkit.models.sequence import id_seed, sample_completions, token_logps
from kdkit.train.preference import pair_indices


class RewardModel(torch.nn.Module):
    """Scalar reward of an answer: decoder (B, T, H) → masked mean over answer tokens (B, H) → (B,)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone  # a causal LM (a copy of the student); its lm_head is unused
        self.head = torch.nn.Linear(backbone.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)  # every answer starts at reward 0: chance ranking
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict) -> torch.Tensor:
        hidden = decoder_hidden(self.backbone, batch["input_ids"], batch["attention_mask"])  # (B, T, H)
        mask = (batch["labels"] != -100).to(hidden.dtype)[..., None]  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
        return self.head(pooled).squeeze(-1)  # (B,)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair −log σ(r_c − r_r) (B,): the negative log-likelihood of the preference."""
    return -F.logsigmoid(chosen - rejected)


def reward_step(rm: RewardModel, data: PairData, step: int, *, tc, pad_id: int, device) -> dict:
    """One optimizer step of Bradley–Terry over its micro-batches (mean over the step's pairs)."""
    micro = pair_indices(len(data.ids), step, batch_size=tc.batch_size, grad_accum=tc.grad_accum, seed=tc.seed)
    total = sum(len(i) for i in micro)
    m = {"loss": 0.0, "accuracy": 0.0, "ids": []}
    for idx in micro:
        batch = {k: v.to(device) for k, v in pair_batch(data, idx, pad_id=pad_id).items()}
        chosen, rejected = rm(batch).chunk(2)  # (B,), (B,)
        losses = bradley_terry_loss(chosen, rejected)
        (losses.sum() / total).backward()
        m["loss"] += float(losses.detach().sum()) / total
        m["accuracy"] += float((chosen > rejected).float().sum()) / total
        m["ids"] += [data.ids[i] for i in idx]
    return m


@torch.no_grad()
def reward_accuracy(rm: RewardModel, data: PairData, *, pad_id: int, batch_size: int = 8) -> float:
    """Share of pairs the reward model ranks as the teacher did (chosen above rejected)."""
    rm.eval()
    device = next(rm.parameters()).device
    right = 0
    for start in range(0, len(data.ids), batch_size):
        idx = list(range(start, min(start + batch_size, len(data.ids))))
        chosen, rejected = rm({k: v.to(device) for k, v in pair_batch(data, idx, pad_id=pad_id).items()}).chunk(2)
        right += int((chosen > rejected).sum())
    return right / len(data.ids)


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(P·G,) rewards, G per prompt consecutive → (P·G,) advantages normalised within each group."""
    r = rewards.view(-1, group)  # (P, G)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + 1e-4)).view(-1)


def rl_step(policy, reference, prompts: list[list[int]], reward_fn, *, group: int, max_new_tokens: int,
            temperature: float, top_p: float, kl_coef: float, pad_id: int, eos_id: int, seed: int) -> dict:
    """Sample `group` answers per prompt from the policy, score them, and backward the GRPO loss."""
    device = next(policy.parameters()).device
    policy.eval()  # sampling: no dropout
    completions = [c for i, p in enumerate(prompts)
                   for c in sample_completions(policy, p, n=group, max_new_tokens=max_new_tokens,
                                               temperature=temperature, top_p=top_p, pad_id=pad_id,
                                               eos_id=eos_id, seed=id_seed(f"{seed}/{i}"))]
    policy.train()
    batch = completion_batch([p for p in prompts for _ in range(group)], completions, pad_id=pad_id)
    batch = {k: v.to(device) for k, v in batch.items()}  # (P·G, T)
    with torch.no_grad():
        rewards = reward_fn(batch).float()  # (P·G,)
        ref_logps, _ = token_logps(reference, batch)  # (N,)
    advantages = group_advantages(rewards, group)  # (P·G,)
    logps, rows = token_logps(policy, batch)  # (N,), (N,)
    diff = ref_logps - logps
    k3 = torch.exp(diff) - diff - 1  # (N,) per-token KL(π ‖ π_ref) estimate, ≥ 0
    per_token = -advantages[rows] * logps + kl_coef * k3  # (N,)
    counts = torch.bincount(rows, minlength=len(completions)).clamp(min=1)  # (P·G,)
    per_answer = torch.zeros(len(completions), device=device).index_add(0, rows, per_token) / counts
    loss = per_answer.mean()
    loss.backward()
    return {"loss": float(loss.detach()), "reward": float(rewards.mean()),
            "reward_std": float(rewards.view(-1, group).std(1, unbiased=False).mean()),
            "kl": float((logps.detach() - ref_logps).mean()), "kl_k3": float(k3.detach().mean()),
            "answer_tokens": float(counts.float().mean())}
