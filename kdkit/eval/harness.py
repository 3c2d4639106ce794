"""Benchmark tasks through lm-evaluation-harness (`lm_eval.simple_evaluate`) on local HF directories.

Tasks are lm-eval YAML task configs over local files (`dataset_path: json` + `dataset_kwargs:
data_files:`), passed to lm-eval as dicts, so no task index and no hub access is needed
(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set). Two tasks ship in kdkit/assets/harness/:

- `kdkit_mc`: 30 general-knowledge questions, 4 choices, log-likelihood ranking (metric `acc`);
- `kdkit_arith`: 20 additions/subtractions, greedy generation, exact match of the first number.

A task is named by a shipped name or by a path to a task YAML; relative `data_files` in a YAML are
read relative to that YAML. lm-eval is an optional dependency: `pip install 'kdkit[eval]'`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import yaml

from kdkit.errors import UserError

TASKS_DIR = Path(__file__).resolve().parents[1] / "assets" / "harness"
SHIPPED = {p.stem: p for p in sorted(TASKS_DIR.glob("*.yaml"))}  # kdkit_mc, kdkit_arith


def task_config(task: str) -> dict:
    """The lm-eval task config (a dict) for a shipped task name or a task YAML path."""
    path = SHIPPED.get(task) or Path(task).expanduser()
    if not path.is_file():
        raise UserError(f"harness task {task!r} is neither a shipped task ({', '.join(SHIPPED)}) "
                        "nor a task YAML file")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e}); `!function` tags are not supported here") from None
    if not isinstance(cfg, dict) or "task" not in cfg:
        raise UserError(f"{path}: an lm-eval task YAML needs a `task:` name")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, (str, dict)):
        # data files next to the YAML, wherever the process runs from
        absolute = {k: str(path.parent / v) for k, v in files.items()} if isinstance(files, dict) else str(path.parent / files)
        cfg["dataset_kwargs"] = {**cfg["dataset_kwargs"], "data_files": absolute}
    return cfg


def run_harness(model_dir: str | Path, tasks: list[str], *, limit: int | None = None, batch_size: int = 8,
                device: str = "cpu", dtype: str = "float32") -> dict[str, dict[str, float]]:
    """{task: {metric: value}} for the HF model in `model_dir` (e.g. {"kdkit_mc": {"acc": 0.4}})."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never ask the hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("eval.harness_tasks needs lm-evaluation-harness: `pip install 'kdkit[eval]'` "
                        "(or `pip install lm-eval`)") from None
    configs = [task_config(t) for t in tasks]
    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-request INFO lines drown the CLI
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": dtype}, tasks=configs,
        task_manager=TaskManager(include_defaults=False),  # no index of lm-eval's thousands of task YAMLs
        limit=limit, batch_size=batch_size, device=device, log_samples=False, bootstrap_iters=0,
    )
    return {name: _numbers(res) for name, res in out["results"].items()}


def _numbers(res: dict) -> dict[str, float]:
    """lm-eval's {"acc,none": 0.4, "acc_stderr,none": "N/A", "alias": ...} → {"acc": 0.4}."""
    keys = [k for k in res if "," in k and "_stderr" not in k and isinstance(res[k], (int, float))]
    out = {}
    for key in keys:
        metric, filt = key.split(",", 1)
        clash = sum(k.split(",", 1)[0] == metric for k in keys) > 1  # one metric under several filters
        value = float(res[key])
        out[f"{metric}/{filt}" if clash else metric] = value if math.isfinite(value) else float("nan")
    return out
