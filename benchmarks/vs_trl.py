"""kdkit against TRL (trl==1.16.0) on the same work, each run in its own process, alone (not a test).

    python benchmarks/vs_trl.py [--what trainer recipe] [--steps 25] [--budget 600] [--precision fp32|bf16]
                                [--train runs/exp/data/train.jsonl] [--eval runs/exp/data/eval.jsonl]

- *trainer against trainer*: TRL's GKDTrainer (trl.experimental.gkd) with lmbda=0, beta=0 (forward
  KL(teacher ‖ student) on the fixed data) and kdkit's distill recipe (kdkit.recipes.distill.run,
  forward_kl, the fused loss by default) for --steps steps each: the same teacher (the packaged
  SmolLM2-135M-Instruct, loaded by kdkit.models.load for both: GGUF → a plain HF model), the same
  student initialisation (the uniform 10-of-30-layer student, saved once and loaded by both), the same
  rows, batch, max_length, precision, and the same AdamW + warm-up/cosine schedule object
  (kdkit.train.optim.build_optimizer, handed to TRL's Trainer as `optimizers=`). Printed: seconds per
  step (median after the first 2), tokens/s (non-pad tokens, the same steps), peak RSS of the process.
- *recipe against recipe*: kdkit's quickstart recipe (kdkit/configs/quickstart.yaml as it stands,
  through kdkit.cli.run_pipeline on the given data; its prune and cache stages, when it has them, are
  charged to its budget, and training gets the rest through `train.max_seconds`) against the best TRL
  offers for the same teacher, student size and budget: GKDTrainer on the uniform 10-layer student,
  its step count set from its own measured seconds per step by kdkit's TimeBudget itself (the rule
  kdkit's loop uses), so that its training loop fills the same budget.

Every student is then evaluated in one more process by the same function
(kdkit.eval.retention.evaluate_models, fp32) on the held-out rows: KL(teacher ‖ student), top-1
agreement, and the share of the cross-entropy gap closed relative to the untrained uniform student.
The data files are copied (complete lines only) at start, so files still being written are read once.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TEACHER = "smollm2-135m-instruct"
KEEP_LAYERS = 10
CAP_STEPS = 10_000  # budgeted runs: the budget, not this, ends them


# ---------------------------------------------------------------- shared by the children


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def step_stats(ends: list[float], tokens: list[int]) -> dict:
    """Seconds per step (median of steps 3..N: intervals between consecutive optimizer-step ends) and
    tokens/s over those same steps."""
    durations = [b - a for a, b in zip(ends, ends[1:])][1:]  # (N-2,) steps 3..N
    if not durations:
        return {"s_per_step": None, "tokens_per_s": None}
    return {"s_per_step": statistics.median(durations), "tokens_per_s": sum(tokens[2:len(ends)]) / sum(durations)}


def kdkit_train_config(args, *, steps: int):
    """kdkit's TrainConfig of the trainer comparison; TRL gets its optimizer and schedule from it too."""
    from kdkit.config import load_config

    return load_config(None, [
        f"train.max_steps={steps}", f"train.batch_size={args.batch_size}", "train.grad_accum=1",
        f"train.lr={args.lr}", f"train.warmup_steps={min(args.warmup, steps)}", "train.weight_decay=0.0",
        f"train.precision={args.precision}", f"train.threads={args.threads}", "train.device=cpu",
        "train.save_every=0", f"data.max_length={args.max_length}",
    ])


def kept_examples(path: Path, tok, args):
    """The rows kdkit trains on (its drops applied), as Examples, and kdkit's tokenisation of them."""
    from kdkit.data.sources import load_examples
    from kdkit.train.setup import tokenize_file

    data = tokenize_file(str(path), tok, kdkit_train_config(args, steps=1), key="data.train")
    by_id = {ex.id: ex for ex in load_examples(path)}
    return [by_id[i] for i in data.ids], data


# ---------------------------------------------------------------- children


