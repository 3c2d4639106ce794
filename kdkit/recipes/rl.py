"""`kdkit rl CONFIG`: policy optimisation of the student against the teacher's preferences.

preference.reward picks the reward: `reward_model` trains one first (a copy of the student with a
scalar head, Bradley–Terry on the pairs `kdkit feedback` wrote; every fifth pair held out to report
its ranking accuracy) in RUN_DIR/reward_model; `teacher` uses the teacher's mean log-likelihood per
answer token directly (teacher and student must share a tokenizer). Then cfg.train.max_steps
GRPO-style steps: preference.rl_prompts prompts per step, preference.samples_per_prompt answers each,
group-normalised advantages and a per-token KL penalty (preference.kl_coef) to the frozen reference.
Saves RUN_DIR/student with its model card; metrics (reward, kl) in RUN_DIR/metrics.jsonl.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path


from kdkit.config import Config
from kdkit.data.preference import PairData, read_pairs, tokenize_pairs
from kdkit.data.render import render_prompt
from kdkit.data.sources import Example, load_examples
from kdkit.errors import UserError
from kdkit.eval.retention import evaluate_models, markdown_table, write_report
from kdkit.models.load import count_parameters, head_rows, shared_vocab_size, tokenizer_hash
from kdkit.models.sequence import mean_logps
from kdkit.train.preference import card_section, default_pairs_path, optimize, pair_indices, setup_policy
from kdkit.train.reward import RewardModel, reward_accuracy, reward_step, rl_step
from kdkit.train.setup import model_card, save_student, tokenize_file


def _split(data: PairData) -> tuple[PairData, PairData | None]:
    """(train pairs, held-out pairs: every fifth, when there are at least five)."""
    if len(data.ids) < 5:
        return data, None
    pick = lambda keep: PairData(ids=[x for i, x in enumerate(data.ids) if keep(i)],  # noqa: E731
                                 chosen=[x for i, x in enumerate(data.chosen) if keep(i)],
                                 rejected=[x for i, x in enumerate(data.rejected) if keep(i)])
    return pick(lambda i: i % 5 != 4), pick(lambda i: i % 5 == 4)


def reward_model_fn(cfg: Config, student, tok, *, run_dir: Path, resume: bool, device) -> tuple:
    """Train the reward model on the pairs; (reward_fn, {held-out accuracy...})."""
    pc = cfg.preference
    path = default_pairs_path(cfg)
    train, held = _split(tokenize_pairs(read_pairs(path), tok, max_length=cfg.data.max_length, source=str(path)))
    rm = RewardModel(copy.deepcopy(student)).to(device)
    tc = cfg.train.model_copy(update={"max_steps": pc.reward_steps, "lr": pc.reward_lr})
    optimize(rm, partial(reward_step, rm, train, tc=tc, pad_id=tok.pad_token_id, device=device), tc,
             run_dir=run_dir / "reward_model", resume=resume, desc="reward model")
    rm.requires_grad_(False).eval()
    info = {"reward model train accuracy": reward_accuracy(rm, train, pad_id=tok.pad_token_id)}
    if held is not None:
        info["reward model held-out accuracy"] = reward_accuracy(rm, held, pad_id=tok.pad_token_id)
    return rm, info


def run(cfg: Config, *, resume: bool = False, teacher=None) -> dict:
    # ---- setup
    pc = cfg.preference
    run_dir, teacher, student, tok, init, device, reference = setup_policy(cfg, teacher)
    source = pc.prompts or cfg.data.train
    if not source:
        raise UserError("preference.prompts (or data.train) is not set: give a file of prompts for the student")
    prompts = [render_prompt(Example(id=e.id, messages=e.messages[:-1] if e.messages and
                                     e.messages[-1]["role"] == "assistant" else e.messages, text=e.text), tok)
               for e in load_examples(source)[: pc.limit]]
    if pc.reward == "reward_model":
        reward_fn, info = reward_model_fn(cfg, student, tok, run_dir=run_dir, resume=resume, device=device)
    else:
        if tokenizer_hash(teacher.tokenizer) != tokenizer_hash(tok):
            raise UserError("preference.reward=teacher scores the student's tokens with the teacher: they must "
                            "share a tokenizer; use preference.reward=reward_model")
        reward_fn, info = partial(mean_logps, teacher.model.to(device)), {}

    # ---- loop
    def step_fn(step: int) -> dict:
        idx = pair_indices(len(prompts), step, batch_size=pc.rl_prompts, grad_accum=1, seed=cfg.train.seed)[0]
        m = rl_step(student, reference, [prompts[i] for i in idx], reward_fn, group=pc.samples_per_prompt,
                    max_new_tokens=pc.max_new_tokens, temperature=pc.temperature, top_p=pc.top_p,
                    kl_coef=pc.kl_coef, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                    seed=cfg.train.seed * 1000003 + step)
        return {**m, "ids": [str(i) for i in idx]}

    history = optimize(student, step_fn, cfg.train, run_dir=run_dir, resume=resume, desc="rl")

    # ---- evaluate and save
    table, metrics = None, None
    if cfg.data.eval:
        held_out = tokenize_file(cfg.data.eval, tok, cfg, key="data.eval")
        if cfg.eval.limit:  # ids, tokens and labels stay aligned
            n = cfg.eval.limit
            held_out.ids, held_out.input_ids, held_out.labels = (held_out.ids[:n], held_out.input_ids[:n],
                                                                 held_out.labels[:n])
        vocab = shared_vocab_size(teacher.tokenizer, tok, head_rows(teacher.model), head_rows(student))
        models = {"student_before": reference, "student_after": student} if pc.reference == "student" \
            else {"student_after": student}
        metrics = evaluate_models(models, teacher.model.to(device), held_out, vocab=vocab, pad_id=tok.pad_token_id,
                                  batch_size=cfg.eval.batch_size, device=device)
        table = markdown_table(metrics)
        # in RUN_DIR/eval: the report's training plots read distillation metrics, not these
        write_report(metrics, run_dir / "eval", extra={"train_steps": cfg.train.max_steps, **info})
    results = {**info, "reward": pc.reward, "kl coefficient": pc.kl_coef, "group size": pc.samples_per_prompt,
               "final reward": history[-1]["reward"] if history else float("nan"),
               "final KL to reference": history[-1]["kl"] if history else float("nan")}
    card = model_card(teacher=teacher, init=init, student_params=count_parameters(student),
                      teacher_params=teacher.num_parameters, cfg=cfg, eval_table=table)
    card += "\n" + card_section(cfg, method="GRPO-style policy gradient with a KL penalty", results=results)
    student_dir = save_student(student, tok, run_dir / "student", card=card)
    return {"run_dir": run_dir, "student_dir": student_dir, "history": history, "metrics": metrics,
            "table": table, **info}
