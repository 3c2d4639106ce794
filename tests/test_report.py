"""report.md / report.html from a real (tiny) distill run: the plots hold the run's data, and the
page renders in headless Chromium with every image decoded (a screenshot is taken)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from kdkit.config import load_config
from kdkit.eval.report import render_report, retention
from kdkit.recipes import distill


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_teacher):
    from tests.conftest import chat_rows, write_jsonl  # noqa: PLC0415

    tmp = tmp_path_factory.mktemp("report")
    cfg = load_config(None, [f"run.dir={tmp / 'run'}", f"teacher.path={tiny_teacher}", "student.init=teacher_layers",
                             "student.num_layers=2", f"data.train={write_jsonl(tmp / 't.jsonl', chat_rows(16))}",
                             f"data.eval={write_jsonl(tmp / 'e.jsonl', chat_rows(4, seed=1))}", "data.max_length=64",
                             "train.max_steps=7", "train.batch_size=4", "train.grad_accum=1", "train.lr=3e-3",
                             "train.warmup_steps=1", "train.save_every=0", "train.threads=1"])
    distill.run(cfg)
    return Path(cfg.run.dir)


def test_report_files_and_plots_hold_the_runs_data(run_dir):
    for name in ("report.md", "report.html", "metrics.json", "plots/losses.png", "plots/kl.png",
                 "plots/retention.png", "plots/speed_size.png"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = render_report(run_dir, metrics)
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert out["series"]["step"] == [r["step"] for r in logged] == list(range(1, 8))
    assert out["series"]["kl"] == [r["kl"] for r in logged] and out["series"]["loss"] == [r["loss"] for r in logged]
    md = (run_dir / "report.md").read_text()
    assert "retention (100% = teacher)" in md and "![kl](plots/kl.png)" in md
    ret = retention(metrics)
    t, s = metrics["teacher"], metrics["student_after"]
    assert ret["student_after"]["ce"] == pytest.approx(t["ce"] / s["ce"])  # lower is better: teacher / student
    assert f"{100 * ret['student_after']['ce']:.1f}%" in md


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on this machine: `apt-get install chromium` (Debian) to run this check")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    url = (run_dir / "report.html").resolve().as_uri()
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-images-loaded="4"' in dom.stdout and 'data-images-total="4"' in dom.stdout, dom.stdout[-1500:]
    shot = tmp_path / "report.png"
    r = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2600", url], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    pixels = mpimg.imread(shot)  # (H, W, C) floats
    assert shot.stat().st_size > 50_000 and pixels.shape[:2] == (2600, 1200)
    assert pixels[..., :3].std() > 0.05  # not a blank page
