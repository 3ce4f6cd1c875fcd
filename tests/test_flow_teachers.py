"""Flow-matching teachers (SD3, FLUX.1, FLUX.1-dev, SANA) through every registered method, LoRA and full.

Each run goes through the training loop on a tiny pipeline of the real class (``conftest.make_tiny_flow_pipeline``);
its export must then load where users generate: the LoRA with ``load_lora_weights`` into the vanilla pipeline class
(and change its output), a full student with ``from_pretrained``, and ``load_student`` at every step count listed
in sampling.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill_diffusion import artifacts
from distill_diffusion.config import parse_config
from distill_diffusion.loop import train
from methods import METHODS

ROOT = Path(__file__).resolve().parent.parent

RESOLUTION = {"sd3": 16, "flux": 16, "flux_dev": 16, "sana": 32}  # SanaPipeline wants multiples of 32
# Short-run settings per method (two steps must update the student, and reach every stage).
SHORT = {"tscd": ["method.segments=[2,1]", "method.stage_fractions=[0.5,0.5]"],
         "dmd2": ["method.gan=true", "method.student_update_every=1", "method.student_lr=1e-3"], "lcm": [], "sid": [],
         "scm": ["method.tangent_warmup_steps=1"]}
# The shipped configs for real flow models, run on the tiny pipeline of the same class (their step counts, stages and
# method settings; sizes, precision and learning rates overridden to fit a CPU test).
CONFIGS = {"sd3": ("sd35_medium", "lora"), "flux_dev": ("flux1_dev", "lora"), "sana": ("sana_1600m", "full")}
# Every method x {lora, full} x {SD3, FLUX.1, SANA} and FLUX.1-dev. The default test set runs one case per method: a
# shipped config (each family's config by some method) or, for LCM, a full FLUX.1 student (together every family and
# both student kinds); the rest are ``slow`` (CI runs them), to keep the test command's time.
DEFAULT_SHIPPED = {"dmd2": "flux_dev", "sid": "sana", "tscd": "sd3", "scm": "sd3"}
DEFAULT_EXTRA = {"lcm": ("flux", "full")}


def _case(method: str, kind: str, student: str) -> object:
    shipped = CONFIGS.get(kind, (None, None))[1] == student
    default = (shipped and DEFAULT_SHIPPED.get(method) == kind) or DEFAULT_EXTRA.get(method) == (kind, student)
    return pytest.param(method, kind, student, shipped, marks=() if default else pytest.mark.slow)


CASES = [_case(m, kind, student) for m in sorted(METHODS)
         for kind, student in [("sd3", "lora"), ("sd3", "full"), ("flux", "lora"), ("flux", "full"),
                               ("flux_dev", "lora"), ("sana", "lora"), ("sana", "full")]]


def config_file(method: str, kind: str) -> Path:
    return next((ROOT / "configs" / method).glob(f"{CONFIGS[kind][0]}*.yaml"))


def _run(method: str, kind: str, student: str, teacher: str, images: str, out, use_config: bool = False,
         *extra: str):
    args = ["--method", method]
    if use_config:
        args += ["--config", str(config_file(method, kind)), "mixed_precision=no", "gradient_accumulation_steps=1"]
        if method == "tscd":
            args += ["max_steps=4" if "[8, 4, 2, 1]" in config_file(method, kind).read_text() else "max_steps=2"]
    else:
        args += SHORT[method] + ["max_steps=2"]
    args += [f"teacher={teacher}", f"student={student}", f"resolution={RESOLUTION[kind]}", f"data.images={images}",
             "batch_size=2", "lora_rank=2", "lora_alpha=2", "learning_rate=1e-3", f"output_dir={out}",
             "report_to=none", "validation_seeds=0", "logging_steps=1", *extra]
    if use_config and method == "dmd2":
        args += ["method.student_update_every=1", "method.student_lr=1e-3"]
    if use_config and method == "scm":  # rCM's 5 critic updates per student update would leave the student as it was
        args += ["method.student_update_every=1"]
    if "max_steps" not in " ".join(args):
        args.append("max_steps=2")
    cfg, _ = parse_config(args, METHODS)
    train(cfg, METHODS[method])
    return json.loads((out / "sampling.json").read_text())


def _latents(pipe, res: int, guidance: float = 1.0, **kw):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # flow pipelines do not pass their generator to scheduler.step (FlowMatchLCM's fresh noise)
    fam = artifacts.family_of(pipe)
    return pipe("a red square", height=res, width=res, generator=g, output_type="latent",
                **fam.pipe_call_kwargs(pipe, guidance, None), **kw).images


@pytest.mark.parametrize("method,kind,student,use_config", CASES)
def test_flow_teacher_trains_and_exports_to_vanilla_pipelines(method, kind, student, use_config, flow_teachers,
                                                             image_folder, tmp_path):
    """Every method x {lora, full} x {SD3, FLUX.1, SANA}, and FLUX.1-dev; the shipped sd35 / flux1_dev / sana
    configs where they exist."""
    from diffusers import DiffusionPipeline

    info = _run(method, kind, student, flow_teachers[kind], image_folder, tmp_path, use_config)
    assert info["schedule"] == "flow" and info["family"] == kind.removesuffix("_dev")
    res = RESOLUTION[kind]
    for k, s in info["steps"].items():
        assert s["scheduler"].startswith("FlowMatch") and len(s["sigmas"]) == int(k) == len(s["timesteps"])
    if student == "lora":
        pipe = DiffusionPipeline.from_pretrained(flow_teachers[kind])
        before = _latents(pipe, res, num_inference_steps=1)
        pipe.load_lora_weights(str(tmp_path / "student"))
        assert not torch.equal(before, _latents(pipe, res, num_inference_steps=1))
    else:
        pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "student"))
        assert type(pipe).__name__ == info["pipeline"]
    # The README's plain-diffusers recipe: the scheduler class, kwargs and sigmas of sampling.json reproduce
    # load_student's sampling.
    import diffusers

    s = info["steps"][str(info["default_steps"])]
    pipe.scheduler = getattr(diffusers, s["scheduler"]).from_config(pipe.scheduler.config, **s["scheduler_kwargs"])
    want = _latents(artifacts.load_student(tmp_path, fuse=False), res, sigmas=s["sigmas"])
    torch.testing.assert_close(_latents(pipe, res, sigmas=s["sigmas"]), want, atol=1e-5, rtol=1e-4)
    student_pipe = artifacts.load_student(tmp_path)
    for k in student_pipe.distill.steps:
        images, _ = artifacts.sample(student_pipe, ["a blue circle"], k, [0], output_type="np")
        assert images.shape == (1, res, res, 3) and torch.isfinite(torch.as_tensor(images)).all()


def test_guidance_distilled_flux_counts_one_evaluation_per_step(flow_teachers, image_folder, tmp_path):
    """FLUX.1-dev's guidance is an input: the teacher's CFG is one pass (NFE counts it once), and its student
    samples with the guidance it was trained with."""
    info = _run("lcm", "flux_dev", "lora", flow_teachers["flux_dev"], image_folder, tmp_path, use_config=True)
    teacher = artifacts.load_teacher(flow_teachers["flux_dev"], resolution=16)
    assert artifacts.nfe(teacher, 4, 3.5) == 4 and not artifacts.uses_cfg(teacher, 3.5)
    student = artifacts.load_student(tmp_path)
    assert artifacts.nfe(student, 4) == 4 and info["steps"]["4"]["guidance_scale"] == 3.5
    images, _ = artifacts.sample(teacher, ["a red square"], 2, [0], 3.5, output_type="np")
    assert images.shape == (1, 16, 16, 3)


def test_flow_student_images_depend_only_on_their_seed(flow_teachers, image_folder, tmp_path):
    """SD3's and FLUX's pipelines do not pass their generator to scheduler.step: FlowMatchLCMScheduler's fresh noise
    would come from torch's global RNG. ``sample`` hands the per-image generators to the scheduler, so an image is
    the same alone or in a batch, whatever the global RNG."""
    _run("sid", "sd3", "lora", flow_teachers["sd3"], image_folder, tmp_path, False, "method.num_steps=2")
    pipe = artifacts.load_student(tmp_path)
    torch.manual_seed(1)
    both, _ = artifacts.sample(pipe, ["a red square", "a blue circle"], 2, [5, 6], output_type="np")
    torch.manual_seed(2)
    alone, _ = artifacts.sample(pipe, ["a blue circle"], 2, [6], output_type="np")
    assert abs(both[1] - alone[0]).max() < 1e-5
