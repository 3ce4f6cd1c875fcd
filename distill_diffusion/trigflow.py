"""TrigFlow: any teacher's network read as a TrigFlow velocity F(x̂, t), and the continuous-time consistency maths.

Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", 2024 (arXiv:2410.11081),
sec. 2 and 4: x_t = cos(t) x0 + sin(t) z with t ∈ [0, π/2] and z ~ N(0, σ_d² I); the network predicts
F such that dx_t/dt = σ_d F(x_t / σ_d, t) along the probability-flow ODE, and the consistency function is
f(x_t, t) = cos(t) x_t − sin(t) σ_d F. In the unit state x̂ = x_t / σ_d = cos(t) x0 + sin(t) ε this reads
F = cos(t) ε − sin(t) x0 and x0 = cos(t) x̂ − sin(t) F: F is the velocity of the unit state, so any teacher that
predicts (x0, ε) defines it (SANA-Sprint, arXiv:2503.09641, sec. 3.1, does this training-free for a flow teacher).

From a native schedule x_n = α_n x0 + σ_n ε at the same signal-to-noise ratio, t = arctan(σ_n / α_n) and
x_n = x̂ · sqrt(α_n² + σ_n²):
- rectified flow (α_n = 1 − s, σ_n = s): s = sin t / (sin t + cos t), x_n = x̂ / (sin t + cos t), the network fed s·T;
- VP (α_n² + σ_n² = 1): ᾱ = cos² t and x_n = x̂; the network is fed the continuous timestep whose ᾱ is cos² t,
  interpolated linearly in log-SNR between the teacher's training timesteps.

Everything here is a pure function of tensors and a schedule (``distill_diffusion.schedule``); a method feeds
networks through :meth:`distill_diffusion.models.Models.net_out_at`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

HALF_PI = math.pi / 2


def _b(a: Tensor, like: Tensor) -> Tensor:
    return a.reshape(-1, *[1] * (like.ndim - 1))


def vp_log_snr(alphas_cumprod: Tensor) -> Tensor:
    """log(ᾱ / (1 − ᾱ)) per training timestep (T,), strictly decreasing for every diffusers VP schedule."""
    a = alphas_cumprod.double()
    return (a.log() - (1 - a).log()).float()


def trig_range(schedule: Any) -> tuple[float, float]:
    """(t_min, t_max): the trig times the teacher's training timesteps span. Flow: (arctan(σ_0 / (1 − σ_0)), π/2);
    VP: arctan(σ/α) at timesteps 0 and T − 1 (SD's schedule: 0.029 and 1.502, short of π/2 as ᾱ_T > 0)."""
    if schedule.kind == "flow":
        s0 = float(schedule.sigmas[0])
        return math.atan2(s0, 1 - s0), HALF_PI
    a = schedule.alphas_cumprod.double()
    lo, hi = a[0], a[-1]
    return math.atan2(float((1 - lo).sqrt()), float(lo.sqrt())), math.atan2(float((1 - hi).sqrt()), float(hi.sqrt()))


def native_time(schedule: Any, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The teacher's own coordinates at trig time t (B,): (c_in, net_t, α_n, σ_n), each (B,).

    The network input is x_n = c_in · x̂ at the network timestep ``net_t`` (what the pipeline would feed it, as a
    float), and x_n = α_n x0 + σ_n ε. Differentiable in t (the JVP's time tangent flows through it).
    """
    cos, sin = torch.cos(t), torch.sin(t)
    if schedule.kind == "flow":
        c_in = 1 / (sin + cos)
        s = sin * c_in
        return c_in, s * schedule.num_train_timesteps, 1 - s, s
    lam = vp_log_snr(schedule.alphas_cumprod).to(t.device)  # decreasing in the timestep
    target = 2 * (torch.log(cos) - torch.log(sin))  # log-SNR of the trig time: log(cot² t)
    T = lam.shape[0]
    # index i with lam[i] >= target > lam[i + 1]; searchsorted needs ascending, so search in -lam
    i = torch.searchsorted(-lam, -target.detach().contiguous()).clamp(1, T - 1) - 1
    frac = (lam[i] - target) / (lam[i] - lam[i + 1])
    net_t = (i.to(t.dtype) + frac).clamp(0, T - 1)
    return torch.ones_like(t), net_t, cos, sin


def nearest_timestep(schedule: Any, t: float) -> int:
    """The training timestep whose noise level is nearest to trig time t: flow by σ = sin t / (sin t + cos t), VP by
    log-SNR log(cot² t); t = π/2 (pure noise) is the last timestep T − 1."""
    T = schedule.num_train_timesteps
    if t >= HALF_PI - 1e-9:
        return T - 1
    if schedule.kind == "flow":
        s = math.sin(t) / (math.sin(t) + math.cos(t))
        return int((schedule.sigmas.cpu() - s).abs().argmin())
    target = 2 * math.log(math.cos(t) / math.sin(t))
    return int((vp_log_snr(schedule.alphas_cumprod.cpu()) - target).abs().argmin())


def nearest_timesteps(schedule: Any, t: Tensor) -> Tensor:
    """:func:`nearest_timestep` per sample, for trig times t (B,) drawn at run time: (B,) long, on t's device."""
    return torch.tensor([nearest_timestep(schedule, float(x)) for x in t.detach().cpu()], dtype=torch.long,
                        device=t.device)


def split_native(out: Tensor, x_n: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x0, ε) from a raw network output at x_n = α x0 + σ ε with float (α, σ) (B,): the continuous form of
    :func:`distill_diffusion.schedule.split_prediction` and :func:`~distill_diffusion.schedule.flow_split`."""
    a, s = _b(alpha, out), _b(sigma, out)
    if prediction_type == "epsilon":
        return (x_n - s * out) / a, out
    if prediction_type == "v_prediction":  # VP only (α² + σ² = 1)
        return a * x_n - s * out, s * x_n + a * out
    if prediction_type == "sample":
        return out, (x_n - a * out) / s
    if prediction_type == "flow":  # v = ε − x0 with α = 1 − σ
        return x_n - s * out, x_n + a * out
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def velocity(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """F = cos(t) ε − sin(t) x0, the TrigFlow velocity d x̂/dt of a prediction (x0, ε) (sCM eq. 1-2)."""
    return _b(torch.cos(t), x0) * eps - _b(torch.sin(t), x0) * x0


def consistency_x0(x_hat: Tensor, F: Tensor, t: Tensor) -> Tensor:
    """f(x̂, t) = cos(t) x̂ − sin(t) F: the sCM consistency function (eq. 7 in the unit state); it equals the x0 of
    the prediction F came from, so a TrigFlow student samples as any x0-then-renoise consistency sampler."""
    return _b(torch.cos(t), x_hat) * x_hat - _b(torch.sin(t), x_hat) * F


def add_noise(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x̂ = cos(t) x0 + sin(t) ε (B, ...)."""
    return _b(torch.cos(t), x0) * x0 + _b(torch.sin(t), x0) * eps


def time_proposal(tau: Tensor, sigma_data: float) -> Tensor:
    """t = arctan(e^τ / σ_d) with τ ~ N(P_mean, P_std²) (sCM sec. 4.3, the EDM log-normal proposal); (B,)."""
    return torch.atan(torch.exp(tau) / sigma_data)


def scm_tangent(F_minus: Tensor, F_teacher: Tensor, jvp_term: Tensor, x_hat: Tensor, t: Tensor, r: float,
                sigma_data: float) -> Tensor:
    """The sCM tangent g in x_t units (sCM eq. 8 with tangent warm-up, sec. 4.2; the JVP rearrangement of sec. 5.1):

    g = −cos²(t) σ_d (F⁻ − F_teacher) − r (cos(t) sin(t) σ_d x̂ + σ_d J),   J = cos(t) sin(t) dF⁻/dt,

    where dF⁻/dt is the total derivative along the teacher's ODE (d x̂/dt = F_teacher) and r ∈ [0, 1] the warm-up
    factor. All tensors (B, C, h, w) in unit-state units; t (B,).
    """
    cos, sin = _b(torch.cos(t), x_hat), _b(torch.sin(t), x_hat)
    return -(cos**2) * sigma_data * (F_minus - F_teacher) - r * (cos * sin * sigma_data * x_hat + sigma_data * jvp_term)


def normalize_tangent(g: Tensor, c: float = 0.1) -> Tensor:
    """Tangent normalisation g / (‖g‖ + c), the norm over each sample (sCM sec. 4.2, c = 0.1)."""
    return g / (g.flatten(1).norm(dim=1).reshape(-1, *[1] * (g.ndim - 1)) + c)


def clip_tangent(g: Tensor, bound: float = 1.0) -> Tensor:
    """Tangent clipping to [−bound, bound] element-wise, the paper's alternative to normalisation (sec. 4.2)."""
    return g.clamp(-bound, bound)


def scm_loss(F_theta: Tensor, F_minus: Tensor, g: Tensor, t: Tensor, logvar: Tensor, sigma_data: float) -> Tensor:
    """Per-sample sCM loss with adaptive weighting (sCM eq. 9 with the prior weight 1/(σ_d tan t), sec. 4.2):

    (1 / (σ_d tan t)) · e^{−w} · mean_D (F_θ − F⁻ − g)² + w,   w = ``logvar`` (B,) the adaptive weight's output.

    Its gradient in θ at F_θ = F⁻ is −(2/D) (1/(σ_d tan t)) e^{−w} g · ∂F_θ/∂θ: it pushes F_θ along g. (B,).
    """
    sq = (F_theta.float() - F_minus.float() - g.float()) ** 2
    prior = 1 / (sigma_data * torch.tan(t))
    return prior * torch.exp(-logvar) * sq.flatten(1).mean(1) + logvar


class AdaptiveWeight(torch.nn.Module):
    """The adaptive weighting network w_φ(t) (sCM sec. 4.2, after EDM2's uncertainty weighting): fixed random
    Fourier features of c_noise = log(σ_d tan t) / 4, then a linear layer started at zero (w = 0: weight 1)."""

    def __init__(self, sigma_data: float, channels: int = 128, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.sigma_data = sigma_data
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.linear = torch.nn.Linear(channels, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        """w(t) (B,) for trig times t (B,)."""
        c = torch.log(self.sigma_data * torch.tan(t)) / 4
        feats = torch.cos(c[:, None] * self.freqs + self.phases) * math.sqrt(2)
        return self.linear(feats).squeeze(1)
