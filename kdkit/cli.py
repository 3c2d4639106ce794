"""The `kdkit` command: one table of verbs → recipe functions.

User mistakes (`UserError`) print one clear message and exit with code 2, no traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from importlib.resources import files
from pathlib import Path
from typing import Optional

import typer

from kdkit.config import Config, dump_config, load_config
from kdkit.errors import UserError

log = logging.getLogger(__name__)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Knowledge distillation for large language models.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configs.")
app.add_typer(config_app, name="config")

CONFIG = typer.Argument(..., help="YAML config file")
OVERRIDES = typer.Argument(None, help="dotted overrides, e.g. train.lr=1e-4 loss.divergence=jsd")


def _load(config: Optional[Path], overrides: Optional[list[str]]) -> Config:
    return load_config(config, overrides or [])


STAGES = ("generate", "prune", "cache", "distill", "eval")


def run_pipeline(cfg: Config, stages=STAGES, *, resume: bool = False) -> dict:
    """Run stages in order, sharing one teacher; generated data feeds the later stages. The cache
    stage runs only when the run reads its teacher signals from a cache (teacher.signal: cache); the
    prune stage only when prune.method is set, and then distill and eval start from RUN_DIR/pruned."""
    from kdkit.recipes import cache, distill, evaluate, generate, prune
    from kdkit.train.setup import load_teacher

    started = time.perf_counter()
    teacher = load_teacher(cfg)
    out = {}
    if "generate" in stages:
        paths = generate.run(cfg, teacher=teacher)
        cfg.data.train = cfg.data.train or str(paths["train"])
        if "eval" in paths:
            cfg.data.eval = cfg.data.eval or str(paths["eval"])
    if cfg.prune.method != "none":
        if "prune" in stages:
            prune.run(cfg, teacher=teacher, resume=resume)
        prune.use_pruned(cfg)
    if "cache" in stages and cfg.teacher.signal == "cache":
        cache.run(cfg, teacher=teacher)
    if "distill" in stages:
        fit_training_to_budget(cfg, time.perf_counter() - started)
        out = distill.run(cfg, resume=resume, teacher=teacher)
    elif "eval" in stages:
        out = evaluate.run(cfg, teacher=teacher)
    if "distill" in stages and cfg.draft.pipeline and "student_dir" in out:
        out = draft_stage(cfg, out, teacher=teacher, resume=resume)
    return out


def fit_training_to_budget(cfg: Config, elapsed: float) -> None:
    """run.max_seconds: the training loop's budget is what the pipeline has left, less the reserve."""
    if cfg.run.max_seconds is None:
        return
    left = cfg.run.max_seconds - cfg.run.reserve_seconds - elapsed
    if left < 60:
        log.warning("run.max_seconds=%s: %.0f s of it went before training; training gets at least 60 s",
                    cfg.run.max_seconds, elapsed)
    cfg.train.max_seconds = min(cfg.train.max_seconds or float("inf"), max(left, 60.0))
    log.info("run.max_seconds=%s: %.0f s elapsed, train.max_seconds=%.0f", cfg.run.max_seconds, elapsed,
             cfg.train.max_seconds)


def draft_stage(cfg: Config, out: dict, *, teacher, resume: bool) -> dict:
    """draft.pipeline: a draft for the student just made (RUN_DIR/draft), its speed-up beside the
    teacher's with draft.path (a teacher's draft, when given), both in the table and report.md."""
    from kdkit.eval.speculative import speed_report
    from kdkit.models.load import load_model, load_tokenizer, resolve
    from kdkit.recipes import draft

    from kdkit.train.loop import pick_device

    made = draft.run(cfg, resume=resume, target=out["student_dir"])
    tables = [made["table"] or ""]
    if cfg.draft.path:
        src = resolve(cfg.draft.path)
        tables.insert(0, speed_report(cfg.draft, teacher.model, load_model(src), load_tokenizer(src),
                                      title=f"teacher `{teacher.source.id}` with the draft `{cfg.draft.path}`",
                                      device=pick_device(cfg.draft.train.device))[1])
    text = "\n\n".join(t for t in tables if t)
    report = Path(out["run_dir"]) / "report.md"
    if text and report.is_file():
        report.write_text(report.read_text().rstrip() + "\n\n## Speculative decoding\n\n" + text + "\n")
    return {**out, "draft": made, "table": "\n\n".join(t for t in (out.get("table"), text) if t)}


