"""The embedded flow teacher (teacher=embedded-flow): a StableDiffusion3Pipeline without T5, shipped in the package,
and the text length a flow run records so that a vanilla pipeline call reproduces it."""

from __future__ import annotations

import json

import pytest
import torch

from distill_diffusion import artifacts
from distill_diffusion.config import parse_config
from distill_diffusion.loop import train
from distill_diffusion.models import embedded_teacher_path
from methods import METHODS

FLOW = embedded_teacher_path("embedded-flow")


def test_ships_as_a_vanilla_sd3_pipeline_without_t5():
    """It loads as diffusers documents SD3 without T5 (text_encoder_3=None), and our sampler's teacher rows are the
    vanilla call with the recorded text length (0 T5 tokens) and the same generators."""
    from diffusers import StableDiffusion3Pipeline

    info = json.loads((FLOW / "training.json").read_text())
    assert info["max_sequence_length"] == 0
    assert sum(f.stat().st_size for f in FLOW.rglob("*") if f.is_file()) <= 30 * 2**20
    pipe = StableDiffusion3Pipeline.from_pretrained(FLOW, text_encoder_3=None, tokenizer_3=None)
    assert pipe.transformer.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    gens = [torch.Generator().manual_seed(3)]
    want = pipe(["a photo of a sneaker"], height=32, width=32, num_inference_steps=2, guidance_scale=3.0,
                max_sequence_length=0, generator=gens, output_type="np").images
    teacher = artifacts.load_teacher("embedded-flow")
    got, _ = artifacts.sample(teacher, ["a photo of a sneaker"], steps=2, seeds=[3], guidance_scale=3.0,
                              output_type="np")
    assert abs(got - want).max() < 1e-5
    assert artifacts.is_embedded_teacher("embedded-flow") and artifacts.is_embedded_teacher(str(FLOW))
    assert artifacts.teacher_ref(str(FLOW)) == "embedded-flow"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_teacher_name_selects_the_flow_defaults(method):
    """teacher=embedded-flow takes configs/teachers/embedded-flow.yaml and the method's flow_default.yaml (or the
    dataclass defaults for a method without one)."""
    cfg, _ = parse_config(["--method", method, "teacher=embedded-flow"], METHODS)
    assert cfg.teacher == "embedded-flow" and "a trouser" in cfg.validation_prompts
    own = (artifacts.Path(__file__).resolve().parent.parent / "configs" / method / "flow_default.yaml")
    if own.is_file():
        assert cfg.max_steps == int(next(line.split(":")[1] for line in own.read_text().splitlines()
                                         if line.startswith("max_steps:")))


@pytest.mark.parametrize("method", [pytest.param(m, marks=() if m == "lcm" else pytest.mark.slow)
                                    for m in sorted(METHODS)])
def test_every_method_trains_on_the_embedded_flow_teacher(method, tmp_path):
    """Two steps of each method's flow defaults on the shipped flow teacher; the run records the family, the flow
    schedule and the text length, and its student samples."""
    args = ["--method", method, "teacher=embedded-flow", "max_steps=2", "batch_size=2", "report_to=none",
            "validation_seeds=0", f"output_dir={tmp_path}"]
    if method == "tscd":
        args += ["method.segments=[2,1]", "method.stage_fractions=[0.5,0.5]", "method.sampling_steps=[1,2]",
                 "method.default_steps=2"]
    cfg, _ = parse_config(args, METHODS)
    train(cfg, METHODS[method])
    info = json.loads((tmp_path / "sampling.json").read_text())
    assert (info["family"], info["schedule"], info["max_sequence_length"], info["teacher"]) == \
        ("sd3", "flow", 0, "embedded-flow")
    pipe = artifacts.load_student(tmp_path)
    images, _ = artifacts.sample(pipe, ["a bag"], seeds=[0], output_type="np")
    assert images.shape == (1, 32, 32, 3)


def test_a_run_records_its_text_length_for_the_vanilla_call(flow_teachers, image_folder, tmp_path):
    """max_sequence_length= on a flow teacher: recorded in sampling.json, set on the loaded student and passed by
    sample(); the vanilla call with it reproduces the student, the pipeline default (256) does not."""
    from diffusers import StableDiffusion3Pipeline

    cfg, _ = parse_config(["--method", "lcm", f"teacher={flow_teachers['sd3']}", "max_sequence_length=4",
                           f"data.images={image_folder}", "max_steps=1", "batch_size=2", "lora_rank=2",
                           "report_to=none", "validation_seeds=0", "resolution=16", f"output_dir={tmp_path}"],
                          METHODS)
    train(cfg, METHODS["lcm"])
    info = json.loads((tmp_path / "sampling.json").read_text())
    assert info["max_sequence_length"] == 4
    student = artifacts.load_student(tmp_path, fuse=False)
    assert artifacts.family_of(student).pipe_text_kwargs(student) == {"max_sequence_length": 4}
    plain = StableDiffusion3Pipeline.from_pretrained(flow_teachers["sd3"])
    plain.load_lora_weights(str(tmp_path / "student"))
    plain.scheduler = student.scheduler  # the run's scheduler, as load_student configured it

    def latents(pipe, **kw):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        return pipe("a red square", height=16, width=16, num_inference_steps=2, generator=g, output_type="latent",
                    **kw).images

    want = latents(student, max_sequence_length=4)
    torch.testing.assert_close(latents(plain, max_sequence_length=4), want, atol=1e-5, rtol=1e-4)
    assert (latents(plain) - want).abs().max() > 1e-4
