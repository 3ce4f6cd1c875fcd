"""Every registered method, LoRA and full: each role moves only its own tensors, the base never moves, the
exported student samples through load_student at every step count. A new method is tested by registering it."""

import json

import pytest
import torch

from distill_diffusion import artifacts
from distill_diffusion.errors import UserError
from methods import METHODS
from tests.helpers import build, default_only, fixed_batch, optimizers, snapshot, update


@pytest.mark.parametrize("student", ["lora", pytest.param("full", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_roles_move_only_their_tensors(name, student, tiny_teachers):
    models, method, _ = build(METHODS[name], tiny_teachers["sd"], student)
    opts = optimizers(models, method)
    batch = fixed_batch(models, with_latents=METHODS[name].spec(method.cfg, student).needs_images)
    base = snapshot(models.denoiser, lora=False)
    for step in range(2):
        for role in method.updates(step):
            before = {r: [p.detach().clone() for p in models.parameters(r)] for r in models.roles}
            update(models, method, role, batch, opts[role], step)
            for r in models.roles:
                moved = any(not torch.equal(a, b) for a, b in zip(before[r], models.parameters(r)))
                assert moved == (r == role), f"{name}/{student}: role {r} moved={moved} during {role}'s update"
    after = snapshot(models.denoiser, lora=False)
    assert all(torch.equal(base[k], after[k]) for k in base), "the frozen base / teacher weights changed"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_export_samples_at_every_step_count(name, tiny_teachers, tmp_path):
    models, method, _ = build(METHODS[name], tiny_teachers["sd"], "lora")
    spec = method.sampling()
    artifacts.save_run(models, name, spec, tmp_path)
    pipe = artifacts.load_student(tmp_path)
    for k, s in spec.steps.items():
        imgs, _ = artifacts.sample(pipe, ["a red square"], steps=k, seeds=[0], output_type="np")
        assert imgs.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(imgs)).all()
        assert [int(t) for t in pipe.scheduler.timesteps] == s.timesteps


@pytest.mark.parametrize("name", default_only(sorted(METHODS), {"dmd2"}))
def test_export_initial_writes_the_untrained_student(name, tiny_teachers, image_folder, tmp_path):
    """export_initial=true writes a run folder without a training step: with LoRA (B = 0) it samples like the
    teacher's UNet, and no checkpoint is written."""
    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train

    cfg, _ = parse_config(["--method", name, f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}",
                           "export_initial=true", "batch_size=2", f"output_dir={tmp_path}", "report_to=none",
                           "validation_seeds=1"], METHODS)
    train(cfg, METHODS[name])
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    pipe = artifacts.load_student(tmp_path)
    k = pipe.distill.default_steps
    imgs, _ = artifacts.sample(pipe, ["a red square"], steps=k, seeds=[0], output_type="np")
    assert imgs.shape == (1, 16, 16, 3)
    assert (tmp_path / "validation" / "step_000000.png").exists()
    info = artifacts.read_run_info(tmp_path)  # where the run was made: CPU, threads, versions
    assert info["cpu"] and info["torch_threads"] == 1 and info["processes"] == 1 and info["versions"]["torch"]


@pytest.mark.parametrize("name", default_only(["dmd2", "sid"], {"dmd2"}))
def test_memory_json_counts_one_base_copy_with_lora(name, tiny_teachers, image_folder, tmp_path):
    """memory.json: LoRA roles hold their adapters only (Adam: two moments per trainable tensor), and the LoRA run
    counts fewer bytes than full copies of the same roles."""
    import json

    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train

    mem = {}
    for student in ("lora", "full"):
        out = tmp_path / student
        cfg, _ = parse_config(["--method", name, f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}",
                               f"student={student}", "lora_rank=2", "max_steps=2", "batch_size=2", f"output_dir={out}",
                               "report_to=none", "validation_seeds=0", "method.student_update_every=1"
                               if name == "dmd2" else "seed=0"], METHODS)
        train(cfg, METHODS[name])
        mem[student] = json.loads((out / "memory.json").read_text())
        assert not (out / "validation").exists()  # validation_seeds=0: the run folder without a grid
    lora, full = mem["lora"], mem["full"]
    for role, b in lora["trainable_bytes"].items():
        assert b > 0 and lora["optimizer_state_bytes"][role] >= 2 * b
    assert lora["gradient_bytes_peak"] == max(lora["trainable_bytes"].values())
    assert sum(full["trainable_bytes"].values()) > sum(lora["trainable_bytes"].values())
    assert lora["total_counted_bytes"] < full["total_counted_bytes"]
    assert lora["peak_rss_above_baseline_bytes"] > 0


