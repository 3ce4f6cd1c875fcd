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
from .artifacts import configure, pipe_resolution
from .errors import UserError
from .families import family_of
from .method import StepSampling


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


def _euler_first_step_scheduler(base_config: Any, sigma_to: float) -> Any:
    """Flow teachers: a FlowMatchEulerDiscreteScheduler that runs the one sigma it is given, unshifted, and steps
    from it to ``sigma_to`` (Euler x + (σ' − σ) v: the (x0, ε) DDIM jump in flow form) instead of to 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class _FirstStepEuler(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None,
                          sigmas: list[float] | None = None, mu: float | None = None, **_: Any) -> None:
            if sigmas is None or len(sigmas) != 1:
                raise ValueError("the hybrid's teacher step needs one explicit sigma")
            self.num_inference_steps = 1
            self.sigmas = torch.tensor([float(sigmas[0]), self.sigma_to], dtype=torch.float32, device=device)
            self.timesteps = self.sigmas[:1] * self.config.num_train_timesteps
            self._step_index, self._begin_index = None, None

    sched = _FirstStepEuler.from_config(base_config, shift=1.0, use_dynamic_shifting=False)
    sched.sigma_to = float(sigma_to)
    return sched


@torch.no_grad()
def teacher_first_step(teacher: Any, prompts: list[str], first: StepSampling, generators: list[torch.Generator],
                       teacher_guidance: float, res: int) -> torch.Tensor:
    """The teacher's guided deterministic step (DDIM; flow: Euler) from pure noise at the student's first timestep to
    its second (``first``: the student's schedule): latents at the second, in the pipeline's own latent layout.

    Runs through the teacher pipeline itself (its own prompt encoding, conditioning and CFG) with a one-step
    scheduler, and returns the latents before any VAE decode. The initial noise is drawn from ``generators`` (one
    per image), which are left advanced past it.
    """
    saved = teacher.scheduler
    if first.sigmas is not None:
        teacher.scheduler = _euler_first_step_scheduler(saved.config, first.sigmas[1])
        where: dict[str, Any] = {"sigmas": [first.sigmas[0]]}
    else:
        teacher.scheduler = _ddim_first_step_scheduler(saved.config, int(first.timesteps[1]))
        where = {"timesteps": [int(first.timesteps[0])]}
    try:
        call = family_of(teacher).pipe_call_kwargs(teacher, teacher_guidance, None)
        out = teacher(prompt=list(prompts), **where, **call, generator=generators, height=res, width=res,
                      output_type="latent")
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
    if len(s.timesteps) < 2:
        raise UserError(f"the run's {steps}-step schedule has {len(s.timesteps)} timestep(s); hybrid sampling needs "
                        ">= 2")
    t_net, s_net = family_of(teacher).pipe_net(teacher), family_of(student).pipe_net(student)
    if type(teacher) is not type(student) or t_net.config.in_channels != s_net.config.in_channels or \
            teacher.vae_scale_factor != student.vae_scale_factor:
        raise UserError("the teacher and the student do not share a latent space; use the run's own teacher")
    res = pipe_resolution(student)
    t0 = time.perf_counter()
    # One generator per image, used first for z (by the teacher's pipeline) and then for any fresh noise the
    # student's scheduler draws (LCM/TCD re-noising): the same draw sequence as the student's own sampling.
    gens = [torch.Generator("cpu").manual_seed(int(sd)) for sd in seeds]
    x = teacher_first_step(teacher, prompts, s, gens, teacher_guidance, res)
    latents = x.to(s_net.device, s_net.dtype)
    if s.sigmas is None:
        # SD pipelines multiply given latents by their scheduler's init_noise_sigma: undo that so the student starts
        # exactly from x_{τ_2} (flow pipelines take given latents as they are).
        latents = latents / float(student.scheduler.init_noise_sigma)
        rest: dict[str, Any] = {**s.call_kwargs(), "timesteps": [int(t) for t in s.timesteps[1:]]}
    else:
        rest = {**s.call_kwargs(), "sigmas": list(s.sigmas[1:])}
    call = family_of(student).pipe_call_kwargs(student, s.guidance_scale, None)
    student.scheduler.generator = gens  # see artifacts._seeded: flow pipelines do not pass it to step()
    out = student(prompt=list(prompts), **rest, **call, latents=latents, generator=gens, height=res, width=res,
                  output_type=output_type)
    return out.images, time.perf_counter() - t0
