"""`kdkit draft CONFIG`: distil a speculative-decoding draft for a target model, then measure its speed-up.

The target is the teacher (`teacher.path`) or any directory kdkit saved (`draft.target`, e.g. a
student). The draft is a few of the target's layers (`draft.num_layers`, uniform or `draft.layers`,
or the most important ones: `draft.init=prune`) with the target's embeddings and head, so it shares
the target's tokenizer, which transformers' assisted generation requires; `draft.hidden_size` /
`draft.intermediate_size` narrow it to the most important channels and neurons (the V x H head is most
of a few-layer draft's cost). It is trained by the one
distill loop (kdkit/train/loop.py): the loss is `draft.divergence` to the online target on

- fixed data: the target's greedy answers to `draft.prompts` (or `draft.data`), i.e. the very text
  the draft has to predict when the target decodes greedily, and
- on-policy data: a share `draft.onpolicy` of micro-batches whose answers are the draft's own
  continuations, scored by the target (modes.onpolicy, a loop plugin).

Every `draft.eval_every` steps the greedy acceptance on held-out prompts is logged to
DIR/acceptance.jsonl: the draft's matches along the target's own greedy text (one batched forward),
from which the rounds of assisted decoding follow exactly (kdkit/eval/speculative.py). At the end the
draft is saved as an HF directory (DIR/draft, model card naming its target) and, with `draft.speed`,
its speed-up is measured with transformers' assisted generation and the best γ is written into the
draft's generation_config.json (num_assistant_tokens), which transformers reads from the assistant.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from kdkit.config import Config, FeaturesConfig, ModesConfig, OnPolicyConfig, save_config
from kdkit.data.sources import load_examples
from kdkit.errors import UserError
from kdkit.eval.speculative import (acceptance_summary, greedy_continuations, greedy_matches, heldout_prompts,
                                    speed_report)
from kdkit.models.license import gate_from_config, license_card_lines
from kdkit.models.load import count_parameters, head_rows, shared_vocab_size, student_from_layers, uniform_layers
from kdkit.prune.depth import prune_depth
from kdkit.prune.dims import check_dims
from kdkit.prune.importance import compute_importance, first_tokens
from kdkit.prune.width import prune_width
from kdkit.teacher.generate import generate_answers, sampled_round
from kdkit.teacher.online import online_signal_fn
from kdkit.train.loop import Plugins, distill, pick_device
from kdkit.train.modes import add_mode_plugins
from kdkit.train.setup import forward_teacher, load_teacher, save_student, tokenize_file

log = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "instructions"  # packaged prompts


# ---------------------------------------------------------------- config


def draft_dir(cfg: Config) -> Path:
    return Path(cfg.draft.dir) if cfg.draft.dir else Path(cfg.run.dir) / "draft"


def loop_config(cfg: Config, run_dir: Path, data: Path) -> Config:
    """The config the distill loop reads for the draft: the draft's own train section, its divergence,
    its on-policy share; no other mode, no features, the online target as the teacher."""
    d = cfg.draft
    lc = cfg.loss.model_copy(update={"divergence": d.divergence, "alpha": d.alpha, "temperature": 1.0})
    modes = ModesConfig(onpolicy=OnPolicyConfig(fraction=d.onpolicy, greedy=d.onpolicy_greedy,
                                                max_new_tokens=d.onpolicy_tokens))
    return cfg.model_copy(update={
        "run": cfg.run.model_copy(update={"dir": str(run_dir)}), "train": d.train.model_copy(), "loss": lc,
        "modes": modes, "features": FeaturesConfig(),
        "data": cfg.data.model_copy(update={"train": str(data), "eval": None, "packing": False}),
        "teacher": cfg.teacher.model_copy(update={"signal": "online"}),
    })


def target_of(cfg: Config, *, teacher=None, target: str | Path | None = None):
    """The model the draft serves: `target` (a directory), else draft.target, else the teacher."""
    path = target or cfg.draft.target
    if path is None:
        return teacher or load_teacher(cfg)
    if not Path(path).is_dir():
        raise UserError(f"draft.target {str(path)!r} is not a directory: give a model directory kdkit saved "
                        "(e.g. RUN_DIR/student), or leave it unset to draft for teacher.path")
    licence = cfg.teacher.license  # a student kdkit saved carries its teacher's licence in its card
    return load_teacher(cfg.model_copy(update={"teacher": cfg.teacher.model_copy(
        update={"path": str(path), "gguf_file": None, "license": licence})}))


# ---------------------------------------------------------------- setup


def fixed_data(cfg: Config, target, run_dir: Path) -> Path:
    """draft.data, or the target's greedy answers to draft.prompts plus `draft.samples` sampled answers
    per prompt (ids ID~sJ), by the target as the draft's run holds it (bf16 where it computes in bf16).
    Resumable: answered ids are kept."""
    d = cfg.draft
    if d.data:
        return Path(d.data)
    prompts = load_examples(d.prompts or ASSETS / "train.jsonl")[:d.prompts_limit]
    model = forward_teacher(cfg.model_copy(update={"train": d.train}), target)
    out = run_dir / "data" / "train.jsonl"
    generate_answers(model, target.tokenizer, prompts, out, max_new_tokens=d.answer_tokens,
                     batch_size=d.answer_batch)
    for j in range(1, d.samples + 1):  # more prefixes the target's greedy next token is known at
        generate_answers(model, target.tokenizer, sampled_round(prompts, j), out,
                         max_new_tokens=d.answer_tokens, batch_size=d.answer_batch, do_sample=True,
                         temperature=d.sample_temperature, seed=d.train.seed + j)
    return out


def check_width(cfg: Config, model) -> None:
    """UserError, before any data is written, when the target's config class rejects draft.hidden_size /
    draft.intermediate_size (e.g. a Llama hidden size must be a multiple of its attention heads)."""
    d, c = cfg.draft, model.config
    dims = {k: v for k, v in (("hidden_size", d.hidden_size), ("intermediate_size", d.intermediate_size)) if v}
    if not dims:
        return
    if any(v > getattr(c, k) for k, v in dims.items()):
        raise UserError(f"draft: width pruning only shrinks; the target has hidden_size {c.hidden_size}, "
                        f"intermediate_size {c.intermediate_size}, got {dims}")
    check_dims(c, where="draft", advice="Set draft.hidden_size / draft.intermediate_size to sizes it accepts",
               **dims)


def init_draft(cfg: Config, target, train, *, pad_id: int):
    """(draft model, a one-line description): a copy of a few of the target's layers; unless
    draft.train_head, its embeddings and head stay frozen (the optimizer takes trainable parameters only)."""
    d, model = cfg.draft, target.model
    total = model.config.num_hidden_layers
    torch.manual_seed(d.train.seed)
    imp = None
    if d.init == "prune":
        imp = compute_importance(model, train, pad_id=pad_id, layer_ppl=d.prune_metric == "ppl")
        draft, layers = prune_depth(model, imp, d.num_layers, metric=d.prune_metric)
        how = f"the {len(layers)} most important ({d.prune_metric}) layers {layers} of the target's {total}"
    else:
        layers = d.layers if d.layers is not None else uniform_layers(total, d.num_layers)
        if not layers or any(not 0 <= i < total for i in layers):
            raise UserError(f"draft.layers {layers}: indices must lie in 0..{total - 1} (the target's layers)")
        draft, how = student_from_layers(model, layers), f"target layers {layers} of {total}"
    if d.hidden_size or d.intermediate_size:  # narrow: the most important channels/neurons of the kept layers
        imp = imp or compute_importance(model, first_tokens(train, d.prune_tokens), pad_id=pad_id, layer_ppl=False)
        draft = prune_width(draft, imp.subset(layers), hidden_size=d.hidden_size,
                            intermediate_size=d.intermediate_size)
        how += (f"; width-pruned to hidden {draft.config.hidden_size}, intermediate "
                f"{draft.config.intermediate_size} (the most important)")
    if not d.train_head:
        for module in (draft.get_input_embeddings(), draft.get_output_embeddings()):
            module.weight.requires_grad_(False)
        how += "; embeddings and head the target's" + (" (their kept channels)" if d.hidden_size else "") + ", frozen"
    return draft, how


class AcceptanceProbe:
    """Greedy acceptance of the draft on held-out prompts, from its matches along the target's own
    greedy text (computed once). Logged to DIR/acceptance.jsonl, one line per evaluated step; a
    resumed run rewrites the steps it redoes, so the file equals an uninterrupted run's."""

    def __init__(self, draft, target_model, prompts: list[torch.Tensor], *, cfg: Config, run_dir: Path,
                 pad_id: int):
        d = cfg.draft
        self.draft, self.prompts, self.pad_id, self.d = draft, prompts, pad_id, d
        self.texts = greedy_continuations(target_model, prompts, max_new_tokens=d.new_tokens, pad_id=pad_id)
        self.path = run_dir / "acceptance.jsonl"
        self.records = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.records[row["step"]] = row
                except (ValueError, KeyError):
                    break  # a torn last line from a kill

    def last_step(self) -> int:
        """draft.train.max_steps, or fewer where train.max_seconds cut it (the loop's RUN_DIR/budget.json)."""
        budget = self.path.parent / "budget.json"
        return json.loads(budget.read_text())["max_steps"] if budget.is_file() else self.d.train.max_steps

    def __call__(self, step: int) -> None:
        d = self.d
        if d.eval_every == 0 or not (step % d.eval_every == 0 or step == self.last_step()):
            return
        matches = greedy_matches(self.draft, self.prompts, self.texts, pad_id=self.pad_id)
        row = {"step": step, **acceptance_summary(matches, d.gammas, max_new_tokens=d.new_tokens)}
        self.records = {s: r for s, r in self.records.items() if s < step} | {step: row}
        best = max(d.gammas, key=lambda g: row[f"gamma{g}"]["tokens_per_target_forward"])
        log.warning("draft step %d: held-out match rate %.3f; γ=%d: acceptance %.3f, %.2f tokens per target forward",
                    step, row["match_rate"], best, row[f"gamma{best}"]["acceptance_rate"],
                    row[f"gamma{best}"]["tokens_per_target_forward"])
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for _, r in sorted(self.records.items())))
        tmp.replace(self.path)


