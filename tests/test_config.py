import subprocess
import sys

import pytest

from kdkit.config import Config, build_config, dump_config, load_config, parse_override
from kdkit.errors import UserError


def test_defaults_validate_and_print_with_docs():
    text = dump_config(Config())
    assert "divergence: forward_kl  # per-token divergence" in text
    assert text.count("#") >= len(Config.model_fields)


def test_misspelled_key_names_file_line_and_suggestion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_steps: 3\n  lrr: 0.1\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert "train.lrr" in msg and f"{p}, line 3" in msg and "did you mean 'train.lr'" in msg


def test_wrong_type_and_range_rejected(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("loss:\n  temperature: -1\n")
    with pytest.raises(UserError, match=r"line 2.*loss.temperature"):
        load_config(p)
    with pytest.raises(UserError, match="train.max_steps"):
        build_config({"train": {"max_steps": "many"}})


def test_dotted_overrides_apply_and_unknown_ones_fail():
    cfg = build_config({}, overrides=["train.lr=1e-4", "loss.divergence=jsd", "student.layers=[0, 3]"])
    assert cfg.train.lr == 1e-4 and cfg.loss.divergence == "jsd" and cfg.student.layers == [0, 3]
    with pytest.raises(UserError, match=r"command line: unknown key 'train.seeed'; did you mean 'train.seed'"):
        build_config({}, overrides=["train.seeed=3"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_override("train.lr")


def test_cli_exit_code_2_without_traceback(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trian:\n  lr: 1\n")
    r = subprocess.run([sys.executable, "-m", "kdkit.cli", "config", "validate", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown key 'trian'" in r.stderr and "did you mean 'train'" in r.stderr
    assert "Traceback" not in r.stderr


def _validate(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return subprocess.run([sys.executable, "-m", "kdkit.cli", "config", "validate", str(p)],
                          capture_output=True, text=True, timeout=300), p


@pytest.mark.parametrize("skew,why", [(1, "0 for every input"), (1.5, "out of range"), (-0.1, "out of range")])
def test_degenerate_skew_exits_2_naming_the_key(tmp_path, skew, why):
    r, p = _validate(tmp_path, f"loss:\n  divergence: skew_forward_kl\n  skew: {skew}\n")
    assert r.returncode == 2, r.stderr
    assert f"{p}, line 3: loss.skew" in r.stderr and "[0, 1)" in r.stderr and why in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_jsd_end_points_and_skew_zero_are_valid(tmp_path):
    for text in ("loss:\n  divergence: jsd\n  beta: 0\n", "loss:\n  divergence: jsd\n  beta: 1\n",
                 "loss:\n  divergence: skew_reverse_kl\n  skew: 0\n"):
        r, _ = _validate(tmp_path, text)
        assert r.returncode == 0, r.stderr
    assert "forward KL" in Config.model_fields["loss"].annotation.model_fields["beta"].description


def test_kd_term_that_is_zero_for_every_input_with_all_the_weight_is_refused(tmp_path):
    text = "loss:\n  alpha: 1\nmodes:\n  selective:\n    by: max_prob\n    threshold: 1.5\n"
    r, _ = _validate(tmp_path, text)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    for key in ("loss.alpha", "modes.selective.by", "modes.selective.threshold"):
        assert key in r.stderr, r.stderr
    # the same selection with CE weighted in, or a reachable threshold, is a valid run
    build_config({"loss": {"alpha": 0.5}, "modes": {"selective": {"by": "max_prob", "threshold": 1.5}}})
    build_config({"modes": {"selective": {"by": "max_prob", "threshold": 1.0}}})
