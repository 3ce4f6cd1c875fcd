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
from typing import Any

import torch
from torch import Tensor

from .errors import UserError
from .method import StepRNG, StepSampling


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


# LCMScheduler's boundary condition c_skip x_t + c_out x0 with this timestep scaling has c_skip < 3e-9 for t >= 1: an
# exported VP student then samples with its x0 prediction alone, re-noised with fresh noise between steps (SiD's and
# sCM's generators).
X0_TIMESTEP_SCALING = 1.0e4


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


# ---- flow matching (rectified flow) -------------------------------------------------------------------------------


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """SD3's timestep shift σ' = s σ / (1 + (s − 1) σ) (Esser et al. 2024, eq. 23; ``FlowMatchEulerDiscreteScheduler``
    with ``shift``). sigmas in [0, 1], any shape."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(sigmas: Tensor, mu: float) -> Tensor:
    """FLUX.1's resolution-dependent shift e^μ / (e^μ + 1/σ − 1) (``FlowMatchEulerDiscreteScheduler.time_shift``,
    exponential type, σ-exponent 1); any shape."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def dynamic_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                     max_shift: float = 1.15) -> float:
    """μ of :func:`time_shift` for an image of ``image_seq_len`` latent tokens: linear between (base_seq_len,
    base_shift) and (max_seq_len, max_shift), as diffusers' FLUX pipeline's ``calculate_shift``."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def timestep_density(u: Tensor, scheme: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
                     mode_scale: float = 1.29) -> Tensor:
    """Map draws to the training-time density of SD3's paper (sec. 3.1; diffusers'
    ``compute_density_for_timestep_sampling``), as a fraction of the way from pure noise: values in (0, 1), (B,).

    ``uniform``: u ~ U[0, 1) as given. ``logit_normal``: ``u`` are N(0, 1) draws, returned as
    sigmoid(logit_mean + logit_std u). ``mode``: u ~ U[0, 1), returned as 1 − u − s (cos²(πu/2) − 1 + u).
    Diffusers' scripts index the descending ``scheduler.timesteps`` with floor(value · T); :func:`index_of_density`
    turns it into our ascending index.
    """
    if scheme == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * u)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if scheme == "uniform":
        return u
    raise ValueError(f"unknown timestep density {scheme!r}: uniform, logit_normal or mode")


def index_of_density(u: Tensor, num_train_timesteps: int) -> Tensor:
    """Our ascending timestep index of diffusers' ``timesteps[floor(u · T)]`` (descending, ``u = 0`` the noisiest),
    for u from :func:`timestep_density`, (B,) int64. The same for VP and flow schedules."""
    T = num_train_timesteps
    return (T - 1 - (u * T).long().clamp(0, T - 1)).long()


def density_timesteps(rng: StepRNG, tag: str, num_train_timesteps: int, scheme: str = "uniform",
                      logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29) -> Tensor:
    """Training timestep indices (B,) int64 drawn per sample from one of SD3's densities (:func:`timestep_density`).

    ``uniform`` is the integer draw ``randint(0, T)`` the VP methods always made (so a uniform run is unchanged);
    ``logit_normal`` draws N(0, 1) and ``mode`` U[0, 1) under the same tag.
    """
    if scheme == "uniform":
        return rng.randint(0, num_train_timesteps, tag)
    u = rng.randn((), tag) if scheme == "logit_normal" else rng.rand(tag)
    density = timestep_density(u, scheme, logit_mean, logit_std, mode_scale)
    return index_of_density(density, num_train_timesteps).to(u.device)


def flow_split(v: Tensor, xt: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, eps) from a velocity v = eps − x0 at x_σ = (1 − σ) x0 + σ eps: x0 = x_σ − σ v, eps = x_σ + (1 − σ) v.
    v, xt (B, ...); sigma (B,). ``FlowMatchEulerDiscreteScheduler`` and the SD3 paper's velocity parameterisation."""
    s = _bcast(sigma, xt)
    return xt - s * v, xt + (1 - s) * v


# ---- the schedule abstraction methods speak through -----------------------------------------------------------------
#
# Both schedules index T discrete training timesteps with integers t in [0, T), t = 0 the least noisy and t = T − 1
# the noisiest (as diffusers' training scripts index ``scheduler.timesteps``); t < 0 is the clean sample. At each t
# a schedule has (α_t, σ_t) with x_t = α_t x0 + σ_t ε: VP α = sqrt(ᾱ_t), σ = sqrt(1 − ᾱ_t); rectified flow
# α = 1 − σ_t, σ = σ_t. Everything a method needs is then written once in (x0, ε, α, σ): noising, a prediction
# turned into (x0, ε), the denoising target, the deterministic solver step (DDIM in VP is the Euler step in flow),
# the consistency boundary scalings, what the network is fed as its timestep, and the scheduler a student exports.