# ---------------------------------------------------------------- save


def draft_card(*, target, init: str, draft_params: int, target_params: int, cfg: Config, steps: int,
               table: str | None, license_decision: dict) -> str:
    d = cfg.draft
    lines = [
        "---", f"license: {target.license}", "library_name: transformers",
        "tags: [kdkit, distillation, speculative-decoding, draft]", "---", "",
        "# Speculative-decoding draft distilled with kdkit", "",
        f"- **Target:** `{target.source.id}` ({target_params:,} parameters); this draft shares its tokenizer",
        *license_card_lines(license_decision),
        f"- **Initialisation:** {init}; {draft_params:,} parameters ({draft_params / target_params:.0%} of the target)",
        f"- **Objective:** {d.divergence} to the target (alpha {d.alpha}), on-policy share {d.onpolicy} "
        f"({'greedy' if d.onpolicy_greedy else 'sampled'} continuations of {d.onpolicy_tokens} tokens)",
        f"- **Training:** {steps} steps, batch {d.train.batch_size} × accumulation {d.train.grad_accum}, "
        f"AdamW lr {d.train.lr}, seed {d.train.seed}", "",
        "Use: `target.generate(..., assistant_model=AutoModelForCausalLM.from_pretrained(THIS_DIR))`; "
        "generation_config.json holds the measured best `num_assistant_tokens`.", "",
    ]
    if table:
        lines += ["## Measured speed-up (greedy, identical output checked)", "", table, ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- run


def run(cfg: Config, *, resume: bool = False, teacher=None, target: str | Path | None = None) -> dict:
    # ---- setup
    run_dir = draft_dir(cfg)
    save_config(cfg, run_dir / "config.yaml")
    if cfg.draft.train.threads:  # before the target writes the fixed data
        torch.set_num_threads(cfg.draft.train.threads)
    tgt = target_of(cfg, teacher=teacher, target=target)
    licence = gate_from_config(tgt.license, cfg.teacher, teacher=tgt.source.id)  # before any training
    tok = tgt.tokenizer
    check_width(cfg, tgt.model)  # before the target writes data for minutes
    data = fixed_data(cfg, tgt, run_dir)
    lcfg = loop_config(cfg, run_dir, data)
    train = tokenize_file(str(data), tok, lcfg, key="data.train")
    draft, init = init_draft(cfg, tgt, train, pad_id=tok.pad_token_id)
    vocab = shared_vocab_size(tok, tok, head_rows(tgt.model), head_rows(draft))
    device = pick_device(lcfg.train.device)
    signal_fn = online_signal_fn(forward_teacher(lcfg, tgt), vocab=vocab, provenance=tgt.provenance(),
                                 lazy=lcfg.loss.implementation == "fused")
    plugins = add_mode_plugins(Plugins(), lcfg, draft, vocab=vocab, pad_id=tok.pad_token_id,
                               eos_id=tok.eos_token_id)  # on-policy: the draft's own continuations
    probe = None
    if cfg.draft.eval_every:
        probe = AcceptanceProbe(draft, tgt.model, heldout_prompts(cfg.draft, tok)[:cfg.draft.eval_prompts], cfg=cfg,
                                run_dir=run_dir, pad_id=tok.pad_token_id)
        if 0 not in probe.records:
            probe(0)
        plugins.after_step.append(probe)

    # ---- loop
    result = distill(draft, signal_fn, train, lcfg, run_dir=run_dir, vocab=vocab, pad_id=tok.pad_token_id,
                     resume=resume, plugins=plugins)
    draft = result.student

    # ---- measure and save
    measured, table = (speed_report(cfg.draft, tgt.model, draft, tok, title=f"`{tgt.source.id}` with its draft",
                                       device=device)
                       if cfg.draft.speed else (None, None))
    if measured:
        draft.generation_config.num_assistant_tokens = measured["best_gamma"]
        draft.generation_config.num_assistant_tokens_schedule = "constant"
        draft.generation_config.assistant_confidence_threshold = 0.0  # the full γ: what was measured
        (run_dir / "speculative.json").write_text(json.dumps(measured, indent=1))
        (run_dir / "speculative.md").write_text(table + "\n")
    card = draft_card(target=tgt, init=init, draft_params=count_parameters(draft),
                      target_params=count_parameters(tgt.model), cfg=cfg, steps=result.steps, table=table,
                      license_decision=licence)
    out_dir = save_student(draft, tok, run_dir / "draft", card=card)
    return {"run_dir": run_dir, "draft_dir": out_dir, "history": result.history, "speculative": measured,
            "table": table, "acceptance": [probe.records[s] for s in sorted(probe.records)] if probe else []}
