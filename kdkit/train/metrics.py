"""Per-step metrics to `metrics.jsonl` and TensorBoard (`RUN_DIR/tb`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends one JSON line per logged step; on resume, drops lines past the restored step
    (a killed run may have logged steps its checkpoint does not contain)."""

    def __init__(self, run_dir: Path, *, start_step: int = 0):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        kept = []
        if start_step > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (ValueError, KeyError):
                    break  # a torn last line from a kill
        tmp = self.path.with_suffix(".tmp")  # replaced atomically: a kill here loses no logged step
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        self.file = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is optional at run time
            self.tb = None

    def write(self, metrics: dict) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, metrics["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
