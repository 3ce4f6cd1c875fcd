"""Crash and resume: a run interrupted and resumed ends with the same student as an uninterrupted one (every
registered method); a SIGKILL mid-run leaves no half checkpoint; resume=latest skips broken checkpoints."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill_diffusion import data
from distill_diffusion.config import parse_config
from distill_diffusion.loop import train
from methods import METHODS
from tests.crash_run import crash_at
from tests.helpers import default_only

ROOT = Path(__file__).resolve().parent.parent


def _args(name: str, teacher: str, images: str, out: Path, steps: int, *extra: str) -> list[str]:
    needs_images = METHODS[name].spec(METHODS[name].Config(), "lora").needs_images
    source = f"data.images={images}" if needs_images else f"data.prompts={images}/../prompts.txt"
    return ["--method", name, f"teacher={teacher}", source, f"max_steps={steps}", "batch_size=2",
            f"output_dir={out}", "report_to=none", "checkpointing_steps=2", "lora_rank=2", "lora_alpha=4",
            "validation_seeds=0", "learning_rate=1e-3", *extra]


def _student(out: Path) -> dict[str, torch.Tensor]:
    ck = sorted((out / "checkpoints").iterdir(), key=lambda p: int(p.name.split("-")[1]))[-1]
    return load_file(str(ck / "trainable.safetensors"))


@pytest.fixture(scope="module")
def prompts_file(image_folder):
    p = Path(image_folder).parent / "prompts.txt"
    p.write_text("a red square\na blue circle\n")
    return p


@pytest.mark.parametrize("name", default_only(sorted(METHODS), {"dmd2"}))
def test_resume_equals_uninterrupted(name, tiny_teachers, image_folder, prompts_file, tmp_path, monkeypatch):
    _resume_matches(name, tiny_teachers, image_folder, tmp_path, monkeypatch)


def test_phased_dmd2_resume_restarts_the_critic_the_same(tiny_teachers, image_folder, tmp_path, monkeypatch):
    """Phased DMD restarts its critic at step 2 of 4: a run resumed from the checkpoint at step 2 restarts it too."""
    _resume_matches("dmd2", tiny_teachers, image_folder, tmp_path, monkeypatch, "method.phased=true",
                    "method.conditioning_timesteps=[999,499]", "method.gan=false", "method.student_update_every=1")
    state = json.loads((tmp_path / "part" / "checkpoints" / "checkpoint-2" / "state.json").read_text())
    assert state["max_steps"] == 4  # what check_length compares a resume's max_steps with


def _resume_matches(name, tiny_teachers, image_folder, tmp_path, monkeypatch, *extra: str) -> None:
    steps = 4
    full = tmp_path / "full"
    cfg, _ = parse_config(_args(name, tiny_teachers["sd"], image_folder, full, steps, *extra), METHODS)
    train(cfg, METHODS[name])
    part = tmp_path / "part"
    cfg, _ = parse_config(_args(name, tiny_teachers["sd"], image_folder, part, steps, *extra), METHODS)
    with monkeypatch.context() as m:
        m.setattr(data.Stream, "get", data.Stream.get)  # restored on exit
        crash_at(3, kill=False)
        with pytest.raises(RuntimeError, match="injected fault"):
            train(cfg, METHODS[name])
    cfg, _ = parse_config(_args(name, tiny_teachers["sd"], image_folder, part, steps, *extra, "resume=latest"),
                          METHODS)
    train(cfg, METHODS[name])
    a, b = _student(full), _student(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{name}: {k} differs after resume"


def _run(args: list[str], crash_step: int | None = None) -> subprocess.CompletedProcess:
    cmd = ["tests/crash_run.py", str(crash_step)] if crash_step is not None else ["train.py"]
    return subprocess.run([sys.executable, *cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_then_resume(tiny_teachers, image_folder, tmp_path):
    out = tmp_path / "run"
    r = _run(_args("lcm", tiny_teachers["sd"], image_folder, out, 6), crash_step=3)
    assert r.returncode == -9
    cks = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert cks == ["checkpoint-2"], cks  # complete checkpoints only, no temporary folder left looking whole
    r = _run(_args("lcm", tiny_teachers["sd"], image_folder, out, 6, "resume=latest"))
    assert r.returncode == 0, r.stderr[-1500:]
    assert "resumed from" in r.stdout and "checkpoint-2" in r.stdout
    # The reference runs in a subprocess too: same thread count, so the same floating-point reductions.
    ref = tmp_path / "ref"
    assert _run(_args("lcm", tiny_teachers["sd"], image_folder, ref, 6)).returncode == 0
    a, b = _student(ref), _student(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_latest_skips_broken_checkpoint(tiny_teachers, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    cfg, _ = parse_config(_args("lcm", tiny_teachers["sd"], image_folder, out, 4, "checkpoints_total_limit=3"),
                          METHODS)
    train(cfg, METHODS["lcm"])
    (out / "checkpoints" / "checkpoint-4" / "trainable.safetensors").write_bytes(b"broken")
    cfg, _ = parse_config(_args("lcm", tiny_teachers["sd"], image_folder, out, 5, "resume=latest"), METHODS)
    train(cfg, METHODS["lcm"])
    printed = capsys.readouterr().out
    assert "skipping checkpoint" in printed and "checkpoint-4" in printed and "resumed from" in printed


@pytest.mark.slow
def test_checkpoint_keyed_by_position_still_resumes(tiny_teachers, image_folder, tmp_path, capsys):
    """Checkpoints written before tensors were keyed by name (``<role>/<i>``) resume to the same student."""
    from safetensors.torch import save_file

    from distill_diffusion import checkpoints
    from distill_diffusion.config import method_object
    from distill_diffusion.models import build_models

    full, part = tmp_path / "full", tmp_path / "part"
    cfg, _ = parse_config(_args("lcm", tiny_teachers["sd"], image_folder, full, 4), METHODS)
    train(cfg, METHODS["lcm"])
    cfg, _ = parse_config(_args("lcm", tiny_teachers["sd"], image_folder, part, 2), METHODS)
    train(cfg, METHODS["lcm"])
    ck = part / "checkpoints" / "checkpoint-2" / "trainable.safetensors"
    named = load_file(str(ck))
    order = list(checkpoints.role_tensors(build_models(cfg, METHODS["lcm"].spec(method_object(cfg), "lora"))))
    old, seen = {}, {}
    for k in order:  # the old layout: the i-th tensor of each role, in the models' parameter order
        role = k.split("/", 1)[0]
        old[f"{role}/{seen.setdefault(role, 0)}"] = named[k]
        seen[role] += 1
    save_file(old, str(ck))
    capsys.readouterr()
    cfg, _ = parse_config(_args("lcm", tiny_teachers["sd"], image_folder, part, 4, "resume=latest",
                                "allow_overwrite=true"), METHODS)
    train(cfg, METHODS["lcm"])
    assert "resumed from" in capsys.readouterr().out  # not skipped and restarted at step 0
    a, b = _student(full), _student(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


FIXED_LENGTH = {"dmd2": ("method.phased=true", "method.conditioning_timesteps=[999,499]"), "tscd": ()}


@pytest.mark.parametrize("name", sorted(FIXED_LENGTH))
def test_resume_with_another_max_steps_is_refused_where_phases_are_cut_from_it(name, tiny_teachers, image_folder,
                                                                               tmp_path):
    """Phased DMD's phases and TSCD's stages are fractions of max_steps: resuming with another max_steps would move
    them under a half-trained run, so it is refused before anything loads (resume=latest must not skip the checkpoint
    and start over), and the checkpoint is left as it was. The same max_steps, or a method without such a schedule,
    passes."""
    from distill_diffusion.config import method_object
    from distill_diffusion.errors import UserError
    from distill_diffusion.loop import check_start

    out = tmp_path / "run"
    ck = out / "checkpoints" / "checkpoint-2"
    ck.mkdir(parents=True)
    state = json.dumps({"step": 2, "method": name, "student": "lora", "max_steps": 4})
    (ck / "state.json").write_text(state)
    extra = FIXED_LENGTH[name]
    cfg, _ = parse_config(_args(name, tiny_teachers["sd"], image_folder, out, 8, *extra, "resume=latest"), METHODS)
    assert METHODS[name].spec(method_object(cfg), "lora").fixed_length
    with pytest.raises(UserError, match="max_steps=4"):
        train(cfg, METHODS[name])
    assert (ck / "state.json").read_text() == state and sorted(p.name for p in out.iterdir()) == ["checkpoints"]
    cfg, _ = parse_config(_args(name, tiny_teachers["sd"], image_folder, out, 4, *extra, "resume=latest"), METHODS)
    assert check_start(cfg, METHODS[name].spec(method_object(cfg), "lora"), out) == [ck]
    cfg, _ = parse_config(_args("lcm", tiny_teachers["sd"], image_folder, out, 8, "resume=latest"), METHODS)
    assert check_start(cfg, METHODS["lcm"].spec(method_object(cfg), "lora"), out) == [ck]
    cfg, _ = parse_config(_args("lcm", tiny_teachers["sd"], image_folder, out, 8, "lr_schedule=cosine",
                                "resume=latest"), METHODS)
    with pytest.raises(UserError, match="lr_schedule=cosine is cut from max_steps"):
        check_start(cfg, METHODS["lcm"].spec(method_object(cfg), "lora"), out)


def test_resume_with_another_learning_rate_trains_at_it(tiny_teachers, image_folder, tmp_path, capsys):
    """The checkpoint's schedulers carry the rate they were built with; a resumed run's ``learning_rate`` wins: the
    first resumed Adam step (same moments, same gradient) moves the student a tenth as far at a tenth of the rate."""
    base = tmp_path / "base"
    cfg, _ = parse_config(_args("lcm", tiny_teachers["sd"], image_folder, base, 2, "adam_weight_decay=0"), METHODS)
    train(cfg, METHODS["lcm"])
    start = _student(base)
    moved = {}
    for lr in ("1e-3", "1e-4"):
        out = tmp_path / f"lr{lr}"
        shutil.copytree(base / "checkpoints", out / "checkpoints")
        cfg, _ = parse_config(_args("lcm", tiny_teachers["sd"], image_folder, out, 3, "adam_weight_decay=0",
                                    "resume=latest", f"learning_rate={lr}", "logging_steps=1"), METHODS)
        train(cfg, METHODS["lcm"])
        end = _student(out)
        moved[lr] = torch.cat([(end[k] - start[k]).flatten() for k in start if "lora" in k]).norm()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["student/lr"] == pytest.approx(float(lr))
    assert "0.001 in the checkpoint, 0.0001 from now on" in capsys.readouterr().out
    assert float(moved["1e-4"] / moved["1e-3"]) == pytest.approx(0.1, rel=1e-3)


def test_resume_switches_an_ema_on(tiny_teachers, image_folder, tmp_path, capsys):
    """A checkpoint written without ``ema_decay`` resumes into a run with one: the EMA starts from the loaded
    student, so after one resumed step it is decay × the checkpoint's student + (1 − decay) × the new one."""
    out = tmp_path / "run"
    cfg, _ = parse_config(_args("lcm", tiny_teachers["sd"], image_folder, out, 2), METHODS)
    train(cfg, METHODS["lcm"])
    before = _student(out)
    cfg, _ = parse_config(_args("lcm", tiny_teachers["sd"], image_folder, out, 3, "resume=latest", "ema_decay=0.9",
                                "checkpointing_steps=1"), METHODS)
    train(cfg, METHODS["lcm"])
    assert "has no EMA of the student; student_ema starts from its student (ema_decay=0.9)" in capsys.readouterr().out
    after = _student(out)
    lora = [k for k in before if k.startswith("student/") and "lora" in k]
    assert lora and not any(torch.equal(before[k], after[k]) for k in lora if "lora_B" in k)
    for k in lora:
        ema = after["student_ema/" + k.split("/", 1)[1].replace(".student.", ".student_ema.")]
        torch.testing.assert_close(ema, 0.9 * before[k] + 0.1 * after[k])


