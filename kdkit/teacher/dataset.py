"""The generated dataset on disk: jsonl shards, manifest.json and the diversity report, in one directory.

    OUT/shard-00000.jsonl …    {"id", "task", "strategy", "messages": [system?, user, assistant], extras}
    OUT/manifest.json          teacher, licence decision, templates (SHA-256), sampling, counts, shards
    OUT/diversity.json, OUT/lengths.png

Rows are sorted by id and the whole directory is rewritten from the stage files at the end of every
run (shards and manifest each written to a temporary name and renamed), so its content depends only
on what the teacher wrote, not on how many times the run was interrupted. `kdkit sft` and
`data.train` read the directory as one dataset.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kdkit.data.quality import apply_filters, diversity_report
from kdkit.utils import atomic_json

FORMAT = "kdkit-generate"
MANIFEST = "manifest.json"
ROW_EXTRAS = ("source_id", "reasoning", "answer", "checked", "score", "draft", "confidence", "teacher_logprobs")


def to_row(item: dict, *, system: str | None = None) -> dict:
    """A training row: the input as the user turn, the teacher's (parsed) answer as the assistant turn."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": item["input"]}, {"role": "assistant", "content": item["output"]}]
    row = {"id": item["id"], "task": item["task"], "strategy": item["strategy"], "messages": messages}
    row.update({k: item[k] for k in ROW_EXTRAS if item.get(k) is not None})
    return row


def write_dataset(items: list[dict], out_dir: Path, *, filters, shard_size: int, systems: dict[str, str | None],
                  manifest: dict) -> dict:
    """Filter `items`, write shards + report + manifest to `out_dir`; returns the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kept, removed = apply_filters(items, filters)
    rows = [to_row(it, system=systems.get(it["task"])) for it in kept]
    shards = _write_shards(rows, out_dir, shard_size=shard_size)
    report = diversity_report(kept, out_dir, before=len(items))
    atomic_json(out_dir / "diversity.json", report)
    manifest = {
        "format": FORMAT, **manifest,
        "counts": {**manifest.get("counts", {}), "before_filters": len(items), "removed_by_filter": removed,
                   "rows": len(rows)},
        "shards": shards, "diversity": {k: v for k, v in report.items() if k != "length_histogram"},
    }
    atomic_json(out_dir / MANIFEST, manifest, sort_keys=False)
    return manifest


def _write_shards(rows: list[dict], out_dir: Path, *, shard_size: int) -> list[dict]:
    """shard-NNNNN.jsonl files of `shard_size` rows; shards left from a bigger earlier run are removed."""
    shards = []
    for n, start in enumerate(range(0, len(rows), shard_size)):
        path = out_dir / f"shard-{n:05d}.jsonl"
        chunk = rows[start : start + shard_size]
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        shards.append({"file": path.name, "rows": len(chunk)})
    names = {s["file"] for s in shards}
    for stale in out_dir.glob("shard-*.jsonl"):
        if stale.name not in names:
            stale.unlink()
    return shards


def read_manifest(path: str | Path | None) -> dict | None:
    """The manifest of a generated dataset directory (or of the directory holding a shard), else None."""
    if not path:
        return None
    p = Path(path)
    for candidate in (p / MANIFEST, p.parent / MANIFEST, p.with_name(p.name + ".manifest.json")):
        if candidate.is_file():
            try:
                manifest = json.loads(candidate.read_text())
            except json.JSONDecodeError:
                continue
            if isinstance(manifest, dict) and "teacher" in manifest:  # not some other tool's manifest
                return manifest
    return None