def prep(args, work: Path) -> dict:
    """The uniform 10-of-30-layer student, saved once for both sides; how TRL's collator labels the rows."""
    from trl.experimental.utils import DataCollatorForChatML

    from kdkit.models.load import count_parameters, freeze, load_model, load_tokenizer, resolve
    from kdkit.models.load import student_from_layers, uniform_layers

    src = resolve(TEACHER)
    teacher, tok = freeze(load_model(src)), load_tokenizer(src)
    layers = uniform_layers(teacher.config.num_hidden_layers, KEEP_LAYERS)
    student = student_from_layers(teacher, layers)
    out = work / "uniform-student"
    shutil.rmtree(out, ignore_errors=True)
    student.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    examples, data = kept_examples(work / "data" / "train.jsonl", tok, args)
    collator = DataCollatorForChatML(tokenizer=tok, max_length=args.max_length)
    same = long = 0
    trl_tokens = 0
    for ex, ids, labels in zip(examples, data.input_ids, data.labels):
        b = collator([{"messages": ex.messages}])  # one row: no padding
        trl_ids, trl_labels = b["input_ids"][0].tolist(), b["labels"][0].tolist()
        trl_tokens += sum(x != -100 for x in trl_labels[1:])
        long += len(trl_ids) >= args.max_length  # kdkit keeps the first max_length tokens, TRL the last
        same += trl_ids == ids and trl_labels == labels
    return {"layers": layers, "params": count_parameters(student), "teacher_params": count_parameters(teacher),
            "rows": len(examples), "rows_in_file": data.total, "labels_identical": same, "at_max_length": long,
            "kdkit_supervised": sum(x != -100 for labels in data.labels for x in labels[1:]),
            "trl_supervised": trl_tokens}


def clocked_optimizer_step(ends: list[float]):
    """Record the end of every kdkit optimizer step (benchmark instrumentation; the loop is unchanged)."""
    import kdkit.train.loop as loop

    inner = loop.optimizer_step

    def timed(*a, **k):
        stepped = inner(*a, **k)
        ends.append(time.perf_counter())
        return stepped

    loop.optimizer_step = timed  # distill() looks it up in its module at every step


def kdkit_trainer(args, work: Path) -> dict:
    from kdkit.config import load_config
    from kdkit.recipes import distill

    run_dir = work / "kdkit-trainer"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(None, [
        f"run.dir={run_dir}", f"teacher.path={TEACHER}", "student.init=pretrained",
        f"student.path={work / 'uniform-student'}", f"data.train={work / 'data' / 'train.jsonl'}",
        "loss.divergence=forward_kl", "loss.temperature=1.0", "loss.alpha=1.0",
        "eval.student_before=false", "eval.speed=false",
    ])
    cfg.train = kdkit_train_config(args, steps=args.steps).train
    cfg.data.max_length = args.max_length
    ends: list[float] = []
    clocked_optimizer_step(ends)
    t0 = time.perf_counter()
    out = distill.run(cfg)
    wall = time.perf_counter() - t0
    hist = out["history"]
    return {"student_dir": str(out["student_dir"]), "steps": len(hist), "wall_s": wall,
            "train_loss": hist[-1]["loss"], "implementation": cfg.loss.implementation,
            **step_stats(ends, [m["tokens"] for m in hist]), "peak_rss": peak_rss_bytes()}


