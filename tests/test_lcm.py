"""LCM: closed forms, the loss falls on a fixed batch, the run folder round-trips into plain diffusers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill_diffusion.schedule import FlowSchedule, VPSchedule
from methods.lcm import LCM, consistency_output
from tests.helpers import build, default_only, fixed_batch, update

ROOT = Path(__file__).resolve().parent.parent


def test_boundary_at_zero_is_identity_and_large_t_is_x0():
    x, x0 = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    vp = VPSchedule(torch.linspace(0.99, 0.01, 1000), "epsilon")
    at = lambda t: vp.consistency_scalings(torch.tensor([t, t]), 0.5, 10.0)  # noqa: E731
    torch.testing.assert_close(consistency_output(x, x0, at(0)), x)
    torch.testing.assert_close(consistency_output(x, x0, at(999)), x0, atol=1e-4, rtol=1e-3)
    # flow schedules: x0 = x - σ v already meets the boundary, c_skip = 0 and c_out = 1 everywhere
    flow = FlowSchedule(torch.linspace(0.001, 1, 1000)).consistency_scalings(torch.tensor([0, 999]), 0.5, 10.0)
    torch.testing.assert_close(consistency_output(x, x0, flow), x0)


@pytest.mark.parametrize("student", default_only(["lora", "full"], {"lora"}))
def test_loss_falls_on_fixed_batch(student, tiny_teachers):
    models, method, _ = build(LCM, tiny_teachers["sd"], student, rank=4, alpha=8, w_min=2.0, w_max=3.0)
    opt = torch.optim.Adam(models.parameters("student"), lr=3e-3 if student == "lora" else 1e-3)
    batch = fixed_batch(models, b=4)
    losses = [update(models, method, "student", batch, opt, step=0) for _ in range(20)]  # lora: about 0.5 by 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_frozen_lora_cannot_pass(tiny_teachers):
    """The same check fails for a LoRA that never trains (learning rate 0): the test above can fail."""
    models, method, _ = build(LCM, tiny_teachers["sd"], "lora", w_min=2.0, w_max=3.0)
    opt = torch.optim.Adam(models.parameters("student"), lr=0.0)
    batch = fixed_batch(models, b=4)
    losses = [update(models, method, "student", batch, opt, step=0) for _ in range(10)]
    assert not losses[-1] < 0.7 * losses[0]


def _train(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_train_py_lora_roundtrip_into_plain_diffusers(tiny_teachers, image_folder, tmp_path):
    """A run through train.py; its LoRA (alpha != rank) loads into a vanilla pipeline with load_lora_weights and
    the scheduler from sampling.json, and gives exactly the images of load_student."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from distill_diffusion import load_student, sample

    out = tmp_path / "run"
    r = _train(["--method", "lcm", f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}", "max_steps=4",
                "batch_size=2", "lora_rank=4", "lora_alpha=12", "learning_rate=1e-2", f"output_dir={out}",
                "report_to=none", "checkpointing_steps=2"])
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("config.yaml", "sampling.json", "metrics.jsonl", "README.md", "student/pytorch_lora_weights.safetensors"):
        assert (out / f).exists(), f
    assert (out / "validation" / "step_000004.png").exists()
    info = json.loads((out / "sampling.json").read_text())
    assert info["lora"]["lora_alpha"] == 12 and info["lora"]["r"] == 4
    s4 = info["steps"]["4"]

    pipe = load_student(out)
    ours, _ = sample(pipe, ["a red square", "a blue circle"], steps=4, seeds=[0, 1], output_type="np")

    plain = StableDiffusionPipeline.from_pretrained(tiny_teachers["sd"])
    plain.load_lora_weights(str(out / "student"))
    plain.scheduler = LCMScheduler.from_config(plain.scheduler.config, **s4["scheduler_kwargs"])
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    ref = plain(["a red square", "a blue circle"], timesteps=s4["timesteps"], guidance_scale=s4["guidance_scale"],
                generator=gens, output_type="np", height=16, width=16).images
    assert abs(ours - ref).max() < 1e-5
    # and the LoRA changed the teacher's function (lora_alpha restored: a wrong scale would not match above)
    plain.unload_lora_weights()
    base = plain(["a red square", "a blue circle"], timesteps=s4["timesteps"], guidance_scale=1.0,
                 generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="np", height=16,
                 width=16).images
    assert abs(ours - base).max() > 1e-4


@pytest.mark.parametrize("teacher", default_only(["v", "sdxl"], set()))
def test_train_in_process_v_and_sdxl(teacher, tiny_teachers, image_folder, tmp_path):
    from distill_diffusion import load_student, sample
    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train
    from methods import METHODS

    cfg, _ = parse_config(["--method", "lcm", f"teacher={tiny_teachers[teacher]}", f"data.images={image_folder}",
                           "max_steps=3", "batch_size=2", f"output_dir={tmp_path}", "report_to=none"], METHODS)
    train(cfg, LCM)
    pipe = load_student(tmp_path)
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if teacher == "sdxl" else "StableDiffusionPipeline")
    imgs, _ = sample(pipe, ["a red square"], steps=4, seeds=[0], output_type="np")
    assert imgs.shape == (1, 16, 16, 3)


