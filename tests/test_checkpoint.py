import torch

from kdkit.config import TrainConfig
from kdkit.models.tiny import tiny_llama
from kdkit.train.checkpoint import list_checkpoints, load_latest, save_checkpoint
from kdkit.train.optim import build_optimizer, lr_factor


def _setup(seed):
    model = tiny_llama(vocab_size=40, seed=seed)
    opt, sched = build_optimizer(model, TrainConfig(max_steps=10, warmup_steps=2))
    return model, opt, sched


def _train_one(model, opt, sched):
    loss = model(torch.arange(8)[None]).logits.square().mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_roundtrip_and_damaged_checkpoint_falls_back(tmp_path, caplog):
    model, opt, sched = _setup(0)
    _train_one(model, opt, sched)
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, keep=3)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    _train_one(model, opt, sched)
    last = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, keep=3)
    # a flipped byte in the newest checkpoint: detected, the previous one is used
    blob = bytearray((last / "model.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (last / "model.safetensors").write_bytes(bytes(blob))
    fresh, opt2, sched2 = _setup(1)
    step, _ = load_latest(tmp_path, model=fresh, optimizer=opt2, scheduler=sched2)
    assert step == 1
    assert "step-00000002 is damaged (model.safetensors checksum mismatch)" in caplog.text
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in good.items())
    assert sched2.last_epoch == 1


def test_torn_write_is_invisible_and_old_checkpoints_pruned(tmp_path):
    model, opt, sched = _setup(0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched, keep=2)
    (tmp_path / "step-00000004.tmp").mkdir()  # what a kill during a write leaves behind
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]


def test_schedule_warms_up_then_decays_to_floor():
    f = [lr_factor(s, warmup=2, total=10, floor=0.1) for s in range(12)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert all(a >= b for a, b in zip(f[2:], f[3:])) and abs(f[10] - 0.1) < 1e-12
    line = [lr_factor(s, warmup=2, total=10, floor=0.0, shape="linear") for s in range(12)]
    assert line[:2] == [0.5, 1.0] and line[6] == 0.5 and line[10] == 0.0  # half-way down at step 6 of 2..10
    assert all(abs((a - b) - 0.125) < 1e-12 for a, b in zip(line[2:10], line[3:11]))  # a straight line


def test_linear_schedule_reaches_the_optimizer(tmp_path):
    from kdkit.config import load_config

    model = torch.nn.Linear(2, 2)
    tc = load_config(None, ["train.schedule=linear", "train.min_lr_ratio=0", "train.warmup_steps=0",
                            "train.max_steps=4", "train.lr=1.0"]).train
    opt, sched = build_optimizer(model, tc)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [1.0, 0.75, 0.5, 0.25]


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_with_code_is_refused_and_unsafe_names_flagged(tmp_path):
    import hashlib
    import json

    import pytest

    from kdkit.errors import UserError
    from kdkit.train.checkpoint import verify

    model, opt, sched = _setup(0)
    ckpt = save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched)
    torch.save({"optimizer": _Evil(), "scheduler": {}}, ckpt / "optim.pt")  # checksums updated below
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sha256"]["optim.pt"] = hashlib.sha256((ckpt / "optim.pt").read_bytes()).hexdigest()
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="refusing to load .*optim.pt"):
        load_latest(tmp_path, model=model, optimizer=opt, scheduler=sched)
    meta["sha256"]["../../outside"] = "0" * 64
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert "unsafe file name" in verify(ckpt)


def test_a_failed_write_a_full_disk_is_a_clear_error_and_the_checkpoint_before_it_stays(tmp_path, monkeypatch):
    """A full disk made torch's writer raise `RuntimeError: basic_ios::clear: iostream error` mid-write: the
    run must end with a UserError (exit 2) naming the checkpoint, the free space and where a rerun resumes,
    the partial write removed, the previous checkpoint whole and loadable."""
    import pytest

    from kdkit.errors import UserError
    from kdkit.train import checkpoint

    model, opt, sched = _setup(0)
    _train_one(model, opt, sched)
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched)

    def full(*a, **k):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(UserError, match=r"step-00000002 \(RuntimeError: basic_ios::clear.*GiB free.*resumes from "
                                        r"step-00000001"):
        save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]  # no partial step-00000002.tmp left
    fresh, opt2, sched2 = _setup(1)
    assert load_latest(tmp_path, model=fresh, optimizer=opt2, scheduler=sched2)[0] == 1