def trl_gkd(args, work: Path, *, name: str, budget: float | None) -> dict:
    """TRL's GKDTrainer, lmbda=0 beta=0, on the uniform student: --steps steps, or as many as fit `budget`."""
    import torch
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kdkit.models.load import freeze, load_model, load_tokenizer, resolve
    from kdkit.train.dist import DistContext
    from kdkit.train.loop import TimeBudget
    from kdkit.train.optim import build_optimizer

    t0 = time.perf_counter()
    teacher = freeze(load_model(resolve(TEACHER)))  # the GGUF rebuilt as a plain float HF model
    student_src = resolve(str(work / "uniform-student"))
    student, tok = load_model(student_src), load_tokenizer(student_src)
    examples, _ = kept_examples(work / "data" / "train.jsonl", tok, args)
    from datasets import Dataset

    dataset = Dataset.from_list([{"messages": ex.messages} for ex in examples])
    tc = kdkit_train_config(args, steps=CAP_STEPS if budget else args.steps).train
    tc.max_seconds = budget  # None: --steps steps
    opt, sched = build_optimizer(student, tc)  # the schedule reads tc.max_steps live (the budget sets it)
    timer = TimeBudget(tc, work / name, resume=False)  # kdkit's own rule, so both loops fill the budget alike
    ends, tokens = [], []

    class Clock(TrainerCallback):
        """Step ends; with a budget, kdkit's TimeBudget sets the step count that fits the rest of it (timed over
        the warm-up, re-timed once at the steady rate; the cosine spans those steps)."""

        def on_train_begin(self, a, state, control, **kw):
            timer.start()

        def on_step_end(self, a, state, control, **kw):
            ends.append(time.perf_counter())
            timer.after_step(state.global_step, DistContext(), main=True)
            if state.global_step >= tc.max_steps:
                control.should_training_stop = True

    class CountingGKD(GKDTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            tokens.append(int(inputs["attention_mask"].sum()))  # non-pad tokens, as kdkit counts them
            return super().training_step(model, inputs, num_items_in_batch)

    gargs = GKDConfig(
        output_dir=str(work / name / "trainer"), max_steps=tc.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, learning_rate=args.lr, max_length=args.max_length,
        lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0, disable_dropout=True, max_grad_norm=tc.max_grad_norm,
        bf16=args.precision == "bf16", fp16=False, use_cpu=True, gradient_checkpointing=False,
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, remove_unused_columns=False, seed=tc.seed,
    )
    trainer = CountingGKD(model=student, teacher_model=teacher, args=gargs, train_dataset=dataset,
                          processing_class=tok, optimizers=(opt, sched), callbacks=[Clock()])
    torch.manual_seed(tc.seed)
    t_train = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t_train
    out = work / name / "student"
    shutil.rmtree(out, ignore_errors=True)
    trainer.model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"student_dir": str(out), "steps": len(ends), "wall_s": time.perf_counter() - t0, "train_s": train_s,
            "train_loss": result.training_loss, "mixed_precision": str(trainer.accelerator.mixed_precision),
            **step_stats(ends, tokens), "peak_rss": peak_rss_bytes()}


def trl_trainer(args, work: Path) -> dict:
    return trl_gkd(args, work, name="trl-trainer", budget=None)


def trl_recipe(args, work: Path) -> dict:
    return trl_gkd(args, work, name="trl-recipe", budget=args.budget)


def kdkit_recipe(args, work: Path) -> dict:
    """The quickstart recipe on the given data: prune/cache stages (when it has them) timed against the
    budget, training filling the rest (train.max_seconds)."""
    from importlib.resources import files

    from kdkit.cli import run_pipeline
    from kdkit.config import load_config

    run_dir = work / "kdkit-recipe"
    shutil.rmtree(run_dir, ignore_errors=True)
    preset = Path(str(files("kdkit") / "configs" / "quickstart.yaml"))
    cfg = load_config(preset, [
        f"run.dir={run_dir}", f"data.train={work / 'data' / 'train.jsonl'}", f"train.threads={args.threads}",
        f"train.precision={args.precision}", "train.device=cpu", "train.save_every=0",
        "eval.student_before=false", "eval.speed=false",
    ])
    cfg.data.eval = None  # evaluated with every other student, in the eval process
    cfg.run.max_seconds = None  # the recipe's budget here is --budget, charged below
    ends: list[float] = []
    clocked_optimizer_step(ends)
    t0 = time.perf_counter()
    run_pipeline(cfg, ("prune", "cache"))  # either may be off in the recipe: then nothing runs
    setup = time.perf_counter() - t0
    cfg.train.max_steps = CAP_STEPS
    cfg.train.max_seconds = max(args.budget - setup, 1.0)
    out = run_pipeline(cfg, ("distill",))
    hist = out["history"]
    recipe = (f"prune={cfg.prune.method}, signal={cfg.teacher.signal}, {cfg.loss.divergence} "
              f"T={cfg.loss.temperature}, lr={cfg.train.lr}, batch={cfg.train.batch_size}")
    return {"student_dir": str(out["student_dir"]), "steps": len(hist), "wall_s": time.perf_counter() - t0,
            "setup_s": setup, "train_loss": hist[-1]["loss"], "recipe": recipe,
            **step_stats(ends, [m["tokens"] for m in hist]), "peak_rss": peak_rss_bytes()}