def test_constant_checkpoint_resumed_with_a_late_decay_equals_the_decaying_run(tiny_teachers, image_folder, tmp_path,
                                                                              capsys):
    """Warmup-stable-decay: a constant-rate run's checkpoint, resumed with a longer ``max_steps`` and a decay over
    the steps after it (``lr_decay_steps``), trains exactly as a run with that schedule from the start (constant up
    to the checkpoint). A decay that would have begun before the checkpoint is refused, naming the largest
    ``lr_decay_steps`` that fits."""
    from distill_diffusion.errors import UserError

    decay = ("lr_schedule=linear", "lr_decay_steps=3")
    whole, part = tmp_path / "whole", tmp_path / "part"
    cfg, _ = parse_config(_args("lcm", tiny_teachers["sd"], image_folder, whole, 5, *decay), METHODS)
    train(cfg, METHODS["lcm"])
    cfg, _ = parse_config(_args("lcm", tiny_teachers["sd"], image_folder, part, 3), METHODS)  # constant, 3 steps
    train(cfg, METHODS["lcm"])
    ck = shutil.copytree(part / "checkpoints" / "checkpoint-2", tmp_path / "checkpoint-2")
    cfg, _ = parse_config(_args("lcm", tiny_teachers["sd"], image_folder, part, 5, *decay, f"resume={ck}",
                                "allow_overwrite=true"), METHODS)
    train(cfg, METHODS["lcm"])
    a, b = _student(whole), _student(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg, _ = parse_config(_args("lcm", tiny_teachers["sd"], image_folder, part, 5, "lr_schedule=linear",
                                "lr_decay_steps=4", f"resume={ck}", "allow_overwrite=true"), METHODS)
    with pytest.raises(UserError, match="lr_decay_steps=3 or fewer"):
        train(cfg, METHODS["lcm"])
