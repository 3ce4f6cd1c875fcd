"""Numerical faults: a non-finite update is skipped (and counted); too many in a row stop the run with a message
naming the step and role, keeping the last good checkpoint."""

import json

from distill_diffusion.loop import run_main
from methods import METHODS
from methods.lcm import LCM


def _argv(teacher, images, out, *extra):
    return ["--method", "lcm", f"teacher={teacher}", f"data.images={images}", "batch_size=2", f"output_dir={out}",
            "report_to=none", "logging_steps=1", "validation_seeds=0", *extra]


def test_one_bad_step_is_skipped(tiny_teachers, image_folder, tmp_path, monkeypatch):
    orig = LCM.loss

    def flaky(self, role, batch, step):
        loss, logs = orig(self, role, batch, step)
        return (loss * float("nan") if step == 1 else loss), logs

    monkeypatch.setattr(LCM, "loss", flaky)
    assert run_main(_argv(tiny_teachers["sd"], image_folder, tmp_path, "max_steps=3"), METHODS) == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in rows] == [0, 1, 1]


def test_many_bad_steps_stop_the_run(tiny_teachers, image_folder, tmp_path, monkeypatch, capsys):
    orig = LCM.loss

    def broken(self, role, batch, step):
        loss, logs = orig(self, role, batch, step)
        return (loss * float("inf") if step >= 2 else loss), logs

    monkeypatch.setattr(LCM, "loss", broken)
    code = run_main(_argv(tiny_teachers["sd"], image_folder, tmp_path, "max_steps=10", "checkpointing_steps=2",
                          "max_nonfinite_steps=3"), METHODS)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3
    assert "stopped at step 4" in err and "role student" in err and "checkpoint" in err
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "trainable.safetensors").exists()
    assert not (tmp_path / "sampling.json").exists()  # nothing half-trained exported as if finished