def evaluate(args, work: Path) -> dict:
    """Every saved student against the teacher, by one function, on the held-out rows (fp32)."""
    from kdkit.config import load_config
    from kdkit.eval.retention import evaluate_models
    from kdkit.models.load import freeze, head_rows, load_model, load_tokenizer, resolve
    from kdkit.train.setup import tokenize_file

    students = json.loads(args.students)
    src = resolve(TEACHER)
    teacher, tok = freeze(load_model(src)), load_tokenizer(src)
    held = tokenize_file(str(work / "data" / "eval.jsonl"), tok, load_config(None, [f"data.max_length={args.max_length}"]),
                         key="data.eval")
    models = {name: freeze(load_model(resolve(path))) for name, path in students.items()}
    vocab = min(head_rows(m) for m in [teacher, *models.values()])
    metrics = evaluate_models(models, teacher, held, vocab=vocab, pad_id=tok.pad_token_id, batch_size=8)
    return {"metrics": metrics, "rows": len(held.input_ids)}


CHILDREN = {"prep": prep, "kdkit-trainer": kdkit_trainer, "trl-trainer": trl_trainer,
            "kdkit-recipe": kdkit_recipe, "trl-recipe": trl_recipe, "eval": evaluate}


# ---------------------------------------------------------------- the parent


def snapshot(src: Path, dst: Path) -> int:
    """Copy the complete lines of a file another process may still be writing; returns the row count."""
    if not src.is_file():
        sys.exit(f"vs_trl: {src} does not exist; pass --train/--eval (OpenAI `messages` jsonl)")
    text = src.read_text()
    text = text[: text.rfind("\n") + 1]  # a half-written last row is left out
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text)
    return sum(1 for line in text.splitlines() if line.strip())


