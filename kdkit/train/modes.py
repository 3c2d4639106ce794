"""Training modes as loop `Plugins`: on-policy samples, replay data, an EMA teacher, a KL anchor.

Everything here is a plain function returning the callables of `Plugins` (see loop.py): a mode is a
configuration of the one loop, never another trainer. Randomness (which micro-batches go
on-policy, the student's samples, which replay rows) is a pure function of (seed, step, the batch's
example ids), so a killed and resumed run sees exactly what an uninterrupted one would.
"""

from __future__ import annotations

import copy
import zlib
from typing import Callable

import torch

from kdkit.config import Config, OnPolicyConfig
from kdkit.data.collate import collate
from kdkit.data.render import IGNORE, TokenizedData
from kdkit.losses import distill_loss, forward_kl, normalize
from kdkit.models.forward import supervised_logits, supervised_positions
from kdkit.models.load import freeze
from kdkit.train.loop import Plugins, _div_kwargs, pick_device


def batch_seed(seed: int, step: int, ids: list[str], salt: str) -> int:
    """A seed fixed by the run's seed, the step and the micro-batch's examples (not by call order)."""
    return zlib.crc32(f"{salt}/{seed}/{step}/{','.join(ids)}".encode())


def batch_rows(batch: dict) -> tuple[list[list[int]], list[list[int]]]:
    """(input_ids, labels) of every row of a right-padded batch, padding removed."""
    lengths = batch["attention_mask"].sum(1).tolist()
    ids = [row[:n] for row, n in zip(batch["input_ids"].tolist(), lengths)]
    labels = [row[:n] for row, n in zip(batch["labels"].tolist(), lengths)]
    return ids, labels


def rebuild(batch: dict, ids, labels, *, pad_id: int, **extra) -> dict:
    """A new right-padded batch from rows, keeping the batch's other entries (ids, log)."""
    out = {k: v for k, v in batch.items() if not torch.is_tensor(v)}
    out.update(collate(ids, labels, pad_id=pad_id), **extra)
    return out


def chain(*fns: Callable | None) -> Callable | None:
    """prepare functions applied in order (None entries skipped)."""
    fns = [f for f in fns if f is not None]
    if not fns:
        return None

    def prepare(batch, step):
        for f in fns:
            batch = f(batch, step)
        return batch

    return prepare


# ---------------------------------------------------------------- on-policy (GKD)


def prompt_part(ids: list[int], labels: list[int]) -> list[int]:
    """The tokens before the first supervised label: the prompt the answer continues."""
    first = next((i for i, label in enumerate(labels) if label != IGNORE), len(ids))
    return ids[:max(first, 1)]


@torch.no_grad()
def sample_answers(student, prompts: list[list[int]], oc: OnPolicyConfig, *, seed: int, pad_id: int,
                   eos_id: int | None) -> list[list[int]]:
    """Continuations the student samples (or, oc.greedy, decodes greedily) for left-padded prompts, cut
    after the first EOS."""
    device = next(student.parameters()).device
    batch = collate(prompts, None, pad_id=pad_id, side="left")  # (B, P), prompts end at P
    was_training = student.training
    student.eval()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # sampling never moves the run's own RNG stream
        torch.manual_seed(seed)
        sampling = {"do_sample": False} if oc.greedy else {"do_sample": True, "temperature": oc.temperature,
                                                             "top_p": oc.top_p, "top_k": 0}
        out = student.generate(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device), **sampling,
                               max_new_tokens=oc.max_new_tokens, min_new_tokens=1, pad_token_id=pad_id,
                               eos_token_id=eos_id)  # (B, P + new)
    student.train(was_training)
    answers = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        cut = row.index(eos_id) + 1 if eos_id in row else len(row)
        answers.append(row[:cut])
    return answers


