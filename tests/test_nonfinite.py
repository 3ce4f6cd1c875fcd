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


def _inf_loss_from(monkeypatch, first: int) -> None:
    """LCM's loss is infinite from step ``first`` on."""
    orig = LCM.loss

    def broken(self, role, batch, step):
        loss, logs = orig(self, role, batch, step)
        return (loss * float("inf") if step >= first else loss), logs

    monkeypatch.setattr(LCM, "loss", broken)


def test_many_bad_steps_stop_the_run(tiny_teachers, image_folder, tmp_path, monkeypatch, capsys):
    _inf_loss_from(monkeypatch, 2)
    code = run_main(_argv(tiny_teachers["sd"], image_folder, tmp_path, "max_steps=10", "checkpointing_steps=2",
                          "max_nonfinite_steps=3"), METHODS)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3
    assert "stopped at step 4" in err and "role student" in err and "checkpoint" in err
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "trainable.safetensors").exists()
    assert not (tmp_path / "sampling.json").exists()  # nothing half-trained exported as if finished


def _fp16_scaler_accelerator(monkeypatch, init_scale: float):
    """CPU runs have no loss scaler; give the accelerator the one a GPU fp16 run gets (torch.amp.GradScaler), with
    the gradient unscaling accelerate does before clipping, so the loop's fp16 path runs here."""
    import torch

    from distill_diffusion import loop

    made = {}
    orig = loop.make_accelerator

    def with_scaler(cfg, out):
        acc = orig(cfg, out)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
        acc.native_amp = True
        acc.unscale_gradients = lambda optimizer=None: [acc.scaler.unscale_(o.optimizer) for o in acc._optimizers]
        made["acc"] = acc
        return acc

    monkeypatch.setattr(loop, "make_accelerator", with_scaler)
    return made


def test_fp16_overflow_lowers_the_scale_and_training_goes_on(tiny_teachers, image_folder, tmp_path, monkeypatch):
    """A scale so high that the scaled backward overflows: updates overflow until the scaler has halved its scale
    far enough, then training proceeds. None of those overflows counts toward max_nonfinite_steps (1 here, so one
    counted overflow would stop the run), because the scale was still above its floor."""
    import torch

    made = _fp16_scaler_accelerator(monkeypatch, init_scale=2.0 ** 127)  # float32's largest power of two
    assert run_main(_argv(tiny_teachers["sd"], image_folder, tmp_path, "max_steps=8", "max_nonfinite_steps=1"),
                    METHODS) == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = rows[-1]["skipped_updates"]
    scale = made["acc"].scaler.get_scale()
    assert 1 <= skipped < 8 and scale == 2.0 ** (127 - skipped)  # one halving per overflow, then finite updates
    assert torch.isfinite(torch.tensor(rows[-1]["student/loss"]))


def test_fp16_overflows_at_the_floor_scale_stop_the_run(tiny_teachers, image_folder, tmp_path, monkeypatch, capsys):
    _inf_loss_from(monkeypatch, 1)
    made = _fp16_scaler_accelerator(monkeypatch, init_scale=4.0)
    code = run_main(_argv(tiny_teachers["sd"], image_folder, tmp_path, "max_steps=20", "max_nonfinite_steps=3"),
                    METHODS)
    # scale 4 -> 2 -> 1 (two overflows above the floor), then three at the floor (1 -> 0.5 -> 0.25 -> 0.125)
    assert code == 3 and "stopped at step 5" in capsys.readouterr().err
    assert made["acc"].scaler.get_scale() == 0.125


def test_gradient_buckets_cover_every_tensor_once_within_the_bound(monkeypatch):
    import torch

    from distill_diffusion import loop

    monkeypatch.setattr(loop, "GRAD_BUCKET_BYTES", 100)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (10, 10, 5, 40, 3, 3)]
    buckets = loop._buckets(params)
    assert [len(b) for b in buckets] == [3, 1, 2]  # 40 + 40 + 20 = 100 B; 160 B alone; 12 + 12 B
    assert [p for b in buckets for p in b] == params
