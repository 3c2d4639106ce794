"""The student as a speculative-decoding draft for its teacher (transformers assisted generation).

Greedy assisted generation returns exactly the teacher's own greedy text; what the student buys is
speed: each teacher forward verifies the student's draft and keeps its longest correct prefix plus
one token of its own. We count, from forward hooks (independent of transformers' internals):

- teacher forwards F and draft forwards D during assisted generation (one draft forward = one
  drafted token; one teacher forward = one verification round, which adds accepted + 1 tokens);
- new tokens N, so accepted draft tokens A = N − F, acceptance rate A / D, and N / F tokens per
  teacher forward (1.0 = no gain, k + 1 = every draft accepted).

Speed-up = wall time of the teacher alone / wall time with the draft, same prompts, same tokens.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager

import torch


@contextmanager
def _count_forwards(*models):
    counts = [0] * len(models)

    def hook_for(i):
        def hook(module, args, kwargs):
            counts[i] += 1
        return hook

    handles = [m.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, m in enumerate(models)]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def _generate(model, ids, *, max_new_tokens: int, pad_id: int, **kwargs) -> torch.Tensor:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad_id, **kwargs)
    return out[0, ids.shape[1]:]  # (new,)


@torch.no_grad()
def speculative_decoding(teacher, draft, prompts: list[torch.Tensor], *, max_new_tokens: int = 64,
                         num_draft_tokens: int = 5, schedule: str = "constant",
                         confidence_threshold: float = 0.0, pad_id: int = 0) -> dict:
    """Greedy decode each prompt ((T,) token ids) with the teacher alone and with `draft`.

    `num_draft_tokens` / `schedule` / `confidence_threshold` set transformers' draft length, its
    adaptation ("constant", "heuristic") and the draft's early stop (0 = always draft the full length).
    """
    teacher.eval(), draft.eval()
    draft.generation_config = copy.deepcopy(draft.generation_config)  # transformers adapts it in place
    totals = {"new_tokens": 0, "drafted": 0, "accepted": 0, "teacher_forwards": 0, "identical": 0,
              "teacher_seconds": 0.0, "assisted_seconds": 0.0}
    for prompt in prompts:
        ids = prompt.view(1, -1)  # (1, T): assisted generation runs one sequence at a time
        gc = draft.generation_config
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = num_draft_tokens, schedule
        gc.assistant_confidence_threshold = confidence_threshold
        t0 = time.perf_counter()
        alone = _generate(teacher, ids, max_new_tokens=max_new_tokens, pad_id=pad_id)
        t1 = time.perf_counter()
        with _count_forwards(teacher, draft) as calls:  # read after the block: the list fills during it
            assisted = _generate(teacher, ids, max_new_tokens=max_new_tokens, pad_id=pad_id, assistant_model=draft)
        t2 = time.perf_counter()
        totals["teacher_seconds"] += t1 - t0
        totals["assisted_seconds"] += t2 - t1
        totals["identical"] += int(torch.equal(alone, assisted))
        totals["new_tokens"] += len(assisted)
        teacher_calls, draft_calls = calls
        totals["teacher_forwards"] += teacher_calls
        totals["drafted"] += draft_calls
        totals["accepted"] += len(assisted) - teacher_calls
    return {
        **totals, "prompts": len(prompts), "identical_fraction": totals["identical"] / max(len(prompts), 1),
        "acceptance_rate": totals["accepted"] / max(totals["drafted"], 1),
        "tokens_per_teacher_forward": totals["new_tokens"] / max(totals["teacher_forwards"], 1),
        "speedup": totals["teacher_seconds"] / max(totals["assisted_seconds"], 1e-9),
        "num_draft_tokens": num_draft_tokens, "schedule": schedule,
    }


def prompt_ids(tokenizer, examples: list, *, limit: int | None = None) -> list[torch.Tensor]:
    """Held-out chat rows (`Example`s or dicts with `messages`) → prompt token ids ((T,) each): every
    turn before the last assistant turn; plain-text rows are skipped."""
    prompts = []
    for row in examples[:limit]:
        messages = row["messages"] if isinstance(row, dict) else row.messages
        if not messages:
            continue
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        ids = tokenizer.apply_chat_template(messages[:last], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        prompts.append(ids[0])
    return prompts