def onpolicy_prepare(student, oc: OnPolicyConfig, *, seed: int, pad_id: int, eos_id: int | None) -> Callable:
    """`prepare`: with probability λ (decided by seed, step and the examples) a micro-batch's answers
    are replaced by the student's own samples, which become the supervised tokens; the teacher
    then scores them. Marks `batch["on_policy"]` and logs `on_policy` (the share of micro-batches)."""

    def prepare(batch: dict, step: int) -> dict:
        key = batch_seed(seed, step, batch["ids"], "onpolicy")
        chosen = torch.rand((), generator=torch.Generator().manual_seed(key)).item() < oc.fraction
        batch.setdefault("log", {})["on_policy"] = float(chosen)
        if not chosen:
            return batch
        ids, labels = batch_rows(batch)
        prompts = [prompt_part(i, l) for i, l in zip(ids, labels)]
        answers = sample_answers(student, prompts, oc, seed=key, pad_id=pad_id, eos_id=eos_id)
        new_ids = [p + a for p, a in zip(prompts, answers)]
        new_labels = [[IGNORE] * len(p) + a for p, a in zip(prompts, answers)]
        return rebuild(batch, new_ids, new_labels, pad_id=pad_id, on_policy=True)

    return prepare


# ---------------------------------------------------------------- replay (anti-forgetting)


def replay_count(batch_size: int, ratio: float) -> int:
    """Replay rows appended to a micro-batch of `batch_size` so they make up `ratio` of it."""
    return round(batch_size * ratio / (1.0 - ratio)) if ratio > 0 else 0


def replay_prepare(data: TokenizedData, ratio: float, *, seed: int, pad_id: int) -> Callable:
    """`prepare`: appends general-data rows (ids prefixed `replay:`) to every micro-batch; logs
    `replay_fraction`. Replay rows are trained like any other (KD + CE on their answers)."""

    def prepare(batch: dict, step: int) -> dict:
        ids, labels = batch_rows(batch)
        n = replay_count(len(ids), ratio)
        g = torch.Generator().manual_seed(batch_seed(seed, step, batch["ids"], "replay"))
        picks = torch.randint(len(data.input_ids), (n,), generator=g).tolist()
        ids += [data.input_ids[i] for i in picks]
        labels += [data.labels[i] for i in picks]
        out = rebuild(batch, ids, labels, pad_id=pad_id)
        out["ids"] = list(batch["ids"]) + [f"replay:{data.ids[i]}" for i in picks]
        out.setdefault("log", {})["replay_fraction"] = n / len(ids)
        return out

    return prepare


# ---------------------------------------------------------------- student logits for terms


class LogitsTap:
    """Keeps the last output of the student's lm_head (with its graph), so terms reuse the student's
    forward instead of running another. Dense path only (the fused path never calls the head)."""

    def __init__(self, student, vocab: int):
        self.vocab, self.last = vocab, None
        student.get_output_embeddings().register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.last = output

    def take(self) -> torch.Tensor:
        """The student's logits (N, V) of the current micro-batch (terms run right after its forward)."""
        if self.last is None or self.last.dim() != 2:
            raise RuntimeError("no student logits captured: this mode needs loss.implementation=dense")
        return self.last[:, :self.vocab]  # (N, V)


def anchor_term(tap: LogitsTap, anchor, *, vocab: int, weight: float) -> Callable:
    """Term: weight · KL(anchor ‖ student) on supervised tokens, normalised by the step's count."""

    def term(batch: dict, signal, num_tokens: int) -> torch.Tensor:
        s_logits = tap.take()  # (N, V)
        with torch.no_grad():
            a_logits, _ = supervised_logits(anchor, batch, vocab=vocab)  # (N, V)
        return weight * normalize(forward_kl(s_logits, a_logits).sum(), num_tokens)

    return term


