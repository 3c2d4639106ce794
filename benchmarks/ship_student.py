"""Measure a distilled student against its teacher, side by side in one run (not a test).

    python benchmarks/ship_student.py STUDENT_DIR --teacher smollm2-135m-instruct --eval EVAL.jsonl \
        --what retention speculative quantize gguf [--limit 24] [--prompts 6] [--new-tokens 48]

retention: held-out CE / KL / top-1 / tokens/s of teacher and student, and retention (100% = teacher).
speculative: the student drafting for the teacher (acceptance, tokens per teacher forward, speed-up).
quantize: int8 and int4 weight-only student: size in memory, KL to the fp32 student and to the teacher.
gguf: f16 / q8_0 / q4_0 file sizes, and the q4_0/q8_0 files read back through transformers.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from kdkit.data.render import tokenize_examples
from kdkit.data.sources import load_examples
from kdkit.eval.quantize import model_bytes, quantize_weights
from kdkit.eval.report import retention_table
from kdkit.eval.retention import evaluate_models, markdown_table
from kdkit.eval.speculative import prompt_ids, speculative_decoding
from kdkit.models.gguf_export import export_gguf
from kdkit.models.load import freeze, load_model, load_tokenizer, resolve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("student")
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--eval", required=True)
    ap.add_argument("--what", nargs="+", default=["retention", "speculative", "quantize", "gguf"])
    ap.add_argument("--limit", type=int, default=24, help="held-out rows for the next-token metrics")
    ap.add_argument("--prompts", type=int, default=6, help="held-out prompts for speculative decoding")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--draft-tokens", type=int, default=5)
    args = ap.parse_args()
    t0 = time.perf_counter()
    t_src, s_src = resolve(args.teacher), resolve(args.student)
    teacher, tok = freeze(load_model(t_src)), load_tokenizer(t_src)
    student = freeze(load_model(s_src))
    rows = load_examples(args.eval)
    data = tokenize_examples(rows[: args.limit], tok, max_length=256)
    vocab = student.config.vocab_size
    print(f"loaded in {time.perf_counter() - t0:.0f}s; {len(data.input_ids)} held-out rows")

    def evaluate(models, reference):
        return evaluate_models(models, reference, data, vocab=vocab, pad_id=tok.pad_token_id, batch_size=8)

    if "retention" in args.what:
        m = evaluate({"student": student}, teacher)
        print("\n## retention\n" + markdown_table(m) + "\n\n" + retention_table(m))
    if "speculative" in args.what:
        prompts = prompt_ids(tok, rows, limit=args.prompts)
        r = speculative_decoding(teacher, student, prompts[:1], max_new_tokens=8, pad_id=tok.pad_token_id)  # warm-up
        r = speculative_decoding(teacher, student, prompts, max_new_tokens=args.new_tokens,
                                 num_draft_tokens=args.draft_tokens, pad_id=tok.pad_token_id)
        print("\n## speculative decoding\n" + json.dumps(r, indent=1))
    if "quantize" in args.what:
        q = {"int8": quantize_weights(student, bits=8), "int4": quantize_weights(student, bits=4)}
        to_student = evaluate(q, student)  # quality drop against the unquantized student
        to_teacher = evaluate({"fp32": student, **q}, teacher)
        print("\n## quantized student (weight-only)")
        print("| model | bytes in memory | KL(fp32 student ‖ q) | top-1 vs fp32 | CE | KL(teacher ‖ q) | tokens/s |")
        print("|---|---|---|---|---|---|---|")
        for name, model in {"fp32": student, **q}.items():
            drift = to_student.get(name, {"kl_to_teacher": 0.0, "top1_agreement": 1.0})
            t = to_teacher[name]
            print(f"| {name} | {model_bytes(model):,} | {drift['kl_to_teacher']:.4f} | {drift['top1_agreement']:.1%} "
                  f"| {t['ce']:.3f} | {t['kl_to_teacher']:.3f} | {t['tokens_per_s']:,.0f} |")
    if "gguf" in args.what:
        with tempfile.TemporaryDirectory() as tmp:
            print("\n## GGUF export (read back through transformers)")
            print("| quant | file bytes | KL(fp32 student ‖ read back) | top-1 vs fp32 |")
            print("|---|---|---|---|")
            for quant in ("f16", "q8_0", "q4_0"):
                path = export_gguf(student, tok, Path(tmp) / f"s-{quant}.gguf", quant=quant)
                back = freeze(load_model(resolve(str(path))))
                d = evaluate({quant: back}, student)[quant]
                print(f"| {quant} | {path.stat().st_size:,} | {d['kl_to_teacher']:.4f} | {d['top1_agreement']:.1%} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    torch.set_num_threads(1)  # machines here are shared
    main()
