"""A saved student against its teacher on prompts the project has never seen (not a test).

    python benchmarks/unseen_eval.py runs/quickstart/student
    python benchmarks/unseen_eval.py runs/quickstart/student --prompts my_prompts.jsonl --work runs/unseen

The 40 instructions in benchmarks/data/unseen_prompts.jsonl were written for this check: none is among the
quickstart's 1,583 training or 48 held-out instructions, nor a MinHash near-duplicate of one (checked here
before anything runs, estimated Jaccard < 0.5). The teacher answers them greedily (`kdkit generate`'s
writer), then `kdkit eval`'s metrics compare the student with the teacher on those answers: KL(teacher ‖
student), top-1 agreement and cross-entropy, with the untrained uniform 10-layer baseline for the CE gap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompts_of(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def check_unseen(prompts: list[str]) -> float:
    """The largest estimated Jaccard of any prompt with any shipped training or held-out instruction."""
    from kdkit.data.quality import minhash

    shipped = ROOT / "kdkit" / "assets" / "instructions"
    others = prompts_of(shipped / "train.jsonl") + prompts_of(shipped / "heldout.jsonl")
    sigs = np.stack([minhash(t) for t in others])  # (1,631, P)
    worst = max(float((sigs == minhash(p)).mean(-1).max()) for p in prompts)
    if worst >= 0.5:
        raise SystemExit(f"a prompt near-duplicates a shipped instruction (estimated Jaccard {worst:.2f})")
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("student", type=Path)
    ap.add_argument("--prompts", type=Path, default=ROOT / "benchmarks" / "data" / "unseen_prompts.jsonl")
    ap.add_argument("--work", type=Path, default=Path("runs/unseen"))
    args = ap.parse_args()

    from kdkit.config import load_config
    from kdkit.eval.retention import add_ce_gap, evaluate_models, markdown_table
    from kdkit.models.load import head_rows, load_model, resolve, shared_vocab_size, student_from_layers, uniform_layers
    from kdkit.recipes import generate
    from kdkit.train.loop import pick_device
    from kdkit.train.setup import load_teacher, tokenize_file

    worst = check_unseen(prompts_of(args.prompts))
    answers = args.work / "answers.jsonl"
    cfg = load_config(None, [f"run.dir={args.work}", "teacher.path=smollm2-135m-instruct",
                             f"generate.prompts={args.prompts}", f"generate.output={answers}",
                             "generate.max_new_tokens=96", "generate.batch_size=64", "data.max_length=256"])
    teacher = load_teacher(cfg)
    generate.run(cfg, teacher=teacher)  # resumable: a rerun reuses the answers
    student = load_model(resolve(str(args.student)))
    held = tokenize_file(str(answers), teacher.tokenizer, cfg, key="data.eval")
    device = pick_device("auto")
    vocab = shared_vocab_size(teacher.tokenizer, teacher.tokenizer, head_rows(teacher.model), head_rows(student))
    n = teacher.model.config.num_hidden_layers
    models = {"baseline": student_from_layers(teacher.model, uniform_layers(n, 10)), "student": student}
    metrics = add_ce_gap(evaluate_models(models, teacher.model, held, vocab=vocab, pad_id=teacher.tokenizer.pad_token_id,
                                         batch_size=8, device=device))
    print(f"{len(held.ids)} unseen prompts (max estimated Jaccard with a shipped instruction: {worst:.2f})")
    print(markdown_table(metrics))
    (args.work / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))


if __name__ == "__main__":
    main()