@pytest.mark.slow
def test_full_student_exports_a_pipeline(tiny_teachers, image_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train
    from methods import METHODS

    cfg, _ = parse_config(["--method", "lcm", f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}",
                           "student=full", "max_steps=2", "batch_size=2", f"output_dir={tmp_path}",
                           "report_to=none"], METHODS)
    train(cfg, LCM)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "student")
    assert pipe.unet.config.time_cond_proj_dim == 256
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    out = pipe("a red square", num_inference_steps=2, guidance_scale=8.0, height=16, width=16, output_type="np")
    assert out.images.shape == (1, 16, 16, 3)


def test_lora_ema_target_is_an_adapter_that_follows(tiny_teachers):
    """method.lora_ema_target: the LoRA student's target is an EMA adapter (decay ema_decay), moved by each update
    towards the student but not onto it; without it, the target is the student's own tensors."""
    models, _, _ = build(LCM, tiny_teachers["sd"], "lora", w_min=2.0, w_max=3.0)
    assert models.targets["target"].decay is None and models.parameters("target") == []
    models, method, _ = build(LCM, tiny_teachers["sd"], "lora", w_min=2.0, w_max=3.0, lora_ema_target=True,
                              ema_decay=0.9)
    assert models.targets["target"].decay == 0.9
    tgt0 = [p.clone() for p in models.parameters("target")]
    opt = torch.optim.Adam(models.parameters("student"), lr=1e-2)
    update(models, method, "student", fixed_batch(models), opt, step=0)
    tgt, src = models.parameters("target"), models.parameters("student")
    for p0, p, s in zip(tgt0, tgt, src):
        torch.testing.assert_close(p, 0.9 * p0 + 0.1 * s)
    assert not all(torch.equal(a, b) for a, b in zip(tgt, src))


def test_tcd_gamma_export_is_the_plain_tcd_pipeline_call(tiny_teachers, image_folder, tmp_path):
    """``method.tcd_gamma``: sampling.json names TCDScheduler with γ as the pipelines' eta; load_student's images
    are a plain diffusers call with TCDScheduler and that eta, and not the call at eta = 0 (γ reaches the sampler);
    the model card's snippet passes it."""
    from diffusers import StableDiffusionPipeline, TCDScheduler

    from distill_diffusion import load_student, sample
    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train
    from methods import METHODS

    cfg, _ = parse_config(["--method", "lcm", f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}",
                           "max_steps=1", "batch_size=2", f"output_dir={tmp_path}", "report_to=none",
                           "validation_steps=0", "method.tcd_gamma=0.3", "method.tcd_steps=[4,8]"], METHODS)
    train(cfg, LCM)
    info = json.loads((tmp_path / "sampling.json").read_text())["steps"]
    s4 = info["4"]
    assert s4["scheduler"] == "TCDScheduler" and s4["eta"] == 0.3 and info["8"]["eta"] == 0.3
    assert info["2"]["scheduler"] == "LCMScheduler" and info["2"]["eta"] is None  # not in tcd_steps: LCM's own
    assert s4["scheduler_kwargs"] == {"original_inference_steps": 50}
    assert "eta=0.3" in (tmp_path / "README.md").read_text()
    prompts = ["a red square", "a blue circle"]
    ours, _ = sample(load_student(tmp_path), prompts, steps=4, seeds=[0, 1], output_type="np")

    plain = StableDiffusionPipeline.from_pretrained(tiny_teachers["sd"])
    plain.load_lora_weights(str(tmp_path / "student"))
    plain.scheduler = TCDScheduler.from_config(plain.scheduler.config, **s4["scheduler_kwargs"])

    def call(eta: float):
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        return plain(prompts, timesteps=s4["timesteps"], guidance_scale=1.0, eta=eta, generator=gens,
                     output_type="np", height=16, width=16).images

    assert abs(ours - call(0.3)).max() < 1e-5
    assert abs(ours - call(0.0)).max() > 1e-4


def test_tcd_gamma_is_refused_on_a_flow_teacher_and_outside_0_1(flow_teachers, image_folder, tmp_path):
    from distill_diffusion.config import parse_config
    from distill_diffusion.errors import UserError
    from distill_diffusion.loop import train
    from methods import METHODS

    with pytest.raises(UserError, match=r"lies in \[0, 1\]"):
        parse_config(["--method", "lcm", "method.tcd_gamma=1.5"], METHODS)
    with pytest.raises(UserError, match="method.tcd_steps"):
        parse_config(["--method", "tscd", "method.tcd_gamma=0.3", "method.tcd_steps=[0,4]"], METHODS)
    cfg, _ = parse_config(["--method", "lcm", f"teacher={flow_teachers['sd3']}", f"data.images={image_folder}",
                           "max_steps=1", "batch_size=2", f"output_dir={tmp_path / 'run'}", "report_to=none",
                           "method.tcd_gamma=0.3"], METHODS)
    with pytest.raises(UserError, match="flow teacher"):
        train(cfg, LCM)
    assert not (tmp_path / "run" / "sampling.json").exists()