def child(name: str, args, extra: list[str] = ()) -> dict | None:
    """Run one part in its own process; its RESULT line, or None (the tail of its stderr is shown)."""
    cmd = [sys.executable, __file__, "--one", name, "--work", str(args.work), "--steps", str(args.steps),
           "--budget", str(args.budget), "--threads", str(args.threads), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length), "--lr", str(args.lr), "--warmup", str(args.warmup),
           "--precision", args.precision, *extra]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TRL_EXPERIMENTAL_SILENCE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(f"[vs_trl] {name}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    print(f"[vs_trl] {name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return json.loads(line[len("RESULT "):])


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def ratio(a, b) -> str:
    return "–" if a is None or b is None or not b else f"{a / b:.2f}×"


def table(runs: dict, metrics: dict, ref: dict | None) -> list[str]:
    untrained = metrics.get("untrained", {}).get("ce")
    teacher_ce = metrics.get("teacher", {}).get("ce")

    def gap(name):
        ce = metrics.get(name, {}).get("ce")
        if None in (ce, untrained, teacher_ce) or untrained == teacher_ce:
            return None
        return (untrained - ce) / (untrained - teacher_ce)

    lines = ["| part | run | steps | s/step | tokens/s | peak RSS (GB) | wall s | held-out KL | top-1 | CE gap closed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    labels = {"kdkit-trainer": ("trainer", "kdkit distill (forward KL)"),
              "trl-trainer": ("trainer", "TRL GKDTrainer (lmbda=0, beta=0)"),
              "kdkit-recipe": ("recipe", "kdkit quickstart recipe"),
              "trl-recipe": ("recipe", "TRL GKDTrainer, uniform 10 layers, steps fit to budget")}
    for pair in (("kdkit-trainer", "trl-trainer"), ("kdkit-recipe", "trl-recipe")):
        if not any(p in runs for p in pair):
            continue
        for name in pair:
            part, label = labels[name]
            r, m = runs.get(name), metrics.get(name, {})
            if r is None:
                lines.append(f"| {part} | {label} | failed | | | | | | | |")
                continue
            lines.append(f"| {part} | {label} | {r['steps']} | {fmt(r['s_per_step'], '.2f')} | "
                         f"{fmt(r['tokens_per_s'], ',.0f')} | {r['peak_rss'] / 1e9:.2f} | {r['wall_s']:.0f} | "
                         f"{fmt(m.get('kl_to_teacher'), '.3f')} | {fmt(m.get('top1_agreement'), '.1%')} | "
                         f"{fmt(gap(name), '.1%')} |")
        a, b = runs.get(pair[0]), runs.get(pair[1])
        if a and b:
            ma, mb = metrics.get(pair[0], {}), metrics.get(pair[1], {})
            kl = ratio(ma.get("kl_to_teacher"), mb.get("kl_to_teacher"))
            if pair[0] == "kdkit-recipe" and ma.get("kl_to_teacher") and mb.get("kl_to_teacher"):
                met = ma["kl_to_teacher"] <= 0.7 * mb["kl_to_teacher"]
                kl += " (target ≤ 0.70×: " + ("met" if met else "not met") + ")"
            lines.append(f"| {labels[pair[0]][0]} | **kdkit / TRL** | | {ratio(a['s_per_step'], b['s_per_step'])} | "
                         f"{ratio(a['tokens_per_s'], b['tokens_per_s'])} | {ratio(a['peak_rss'], b['peak_rss'])} | "
                         f"{ratio(a['wall_s'], b['wall_s'])} | {kl} | "
                         f"{ratio(ma.get('top1_agreement'), mb.get('top1_agreement'))} | |")
    for name, label in (("untrained", "untrained uniform 10-layer student"), ("teacher", "teacher")):
        m = metrics.get(name)
        if m:
            kl = "0" if name == "teacher" else fmt(m["kl_to_teacher"], ".3f")
            lines.append(f"| reference | {label} ({m['params']:,} params) | | | | | | {kl} | "
                         f"{fmt(m['top1_agreement'], '.1%')} | CE {fmt(m['ce'], '.3f')} |")
    return lines


def notes(args, data: dict, ref: dict | None, runs: dict, load: tuple) -> list[str]:
    out = [f"- data: {data['train']} training rows from {args.train}, {data['eval']} held-out rows from {args.eval} "
           f"(copied at start); max_length {args.max_length}, batch {args.batch_size}, lr {args.lr}, "
           f"precision {args.precision}, {args.threads} threads; load average at start {load[0]:.1f}"]
    if ref:
        out.append(f"- student: teacher layers {ref['layers']} ({ref['params']:,} of {ref['teacher_params']:,} "
                   f"parameters), saved once and loaded by both trainers (and by TRL's recipe run)")
        out.append(f"- labels (assistant tokens only on both sides): kdkit's renderer and TRL's DataCollatorForChatML "
                   f"give identical input ids and labels on {ref['labels_identical']} of {ref['rows']} rows "
                   f"({ref['kdkit_supervised']:,} vs {ref['trl_supervised']:,} supervised tokens); "
                   f"{ref['at_max_length']} rows reach max_length, where kdkit keeps the first tokens and TRL the last")
    out += [
        "- optimizer and schedule: one kdkit AdamW (betas 0.9/0.95, weight decay 0, clip 1.0) + linear warm-up "
        f"({min(args.warmup, args.steps)} steps) and cosine to 0.1×, built by kdkit.train.optim.build_optimizer "
        "for each side and handed to TRL's Trainer as `optimizers=`, so only the trainers differ; data order: each "
        "trainer's own seeded shuffle (seed 0 on both)"
        + (f"; {ref['rows']} rows is not a multiple of the batch: HF ends each epoch with a short batch, kdkit's "
           "stream wraps into the next epoch" if ref and ref["rows"] % args.batch_size else ""),
        "- TRL: gradient_checkpointing=False (TRL's SFT default is True: less memory, slower), disable_dropout, "
        "padding on the left; its loss materialises (B, T, V) logits for student and teacher; kdkit uses its "
        "default loss implementation"
        + (f" ({runs['kdkit-trainer']['implementation']})" if runs.get("kdkit-trainer") else ""),
        f"- precision {args.precision}: " + ("bf16 autocast for both students; kdkit also holds its online teacher's "
                                             "weights in bf16, TRL runs its fp32 teacher under autocast"
                                             if args.precision == "bf16" else
                                             "fp32 for both (this CPU has no native bf16: bf16 matmuls run slower)"),
        "- s/step: median interval between optimizer-step ends, steps 3..N; tokens/s: non-pad tokens of those "
        "steps; peak RSS: ru_maxrss of each process (teacher load included); wall s: the process's "
        "load + train + save (kdkit recipe: its prune/cache stages too)",
        "- evaluation: kdkit.eval.retention.evaluate_models in one fp32 process for every saved student, on the "
        "same held-out rows; CE gap closed is relative to the untrained uniform student",
    ]
    if runs.get("kdkit-recipe"):
        r = runs["kdkit-recipe"]
        out.append(f"- kdkit recipe: {r['recipe']}; prune+cache {r['setup_s']:.0f} s charged to its {args.budget:.0f} s "
                   f"budget (teacher loading included), training the rest via train.max_seconds")
    if runs.get("trl-recipe"):
        out.append(f"- TRL recipe: GKDTrainer forward KL on the same rows (its best option on fixed teacher data: "
                   f"on-policy lmbda>0 generates with the student every step, far slower on CPU), training loop "
                   f"budget {args.budget:.0f} s, steps set by kdkit's TimeBudget (warm-up timing, one re-plan); "
                   f"train() took {runs['trl-recipe']['train_s']:.0f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--what", nargs="+", default=["trainer", "recipe"], choices=["trainer", "recipe"])
    ap.add_argument("--steps", type=int, default=25, help="trainer comparison: optimizer steps of each")
    ap.add_argument("--budget", type=float, default=600.0, help="recipe comparison: seconds of each")
    ap.add_argument("--train", type=Path, default=Path("runs/exp/data/train.jsonl"))
    ap.add_argument("--eval", type=Path, default=Path("runs/exp/data/eval.jsonl"))
    ap.add_argument("--work", type=Path, default=Path("runs/vs_trl"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=10, help="warm-up steps (at most --steps)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--one", choices=list(CHILDREN), help=argparse.SUPPRESS)  # internal: one part, this process
    ap.add_argument("--students", help=argparse.SUPPRESS)  # internal: eval's {name: dir}
    args = ap.parse_args()
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(CHILDREN[args.one](args, args.work)), flush=True)
        return
    load = os.getloadavg()
    data = {"train": snapshot(args.train, args.work / "data" / "train.jsonl"),
            "eval": snapshot(args.eval, args.work / "data" / "eval.jsonl")}
    ref = child("prep", args)
    if ref is None:
        sys.exit("vs_trl: preparing the student failed (above)")
    names = [*(["kdkit-trainer", "trl-trainer"] if "trainer" in args.what else []),
             *(["kdkit-recipe", "trl-recipe"] if "recipe" in args.what else [])]
    runs = {name: child(name, args) for name in names}  # one after another: each alone on the machine
    students = {"untrained": str(args.work / "uniform-student"),
                **{n: r["student_dir"] for n, r in runs.items() if r}}
    ev = child("eval", args, ["--students", json.dumps(students)])
    metrics = ev["metrics"] if ev else {}
    print("\n".join(["", *table(runs, metrics, ref), "", *notes(args, data, ref, runs, load)]))


if __name__ == "__main__":
    main()
