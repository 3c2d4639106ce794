"""`kdkit dpo CONFIG`: direct preference optimisation of the student on the teacher's preferences.

Reads the pairs `kdkit feedback` wrote (preference.pairs), trains the student with the sigmoid DPO
loss against a frozen reference (preference.reference: a copy of the starting student by default),
reports the chosen-vs-rejected margin before and after and, with data.eval, the held-out KL to the
teacher; saves RUN_DIR/student with its model card. `--resume` continues from the newest checkpoint.
"""

from __future__ import annotations

from kdkit.config import Config
from kdkit.data.preference import read_pairs, tokenize_pairs
from kdkit.eval.retention import evaluate_models, markdown_table, write_report
from kdkit.models.load import count_parameters, head_rows, shared_vocab_size
from kdkit.train.preference import card_section, default_pairs_path, evaluate_pairs, setup_policy, train_dpo
from kdkit.train.setup import model_card, save_student, tokenize_file


def run(cfg: Config, *, resume: bool = False, teacher=None) -> dict:
    # ---- setup
    run_dir, teacher, student, tok, init, device, reference = setup_policy(cfg, teacher)
    path = default_pairs_path(cfg)
    pairs = tokenize_pairs(read_pairs(path), tok, max_length=cfg.data.max_length, source=str(path))
    before = evaluate_pairs(student, pairs, pad_id=tok.pad_token_id, batch_size=cfg.eval.batch_size)

    # ---- loop
    history = train_dpo(student, reference, pairs, cfg, run_dir=run_dir, pad_id=tok.pad_token_id, resume=resume)

    # ---- evaluate and save
    after = evaluate_pairs(student, pairs, pad_id=tok.pad_token_id, batch_size=cfg.eval.batch_size)
    table, metrics = None, None
    if cfg.data.eval:
        held_out = tokenize_file(cfg.data.eval, tok, cfg, key="data.eval")
        if cfg.eval.limit:  # ids, tokens and labels stay aligned
            n = cfg.eval.limit
            held_out.ids, held_out.input_ids, held_out.labels = (held_out.ids[:n], held_out.input_ids[:n],
                                                                 held_out.labels[:n])
        vocab = shared_vocab_size(teacher.tokenizer, tok, head_rows(teacher.model), head_rows(student))
        models = {"student_before": reference, "student_after": student} if cfg.preference.reference == "student" \
            else {"student_after": student}
        metrics = evaluate_models(models, teacher.model.to(device), held_out, vocab=vocab, pad_id=tok.pad_token_id,
                                  batch_size=cfg.eval.batch_size, device=device)
        table = markdown_table(metrics)
        # in RUN_DIR/eval: the report's training plots read distillation metrics, not these
        write_report(metrics, run_dir / "eval", extra={"train_steps": cfg.train.max_steps, "pairs_before": before,
                                              "pairs_after": after})
    results = {"pairs": len(pairs.ids), "margin before": before["margin"], "margin after": after["margin"],
               "pair accuracy before": before["accuracy"], "pair accuracy after": after["accuracy"],
               "beta": cfg.preference.beta, "label smoothing": cfg.preference.label_smoothing}
    card = model_card(teacher=teacher, init=init, student_params=count_parameters(student),
                      teacher_params=teacher.num_parameters, cfg=cfg, eval_table=table)
    card += "\n" + card_section(cfg, method="DPO (sigmoid loss)", results=results)
    student_dir = save_student(student, tok, run_dir / "student", card=card)
    return {"run_dir": run_dir, "student_dir": student_dir, "history": history, "pairs_before": before,
            "pairs_after": after, "metrics": metrics, "table": table}
