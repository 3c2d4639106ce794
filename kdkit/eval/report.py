"""report.md + report.html with matplotlib plots (PNG) for a run directory.

Plots: per-term training losses and KL over steps (RUN_DIR/metrics.jsonl), retention bars, speed and
size of teacher vs students (metrics.json). Retention puts each student metric against the
teacher's, so 100% = as good as the teacher: student / teacher where higher is better, teacher /
student where lower is better (cross-entropy, perplexity).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from kdkit.eval.retention import ROWS, harness_keys, markdown_table  # noqa: E402

TERMS = ("loss", "kd", "ce")  # per-term training losses in metrics.jsonl


def retention(metrics: dict[str, dict]) -> dict[str, dict[str, float]]:
    """{student: {metric: ratio}} for every metric with a direction (ROWS), 1.0 = the teacher's."""
    metrics = _models(metrics)
    teacher = metrics["teacher"]
    out = {}
    for name, m in metrics.items():
        if name == "teacher":
            continue
        out[name] = {}
        for key, _, _, higher in ROWS:
            if higher is None or not teacher.get(key) or not m.get(key):
                continue
            out[name][key] = m[key] / teacher[key] if higher else teacher[key] / m[key]
        out[name]["top1_agreement"] = m["top1_agreement"]  # agreement with the teacher is a retention already
        for task, metric in harness_keys(metrics):  # benchmark scores: higher is better (acc, exact_match)
            t, s = (x.get("harness", {}).get(task, {}).get(metric) for x in (teacher, m))
            if t and s is not None:  # a teacher score of 0 has no retention
                out[name][f"{task}/{metric}"] = s / t
    return out


def _models(metrics: dict) -> dict[str, dict]:
    """The per-model entries of a metrics dict (metrics.json also holds run-level numbers)."""
    return {k: v for k, v in metrics.items() if isinstance(v, dict) and "ce" in v}


def read_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break  # a torn last line from a killed run
    return rows


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_training(steps: list[dict], out_dir: Path) -> dict[str, Path]:
    x = [r["step"] for r in steps]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for term in TERMS:
        if all(term in r for r in steps):
            ax.plot(x, [r[term] for r in steps], label=term, marker="." if len(x) < 50 else None)
    ax.set(xlabel="step", ylabel="loss", title="Training losses per term")
    ax.legend()
    paths = {"losses": _save(fig, out_dir / "losses.png")}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(x, [r["kl"] for r in steps], color="tab:red", marker="." if len(x) < 50 else None)
    ax.set(xlabel="step", ylabel="KL(teacher ‖ student)", title="KL to the teacher over training", yscale="log")
    paths["kl"] = _save(fig, out_dir / "kl.png")
    return paths


def plot_evaluation(metrics: dict[str, dict], out_dir: Path) -> dict[str, Path]:
    ret = retention(metrics)
    keys = sorted({k for r in ret.values() for k in r})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(ret), 1)
    for i, (name, r) in enumerate(ret.items()):
        ax.bar([j + i * width for j in range(len(keys))], [100 * r.get(k, 0) for k in keys], width, label=name)
    ax.axhline(100, color="grey", lw=1, ls="--")
    ax.set_xticks([j + width * (len(ret) - 1) / 2 for j in range(len(keys))], keys)
    ax.set(ylabel="% of teacher", title="Retention (100% = teacher)")
    ax.legend()
    paths = {"retention": _save(fig, out_dir / "retention.png")}
    names = list(metrics)
    measured = all("decode_tokens_per_s" in metrics[n] for n in names)  # eval.speed ran
    fig, axes = plt.subplots(1, 4 if measured else 2, figsize=(13 if measured else 8, 3.5))
    axes[0].bar(names, [metrics[n]["params"] / 1e6 for n in names], color="tab:blue")
    axes[0].set(ylabel="million parameters", title="Size")
    axes[1].bar(names, [metrics[n]["tokens_per_s"] for n in names], color="tab:green")
    axes[1].set(ylabel="tokens/s (forward)", title="Speed")
    if measured:
        axes[2].bar(names, [metrics[n]["decode_tokens_per_s"] for n in names], color="tab:olive")
        axes[2].set(ylabel="tokens/s (greedy decode, batch 1)", title="Decode speed")
        axes[3].bar(names, [metrics[n]["peak_memory_bytes"] / 1e6 for n in names], color="tab:purple", label="peak memory")
        axes[3].bar(names, [metrics[n]["disk_bytes"] / 1e6 for n in names], color="tab:orange", width=0.4, label="on disk")
        axes[3].set(ylabel="MB", title="Memory and disk")
        axes[3].legend()
    for axis in axes:
        axis.tick_params(axis="x", rotation=20)
    paths["speed_size"] = _save(fig, out_dir / "speed_size.png")
    return paths


def retention_table(metrics: dict[str, dict]) -> str:
    ret = retention(metrics)
    keys = sorted({k for r in ret.values() for k in r})
    lines = ["| retention (100% = teacher) | " + " | ".join(ret) + " |", "|---" * (len(ret) + 1) + "|"]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{100 * ret[n][key]:.1f}%" if key in ret[n] else "–" for n in ret) + " |")
    return "\n".join(lines)


def render_report(run_dir: Path, metrics: dict[str, dict], *, notes: list[str] = ()) -> dict:
    """Write plots/*.png, report.md and report.html; returns their paths and the plotted series."""
    run_dir = Path(run_dir)
    models = _models(metrics)
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    steps = read_steps(run_dir)
    plots = plot_training(steps, plots_dir) if steps else {}
    if "teacher" in models:
        plots.update(plot_evaluation(models, plots_dir))
    tables = [markdown_table(models)] + ([retention_table(models)] if "teacher" in models else [])
    md = "# kdkit evaluation\n\nHeld-out data, next-token metrics on the reference answers.\n\n"
    md += "\n\n".join(tables) + "\n\n" + "".join(f"{n}\n\n" for n in notes)
    md += "".join(f"![{name}](plots/{p.name})\n\n" for name, p in plots.items())
    paths = {"md": run_dir / "report.md", "html": run_dir / "report.html"}
    for path, text in ((paths["md"], md), (paths["html"], _html(tables, notes, plots))):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    series = {"step": [r["step"] for r in steps], **{k: [r.get(k) for r in steps] for k in (*TERMS, "kl")}}
    return {**paths, "plots": plots, "series": series}


def _html_table(md_table: str) -> str:
    rows = [[html.escape(c.strip()) for c in line.strip("|").split("|")] for line in md_table.splitlines()]
    head, body = rows[0], rows[2:]
    out = "<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
    return out + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body) + "</table>"


def _html(tables: list[str], notes, plots: dict[str, Path]) -> str:
    imgs = "".join(f'<figure><img src="plots/{p.name}" alt="{name}"><figcaption>{name}</figcaption></figure>'
                   for name, p in plots.items())
    # The script records how many images decoded, so a headless browser test can check they all rendered.
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>kdkit evaluation</title><style>
body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
th:first-child,td:first-child{{text-align:left}}img{{max-width:100%}}figure{{margin:1em 0}}</style></head>
<body><h1>kdkit evaluation</h1><p>Held-out data, next-token metrics on the reference answers.</p>
{"".join(_html_table(t) for t in tables)}{"".join(f"<p>{html.escape(n)}</p>" for n in notes)}{imgs}
<script>window.addEventListener("load",()=>{{const ok=[...document.images].filter(i=>i.complete&&i.naturalWidth>0);
document.body.dataset.imagesLoaded=ok.length;document.body.dataset.imagesTotal=document.images.length;}});</script>
</body></html>
"""
