"""Speed and memory of one model: prefill and decode tokens/s, latency per token, peak memory, disk size.

- prefill: one forward over a (1, prompt_tokens) prompt, best of `repeats`;
- decode: `new_tokens` greedy steps of one token each on the KV cache left by the prefill, batch 1
  (what a chat user waits for); latency per token = decode seconds / new tokens;
- peak memory: on CUDA, `torch.cuda.max_memory_allocated` during the measurement. On CPU it is the
  growth of the peak resident set size (Linux VmHWM, reset after the imports; elsewhere `ru_maxrss`)
  of a fresh Python process, from after its imports to after loading the model from its directory
  and running the same measurement: weights, KV cache, activations and allocator overhead, plus
  load-time transients (an upper bound). `tracemalloc` would miss torch's allocations entirely;
- disk: bytes of the weight files (*.safetensors, *.bin, *.gguf) in the model's directory.

Run as a module it measures directories and prints one JSON line each: `python -m kdkit.eval.speed DIR…`.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf")


@torch.no_grad()
def measure_speed(model, *, prompt_tokens: int = 128, new_tokens: int = 32, repeats: int = 2,
                  device="cpu") -> dict[str, float]:
    """Prefill and decode throughput of `model` (batch 1, random prompt ids, greedy decode)."""
    model.eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(4, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    best_prefill, best_decode = float("inf"), float("inf")
    for _ in range(repeats):  # the first pass also warms kernels and allocator; keep the best
        t0 = _now(cuda)
        # logits_to_keep=1: only the last position goes through the head, as in generate()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        best_prefill = min(best_prefill, _now(cuda) - t0)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)  # (1, 1)
        t0 = _now(cuda)
        for _ in range(new_tokens):
            out = model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        best_decode = min(best_decode, _now(cuda) - t0)
    result = {
        "prefill_tokens_per_s": prompt_tokens / best_prefill,
        "decode_tokens_per_s": new_tokens / best_decode,
        "ms_per_token": 1000 * best_decode / new_tokens,
        "speed_prompt_tokens": prompt_tokens, "speed_new_tokens": new_tokens,
    }
    if cuda:
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def _now(cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()  # kernels run asynchronously: time what finished
    return time.perf_counter()


def disk_bytes(model_dir: str | Path) -> int:
    """Bytes of the weight files in a model directory (tokenizer and config files are not counted)."""
    d = Path(model_dir)
    return sum(p.stat().st_size for pattern in WEIGHT_FILES for p in d.glob(pattern) if p.is_file())


def _max_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux: VmHWM, which _reset_peak_rss can lower)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> int:
    """Lower the peak RSS to the current RSS where the OS allows it (Linux >= 4.0: clear_refs 5), so that
    the transient peak of the imports does not hide the model's; returns the peak to measure from."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # elsewhere: growth of ru_maxrss over the imports' peak, an underestimate for small models
    return _max_rss_bytes()


def measure_dirs(model_dirs: list, *, prompt_tokens: int = 128, new_tokens: int = 32, threads: int = 1,
                 timeout: float = 1800) -> list[dict[str, float]]:
    """Speed, peak memory (CPU: peak RSS growth) and disk size of the model in each directory, measured
    in a fresh process per directory: memory freed by a previous model stays resident in its process, so
    a later, smaller model measured there would show no growth at all."""
    groups = [[d] for d in model_dirs]
    results = []
    for group in groups:
        cmd = [sys.executable, "-m", "kdkit.eval.speed", *map(str, group), "--prompt-tokens", str(prompt_tokens),
               "--new-tokens", str(new_tokens), "--threads", str(threads)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"speed measurement of {group} failed:\n{r.stderr[-2000:]}")
        results += [json.loads(line) for line in r.stdout.strip().splitlines()[-len(group):]]
    return results


def measure_dir(model_dir: str | Path, **kwargs) -> dict[str, float]:
    """`measure_dirs` for one directory."""
    return measure_dirs([model_dir], **kwargs)[0]


def _main(argv: list[str] | None = None) -> None:
    import argparse
    import gc

    ap = argparse.ArgumentParser(description="speed, peak memory and disk size of HF model directories")
    ap.add_argument("model_dirs", nargs="+")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from kdkit.models.load import load_model, resolve  # imported before the baseline: not the model's memory

    for model_dir in args.model_dirs:
        gc.collect()  # the previous model's tensors are gone before the peak is reset
        baseline = _reset_peak_rss()
        model = load_model(resolve(model_dir))
        result = measure_speed(model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
        result["peak_memory_bytes"] = _max_rss_bytes() - baseline
        result["disk_bytes"] = disk_bytes(model_dir)
        print(json.dumps(result), flush=True)
        del model


if __name__ == "__main__":
    _main()
