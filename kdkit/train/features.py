"""White-box distillation as loop plugins: hidden-state and attention-map terms, combined with the
KD objective by `weighting.Weighting`.

Per micro-batch: the wrapped `signal_fn` runs the online teacher with hooks armed and hands its
hidden states (supervised rows) and attention maps on as a `HiddenSignal` on the dense signal; it
also arms the student's hooks, so the loop's own student forward records the matching internals;
the terms then compare the two (the student's rows through a learned projector) and normalise by
the step's supervised-token count. Projectors and learned log-variances are `Plugins.trainable`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from kdkit.config import Config
from kdkit.errors import UserError
from kdkit.losses.feature import align_heads, attention_loss, hidden_loss, uniform_pairs
from kdkit.models.capture import FeatureCapture, attention_probs, decoder_layers
from kdkit.models.forward import supervised_positions
from kdkit.models.projector import Projectors
from kdkit.signal import DenseSignal, HeadSignal, HiddenSignal
from kdkit.train.weighting import Weighting

log = logging.getLogger(__name__)
PROJECTOR_FILE = "projector.safetensors"


def layer_pairs(lc, *, student_layers: int, teacher_layers: int, key: str) -> tuple[list[tuple[int, int]], list[float]]:
    """(pairs, λ per pair) of a hidden/attention section: explicit pairs or uniform ones; λ default 1/len."""
    pairs = [tuple(p) for p in lc.pairs] if lc.pairs is not None else \
        uniform_pairs(lc.layers, student_layers=student_layers, teacher_layers=teacher_layers)
    for s, t in pairs:
        if s >= student_layers or t >= teacher_layers:
            raise UserError(f"{key}.pairs: [{s}, {t}] is out of range: the student has {student_layers} layers and "
                            f"the teacher {teacher_layers} (0-based indices)")
    weights = list(lc.pair_weights) if lc.pair_weights is not None else [1.0 / len(pairs)] * len(pairs)
    return pairs, weights


def query_rows(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention rows (N, h, T) of the supervised query positions: maps (B, h, T, T), mask (B, T-1)."""
    return maps[:, :, :-1].transpose(1, 2)[mask]  # (B, T-1, h, T) → (N, h, T)