@pytest.mark.parametrize("student", ["lora", pytest.param("full", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", default_only(sorted(METHODS), {"lcm", "scm"}))
def test_ema_student_is_exported_and_the_raw_one_kept(name, student, tiny_teachers, image_folder, tmp_path):
    """ema_decay: the run exports the EMA of its student; the checkpoint keeps both. With decay 0.5 and the EMA
    starting at the untrained student, the exported weights sit strictly between the start and the raw student."""
    from safetensors.torch import load_file

    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train

    cfg, _ = parse_config(["--method", name, f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}",
                           f"student={student}", "max_steps=4", "batch_size=2", f"output_dir={tmp_path}",
                           "report_to=none", "validation_seeds=0", "checkpointing_steps=4", "ema_decay=0.5",
                           "learning_rate=1e-3", "lora_rank=2", "lora_alpha=4",
                           *(["method.student_update_every=2"] if name == "dmd2" else [])], METHODS)
    train(cfg, METHODS[name])
    ck = load_file(str(tmp_path / "checkpoints" / "checkpoint-4" / "trainable.safetensors"))
    raw = {k.removeprefix("student/").replace(".student.", "."): v for k, v in ck.items() if k.startswith("student/")}
    ema = {k.removeprefix("student_ema/").replace(".student_ema.", "."): v for k, v in ck.items()
           if k.startswith("student_ema/")}
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)
    if student == "lora":  # the exported LoRA file holds the EMA adapter's tensors
        lora = load_file(str(tmp_path / "student" / artifacts.LORA_FILE))
        got = {k.removeprefix("unet."): v for k, v in lora.items()}
        assert got.keys() == ema.keys() and all(torch.equal(got[k], ema[k]) for k in ema)
    else:
        sd = artifacts.load_student(tmp_path).unet.state_dict()
        assert all(torch.equal(sd[k], ema[k]) for k in ema)


@pytest.mark.slow
def test_ema_starts_from_the_init_from_student(tiny_teachers, image_folder, tmp_path):
    """With init_from, EMA targets are copied after the earlier run's student is loaded: exported before any step,
    the EMA student is that run's student, not the untrained one."""
    from safetensors.torch import load_file

    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train

    common = ["--method", "lcm", f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}", "batch_size=2",
              "report_to=none", "validation_seeds=0", "lora_rank=2", "lora_alpha=4", "learning_rate=1e-2"]
    train(parse_config([*common, "max_steps=2", f"output_dir={tmp_path / 'a'}"], METHODS)[0], METHODS["lcm"])
    train(parse_config([*common, "export_initial=true", f"init_from={tmp_path / 'a'}", "ema_decay=0.9",
                        f"output_dir={tmp_path / 'b'}"], METHODS)[0], METHODS["lcm"])
    a = load_file(str(tmp_path / "a" / "student" / artifacts.LORA_FILE))
    b = load_file(str(tmp_path / "b" / "student" / artifacts.LORA_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # a trained student, not B = 0


@pytest.mark.parametrize("name", default_only(sorted(METHODS), {"tscd"}))
def test_export_checkpoint_writes_what_the_run_wrote(name, tiny_teachers, image_folder, tmp_path):
    """export_checkpoint=<checkpoint> writes that checkpoint's student as a run folder without a training step, for
    every method (TSCD's stages and a decaying rate, which refuse a resume with another max_steps, included): the
    last checkpoint's export holds the run's own student tensors, an earlier one's differ; the run is untouched. A
    ``resume`` (a resumed run's config.yaml names one, here not even a checkpoint) is not its business."""
    from safetensors.torch import load_file

    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train

    common = ["--method", name, f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}", "batch_size=2",
              "report_to=none", "validation_seeds=0", "lora_rank=2", "learning_rate=1e-3", "lr_schedule=cosine"]
    run = tmp_path / "run"
    train(parse_config([*common, "max_steps=5", "checkpointing_steps=4", f"output_dir={run}"], METHODS)[0],
          METHODS[name])
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*"))

    def exported(step: int, average: int = 1) -> dict[str, torch.Tensor]:
        out = tmp_path / f"at{step}_{average}"
        train(parse_config([*common, "max_steps=5", f"output_dir={out}", f"resume={run}/checkpoints/checkpoint-1",
                            f"export_checkpoint={run}/checkpoints/checkpoint-{step}", f"export_average={average}"],
                           METHODS)[0], METHODS[name])
        info = json.loads((out / "sampling.json").read_text())
        assert info["step"] == step
        # an average says so, and of which checkpoints, in sampling.json and the card (checkpoints 4 and 5 here)
        assert info.get("averaged_steps") == ([4, 5] if average > 1 else None)
        assert ("uniform average of the checkpoints at steps 4, 5" in (out / "README.md").read_text()) == (average > 1)
        return load_file(str(next((out / "student").glob("*.safetensors"))))

    final = load_file(str(next((run / "student").glob("*.safetensors"))))
    last, earlier, both = exported(5), exported(4), exported(5, average=2)
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    # export_average=2: the uniform average of checkpoints 4 and 5, factor by factor, summed in float64
    assert all(torch.equal(both[k], ((last[k].double() + earlier[k].double()) / 2).float()) for k in final)
    with pytest.raises(UserError, match="at most 2"):
        exported(5, average=3)
    # the export at step 4 differs from the last wherever the exported role moved in step 5 (DMD2's student does not:
    # it updates on every tenth iteration)
    ck4, ck5 = (load_file(str(run / "checkpoints" / f"checkpoint-{i}" / "trainable.safetensors")) for i in (4, 5))
    role = "student_ema/" if any(k.startswith("student_ema/") for k in ck5) else "student/"
    moved = any(not torch.equal(ck4[k], ck5[k]) for k in ck5 if k.startswith(role))
    assert moved == any(not torch.equal(final[k], earlier[k]) for k in final) and (moved or name == "dmd2")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*")) == before