@app.command()
def quickstart(
    fast: bool = typer.Option(False, "--fast", help="a short smoke run (a minute or two)"),
    run_dir: Path = typer.Option(Path("runs/quickstart"), help="where everything is written"),
    overrides: Optional[list[str]] = OVERRIDES,
):
    """Distill the embedded SmolLM2-135M-Instruct teacher into a student of 47% of its parameters
    (importance width pruning, then logit distillation on cached teacher signals), on CPU, end to end."""
    started = time.perf_counter()
    assets = files("kdkit") / "assets" / "instructions"
    preset = files("kdkit") / "configs" / ("quickstart_fast.yaml" if fast else "quickstart.yaml")
    cfg = load_config(Path(str(preset)), [f"run.dir={run_dir}", *(overrides or [])])
    cfg.generate.prompts = cfg.generate.prompts or str(assets / "train.jsonl")
    cfg.generate.eval_prompts = cfg.generate.eval_prompts or str(assets / "heldout.jsonl")
    out = run_pipeline(cfg, resume=True)
    typer.echo("\n" + out["table"] + "\n")
    m = out["metrics"]
    after, ref = m["student_after"], ("baseline" if "baseline" in m else "student_before")
    typer.echo(f"held-out: KL to the teacher {after['kl_to_teacher']:.3f} nats/token "
               f"({after['kl_to_teacher'] / m[ref]['kl_to_teacher']:.3f}x the {ref}'s), top-1 "
               f"agreement {after['top1_agreement']:.1%}"
               + (f", CE gap closed {after['ce_gap_closed']:.1%}" if "ce_gap_closed" in after else "")
               + f"; student {after['params'] / m['teacher']['params']:.1%} of the teacher's parameters")
    typer.echo(f"wall clock: {(time.perf_counter() - started) / 60:.1f} min")
    typer.echo(f"student:  {out['student_dir']}")
    typer.echo(f"report:   {Path(out['run_dir']) / 'report.md'}")
    typer.echo(f"metrics:  {Path(out['run_dir']) / 'metrics.json'}")


@app.command()
def distill(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES,
            resume: bool = typer.Option(False, "--resume", help="continue from the newest whole checkpoint")):
    """Online logit distillation: teacher → student, then evaluation and the saved student."""
    out = run_pipeline(_load(config, overrides), ("distill",), resume=resume)
    if out.get("table"):
        typer.echo("\n" + out["table"])
    if "student_dir" in out:  # rank 0 of a distributed run, or the only process
        typer.echo(f"student: {out['student_dir']}")


@app.command()
def draft(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES,
          resume: bool = typer.Option(False, "--resume", help="continue from the newest whole checkpoint")):
    """Distil a speculative-decoding draft for the teacher (or draft.target, e.g. a saved student); logs
    held-out acceptance while training, then measures the speed-up (assisted generation, greedy)."""
    from kdkit.recipes import draft as recipe

    out = recipe.run(_load(config, overrides), resume=resume)
    if out["acceptance"]:
        first, last = out["acceptance"][0], out["acceptance"][-1]
        typer.echo(f"held-out greedy match rate: {first['match_rate']:.3f} (step {first['step']}) → "
                   f"{last['match_rate']:.3f} (step {last['step']})")
    if out.get("table"):
        typer.echo("\n" + out["table"] + "\n")
    typer.echo(f"draft: {out['draft_dir']}")


@app.command()
def generate(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES):
    """The teacher writes data: answers to a file of prompts, or generate.tasks (elicitation strategies)."""
    from kdkit.recipes import generate as recipe

    for split, path in recipe.run(_load(config, overrides)).items():
        typer.echo(f"{split}: {path}")


@app.command()
def sft(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES,
        resume: bool = typer.Option(False, "--resume", help="continue from the newest whole checkpoint")):
    """Sequence-level KD: train the student on teacher-written data (cross-entropy on the teacher's tokens)."""
    from kdkit.recipes import sft as recipe

    out = recipe.run(_load(config, overrides), resume=resume)
    if out["history"]:
        typer.echo(f"loss {out['history'][0]['loss']:.3f} → {out['history'][-1]['loss']:.3f}")
    typer.echo(f"student: {out['student_dir']}")


@app.command()
def cache(args: list[str] = typer.Argument(..., help="CONFIG [key=value …], or: verify DIR"),
          repair: bool = typer.Option(False, "--repair", help="verify: redo damaged or missing shards")):
    """Store the teacher's top-k log-probs for the training data (`kdkit cache verify DIR [--repair]`)."""
    from kdkit.recipes import cache as recipe

    if args[0] == "verify":
        if len(args) != 2:
            raise UserError("usage: kdkit cache verify DIR [--repair]")
        problems = recipe.verify(Path(args[1]), repair=repair)
        for p in problems:
            typer.echo(f"damaged: {p}", err=True)
        if problems:
            raise typer.Exit(1)
        typer.echo(f"{args[1]}: every shard verified" + (" (repaired)" if repair else ""))
        return
    typer.echo(f"cache: {recipe.run(_load(Path(args[0]), args[1:]))}")


@app.command("eval")
def evaluate(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES):
    """Teacher vs student-before vs student-after on held-out data: metrics.json + report.md."""
    out = run_pipeline(_load(config, overrides), ("eval",))
    typer.echo(out["table"])
    typer.echo(f"metrics: {out['metrics_path']}\nreport:  {out['report_path']}")