class FeatureKD:
    """The hooks, projectors, weighting and terms of one run; `finish(run_dir)` saves and unhooks."""

    def __init__(self, cfg: Config, teacher, student, inner_signal_fn):
        fc = self.fc = cfg.features
        ls, lt = len(decoder_layers(student)), len(decoder_layers(teacher))
        hid, att = fc.hidden, fc.attention
        depth = {"student_layers": ls, "teacher_layers": lt}
        self.hidden_pairs, self.hidden_weights = (
            layer_pairs(hid, key="features.hidden", **depth) if hid.weight > 0 else ([], []))
        self.attn_pairs, self.attn_weights = (
            layer_pairs(att, key="features.attention", **depth) if att.weight > 0 else ([], []))
        if self.attn_pairs and att.heads == "map":
            _check_heads(student, teacher)
        self.teacher_cap = FeatureCapture(teacher, hidden_layers=[t for _, t in self.hidden_pairs],
                                          position=hid.position, attention_layers=[t for _, t in self.attn_pairs])
        self.student_cap = FeatureCapture(student, hidden_layers=[s for s, _ in self.hidden_pairs],
                                          position=hid.position, attention_layers=[s for s, _ in self.attn_pairs])
        self.projectors = self._projectors(student, teacher)
        betas = {**({"hidden": hid.weight} if self.hidden_pairs else {}),
                 **({"attention": att.weight} if self.attn_pairs else {})}
        self.weighting = Weighting(fc.weighting, betas, kd_weight=fc.kd_weight,
                                   dominance_threshold=fc.dominance_threshold, dominance_steps=fc.dominance_steps)
        self.trainable = torch.nn.ModuleDict({
            **({"projectors": self.projectors} if self.projectors is not None else {}),
            **({"weighting": self.weighting} if fc.weighting == "uncertainty" else {})})
        self.inner = inner_signal_fn
        self._student: dict | None = None  # this micro-batch's student captures

    def _projectors(self, student, teacher) -> Projectors | None:
        ds, dt = student.config.hidden_size, teacher.config.hidden_size
        if not self.hidden_pairs:
            return None
        if self.fc.hidden.projector == "none":
            if ds != dt:
                raise UserError(f"features.hidden.projector=none needs equal widths, but the student's hidden size is "
                                f"{ds} and the teacher's {dt}: choose identity, xavier or orthogonal")
            return None
        return Projectors(self.hidden_pairs, d_student=ds, d_teacher=dt, init=self.fc.hidden.projector)

    # ---- the teacher side: a signal_fn wrapper

    @torch.no_grad()
    def signal_fn(self, batch: dict) -> DenseSignal:
        """The inner dense signal, carrying the teacher's HiddenSignal; arms the student's hooks."""
        with self.teacher_cap.recording():
            dense = self.inner(batch)
        if not isinstance(dense, (DenseSignal, HeadSignal)):
            raise UserError("hidden/attention distillation needs the online teacher (teacher.signal=online)")
        mask, _ = supervised_positions(batch["labels"])  # (B, T-1)
        cap = self.teacher_cap
        if any(t not in cap.hidden for _, t in self.hidden_pairs) or any(t not in cap.attn for _, t in self.attn_pairs):
            raise UserError("features: the signal of this step did not come from a forward of the teacher model "
                            "(cache, self-distillation or another mode replaced it); hidden/attention distillation "
                            "needs teacher.signal=online with the configured teacher")
        hidden = {t: cap.hidden[t][:, :-1][mask] for _, t in self.hidden_pairs}  # {t: (N, H_t)}
        maps = {t: cap.attention_probs(t, max_seq_len=self.fc.attention.max_seq_len) for _, t in self.attn_pairs}
        cap.clear()
        self.student_cap.arm()  # the loop's student forward of this micro-batch comes next
        return dataclasses.replace(dense, hidden=HiddenSignal(hidden=hidden, attentions=maps,
                                                              provenance=dense.provenance))

    # ---- the student side: terms

    def _captures(self) -> dict:
        """The student's internals from the forward since the last signal_fn (taken once, then unhooked
        until the next micro-batch, so a checkpointed layer's recomputation in backward records nothing)."""
        if self.student_cap.armed:
            cap = self.student_cap
            self._student = {"hidden": dict(cap.hidden), "attn": {i: dict(r) for i, r in cap.attn.items()}}
            cap.disarm()
            cap.clear()
        if self._student is None:
            raise RuntimeError("no student captures: the feature terms need the wrapped signal_fn of this plugin")
        return self._student

    def _teacher(self, signal) -> HiddenSignal:
        hidden = getattr(signal, "hidden", None)
        if hidden is None:
            raise UserError("hidden/attention distillation needs the online teacher's internals "
                            "(teacher.signal=online); this signal carries none")
        return hidden

    def hidden_term(self, batch: dict, signal, num_tokens: int) -> torch.Tensor:
        """Σ_pairs λ_p · distance(P_p(student rows), teacher rows), normalised by the step's tokens."""
        student, teacher = self._captures(), self._teacher(signal)
        mask, _ = supervised_positions(batch["labels"])  # (B, T-1)
        self.weighting.share = int(mask.sum()) / max(num_tokens, 1)
        total = 0.0
        for (s, t), lam in zip(self.hidden_pairs, self.hidden_weights):
            rows = student["hidden"][s][:, :-1][mask]  # (N, H_s)
            if self.projectors is not None:
                rows = self.projectors[s, t](rows)  # (N, H_t)
            with torch.autocast(rows.device.type, enabled=False):  # distances in fp32
                total = total + lam * hidden_loss(rows.float(), teacher.hidden[t].float(),
                                                  distance=self.fc.hidden.distance, num_tokens=num_tokens)
        return total

    def attention_term(self, batch: dict, signal, num_tokens: int) -> torch.Tensor:
        """Σ_pairs λ_p · loss(student attention rows, teacher rows) over supervised queries."""
        student, teacher = self._captures(), self._teacher(signal)
        mask, _ = supervised_positions(batch["labels"])  # (B, T-1)
        self.weighting.share = int(mask.sum()) / max(num_tokens, 1)
        ac, total = self.fc.attention, 0.0
        for (s, t), lam in zip(self.attn_pairs, self.attn_weights):
            rec = student["attn"][s]
            maps = _student_probs(rec, ac.max_seq_len)  # (B, h_s, T, T)
            with torch.autocast(maps.device.type, enabled=False):
                total = total + lam * attention_loss(query_rows(maps, mask), query_rows(teacher.attentions[t], mask),
                                                     loss=ac.loss, heads=ac.heads, num_tokens=num_tokens)
        return total

    def terms(self) -> dict:
        return {**({"hidden": self.hidden_term} if self.hidden_pairs else {}),
                **({"attention": self.attention_term} if self.attn_pairs else {})}

    def finish(self, run_dir: Path, *, save: bool = True) -> Path | None:
        """Unhook both models and write RUN_DIR/projector.safetensors (when there are projectors and `save`)."""
        self.teacher_cap.remove()
        self.student_cap.remove()
        self._student = None
        if self.projectors is None or not save:
            return None
        return self.projectors.save(Path(run_dir) / PROJECTOR_FILE)