TCD_FLOW = ("method.tcd_gamma: TCD's stochastic sampler (TCDScheduler) is for VP teachers; diffusers' flow "
            "schedulers have no γ. Leave method.tcd_gamma unset on a flow teacher")


def tcd_at(gamma: float | None, steps: Sequence[int] | None, k: int) -> float | None:
    """TCD's γ for a k-step sampler: ``gamma`` when it is set and k is among ``steps`` (None: every k), else None
    (the method's own sampler)."""
    return gamma if gamma is not None and (steps is None or k in steps) else None


def check_tcd_gamma(gamma: float | None, steps: Sequence[int] | None = None, sched: Any = None) -> None:
    """Refuse ``method.tcd_gamma`` outside [0, 1], ``method.tcd_steps`` with a count below 1, or γ on a flow
    teacher's schedule ``sched`` (when given), before a run trains a student it could not export (UserError: one
    line that says what to do)."""
    if steps is not None and (not steps or min(steps) < 1):
        raise UserError(f"method.tcd_steps={steps}: step counts >= 1 (null: every exported step count)")
    if gamma is None:
        return
    if not 0 <= gamma <= 1:
        raise UserError(f"method.tcd_gamma={gamma}: TCD's γ lies in [0, 1] (0: deterministic, 1: re-noising)")
    if sched is not None and not isinstance(sched, VPSchedule):
        raise UserError(TCD_FLOW)


