"""The student as a speculative-decoding draft for its teacher (transformers assisted generation).

Greedy assisted generation returns exactly the teacher's own greedy text; what the student buys is
speed: each teacher forward verifies the student's draft and keeps its longest correct prefix plus
one token of its own. We count, from forward hooks (independent of transformers' internals):

- teacher forwards F and draft forwards D during assisted generation (one draft forward = one
  drafted token; one teacher forward = one verification round, which adds accepted + 1 tokens);
- new tokens N, so accepted draft tokens A = N − F, acceptance rate A / D, and N / F tokens per
  teacher forward (1.0 = no gain, k + 1 = every draft accepted).

Speed-up = wall time of the teacher alone / wall time with the draft, same prompts, same tokens.

For a draft (`kdkit draft`, `kdkit eval` with draft.path) `measure_draft` also tries several draft
lengths γ, measures the cost ratio c = draft time / target time per forward (hooks, one-token decode
steps of each), and sets beside each measurement the prediction of Leviathan et al. (2023),
(1 − α^(γ+1)) / ((1 − α)(γ·c + 1)), with α the draft's greedy match rate along the target's text.
Greedy acceptance is a function of those matches alone (`greedy_matches`, `simulate_rounds`): the
draft's proposal at each position either equals the target's greedy token or ends the round.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from kdkit.data.collate import collate
from kdkit.data.sources import load_examples
from kdkit.errors import UserError

HELDOUT = Path(__file__).resolve().parent.parent / "assets" / "instructions" / "heldout.jsonl"  # the project's


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


# ---------------------------------------------------------------- greedy acceptance from matches


@torch.no_grad()
def greedy_matches(draft, prompts: list[torch.Tensor], continuations: list[torch.Tensor], *,
                   pad_id: int = 0, batch_size: int = 8) -> list[torch.Tensor]:
    """(N_i,) bools per prompt: whether the draft's greedy next token equals the target's at each
    position of the target's own greedy continuation (teacher-forced: one draft forward per batch)."""
    was_training = draft.training
    draft.eval()
    device = next(draft.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        ps, cs = prompts[start:start + batch_size], continuations[start:start + batch_size]
        rows = [torch.cat([p, c]).tolist() for p, c in zip(ps, cs)]
        batch = collate(rows, None, pad_id=pad_id)  # right-padded (B, L)
        logits = draft(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits  # (B, L, V)
        guess = logits.argmax(-1).cpu()  # (B, L): the draft's next token after each position
        for b, (p, c) in enumerate(zip(ps, cs)):
            # the token at position t is proposed from position t - 1
            out.append(guess[b, len(p) - 1:len(p) - 1 + len(c)] == c)  # (N_i,)
    draft.train(was_training)
    return out


def simulate_rounds(matches: torch.Tensor, gamma: int, *, max_new_tokens: int | None = None) -> dict:
    """Assisted greedy decoding of a known target text, round by round: the draft proposes
    min(γ, tokens left − 1) tokens (transformers leaves room for the target's own), the target keeps
    the leading correct ones plus one of its own. `matches` (N,) holds, per position, whether the
    draft's proposal there is the target's token; `max_new_tokens` the generation's limit (default N)."""
    n = len(matches)
    limit = n if max_new_tokens is None else max_new_tokens
    pos = drafted = accepted = rounds = 0
    hits = matches.tolist()
    while pos < n:
        k = min(gamma, limit - pos - 1)
        a = 0
        while a < k and pos + a < n - 1 and hits[pos + a]:  # the last token is always the target's own
            a += 1
        if n < limit and pos + a == n - 1 and k > a and hits[n - 1]:
            k = a + 1  # the text ends at an EOS the draft proposes too: the draft stops there
        drafted, accepted, rounds, pos = drafted + max(k, 0), accepted + a, rounds + 1, pos + a + 1
    return {"tokens": n, "drafted": drafted, "accepted": accepted, "target_forwards": rounds,
            "acceptance_rate": accepted / max(drafted, 1), "tokens_per_target_forward": n / max(rounds, 1)}


def predicted_speedup(alpha: float, gamma: int, c: float) -> float:
    """Leviathan et al.'s expected speed-up for i.i.d. acceptance α, γ drafted tokens, cost ratio c."""
    tokens = gamma + 1 if alpha >= 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * c + 1)


def acceptance_summary(matches: list[torch.Tensor], gammas: list[int], *, max_new_tokens: int) -> dict:
    """Match rate α and, per γ, the simulated acceptance rate and tokens per target forward."""
    total = sum(len(m) for m in matches)
    out = {"match_rate": sum(int(m.sum()) for m in matches) / max(total, 1), "tokens": total}
    for g in gammas:
        runs = [simulate_rounds(m, g, max_new_tokens=max_new_tokens) for m in matches if len(m)]
        drafted, accepted = sum(r["drafted"] for r in runs), sum(r["accepted"] for r in runs)
        out[f"gamma{g}"] = {"acceptance_rate": accepted / max(drafted, 1),
                            "tokens_per_target_forward": total / max(sum(r["target_forwards"] for r in runs), 1)}
    return out


@torch.no_grad()
def greedy_continuations(model, prompts: list[torch.Tensor], *, max_new_tokens: int,
                         pad_id: int) -> list[torch.Tensor]:
    """The model's greedy continuation ((N_i,) ids) of each prompt, one at a time: exactly the text
    assisted generation at batch 1 must reproduce (stopping at the model's EOS)."""
    model.eval()
    return [_generate(model, p.view(1, -1), max_new_tokens=max_new_tokens, pad_id=pad_id) for p in prompts]


# ---------------------------------------------------------------- measured speed-up of a draft


@contextmanager
def _timed_forwards(*models):
    """Per model, (seconds, input tokens) of every forward run inside the block."""
    records, started = [[] for _ in models], {}

    def hooks(i):
        def pre(module, args, kwargs):
            started[i] = time.perf_counter()

        def post(module, args, kwargs, output):
            ids = kwargs.get("input_ids", args[0] if args else None)
            records[i].append((time.perf_counter() - started[i], ids.shape[-1] if ids is not None else 0))
        return pre, post

    handles = []
    for i, m in enumerate(models):
        pre, post = hooks(i)
        handles += [m.register_forward_pre_hook(pre, with_kwargs=True), m.register_forward_hook(post, with_kwargs=True)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def _timed(target, ids, *, new_tokens: int, pad_id: int, draft=None, gamma: int = 1):
    """(new tokens, seconds, forward records of target [and draft]) of one greedy generation."""
    kwargs = {}
    if draft is not None:
        gc = draft.generation_config
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = gamma, "constant"
        gc.assistant_confidence_threshold = 0.0  # always the full γ: the quantity the formula describes
        kwargs["assistant_model"] = draft
    with _timed_forwards(*([target, draft] if draft is not None else [target])) as records:
        t0 = time.perf_counter()
        out = _generate(target, ids, max_new_tokens=new_tokens, pad_id=pad_id, **kwargs)
        seconds = time.perf_counter() - t0
    return out, seconds, records


def _median(xs: list[float]) -> float:
    return float(torch.tensor(xs).median()) if xs else float("nan")


def _run_prompts(target, draft, prompts, gammas, *, new_tokens: int, pad_id: int, cost: dict) -> dict:
    """Per γ: totals of `prompts` decoded by the target alone (once per prompt) and with the draft
    (right after, so both see the same machine load). One-token forwards go to `cost`."""
    rows = {g: {"new_tokens": 0, "drafted": 0, "accepted": 0, "target_forwards": 0, "identical": 0,
                "alone_seconds": 0.0, "assisted_seconds": 0.0} for g in gammas}
    texts = []
    for p in prompts:
        ids = p.view(1, -1)  # (1, T): assisted generation runs one sequence at a time
        alone, alone_s, (t_rec,) = _timed(target, ids, new_tokens=new_tokens, pad_id=pad_id)
        cost["target"] += [s for s, n in t_rec[1:] if n == 1]  # decode steps (not the prefill)
        texts.append(alone)
        for g in gammas:
            out, s, (t_rec, d_rec) = _timed(target, ids, new_tokens=new_tokens, pad_id=pad_id, draft=draft, gamma=g)
            cost["draft"] += [sec for sec, n in d_rec if n <= 2]  # a draft step (2: after a fully accepted round)
            r = rows[g]
            r["alone_seconds"] += alone_s
            r["assisted_seconds"] += s
            r["identical"] += int(torch.equal(alone, out))
            r["new_tokens"] += len(out)
            r["target_forwards"] += len(t_rec)
            r["drafted"] += len(d_rec)
            r["accepted"] += len(out) - len(t_rec)
    for r in rows.values():
        r.update(prompts=len(prompts), acceptance_rate=r["accepted"] / max(r["drafted"], 1),
                 tokens_per_target_forward=r["new_tokens"] / max(r["target_forwards"], 1),
                 alone_tokens_per_s=r["new_tokens"] / max(r["alone_seconds"], 1e-9),
                 assisted_tokens_per_s=r["new_tokens"] / max(r["assisted_seconds"], 1e-9),
                 speedup=r["alone_seconds"] / max(r["assisted_seconds"], 1e-9))
    return {"rows": rows, "texts": texts}


@torch.no_grad()
def measure_draft(target, draft, prompts: list[torch.Tensor], *, gammas: list[int], gamma_prompts: int,
                  speed_prompts: int, new_tokens: int = 64, pad_id: int = 0) -> dict:
    """The draft's measured speed-up for its target, greedy, at batch 1.

    Each γ of `gammas` runs on the first `gamma_prompts` prompts; the best (measured) γ then runs on
    the next `speed_prompts` prompts (held out from the choice; the first ones again when there are
    too few). Every row: acceptance, tokens per target forward, tokens/s alone and with the draft, the
    speed-up, outputs identical, and the prediction from the measured α (match rate) and c."""
    target.eval(), draft.eval()
    draft.generation_config = copy.deepcopy(draft.generation_config)  # transformers adapts it in place
    tune, final = prompts[:gamma_prompts], prompts[gamma_prompts:gamma_prompts + speed_prompts]
    if not final:
        final = prompts[:speed_prompts]
    _timed(target, tune[0].view(1, -1), new_tokens=4, pad_id=pad_id, draft=draft, gamma=2)  # warm-up
    cost = {"draft": [], "target": []}
    sweep = _run_prompts(target, draft, tune, gammas, new_tokens=new_tokens, pad_id=pad_id, cost=cost)
    c = _median(cost["draft"]) / _median(cost["target"])
    alpha = acceptance_summary(greedy_matches(draft, tune, sweep["texts"], pad_id=pad_id), [],
                               max_new_tokens=new_tokens)["match_rate"]
    for g, r in sweep["rows"].items():
        r["predicted_speedup"] = predicted_speedup(alpha, g, c)
    best = max(gammas, key=lambda g: sweep["rows"][g]["speedup"])
    last = _run_prompts(target, draft, final, [best], new_tokens=new_tokens, pad_id=pad_id, cost=cost)
    final_alpha = acceptance_summary(greedy_matches(draft, final, last["texts"], pad_id=pad_id), [],
                                     max_new_tokens=new_tokens)["match_rate"]
    c = _median(cost["draft"]) / _median(cost["target"])  # over every measured forward
    row = {**last["rows"][best], "gamma": best, "alpha": final_alpha, "c": c,
           "predicted_speedup": predicted_speedup(final_alpha, best, c)}
    return {"gammas": sweep["rows"], "gamma_alpha": alpha, "best_gamma": best, "final": row, "c": c,
            "draft_forward_ms": 1e3 * _median(cost["draft"]), "target_forward_ms": 1e3 * _median(cost["target"]),
            "threads": torch.get_num_threads(), "new_tokens": new_tokens}


def draft_table(m: dict, *, title: str = "target with its draft") -> str:
    """Markdown: the γ sweep, then the final measurement on prompts the choice of γ did not see."""
    f = m["final"]
    lines = [f"**{title}** — greedy, batch 1, {m['new_tokens']} new tokens, {m['threads']} threads; "
             f"c = {m['c']:.3f} (draft {m['draft_forward_ms']:.1f} ms / target {m['target_forward_ms']:.1f} ms "
             f"per one-token forward)", "",
             "| γ | prompts | α (match rate) | acceptance | tokens / target forward | tokens/s alone | "
             "tokens/s with draft | speed-up | predicted | identical |", "|" + " --- |" * 10]
    for g, r in m["gammas"].items():
        lines.append(f"| {g} | {r['prompts']} | {m['gamma_alpha']:.3f} | {r['acceptance_rate']:.3f} | "
                     f"{r['tokens_per_target_forward']:.2f} | {r['alone_tokens_per_s']:.1f} | "
                     f"{r['assisted_tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['predicted_speedup']:.2f}x | "
                     f"{r['identical']}/{r['prompts']} |")
    lines.append(f"| **{f['gamma']} (held out)** | {f['prompts']} | {f['alpha']:.3f} | {f['acceptance_rate']:.3f} | "
                 f"{f['tokens_per_target_forward']:.2f} | {f['alone_tokens_per_s']:.1f} | "
                 f"{f['assisted_tokens_per_s']:.1f} | **{f['speedup']:.2f}x** | {f['predicted_speedup']:.2f}x | "
                 f"{f['identical']}/{f['prompts']} |")
    return "\n".join(lines)


def heldout_prompts(dc, tokenizer) -> list[torch.Tensor]:
    """The prompts of `draft.heldout` (default: kdkit's packaged held-out prompts) as token ids."""
    path = dc.heldout or HELDOUT
    prompts = prompt_ids(tokenizer, load_examples(path))
    if not prompts:
        raise UserError(f"draft.heldout {path}: no chat prompts in it (rows need 'prompt' or 'messages')")
    return prompts


def speed_report(dc, target_model, draft, tokenizer, *, title: str, device="cpu") -> tuple[dict, str]:
    """`measure_draft` as the `draft` config section `dc` asks, with dc.threads torch threads
    (restored after): (the measurement, its markdown table)."""
    threads = torch.get_num_threads()
    if dc.threads:
        torch.set_num_threads(dc.threads)
    try:
        m = measure_draft(target_model.to(device), draft.to(device),
                          [p.to(device) for p in heldout_prompts(dc, tokenizer)], gammas=dc.gammas,
                          gamma_prompts=dc.gamma_prompts, speed_prompts=dc.speed_prompts, new_tokens=dc.new_tokens,
                          pad_id=tokenizer.pad_token_id)
    finally:
        torch.set_num_threads(threads)
    return m, draft_table(m, title=title)