def _student_probs(rec: dict, max_seq_len: int) -> torch.Tensor:
    return attention_probs(rec["module"], rec["q"], rec["k"], rec["position_embeddings"], rec["attention_mask"],
                           max_seq_len=max_seq_len)


def _check_heads(student, teacher) -> None:
    hs, ht = student.config.num_attention_heads, teacher.config.num_attention_heads
    try:
        align_heads(torch.zeros(1, hs, 1), torch.zeros(1, ht, 1), heads="map")
    except ValueError as e:
        raise UserError(f"features.attention.heads=map: {e}") from None


def feature_plugins(cfg: Config, teacher, student, signal_fn, plugins):
    """Add hidden-state / attention distillation (cfg.features) to `plugins`; returns (signal_fn, FeatureKD).

    Off (both weights 0): returns the signal_fn unchanged and None, and never touches the teacher's
    weights. `teacher` is the run's Teacher (its `.model` is loaded only when needed) or a model.
    """
    fc = cfg.features
    if not fc.enabled:
        return signal_fn, None
    if cfg.teacher.signal != "online":
        raise UserError(f"features (hidden/attention distillation) need the teacher's internals in every step: set "
                        f"teacher.signal=online (it is {cfg.teacher.signal!r}), or set features.hidden.weight and "
                        "features.attention.weight to 0")
    if plugins.combine is not None:
        raise UserError("features cannot be combined with a training mode that sets its own loss combiner; "
                        "turn one of them off")
    model = teacher if isinstance(teacher, torch.nn.Module) else teacher.model
    kd = FeatureKD(cfg, model, student, signal_fn)
    plugins.terms.update(kd.terms())
    plugins.combine = kd.weighting
    if len(kd.trainable):  # beside other modes' trainables, if any
        if plugins.trainable is None:
            plugins.trainable = torch.nn.ModuleDict()
        elif not isinstance(plugins.trainable, torch.nn.ModuleDict):
            plugins.trainable = torch.nn.ModuleDict({"extras": plugins.trainable})
        plugins.trainable["features"] = kd.trainable
    plugins.after_step.append(kd.weighting.after_step)
    log.info("features: hidden pairs %s (%s), attention pairs %s (%s), weighting %s", kd.hidden_pairs,
             fc.hidden.distance, kd.attn_pairs, fc.attention.loss, fc.weighting)
    return kd.signal_fn, kd
