"""Flow-matching teachers (SD3, FLUX.1, FLUX.1-dev, SANA) through every registered method, LoRA and full.

Each run goes through the training loop on a tiny pipeline of the real class (``conftest.make_tiny_flow_pipeline``);
its export must then load where users generate: the LoRA with ``load_lora_weights`` into the vanilla pipeline class
(and change its output), a full student with ``from_pretrained``, and ``load_student`` at every step count listed
in sampling.json.
"""

from __future__ import annotations

import json

import pytest
import torch

from distill_diffusion import artifacts
from distill_diffusion.config import parse_config
from distill_diffusion.loop import train
from methods import METHODS

RESOLUTION = {"sd3": 16, "flux": 16, "flux_dev": 16, "sana": 32}  # SanaPipeline wants multiples of 32
# Short-run settings per method (two steps must reach every stage / role).
SHORT = {"tscd": ["method.segments=[2,1]", "method.stage_fractions=[0.5,0.5]"],
         "dmd2": ["method.gan=true", "method.student_update_every=1"], "lcm": [], "sid": []}


def _run(method: str, kind: str, student: str, teacher: str, images: str, out, *extra: str):
    args = ["--method", method, f"teacher={teacher}", f"student={student}", f"resolution={RESOLUTION[kind]}",
            f"data.images={images}", "max_steps=2", "batch_size=2", "lora_rank=2", "lora_alpha=2",
            "learning_rate=1e-3", f"output_dir={out}", "report_to=none", "validation_seeds=0", "logging_steps=1",
            *SHORT.get(method, []), *extra]
    cfg, _ = parse_config(args, METHODS)
    train(cfg, METHODS[method])
    return json.loads((out / "sampling.json").read_text())


def _latents(pipe, res: int, **kw):
    g = torch.Generator().manual_seed(0)
    fam = artifacts.family_of(pipe)
    return pipe("a red square", height=res, width=res, generator=g, output_type="latent",
                **fam.pipe_call_kwargs(pipe, 1.0, None), **kw).images


@pytest.mark.parametrize("student", ["lora", "full"])
@pytest.mark.parametrize("kind", ["sd3", "flux", "sana"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_flow_teacher_trains_and_exports_to_vanilla_pipelines(method, kind, student, flow_teachers, image_folder,
                                                             tmp_path):
    from diffusers import DiffusionPipeline

    info = _run(method, kind, student, flow_teachers[kind], image_folder, tmp_path)
    assert info["schedule"] == "flow" and info["family"] == kind
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
    student_pipe = artifacts.load_student(tmp_path)
    for k in student_pipe.distill.steps:
        images, _ = artifacts.sample(student_pipe, ["a blue circle"], k, [0], output_type="np")
        assert images.shape == (1, res, res, 3) and torch.isfinite(torch.as_tensor(images)).all()


def test_guidance_distilled_flux_counts_one_evaluation_per_step(flow_teachers, image_folder, tmp_path):
    """FLUX.1-dev's guidance is an input: the teacher's CFG is one pass (NFE counts it once), and its student
    samples with the guidance it was trained with."""
    info = _run("lcm", "flux_dev", "lora", flow_teachers["flux_dev"], image_folder, tmp_path)
    teacher = artifacts.load_teacher(flow_teachers["flux_dev"], resolution=16)
    assert artifacts.nfe(teacher, 4, 3.5) == 4 and not artifacts.uses_cfg(teacher, 3.5)
    student = artifacts.load_student(tmp_path)
    assert artifacts.nfe(student, 4) == 4 and info["steps"]["4"]["guidance_scale"] == 3.5
    images, _ = artifacts.sample(teacher, ["a red square"], 2, [0], 3.5, output_type="np")
    assert images.shape == (1, 16, 16, 3)
