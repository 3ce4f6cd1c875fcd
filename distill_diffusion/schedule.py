"""Shared diffusion maths: one place for noising, parameterisation conversions, guidance and solver steps.

Everything here is a pure function of tensors and the DDPM schedule ``alphas_cumprod`` (ᾱ, shape (T,)); the one
exception, :func:`student_rollout`, also takes the student as a function x0 = G(x_t, t).
Timesteps ``t`` are integer tensors of shape (B,) in [0, T). Latents are (B, C, H, W).
Each function is tested against the diffusers scheduler that defines the same quantity (tests/test_schedule.py).

Guidance convention: everywhere in this project a guidance scale ``w`` means the diffusers convention
``uncond + w (cond - uncond)`` (w = 1: no guidance). Papers that write ``cond + w' (cond - uncond)`` (LCM, PCM)
convert at their edge with :func:`paper_to_diffusers_guidance`; :func:`paper_cfg` evaluates their form from our w.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def _bcast(a: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample (B,) tensor to broadcast over ``like`` (B, ...)."""
    return a.reshape(a.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def alpha_sigma(t: Tensor, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """sqrt(ᾱ_t), sqrt(1 - ᾱ_t) for integer timesteps t (B,). Negative t means "before the first step": ᾱ = 1."""
    ac = alphas_cumprod.to(t.device)
    a = torch.where(t >= 0, ac[t.clamp(min=0)], torch.ones((), device=t.device, dtype=ac.dtype))
    return a.sqrt(), (1 - a).sqrt()


def add_noise(x0: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) eps (DDPM eq. 4); equals ``DDPMScheduler.add_noise``."""
    a, s = alpha_sigma(t, alphas_cumprod)
    return _bcast(a, x0) * x0 + _bcast(s, x0) * eps


def split_prediction(
    model_out: Tensor, xt: Tensor, t: Tensor, alphas_cumprod: Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """Turn a network output into (x0, eps) for the schedule's parameterisation.

    epsilon: x0 = (x_t - sqrt(1-ᾱ) eps) / sqrt(ᾱ);
    v_prediction (Salimans & Ho 2022): x0 = a x_t - s v, eps = s x_t + a v;
    sample: the output is x0.
    """
    a, s = alpha_sigma(t, alphas_cumprod)
    a, s = _bcast(a, xt), _bcast(s, xt)
    if prediction_type == "epsilon":
        eps = model_out
        x0 = (xt - s * eps) / a
    elif prediction_type == "v_prediction":
        x0 = a * xt - s * model_out
        eps = s * xt + a * model_out
    elif prediction_type == "sample":
        x0 = model_out
        eps = (xt - a * x0) / s
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return x0, eps


def model_target(x0: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor, prediction_type: str) -> Tensor:
    """The regression target of the denoising loss for the given parameterisation (eps, v = a eps - s x0, or x0)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        a, s = alpha_sigma(t, alphas_cumprod)
        return _bcast(a, x0) * eps - _bcast(s, x0) * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def snr(t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio ᾱ / (1 - ᾱ), shape (B,)."""
    a, s = alpha_sigma(t, alphas_cumprod)
    return a**2 / s**2


def cfg(uncond: Tensor, cond: Tensor, w: Tensor | float) -> Tensor:
    """Classifier-free guidance, diffusers convention: uncond + w (cond - uncond). ``w`` scalar or (B,)."""
    if isinstance(w, Tensor) and w.ndim == 1:
        w = _bcast(w, cond)
    return uncond + w * (cond - uncond)


def paper_to_diffusers_guidance(w_paper: Tensor | float) -> Tensor | float:
    """LCM/PCM write cond + w' (cond - uncond) = uncond + (w' + 1)(cond - uncond): w = w' + 1."""
    return w_paper + 1


def diffusers_to_paper_guidance(w: Tensor | float) -> Tensor | float:
    """Inverse of :func:`paper_to_diffusers_guidance`."""
    return w - 1


def ddim_step(x0: Tensor, eps: Tensor, t_prev: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Deterministic DDIM (eta = 0) to timestep t_prev: sqrt(ᾱ_prev) x0 + sqrt(1 - ᾱ_prev) eps (Song et al. eq. 12).

    ``t_prev < 0`` lands on the clean sample (ᾱ = 1, i.e. ``set_alpha_to_one=True``). Equals ``DDIMScheduler.step``
    with eta = 0 given the same (x0, eps).
    """
    return add_noise(x0, eps, t_prev, alphas_cumprod)


def boundary_scalings(t: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """Consistency-model boundary conditions at timestep t (LCM eq. 9 with diffusers' timestep scaling).

    c_skip = σ_d² / ((st)² + σ_d²), c_out = st / sqrt((st)² + σ_d²), s = timestep_scaling. Shapes (B,).
    Equals ``LCMScheduler.get_scalings_for_boundary_condition_discrete``.
    """
    scaled = t.float() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def guidance_embedding(w: Tensor, dim: int = 256, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding of a guidance scale (B,) -> (B, dim), as diffusers' pipelines feed ``time_cond_proj_dim``.

    diffusers' pipelines call this with ``guidance_scale - 1`` (their w) scaled by 1000; the LCM paper's w' is exactly
    that quantity, so a student trained on w' samples correctly with ``guidance_scale = w' + 1``.
    """
    w = w.float() * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=w.device, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """Per-sample pseudo-Huber distance mean(sqrt((a-b)² + c²) - c) over non-batch dims (Song & Dhariwal 2023), (B,)."""
    d = (a.float() - b.float()) ** 2
    return (torch.sqrt(d + c * c) - c).flatten(1).mean(1)


def solver_timesteps(num_train_timesteps: int, num_solver_steps: int) -> Tensor:
    """The skipping-step DDIM grid of LCM/PCM: (1..N) * k - 1 with k = T // N, ascending, shape (N,)."""
    k = num_train_timesteps // num_solver_steps
    return torch.arange(1, num_solver_steps + 1) * k - 1


# ---- shared by several methods ----------------------------------------------------------------------------------


def paper_cfg(uncond: Tensor, cond: Tensor, w: Tensor) -> Tensor:
    """The teacher's guidance as LCM (eq. 8) and PCM write it, cond + ω (cond - uncond), with ω = w - 1.

    Takes our diffusers-convention w (B,) like :func:`cfg` and equals it up to rounding; uncond, cond (B, ...).
    """
    omega = diffusers_to_paper_guidance(w)
    return cond + omega.reshape(-1, *[1] * (cond.ndim - 1)) * (cond - uncond)


def guided_ddim_step(
    out_cond: Tensor, out_uncond: Tensor | None, xt: Tensor, t: Tensor, t_prev: Tensor, w: Tensor,
    alphas_cumprod: Tensor, prediction_type: str,
) -> Tensor:
    """The teacher's guided DDIM solver step x_t -> x_{t_prev} of consistency distillation (LCM eq. 8; PCM sec. 3).

    ``out_cond`` / ``out_uncond``: the network's raw outputs (B, C, h, w) at (x_t, t) for the prompt and the empty
    prompt; both are turned into (x0, eps), guided with :func:`paper_cfg` (w (B,), diffusers convention) and stepped
    with :func:`ddim_step`. ``out_uncond=None``: no guidance, the conditional prediction alone. Returns (B, C, h, w).
    """
    x0, eps = split_prediction(out_cond, xt, t, alphas_cumprod, prediction_type)
    if out_uncond is not None:
        x0_u, eps_u = split_prediction(out_uncond, xt, t, alphas_cumprod, prediction_type)
        x0, eps = paper_cfg(x0_u, x0, w), paper_cfg(eps_u, eps, w)
    return ddim_step(x0, eps, t_prev, alphas_cumprod)


def renoise(x: Tensor, noise: Tensor, t_from: Tensor, t_to: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion q(x_{t_to} | x_{t_from}) for t_to >= t_from (B,) (DDPM eq. 2 over several steps):
    sqrt(r) x + sqrt(1 - r) noise with r = ᾱ(t_to) / ᾱ(t_from) (PCM's ``noise_travel``). x, noise (B, C, h, w).

    From t_from < 0 (ᾱ = 1) it is :func:`add_noise`.
    """
    a_from, _ = alpha_sigma(t_from, alphas_cumprod)
    a_to, _ = alpha_sigma(t_to, alphas_cumprod)
    r = (a_to / a_from) ** 2
    r = r.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    return r.sqrt() * x + (1 - r).clamp(min=0).sqrt() * noise


def consistency_distance(pred: Tensor, target: Tensor, loss_type: str = "huber", c: float = 0.001) -> Tensor:
    """Per-sample consistency-training distance d(f_θ, f_θ⁻) (B,), averaged over pixels: ``huber`` is the
    pseudo-Huber sqrt(d² + c²) - c (Song & Dhariwal 2023, sec. 3.3; LCM-LoRA, PCM), ``l2`` the squared error
    (LCM eq. 10, Hyper-SD). pred, target (B, ...)."""
    if loss_type == "l2":
        return ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
    return pseudo_huber(pred, target, c)


def student_rollout(
    predict_x0: Callable[[Tensor, Tensor], Tensor], x: Tensor, timesteps: Sequence[int], noises: Sequence[Tensor],
    alphas_cumprod: Tensor,
) -> Tensor:
    """Multi-step sampling of a one-step student (consistency models' Alg. 1, Song et al. 2023; DMD2's backward
    simulation, sec. 4.4; few-step SiD): the input of its step k = len(noises), (B, C, h, w).

    x_0 = ``x`` at τ_0; for j < k: x̂0 = G(x_j, τ_j), x_{j+1} = sqrt(ᾱ_{τ_{j+1}}) x̂0 + sqrt(1 - ᾱ_{τ_{j+1}}) noises[j].
    ``predict_x0(x, t)`` with t (B,) int64 returns G's x0; ``timesteps`` τ_0 > τ_1 > ... has at least k + 1 entries.
    Run it under ``torch.no_grad`` for a rollout without gradient. With c_skip = 0 this is what ``LCMScheduler`` does
    between sampling steps.
    """
    if len(timesteps) <= len(noises):
        raise ValueError(f"{len(noises)} steps need {len(noises) + 1} timesteps, got {list(timesteps)}")
    b = x.shape[0]
    for j, noise in enumerate(noises):
        t = torch.full((b,), timesteps[j], dtype=torch.long, device=x.device)
        x0 = predict_x0(x, t)
        t_next = torch.full((b,), timesteps[j + 1], dtype=torch.long, device=x.device)
        x = add_noise(x0, noise, t_next, alphas_cumprod)
    return x
