"""rCM's score regulariser for consistency students: DMD's reverse-divergence term on the student's own few-step
samples, and the fake score ("critic" role) that learns those samples.

Zheng et al., "Large Scale Diffusion Distillation via Score-Regularized Continuous-Time Consistency" (rCM), 2025
(arXiv:2510.08431), sec. 4: the consistency loss plus λ × DMD's loss on samples the student draws from noise in a
few steps of its own sampler ("backward simulation"), gradient through the last step only; the fake score is
trained by denoising on the same kind of samples (DMD, Yin et al. 2024, eq. 6). Checked against NVlabs/rcm
(``_student_dmd_step``, ``_critic_step``). sCM uses it as rCM does; LCM and TSCD use the same term on their discrete
consistency students (``method.dmd_weight``; our extension of rCM's recipe, not a published one).

One signature for every consistency method: the method gives its sampler's timesteps for k steps and its student's
x0 prediction; the draws are keyed with the method's ``tag`` so that each method's trajectory is its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distill_diffusion.errors import UserError
from distill_diffusion.matching import dm_loss
from distill_diffusion.method import Batch, masked_mean

# x0 of the student at (x_t (B, C, h, w), t (B,) long): its consistency output, with autograd as the caller enables
PredictX0 = Callable[[Tensor, Tensor], Tensor]


@dataclass
class RegulariserConfig:
    """The regulariser's settings, shared by the consistency methods' configs (fields of ``method:``)."""

    dmd_weight: float = 0.0  # λ of DMD's term against the consistency loss; 0: off (no critic role)
    dmd_min_steps: int = 1  # the student's sample for DMD comes from k ~ U{min..max} steps of its own sampler
    dmd_max_steps: int = 4  # (min = max: always that many, so that the critic learns one step count's samples)
    student_update_every: int = 1  # with the critic: critic updates per student update (rCM 5)
    dmd_guidance_scale: float | None = None  # the teacher's CFG inside the DMD term (None: the method's guidance)
    min_step_ratio: float = 0.02  # DMD's t ~ U[0.02 T, 0.98 T] on the teacher's own timesteps (DMD2)
    max_step_ratio: float = 0.98

    def dmd_guidance(self, default: float) -> float:
        """The teacher's CFG inside DMD's term: ``dmd_guidance_scale``, or the method's own guidance ``default``."""
        return default if self.dmd_guidance_scale is None else self.dmd_guidance_scale

    def check_regulariser(self) -> None:
        if self.dmd_weight < 0 or self.dmd_min_steps < 1 or self.student_update_every < 1:
            raise UserError("method.dmd_weight must be >= 0, method.dmd_min_steps and student_update_every >= 1")
        if self.dmd_max_steps < self.dmd_min_steps:
            raise UserError(f"method.dmd_min_steps={self.dmd_min_steps} > method.dmd_max_steps={self.dmd_max_steps}")
        if not 0 <= self.min_step_ratio < self.max_step_ratio <= 1:
            raise UserError(f"method.min_step_ratio={self.min_step_ratio}, method.max_step_ratio="
                            f"{self.max_step_ratio}: need 0 <= min < max <= 1")


def dmd_timestep_range(cfg: RegulariserConfig, num_train_timesteps: int) -> tuple[int, int]:
    """(min, max) teacher timestep of DMD's noise level, both inclusive."""
    T = num_train_timesteps
    return int(cfg.min_step_ratio * T), min(int(cfg.max_step_ratio * T), T - 1)


def update_schedule(step: int, every: int) -> tuple[str, ...]:
    """Roles updated at ``step`` with the regulariser on: the critic every step, the student every ``every``."""
    return ("student", "critic") if (step + 1) % every == 0 else ("critic",)


def draw_steps(batch: Batch, cfg: RegulariserConfig, tag: str) -> int:
    """k ~ U{dmd_min_steps..dmd_max_steps}, shared by the global batch (one rollout length per step), keyed
    ``tag``; no draw when the range holds one count."""
    lo, hi = cfg.dmd_min_steps, cfg.dmd_max_steps
    return batch.rng.shared_randint(lo, hi + 1, tag) if hi > lo else hi


def consistency_sample(models: Any, batch: Batch, predict_x0: PredictX0, timesteps: Sequence[int], tag: str,
                       grad: bool, start: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """The student's x0 after len(timesteps) steps of its consistency sampler (x0, then fresh noise to the next
    timestep), from keyed noise ``{tag}-0..k-1``; only the last prediction with gradient when ``grad`` (and grad
    mode is on; with ``grad`` False no graph is built). ``start`` maps the first noise to the first latent
    (default: unchanged, the pipelines' unit noise). (B, C, h, w)."""
    m, b, k = models, len(batch), len(timesteps)
    noises = [batch.rng.randn(m.latent_shape, f"{tag}-{j}") for j in range(k)]
    x = noises[0] if start is None else start(noises[0])
    with torch.no_grad():
        x = m.schedule.rollout(predict_x0, x, list(timesteps), noises[1:])
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return predict_x0(x, torch.full((b,), int(timesteps[-1]), dtype=torch.long, device=m.device))


def dmd_loss(models: Any, batch: Batch, x0: Tensor, guidance: float, t_range: tuple[int, int],
             tag: str) -> tuple[Tensor, dict[str, float]]:
    """DMD's loss on the student's sample x0 (B, C, h, w; with gradient): x0 noised to t ~ U[t_range] (keyed
    ``{tag}-t``, ``{tag}-noise``), the teacher's x0 at CFG ``guidance`` against the critic's (DMD eq. 7 with DMD2's
    normaliser, :func:`distill_diffusion.matching.dm_loss`); mean over the finite samples."""
    m, rng = models, batch.rng
    t = rng.randint(t_range[0], t_range[1] + 1, f"{tag}-t")
    xt = m.schedule.add_noise(x0.detach(), rng.randn(m.latent_shape, f"{tag}-noise"), t)
    with torch.no_grad():
        x0_real, _ = m.predict("teacher", xt, t, batch.cond, batch.uncond, guidance=guidance)
        x0_fake, _ = m.predict("critic", xt, t, batch.cond)
    per_sample, ok = dm_loss(x0, x0_real, x0_fake)
    loss = per_sample.sum() / ok.sum().clamp(min=1)
    return loss, {"dm": float(loss.detach()), "dm_nonfinite": float((~ok).sum())}


def fake_score_loss(models: Any, batch: Batch, x0: Tensor, tag: str) -> tuple[Tensor, dict[str, float]]:
    """The critic's denoising loss on the student's samples x0 (B, C, h, w; no gradient), the teacher's own
    parameterisation's target (DMD eq. 6), t ~ U{0..T-1} and noise keyed ``{tag}-t``, ``{tag}-noise``."""
    m, rng = models, batch.rng
    t = rng.randint(0, m.num_train_timesteps, f"{tag}-t")
    eps = rng.randn(m.latent_shape, f"{tag}-noise")
    out = m.net_out("critic", m.schedule.add_noise(x0, eps, t), t, batch.cond)
    loss, bad = masked_mean(((out - m.denoising_target(x0, eps, t)) ** 2).flatten(1).mean(1))
    return loss, {"denoise": float(loss.detach()), "nonfinite": float(bad)}