def teacher_terms(tap: LogitsTap, signal_fns: list[Callable], weights: list[float], cfg: Config) -> dict:
    """teachers.combine=sum: one term per extra teacher, w_i · α · T² · KD(teacher i), logged as
    term/teacher{i} (teacher 0 is the loop's own signal, weighted through its `weight`)."""
    lc = cfg.loss

    def make(fn, w):
        def term(batch: dict, signal, num_tokens: int) -> torch.Tensor:
            with torch.no_grad():
                other = fn(batch)
            _, targets = supervised_positions(batch["labels"])
            parts = distill_loss(tap.take(), other, targets, divergence=lc.divergence, temperature=lc.temperature,
                                 alpha=1.0, num_tokens=num_tokens, **_div_kwargs(lc))
            return w * lc.alpha * parts.total

        return term

    return {f"teacher{i}": make(fn, w) for i, (fn, w) in enumerate(zip(signal_fns, weights), start=1)}


# ---------------------------------------------------------------- self-distillation


class EmaTeacher(torch.nn.Module):
    """An exponential moving average of the student, used as its teacher. A module, so it rides
    among the loop's trained modules and is checkpointed (its parameters need no gradient)."""

    def __init__(self, student, decay: float):
        super().__init__()
        self.model = freeze(copy.deepcopy(student))
        self.decay = decay
        self._student = [student]  # a list: not a submodule (not saved twice)

    @torch.no_grad()
    def update(self, step: int) -> None:
        for ema, live in zip(self.model.parameters(), self._student[0].parameters()):
            ema.lerp_(live.detach(), 1.0 - self.decay)


def with_trainable(plugins: Plugins, name: str, module: torch.nn.Module) -> None:
    """Add a module to the plugins' trained (checkpointed) modules."""
    if plugins.trainable is None:
        plugins.trainable = torch.nn.ModuleDict()
    elif not isinstance(plugins.trainable, torch.nn.ModuleDict):
        plugins.trainable = torch.nn.ModuleDict({"extras": plugins.trainable})
    plugins.trainable[name] = module


# ---------------------------------------------------------------- builders (called by recipes/distill.py)


def self_distill_teacher(cfg: Config, student, plugins: Plugins):
    """The frozen teacher modes.self_distill asks for (None when off): a copy of the student's
    initial weights, or an EMA of the student updated after every optimizer step."""
    sd = cfg.modes.self_distill
    if sd.teacher == "off":
        return None
    if sd.teacher == "initial":
        return freeze(copy.deepcopy(student)).to(pick_device(cfg.train.device))
    ema = EmaTeacher(student, sd.ema_decay)
    with_trainable(plugins, "ema_teacher", ema)
    plugins.after_step.append(ema.update)
    return ema.model


def add_mode_plugins(plugins: Plugins, cfg: Config, student, *, vocab: int, pad_id: int, eos_id: int | None,
                     replay: TokenizedData | None = None, extra_signals=()) -> Plugins:
    """Adds what modes.replay / onpolicy / anchor / teachers(sum) need to `plugins`; returns it.

    Call after `self_distill_teacher` (copies of the student must not carry the logits hook)."""
    m, seed = cfg.modes, cfg.train.seed
    prepares = [plugins.prepare]
    if m.replay.ratio > 0:
        prepares.append(replay_prepare(replay, m.replay.ratio, seed=seed, pad_id=pad_id))
    if m.onpolicy.fraction > 0:
        prepares.append(onpolicy_prepare(student, m.onpolicy, seed=seed, pad_id=pad_id, eos_id=eos_id))
    plugins.prepare = chain(*prepares)
    anchor = freeze(copy.deepcopy(student)).to(pick_device(cfg.train.device)) if m.anchor.weight > 0 else None
    if anchor is None and not extra_signals:
        return plugins
    tap = LogitsTap(student, vocab)
    if anchor is not None:
        plugins.terms["anchor"] = anchor_term(tap, anchor, vocab=vocab, weight=m.anchor.weight)
    if extra_signals:
        fns, weights = zip(*extra_signals)
        plugins.terms.update(teacher_terms(tap, list(fns), list(weights), cfg))
    return plugins
