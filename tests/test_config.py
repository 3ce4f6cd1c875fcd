"""Config: typed values, one-line errors with exit code 2, YAML files for the right method, overrides."""

import subprocess
import sys
from pathlib import Path

import pytest

from distill_diffusion.config import parse_config
from distill_diffusion.errors import UserError
from methods import METHODS

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_overrides_and_nested_keys():
    cfg, print_only = parse_config(["--method", "lcm", "teacher=/x", "max_steps=7", "method.w_max=12",
                                    "data.images=/imgs"], METHODS)
    assert cfg.max_steps == 7 and cfg.method.w_max == 12.0 and cfg.data.images == "/imgs" and not print_only
    assert cfg.method.w_min == 6.0  # the paper's default (ω = 5) when the teacher is not the embedded one


@pytest.mark.parametrize("argv, fragment", [
    (["--method", "nope"], "unknown method 'nope'; choose one of: "),
    (["--method", "lcm", "max_step=3"], "did you mean 'max_steps'"),
    (["--method", "lcm", "max_steps=abc"], "max_steps"),
    (["--method", "lcm", "max_steps=0"], "max_steps=0"),
    (["--method", "lcm", "lora_rank=0"], "lora_rank=0"),
    (["--method", "lcm", "student=half"], "student='half'"),
    (["--method", "lcm", "lr_schedule=cosin"], "lr_schedule='cosin': choose one of constant, cosine, linear"),
    (["--method", "lcm", "method.w_maxx=3"], "unknown key 'method.w_maxx' for method 'lcm'"),
    (["--method", "lcm", "method.w_min=20"], "w_min"),
    (["--method", "lcm", "data.foo=1"], "data keys"),
    (["--method", "lcm", "--config", "nonexistent.yaml"], "no such file"),
    (["--method", "lcm", "oops"], "not key=value"),
    (["--method", "lcm", "--bogus"], "unknown option"),
])
def test_errors_are_one_line(argv, fragment):
    with pytest.raises(UserError) as e:
        parse_config(argv, METHODS)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


def test_yaml_for_another_method(tmp_path):
    f = tmp_path / "x.yaml"
    f.write_text("method_name: other\nmax_steps: 3\n")
    with pytest.raises(UserError, match="written for method 'other', not 'lcm'"):
        parse_config(["--method", "lcm", "--config", str(f)], METHODS)


@pytest.mark.parametrize("path", sorted(str(p) for p in (ROOT / "configs").glob("*/*.yaml")
                                        if p.parent.name in METHODS))
def test_shipped_configs_parse(path):
    name = Path(path).parent.name
    cfg, _ = parse_config(["--method", name, "--config", path], METHODS)
    assert cfg.method_name == name


def test_cli_exit_code_2_no_traceback():
    r = subprocess.run([sys.executable, "train.py", "--method", "lcm", "max_stepz=3"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: unknown key 'max_stepz'") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_print_config(capsys):
    """train.py's entry point in-process (the subprocess test above covers the real command line)."""
    from distill_diffusion.loop import run_main

    assert run_main(["--method", "lcm", "--print-config", "max_steps=5"], METHODS) == 0
    out = capsys.readouterr().out
    assert "max_steps: 5" in out and "w_max" in out and "output_dir: runs/lcm" in out


def test_mixed_precision_no_is_not_false():
    """`mixed_precision=no` (accelerate's spelling) on the command line or in YAML, which reads `no` as false."""
    cfg, _ = parse_config(["--method", "lcm", "mixed_precision=no"], METHODS)
    assert cfg.mixed_precision == "no"
    cfg, _ = parse_config(["--method", "lcm", "mixed_precision=fp16"], METHODS)
    assert cfg.mixed_precision == "fp16"


def test_teacher_defaults_by_name_or_path(tmp_path):
    """configs/teachers/embedded.yaml applies to teacher=embedded and to the embedded folder given as a path, not to
    another teacher."""
    from distill_diffusion.models import embedded_teacher_path

    for teacher in ("embedded", str(embedded_teacher_path())):
        cfg, _ = parse_config(["--method", "lcm", f"teacher={teacher}"], METHODS)
        assert cfg.validation_guidance == 3.0 and "a trouser" in cfg.validation_prompts, teacher
    cfg, _ = parse_config(["--method", "lcm", f"teacher={tmp_path}"], METHODS)
    assert cfg.validation_guidance == 7.5 and "a trouser" not in cfg.validation_prompts


def test_lr_factor_closed_forms():
    """Warm-up (i + 1) / w as before for every kind; constant afterwards; cosine and linear decay over
    p = (i + 1 - w) / (total - w + 1), so the last of ``total`` iterations still has a positive rate."""
    import math

    from distill_diffusion.loop import lr_factor

    assert [lr_factor(i, 4, 10) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, 0, 10) == 1.0 and lr_factor(9, 0, 10, "constant") == 1.0
    for kind in ("cosine", "linear"):
        assert [lr_factor(i, 4, 10, kind) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(lr_factor(6, 4, 10, "linear"), 4 / 7) and math.isclose(lr_factor(9, 4, 10, "linear"), 1 / 7)
    assert math.isclose(lr_factor(6, 4, 10, "cosine"), 0.5 * (1 + math.cos(math.pi * 3 / 7)))
    assert 0 < lr_factor(9, 0, 10, "cosine") < lr_factor(8, 0, 10, "cosine") < 1
    # decay_steps 3 (warmup-stable-decay): constant through iteration 6, then p = (i + 1 - 7) / 4
    assert [lr_factor(i, 4, 10, "linear", 3) for i in range(10)] == [0.25, 0.5, 0.75] + [1.0] * 4 + [0.75, 0.5, 0.25]
    assert math.isclose(lr_factor(8, 4, 10, "cosine", 3), 0.5 * (1 + math.cos(math.pi / 2)))
    # decay_steps longer than the stable part: the decay starts at the warm-up's end, as without it
    assert [lr_factor(i, 4, 10, "cosine", 10) for i in range(10)] == [lr_factor(i, 4, 10, "cosine") for i in range(10)]


@pytest.mark.parametrize("args, message", [
    (["lr_decay_steps=10"], "applies to a decaying lr_schedule"),
    (["lr_schedule=linear", "lr_decay_steps=0"], "must be between 1 and max_steps"),
    (["lr_schedule=linear", "max_steps=5", "lr_decay_steps=6"], "must be between 1 and max_steps"),
])
def test_lr_decay_steps_is_checked(args, message):
    with pytest.raises(UserError, match=message):
        parse_config(["--method", "lcm", *args], METHODS)