@app.command()
def pipeline(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES,
             resume: bool = typer.Option(False, "--resume", help="continue from the newest whole checkpoint")):
    """generate (when generate.prompts or generate.tasks is set) → prune (when prune.method is set) → cache (when
    teacher.signal is cache) → distill → eval."""
    cfg = _load(config, overrides)
    stages = STAGES if (cfg.generate.prompts or cfg.generate.tasks) else STAGES[1:]
    out = run_pipeline(cfg, stages, resume=resume)
    if out.get("table"):
        typer.echo("\n" + out["table"])


@app.command()
def feedback(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES):
    """The student answers prompts several times, the teacher scores them: preference pairs (jsonl)."""
    from kdkit.recipes import feedback as recipe

    out = recipe.run(_load(config, overrides))
    typer.echo(f"pairs: {out['pairs']} ({out['num_pairs']} pairs; scored samples: {out['scored']})")


@app.command()
def dpo(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES,
        resume: bool = typer.Option(False, "--resume", help="continue from the newest whole checkpoint")):
    """DPO of the student on the teacher's preference pairs, against a frozen reference."""
    from kdkit.recipes import dpo as recipe

    out = recipe.run(_load(config, overrides), resume=resume)
    b, a = out["pairs_before"], out["pairs_after"]
    typer.echo(f"chosen-vs-rejected margin: {b['margin']:.3f} → {a['margin']:.3f} "
               f"(pair accuracy {b['accuracy']:.2f} → {a['accuracy']:.2f})")
    if out.get("table"):
        typer.echo("\n" + out["table"])
    typer.echo(f"student: {out['student_dir']}")


@app.command()
def rl(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES,
       resume: bool = typer.Option(False, "--resume", help="continue from the newest whole checkpoints")):
    """Reward model on the teacher's preferences (or the teacher's log-likelihood), then policy optimisation
    of the student with a KL penalty to the reference."""
    from kdkit.recipes import rl as recipe

    out = recipe.run(_load(config, overrides), resume=resume)
    for key in ("reward model train accuracy", "reward model held-out accuracy"):
        if key in out:
            typer.echo(f"{key}: {out[key]:.2f}")
    if out["history"]:
        last = out["history"][-1]
        typer.echo(f"last step: reward {last['reward']:.3f}, KL to reference {last['kl']:.4f}")
    if out.get("table"):
        typer.echo("\n" + out["table"])
    typer.echo(f"student: {out['student_dir']}")


@config_app.command("print")
def config_print(config: Optional[Path] = typer.Argument(None, help="YAML config (omit: the defaults)"),
                 overrides: Optional[list[str]] = OVERRIDES):
    """Print the resolved config, each field with its one-line doc."""
    typer.echo(dump_config(_load(config, overrides)))


@config_app.command("validate")
def config_validate(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES):
    """Check a config; exit code 2 with the offending keys when it is wrong."""
    _load(config, overrides)
    typer.echo(f"{config}: ok")


@app.command()
def export(source: str = typer.Argument(..., help="model dir, run dir (its student/), .gguf file or alias"),
           format: str = typer.Option("gguf", "--format", help="gguf (llama.cpp) or hf (clean HF directory)"),
           quant: str = typer.Option("f16", "--quant", help="GGUF weights: f16, q8_0 or q4_0"),
           out: Optional[Path] = typer.Option(None, "--out", help="output file (gguf) or directory (hf)")):
    """Ship a model: one GGUF file (f16/q8_0/q4_0) or a clean HF directory with its model card."""
    from kdkit.recipes import export as recipe

    typer.echo(f"wrote {recipe.run(source, fmt=format, quant=quant, out=str(out) if out else None)}")


@app.command("prune")
def prune_verb(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES):
    """Prune the teacher (depth/width, ranked by importance on calibration data) into RUN_DIR/pruned."""
    from kdkit.recipes import prune as recipe

    out = recipe.run(_load(config, overrides))
    typer.echo(f"{out['method']}: {out['params_before']:,} → {out['params_after']:,} parameters "
               f"(target {out['target_params'] or '-'}), layers {out['layers_kept']}, {out['dims']}")
    typer.echo(f"pruned: {out['pruned_dir']}")


@app.command("plan")
def plan_verb(config: Path = CONFIG, overrides: Optional[list[str]] = OVERRIDES,
              devices: int = typer.Option(1, "--devices", help="processes / GPUs the run is launched on"),
              memory: Optional[float] = typer.Option(None, "--memory", help="GiB per device: suggest what fits")):
    """Estimate peak memory per device of `kdkit distill CONFIG` (weights, gradients, AdamW,
    activations, logits, teacher) and, given --memory, a batch size and loss chunk that fit."""
    from kdkit.recipes import plan as recipe

    typer.echo(recipe.run(_load(config, overrides), world=devices, device_gib=memory)["table"])


def main() -> None:
    logging.basicConfig(level=os.environ.get("KDKIT_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except UserError as e:
        typer.echo(f"kdkit: error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("kdkit: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
