"""Hybrid sampling: the teacher takes the first step, the student the rest.

"Diversity distillation" (Gandikota & Bau, "Distilling Diversity and Control in Diffusion Models", 2025): distilled
students commit to an image's structure at their first step, which is where their diversity is lost; letting the
base model (the teacher, with its classifier-free guidance) take only that first step restores the teacher's
diversity at almost the student's cost. Shared by ``eval --hybrid`` and the app.

Step and timestep choice. The student's K-step schedule from its run (``sampling.json``) is τ_1 > τ_2 > ... > τ_K.

1. The initial latent is z ~ N(0, I), drawn per image from ``torch.Generator().manual_seed(seed)`` exactly as
   :func:`distill_diffusion.artifacts.sample` draws it, so a hybrid image and the student's own image of the same
   seed start from the same noise. The teacher sees it as x_{τ_1} (unit variance; a student's own
   ``init_noise_scale`` is not applied, since the teacher expects the forward process's x_t).
2. The teacher evaluates x_{τ_1} at τ_1 with CFG ``teacher_guidance`` (diffusers convention, batched, so it costs two
   evaluations per image) and takes a deterministic DDIM step (eta = 0) from τ_1 to τ_2:
   x_{τ_2} = sqrt(ᾱ_{τ_2}) x̂0 + sqrt(1 - ᾱ_{τ_2}) ε̂ (Song et al. 2021, eq. 12), where (x̂0, ε̂) is the teacher's guided
   prediction. This is the teacher's own ODE step, so x_{τ_2} lies on the teacher's trajectory and keeps the
   information in z (a fresh re-noising would discard it).
3. The student finishes from x_{τ_2} with its own scheduler, timesteps τ_2..τ_K and guidance, exactly as it would
   after its own first step. Total cost: 2 teacher evaluations + (K - 1) student evaluations (twice that if the
   student itself uses CFG).

``steps`` counts all steps (the teacher's one included), so a hybrid row at K steps is compared with the student at
K steps. A 1-step schedule leaves nothing for the student: ``steps=1`` raises :class:`UserError` (a student that
supports only one step cannot be hybridised this way; its single evaluation starts from pure noise at τ_1, and
giving it the teacher's less-noisy x_{τ_2} labelled τ_1 would be off its training distribution).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from . import schedule
from .artifacts import configure
from .errors import UserError


def _ddim_first_step_scheduler(base_config: Any, t_to: int) -> Any:
    """A DDIMScheduler that runs the explicit timesteps it is given and steps from the last one to ``t_to``.

    diffusers' DDIMScheduler takes no custom timesteps; this subclass accepts ``timesteps=[τ_1]`` and makes the single
    step land on τ_2 instead of the uniform grid's next point.
    """
    from diffusers import DDIMScheduler
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

    class _FirstStepDDIM(DDIMScheduler):
        def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None,
                          timesteps: list[int] | None = None) -> None:
            if timesteps is None:
                raise ValueError("the hybrid's teacher step needs explicit timesteps")
            self.num_inference_steps = len(timesteps)
            self.timesteps = torch.tensor(timesteps, dtype=torch.long, device=device)

        def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, eta: float = 0.0,
                 use_clipped_model_output: bool = False, generator: Any = None, variance_noise: Any = None,
                 return_dict: bool = True) -> Any:
            t = torch.full((sample.shape[0],), int(timestep), dtype=torch.long, device=sample.device)
            ac = self.alphas_cumprod.to(sample.device)
            x0, eps = schedule.split_prediction(model_output.float(), sample.float(), t, ac,
                                                self.config.prediction_type)
            prev = schedule.ddim_step(x0, eps, torch.full_like(t, self.t_to), ac).to(sample.dtype)
            return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)

    sched = _FirstStepDDIM.from_config(base_config)
    sched.t_to = int(t_to)
    return sched


@torch.no_grad()
def teacher_first_step(teacher: Any, prompts: list[str], t_from: int, t_to: int,
                       generators: list[torch.Generator], teacher_guidance: float) -> torch.Tensor:
    """The teacher's guided DDIM step from pure noise at ``t_from`` to ``t_to``: latents x_{t_to}, (B, C, h, w).

    Runs through the teacher pipeline itself (its own prompt encoding, SDXL conditioning and CFG) with a one-step
    scheduler, and returns the latents before any VAE decode. The initial noise is drawn from ``generators`` (one
    per image), which are left advanced past it.
    """
    saved = teacher.scheduler
    teacher.scheduler = _ddim_first_step_scheduler(saved.config, t_to)
    try:
        gens = generators
        res = teacher.unet.config.sample_size * teacher.vae_scale_factor
        out = teacher(prompt=list(prompts), timesteps=[int(t_from)], guidance_scale=teacher_guidance,
                      generator=gens, height=res, width=res, output_type="latent")
    finally:
        teacher.scheduler = saved
    return out.images


@torch.no_grad()
def hybrid_sample(teacher: Any, student: Any, prompts: list[str], steps: int, seeds: list[int],
                  teacher_guidance: float, output_type: str = "pil") -> tuple[list | np.ndarray, float]:
    """Generate one image per prompt: the teacher's first step, then the student's remaining K - 1 steps.

    ``teacher`` is :func:`distill_diffusion.artifacts.load_teacher`'s pipeline and ``student`` is
    :func:`distill_diffusion.artifacts.load_student`'s; both must share the latent space (the run's teacher).
    ``steps`` = K counts the teacher's step; it must be a step count the run supports and ≥ 2. Returns
    (images, seconds) like :func:`distill_diffusion.artifacts.sample`; images are PIL images, or an
    (N, H, W, 3) float array in [0, 1] for ``output_type="np"``.
    """
    if getattr(student, "distill", None) is None:
        raise UserError("hybrid sampling needs a student pipeline from load_student (it reads the run's schedule)")
    if len(prompts) != len(seeds):
        raise UserError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if steps < 2:
        raise UserError("hybrid sampling needs steps >= 2: the teacher takes the first of the student's steps and "
                        "the student the rest, so a 1-step schedule leaves the student nothing to do")
    s = configure(student, steps)
    taus = [int(t) for t in s.timesteps]
    if len(taus) < 2:
        raise UserError(f"the run's {steps}-step schedule has {len(taus)} timestep(s); hybrid sampling needs >= 2")
    if teacher.unet.config.in_channels != student.unet.config.in_channels or \
            teacher.vae_scale_factor != student.vae_scale_factor:
        raise UserError("the teacher and the student do not share a latent space; use the run's own teacher")
    t0 = time.perf_counter()
    # One generator per image, used first for z (by the teacher's pipeline) and then for any fresh noise the
    # student's scheduler draws (LCM/TCD re-noising): the same draw sequence as the student's own sampling.
    gens = [torch.Generator("cpu").manual_seed(int(sd)) for sd in seeds]
    x = teacher_first_step(teacher, prompts, taus[0], taus[1], gens, teacher_guidance)
    # The student's pipeline multiplies given latents by its scheduler's init_noise_sigma: undo that so it starts
    # exactly from x_{τ_2}.
    latents = x.to(student.unet.device, student.unet.dtype) / float(student.scheduler.init_noise_sigma)
    res = student.unet.config.sample_size * student.vae_scale_factor
    out = student(prompt=list(prompts), timesteps=taus[1:], guidance_scale=s.guidance_scale, latents=latents,
                  generator=gens, height=res, width=res, output_type=output_type)
    return out.images, time.perf_counter() - t0