class VPSchedule:
    """The discrete variance-preserving (DDPM) schedule of SD1.x / SD2.x / SDXL teachers.

    alphas_cumprod: ᾱ (T,); prediction_type: "epsilon", "v_prediction" or "sample". Every method is the module
    function of the same name with this ᾱ (so a VP run is exactly what it was before the abstraction).
    """

    kind = "vp"

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str) -> None:
        self.alphas_cumprod, self.prediction_type = alphas_cumprod, prediction_type
        self.num_train_timesteps = int(alphas_cumprod.shape[0])

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return alpha_sigma(t, self.alphas_cumprod)

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return add_noise(x0, eps, t, self.alphas_cumprod)

    def split(self, out: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return split_prediction(out, xt, t, self.alphas_cumprod, self.prediction_type)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return model_target(x0, eps, t, self.alphas_cumprod, self.prediction_type)

    def step(self, x0: Tensor, eps: Tensor, t_to: Tensor) -> Tensor:
        return ddim_step(x0, eps, t_to, self.alphas_cumprod)

    def renoise(self, x: Tensor, noise: Tensor, t_from: Tensor, t_to: Tensor) -> Tensor:
        return renoise(x, noise, t_from, t_to, self.alphas_cumprod)

    def snr(self, t: Tensor) -> Tensor:
        return snr(t, self.alphas_cumprod)

    def net_timestep(self, t: Tensor) -> Tensor:
        """What the network is fed: the integer timestep itself."""
        return t

    def noise_level(self, t: int) -> float:
        """σ_t of one timestep as a Python float, sqrt(1 − ᾱ_t): the scale of add_noise(0, z, t)."""
        return math.sqrt(1.0 - float(self.alphas_cumprod[t]))

    def start_latent(self, z: Tensor, t: Tensor) -> Tensor:
        """A generator's first input at timestep t from unit noise z: add_noise(0, z, t) = σ_t z (SiD's
        initialisation; the exported scheduler's ``init_noise_sigma`` scales the pipeline's noise the same way)."""
        return add_noise(torch.zeros_like(z), z, t, self.alphas_cumprod)

    def start_scale(self, t: int) -> float:
        """The scale of :meth:`start_latent` at one timestep, sqrt(1 − ᾱ_t) (an exported ``init_noise_sigma``)."""
        return self.noise_level(t)

    def consistency_scalings(self, t: Tensor, sigma_data: float, timestep_scaling: float) -> tuple[Tensor, Tensor]:
        """LCM's (c_skip, c_out) at t (eq. 9, ``LCMScheduler``'s discrete boundary condition), (B,) each."""
        return boundary_scalings(t, sigma_data, timestep_scaling)

    def guided_step(self, out_cond: Tensor, out_uncond: Tensor | None, xt: Tensor, t: Tensor, t_prev: Tensor,
                    w: Tensor) -> Tensor:
        return guided_ddim_step(out_cond, out_uncond, xt, t, t_prev, w, self.alphas_cumprod, self.prediction_type)

    def rollout(self, predict_x0: Callable[[Tensor, Tensor], Tensor], x: Tensor, timesteps: Sequence[int],
                noises: Sequence[Tensor]) -> Tensor:
        return student_rollout(predict_x0, x, timesteps, noises, self.alphas_cumprod)

    def sampler(self, kind: str, timesteps: Sequence[int], guidance_scale: float = 1.0,
                init_noise_scale: float = 1.0, vp_kwargs: dict[str, Any] | None = None,
                gamma: float | None = None) -> StepSampling:
        """How a student samples at these timesteps: ``kind`` "consistency" (x0, then fresh noise to the next
        timestep: LCMScheduler), "deterministic" (DDIM's eta = 0 jump of (x0, eps): TCDScheduler with gamma 0) or
        "tcd" (TCD's strategic stochastic sampling at ``gamma``, Zheng et al. 2024, arXiv:2402.19159, sec. 4.3: the
        DDIM jump to s' = (1 − γ) s, then fresh noise up to the next timestep s; TCDScheduler, the pipeline's
        ``eta``). ``vp_kwargs``: the method's LCM/TCD scheduler settings (timestep scaling, original steps); TCD
        takes the original steps only."""
        name = {"consistency": "LCMScheduler", "deterministic": "TCDScheduler", "tcd": "TCDScheduler"}[kind]
        kwargs = dict(vp_kwargs or {})
        if kind == "tcd":
            kwargs = {k: v for k, v in kwargs.items() if k == "original_inference_steps"}
        return StepSampling(scheduler=name, timesteps=[int(t) for t in timesteps], guidance_scale=guidance_scale,
                            scheduler_kwargs=kwargs, init_noise_scale=init_noise_scale,
                            eta=float(gamma) if kind == "tcd" else None)


class FlowSchedule:
    """Rectified flow x_σ = (1 − σ) x0 + σ ε with a velocity network v = ε − x0 (SD3, FLUX.1, SANA; Liu et al. 2022,
    Esser et al. 2024 eq. 2–3), over the teacher's T training sigmas.

    sigmas: σ_t for t = 0..T−1, ascending (FlowMatchEulerDiscreteScheduler's shifted training sigmas reversed:
    σ_t = shift((t + 1) / T)), shape (T,). The network is fed σ_t · T (the scheduler's ``timesteps``; FLUX's
    family divides by 1000 as its pipeline does).
    """

    kind = "flow"
    prediction_type = "flow"

    def __init__(self, sigmas: Tensor) -> None:
        self.sigmas = sigmas.float()
        self.num_train_timesteps = int(sigmas.shape[0])

    @classmethod
    def from_scheduler_config(cls, config: Any, mu: float | None = None) -> FlowSchedule:
        """The training sigmas of a ``FlowMatchEulerDiscreteScheduler`` config (or a flow-sigma DPM-Solver's, SANA's):
        its static ``shift`` (``flow_shift``), or with
        ``use_dynamic_shifting`` the resolution-dependent shift μ (FLUX.1: :func:`dynamic_shift_mu` of the training
        resolution's latent sequence length)."""
        T = int(config.get("num_train_timesteps", 1000))
        base = torch.arange(1, T + 1, dtype=torch.float32) / T  # ascending; the scheduler's linspace(1, T) / T
        if config.get("use_dynamic_shifting", False):
            if mu is None:
                raise ValueError("a dynamically shifted schedule needs mu (the image's latent sequence length)")
            return cls(time_shift(base, mu))
        # SANA's pipelines ship a DPMSolverMultistepScheduler with use_flow_sigmas, whose shift is ``flow_shift``
        return cls(shift_sigmas(base, float(config.get("shift", config.get("flow_shift", 1.0)))))

    def to(self, device: torch.device | str) -> FlowSchedule:
        self.sigmas = self.sigmas.to(device)
        return self

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(1 − σ_t, σ_t) for integer t (B,); t < 0 is the clean sample (1, 0)."""
        s = self.sigmas.to(t.device)
        sig = torch.where(t >= 0, s[t.clamp(min=0)], torch.zeros((), device=t.device))
        return 1 - sig, sig

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_σ = (1 − σ) x0 + σ ε (``FlowMatchEulerDiscreteScheduler.scale_noise``)."""
        a, s = self.alpha_sigma(t)
        return _bcast(a, x0) * x0 + _bcast(s, x0) * eps

    def split(self, out: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return flow_split(out, xt, self.alpha_sigma(t)[1])

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The flow-matching regression target v = ε − x0 (SD3 eq. 3 with the rectified-flow path)."""
        return eps - x0

    def step(self, x0: Tensor, eps: Tensor, t_to: Tensor) -> Tensor:
        """(1 − σ') x0 + σ' ε: the Euler step x + (σ' − σ) v written in (x0, ε), ``FlowMatchEulerDiscreteScheduler.
        step``'s result for the same prediction."""
        return self.add_noise(x0, eps, t_to)

    def renoise(self, x: Tensor, noise: Tensor, t_from: Tensor, t_to: Tensor) -> Tensor:
        """Forward process from t_from to t_to >= t_from: (α'/α) x + sqrt(σ'² − (α'σ/α)²) noise, the marginal
        x_{t_to} given x_{t_from} of x_t = α_t x0 + σ_t ε (in VP this is :func:`renoise`)."""
        a_from, s_from = self.alpha_sigma(t_from)
        a_to, s_to = self.alpha_sigma(t_to)
        r = a_to / a_from
        std = (s_to**2 - (r * s_from) ** 2).clamp(min=0).sqrt()
        return _bcast(r, x) * x + _bcast(std, x) * noise

    def snr(self, t: Tensor) -> Tensor:
        a, s = self.alpha_sigma(t)
        return a**2 / s**2

    def net_timestep(self, t: Tensor) -> Tensor:
        """σ_t · T as float (B,): what SD3's and SANA's pipelines feed their transformer at that sigma."""
        return self.alpha_sigma(t)[1] * self.num_train_timesteps

    def noise_level(self, t: int) -> float:
        return float(self.sigmas[t])

    def start_latent(self, z: Tensor, t: Tensor) -> Tensor:
        """A generator's first input: unit noise z itself. Flow pipelines never scale their initial latent
        (``prepare_latents`` has no ``init_noise_sigma``), so an exported student must start from z as trained."""
        return z

    def start_scale(self, t: int) -> float:
        return 1.0

    def consistency_scalings(self, t: Tensor, sigma_data: float, timestep_scaling: float) -> tuple[Tensor, Tensor]:
        """(0, 1): x0 = x_σ − σ v already equals x at σ = 0, the consistency boundary condition, and
        ``FlowMatchLCMScheduler`` samples with x0 alone (PCM's and SANA-Sprint's flow students do the same)."""
        return torch.zeros(t.shape, device=t.device), torch.ones(t.shape, device=t.device)

    def guided_step(self, out_cond: Tensor, out_uncond: Tensor | None, xt: Tensor, t: Tensor, t_prev: Tensor,
                    w: Tensor) -> Tensor:
        """The teacher's guided Euler step (LCM eq. 8's solver in flow form), CFG in the papers' form on x0 and ε."""
        x0, eps = self.split(out_cond, xt, t)
        if out_uncond is not None:
            x0_u, eps_u = self.split(out_uncond, xt, t)
            x0, eps = paper_cfg(x0_u, x0, w), paper_cfg(eps_u, eps, w)
        return self.step(x0, eps, t_prev)

    def rollout(self, predict_x0: Callable[[Tensor, Tensor], Tensor], x: Tensor, timesteps: Sequence[int],
                noises: Sequence[Tensor]) -> Tensor:
        """:func:`student_rollout` with this schedule's noising (what ``FlowMatchLCMScheduler`` does per step)."""
        if len(timesteps) <= len(noises):
            raise ValueError(f"{len(noises)} steps need {len(noises) + 1} timesteps, got {list(timesteps)}")
        b = x.shape[0]
        for j, noise in enumerate(noises):
            x0 = predict_x0(x, torch.full((b,), timesteps[j], dtype=torch.long, device=x.device))
            x = self.add_noise(x0, noise, torch.full((b,), timesteps[j + 1], dtype=torch.long, device=x.device))
        return x

    def sampler(self, kind: str, timesteps: Sequence[int], guidance_scale: float = 1.0,
                init_noise_scale: float = 1.0, vp_kwargs: dict[str, Any] | None = None,
                gamma: float | None = None) -> StepSampling:
        """FlowMatchLCMScheduler ("consistency") or FlowMatchEulerDiscreteScheduler ("deterministic") with the exact
        sigmas of these training timesteps; shift 1 and no dynamic shift, so the scheduler uses them unchanged.
        ``vp_kwargs`` are LCM/TCD settings and do not apply; "tcd" has no flow scheduler in diffusers."""
        if kind == "tcd":
            raise ValueError(TCD_FLOW)
        if init_noise_scale != 1.0:
            raise ValueError("flow pipelines start from unit noise; init_noise_scale must be 1")
        name = {"consistency": "FlowMatchLCMScheduler", "deterministic": "FlowMatchEulerDiscreteScheduler"}[kind]
        sig = [float(self.sigmas[int(t)]) for t in timesteps]
        return StepSampling(scheduler=name, timesteps=[s * self.num_train_timesteps for s in sig],
                            guidance_scale=guidance_scale, sigmas=sig,
                            scheduler_kwargs={"shift": 1.0, "use_dynamic_shifting": False})


Schedule = VPSchedule | FlowSchedule
