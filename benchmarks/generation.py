"""Teacher generation throughput: local sequential (batch 1) vs local batched vs a vLLM server vs vLLM's
offline engine, one run.

    nice -n 5 python benchmarks/generation.py [--prompts 32 --sequential-prompts 8 --batch-size 32]

All backends answer the same packaged prompts with the packaged teacher (smollm2-135m-instruct),
greedy, `--max-new-tokens` each, through kdkit's own backends (`generate_answers`,
`generate_answers_http`, `generate_answers_vllm`). Tokens are counted by re-tokenising the answers
with the teacher's tokenizer, the same way for every backend. The vLLM rows run when `.venv-vllm`
(see tests/test_vllm.py) holds vLLM (and, for the engine row, kdkit: `pip install -e .` there); the
engine row runs in that environment's Python, in a subprocess of this script. Start-up (server or
engine load) is reported, not counted. Ratios are against the
sequential row measured in this same run (the machine is shared and noisy). Target: batched ≥ 3×.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import requests
import torch

from kdkit.config import build_config
from kdkit.data.sources import load_examples
from kdkit.teacher.generate import generate_answers
from kdkit.teacher.http import generate_answers_http
from kdkit.train.setup import load_teacher

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"


def count_tokens(path: Path, tokenizer) -> int:
    answers = [json.loads(line)["messages"][-1]["content"] for line in path.read_text().splitlines()]
    return sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)


def timed(name: str, fn, out: Path, tokenizer, prompts: int) -> dict:
    t0 = time.perf_counter()
    fn(out)
    seconds = time.perf_counter() - t0
    tokens = count_tokens(out, tokenizer)
    row = {"backend": name, "prompts": prompts, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}
    print(f"measured: {row}", flush=True)  # kept even if a later row is cut short
    return row


def has_vllm() -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return VLLM_PY.exists() and subprocess.run([str(VLLM_PY), "-c", probe]).returncode == 0


def start_vllm(model_dir: Path, log_path: Path, *, timeout: float):
    """(process, base url, start-up seconds) of a vLLM server on a free port, or raises TimeoutError."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host",
           "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--dtype", "float32",
           "--enforce-eager"]  # eager: no kernel compile at start-up (minutes on 2 cores), as in tests/test_vllm.py
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited ({proc.returncode}): {log_path.read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/models", timeout=5).ok:
                    return proc, url, time.monotonic() - t0
            except requests.RequestException:
                pass
            time.sleep(2)
    except BaseException:  # interrupted while waiting (SIGTERM, Ctrl-C): never leave the server behind
        stop(proc)
        raise
    stop(proc)
    raise TimeoutError(f"vLLM did not answer in {timeout:.0f} s")


def stop(proc) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32, help="prompts answered by the batched and vLLM backends")
    ap.add_argument("--sequential-prompts", type=int, default=8, help="prompts answered one at a time")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32, help="vLLM: requests in flight")
    ap.add_argument("--vllm-start-timeout", type=float, default=300)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--engine-worker", nargs=2, metavar=("MODEL_DIR", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine_worker:
        return engine_worker(args, *map(Path, args.engine_worker))
    # `timeout` sends SIGTERM: exit through the finally blocks, so a starting vLLM server is stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.threads:
        torch.set_num_threads(args.threads)

    examples = load_examples(files("kdkit") / "assets" / "instructions" / "train.jsonl")[: args.prompts]
    teacher = load_teacher(build_config({"teacher": {"path": "smollm2-135m-instruct"}}))
    model, tok = teacher.model, teacher.tokenizer
    print(f"teacher {teacher.source.id}, torch threads {torch.get_num_threads()}, "
          f"max_new_tokens {args.max_new_tokens}, greedy")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        local = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
        seq = examples[: args.sequential_prompts]
        rows.append(timed("local sequential (batch 1)", lambda out: generate_answers(
            model, tok, seq, out, batch_size=1, **local), tmp / "seq.jsonl", tok, len(seq)))
        rows.append(timed(f"local batched (batch {args.batch_size})", lambda out: generate_answers(
            model, tok, examples, out, batch_size=args.batch_size, **local), tmp / "batched.jsonl", tok,
            len(examples)))
        if args.no_vllm or not has_vllm():
            print("vLLM: skipped (no .venv-vllm with vllm; see tests/test_vllm.py)" if not args.no_vllm else "")
        else:
            rows += vllm_row(args, model, tok, examples, tmp)
            rows += engine_row(args, tok, examples, tmp)
    base = rows[0]["tok_s"]
    print(f"\n{'backend':34} {'prompts':>7} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'vs sequential':>14}")
    for r in rows:
        print(f"{r['backend']:34} {r['prompts']:7d} {r['tokens']:7d} {r['seconds']:8.1f} {r['tok_s']:8.1f} "
              f"{r['tok_s'] / base:13.2f}x")


def vllm_row(args, model, tok, examples, tmp: Path) -> list[dict]:
    """The vLLM server's row: the teacher saved as an HF directory, served, answered over HTTP."""
    model_dir = tmp / "teacher-hf"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    try:
        proc, url, startup = start_vllm(model_dir, tmp / "vllm.log", timeout=args.vllm_start_timeout)
    except (TimeoutError, RuntimeError) as e:
        print(f"vLLM: skipped ({e})")
        return []
    print(f"vLLM server up in {startup:.0f} s (not counted)")
    try:
        return [timed(f"vLLM server (concurrency {args.concurrency})", lambda out: generate_answers_http(
            examples, out, base_urls=[url], model=str(model_dir), api_key=None, max_new_tokens=args.max_new_tokens,
            temperature=0.0, top_p=1.0, concurrency=args.concurrency, timeout=600, max_retries=2),
            tmp / "vllm.jsonl", tok, len(examples))]
    finally:
        stop(proc)


def engine_row(args, tok, examples, tmp: Path) -> list[dict]:
    """vLLM's offline engine (teacher.backend=vllm), in .venv-vllm's Python: load, then time the answers."""
    out = tmp / "engine.jsonl"
    cmd = [str(VLLM_PY), __file__, "--engine-worker", str(tmp / "teacher-hf"), str(out),
           "--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
    if r.returncode != 0:
        print(f"vLLM engine: skipped (exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]})")
        return []
    # vLLM logs to stdout too (its shutdown comes after the report): the report is the line with "load_s"
    report = json.loads(next(line for line in reversed(r.stdout.splitlines()) if line.startswith('{"load_s"')))
    print(f"vLLM engine loaded in {report['load_s']:.0f} s (not counted)")
    tokens = count_tokens(out, tok)
    row = {"backend": "vLLM offline engine", "prompts": len(examples), "tokens": tokens,
           "seconds": report["seconds"], "tok_s": tokens / report["seconds"]}
    print(f"measured: {row}", flush=True)
    return [row]


def engine_worker(args, model_dir: Path, out: Path) -> None:
    """Runs in .venv-vllm: prints {"load_s", "seconds"} on a line of its own."""
    from kdkit.teacher.vllm_engine import generate_answers_vllm, load_engine

    examples = load_examples(files("kdkit") / "assets" / "instructions" / "train.jsonl")[: args.prompts]
    t0 = time.perf_counter()
    engine = load_engine(model_dir, engine_args={"dtype": "float32", "max_model_len": 2048, "enforce_eager": True},
                         top_logprobs=0, seed=0, trust_remote_code=False)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    generate_answers_vllm(engine, examples, out, max_new_tokens=args.max_new_tokens, temperature=0.0, top_p=1.0)
    print(json.dumps({"load_s": load_s, "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
