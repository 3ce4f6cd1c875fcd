"""sCM: continuous-time consistency distillation in TrigFlow, with rCM's score regulariser as an option.

Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", 2024 (arXiv:2410.11081);
Chen et al., "SANA-Sprint: One-Step Diffusion with Continuous-Time Consistency Distillation", 2025
(arXiv:2503.09641); Zheng et al., "Large Scale Diffusion Distillation via Score-Regularized Continuous-Time
Consistency" (rCM), 2025 (arXiv:2510.08431). Checked against diffusers' research script
examples/research_projects/sana/train_sana_sprint_diffusers.py and NVlabs/rcm (rcm/models/t2v_model_distill_rcm.py).

The teacher and the student are read as TrigFlow velocities F(x̂, t) (``distill_diffusion.trigflow``: from
rectified-flow and VP teachers alike, without retraining). Per step, with data latents x0:

  t = arctan(e^τ / σ_d), τ ~ N(P_mean, P_std²) (clamped to the teacher's range), x̂ = cos t x0 + sin t ε;
  F_T = the teacher's velocity with CFG w folded into the ODE (uncond + w (cond − uncond)), no gradient;
  J = cos t sin t dF_θ⁻/dt along d x̂/dt = F_T: one forward-mode JVP of the student (``torch.func.jvp``, tangents
      (cos t sin t F_T, cos t sin t): sCM sec. 5.1's rearrangement), or a central finite difference;
  g = −cos² t σ_d (F⁻ − F_T) − r (cos t sin t σ_d x̂ + σ_d J), r = min(1, step / warm-up) (eq. 8, sec. 4.2);
  g ← g / (‖g‖ + c) (tangent normalisation, c = 0.1) or clip(g, −1, 1);
  L = (1/(σ_d tan t)) e^{−w(t)} mean (F_θ − F⁻ − g)² + w(t), w the adaptive weighting network (eq. 9).

F⁻ is the student's own output without gradient (sCM has no EMA target). The student samples as any consistency
model: x0 = cos t x̂ − sin t F is the network's own x0 prediction, so the export is the teacher pipeline with
``FlowMatchLCMScheduler`` (flow) or ``LCMScheduler`` (VP) at the training timesteps nearest to the trig times
(1 step: π/2; 2 steps: π/2, 1.3 as SANA-Sprint; more: SCMScheduler's linspace(π/2, 0, k + 1)).

rCM (``dmd_weight > 0``): a second role, the fake score ("critic"), learns the student's samples by denoising, and
the student's loss adds ``dmd_weight`` × DMD's reverse-divergence loss (DMD eq. 7 with DMD2's normaliser,
``distill_diffusion.matching``) on a sample it generates from noise in k ~ U{dmd_min_steps..dmd_max_steps} steps
(backward simulation); the critic updates every step, the student every ``student_update_every`` steps (rCM: 5).

SANA-Sprint's LADD term (``gan_weight > 0``; Chen et al. sec. 3.3, after Sauer et al. 2024, arXiv:2403.12015): hinge
heads on the frozen teacher's features (``distill_diffusion.adversarial``) tell real latents from the student's own
x̂0 = cos t x̂ − sin t F_θ, both noised to the teacher timestep nearest to t_D = arctan(e^τ / σ_d), τ ~
N(gan_p_mean, gan_p_std²) (one t_D per sample, shared by the pair, as the script draws it). x̂0 comes from a forward
of its own at a fresh time t and noise, t set to the largest time π/2 (pure noise: a one-step sample) with
probability ``gan_largest_time_prob`` (the script's ``--train_largest_timestep``, 0.5, which its shell recipe sets;
its D turn sets t to 0.5 there, not π/2, which we read as a slip); at 0 it is the sCM step's own x̂0;
the student's loss adds ``gan_weight`` × −D(fake) (the script's ``adv_loss = -mean(pred_fake)``), the heads learn
relu(1 − D(real)) + relu(1 + D(fake)) (its ``loss_D`` without the factor 1/2, which the heads' Adam does not see).
The heads are the "critic" role's (headless without rCM's fake score, beside it with).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distill_diffusion import adversarial, score_regulariser, trigflow
from distill_diffusion.errors import UserError
from distill_diffusion.method import Batch, Method, MethodSpec, OptimizerSettings, RunContext, SamplingSpec, masked_mean
from distill_diffusion.schedule import X0_TIMESTEP_SCALING

TANGENT_MODES = ("normalize", "clip", "none")
JVP_MODES = ("autograd", "finite_difference")


@dataclass
class SCMConfig(score_regulariser.RegulariserConfig):
    """Paper defaults (sCM's sCD and SANA-Sprint); the rCM term is off unless ``dmd_weight`` > 0."""

    sigma_data: float = 0.5  # σ_d: SANA-Sprint 0.5 (latents ~ unit std); rCM 1.0
    p_mean: float = -0.8  # time proposal τ ~ N(P_mean, P_std²) (sCD and rCM: -0.8, 1.6)
    p_std: float = 1.6
    guidance_scale: float = 4.5  # teacher CFG folded into the ODE, diffusers convention (SANA-Sprint 4-5; 1: none)
    tangent: str = "normalize"  # normalize | clip | none (sec. 4.2)
    tangent_c: float = 0.1  # c of the normalisation g / (‖g‖ + c)
    tangent_warmup_steps: int = 10000  # r ramps 0 -> 1 over these steps (sCM 10k, SANA-Sprint 4k)
    adaptive_weight: bool = True  # the learned w(t) of eq. 9; False: w = 0
    jvp: str = "autograd"  # autograd (torch.func.jvp, math attention) | finite_difference
    fd_step: float = 1e-4  # the central difference's step in trig time (rCM's fd_size; 1e-3 is too coarse on a
    #                        UNet, whose time embedding turns 1e-3 into most of a training timestep)
    sampling_steps: list[int] | None = None  # exported step counts (None: [1, 2, 4])
    default_steps: int = 2
    intermediate_time: float = 1.3  # the 2-step sampler's middle trig time (SANA-Sprint 1.3; sCM 1.1)
    # rCM's score regulariser: RegulariserConfig's fields (dmd_weight 0: sCM alone; rCM scales its sCM loss by 100
    # with dmd_weight 1; dmd_guidance_scale None: guidance_scale)
    # SANA-Sprint's LADD term (its diffusers script's values)
    gan_weight: float = 0.0  # λ_adv against the sCM loss at 1 (SANA-Sprint 0.5); 0: off
    gan_p_mean: float = -0.6  # D's times t_D = arctan(e^τ / σ_d), τ ~ N(gan_p_mean, gan_p_std²)
    gan_p_std: float = 1.0
    gan_lr: float | None = None  # the heads' learning rate (None: the run's learning_rate, as SANA-Sprint)
    gan_all_levels: bool = True  # heads on every feature block (SANA-Sprint: 4 blocks across the depth); False:
    #                              the first half (UNet: down and mid blocks)
    gan_heads_per_level: int = 1
    gan_largest_time_prob: float = 0.5  # the fake's input at π/2 (pure noise) with this probability; 0: the sCM
    #                                     step's own x̂0

    def check(self) -> None:
        if self.sigma_data <= 0 or self.p_std <= 0:
            raise UserError("method.sigma_data and method.p_std must be positive")
        if self.guidance_scale < 0:
            raise UserError(f"method.guidance_scale={self.guidance_scale}: must be >= 0 (diffusers convention)")
        if self.tangent not in TANGENT_MODES:
            raise UserError(f"method.tangent={self.tangent!r}: choose one of {', '.join(TANGENT_MODES)}")
        if self.jvp not in JVP_MODES:
            raise UserError(f"method.jvp={self.jvp!r}: choose one of {', '.join(JVP_MODES)}")
        if self.tangent_warmup_steps < 0 or self.fd_step <= 0 or self.tangent_c <= 0:
            raise UserError("method.tangent_warmup_steps must be >= 0, method.fd_step and method.tangent_c > 0")
        steps = self.steps()
        if min(steps) < 1 or self.default_steps not in steps:
            raise UserError(f"method.sampling_steps={steps}, method.default_steps={self.default_steps}: steps must "
                            "be >= 1 and include the default")
        if not 0 < self.intermediate_time < math.pi / 2:
            raise UserError(f"method.intermediate_time={self.intermediate_time}: must be in (0, π/2)")
        self.check_regulariser()
        if self.gan_weight < 0 or self.gan_p_std <= 0 or self.gan_heads_per_level < 1 or (
                self.gan_lr is not None and self.gan_lr <= 0):
            raise UserError("method.gan_weight must be >= 0, method.gan_p_std and gan_lr > 0, gan_heads_per_level >= 1")
        if self.gan_lr is not None and self.dmd_weight > 0:
            raise UserError("method.gan_lr: with method.dmd_weight > 0 the heads train with the critic's optimizer "
                            "(the run's learning_rate); unset gan_lr")
        if not 0 <= self.gan_largest_time_prob <= 1:
            raise UserError(f"method.gan_largest_time_prob={self.gan_largest_time_prob}: must be in [0, 1]")

    def steps(self) -> list[int]:
        return sorted(self.sampling_steps) if self.sampling_steps is not None else [1, 2, 4]


# ---- the paper's choices as pure functions --------------------------------------------------------------------------


def trig_sampling_times(k: int, intermediate: float) -> list[float]:
    """The k trig times a k-step student visits: π/2, then SANA-Sprint's middle time at k = 2, else SCMScheduler's
    ``linspace(π/2, 0, k + 1)`` without the final 0."""
    if k == 2:
        return [math.pi / 2, intermediate]
    return [math.pi / 2 * (1 - i / k) for i in range(k)]


def warmup_ratio(step: int, warmup_steps: int) -> float:
    """r = min(1, step / H): the tangent warm-up factor (sCM sec. 4.2); H = 0 means r = 1 from the start."""
    return 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)


@contextlib.contextmanager
def forward_ad_attention() -> Any:
    """Attention kernels with forward-mode AD: on CPU the fused SDPA kernel has none, the math backend has."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


class SCM(Method):
    Config = SCMConfig

    @classmethod
    def spec(cls, cfg: SCMConfig, student: str) -> MethodSpec:
        # Data latents feed x̂; the JVP and the rCM critic need no gradient through another role's forward, but the
        # JVP cannot run under gradient checkpointing, which the student's own call turns off around it.
        # The critic role: rCM's fake score, LADD's heads (alone: a headless role), or both.
        roles = ("student", "critic") if cfg.dmd_weight > 0 or cfg.gan_weight > 0 else ("student",)
        headless = ("critic",) if cfg.gan_weight > 0 and cfg.dmd_weight == 0 else ()
        return MethodSpec(roles=roles, headless=headless, needs_images=True)

    def __init__(self, cfg: SCMConfig, run: RunContext, models: Any) -> None:
        super().__init__(cfg, run, models)
        self.t_lo, self.t_hi = trigflow.trig_range(models.schedule)
        self.weight = trigflow.AdaptiveWeight(cfg.sigma_data).to(models.device) if cfg.adaptive_weight else None
        self.dmd_range = score_regulariser.dmd_timestep_range(cfg, models.num_train_timesteps)
        self.disc: adversarial.FeatureDiscriminator | None = None
        if cfg.gan_weight > 0:
            self.feature_names = models.feature_blocks(cfg.gan_all_levels)
            self.disc = adversarial.teacher_discriminator(models, self.feature_names, cfg.gan_heads_per_level)

    def extra_modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"student": self.weight} if self.weight is not None else {}
        return mods | ({"critic": self.disc} if self.disc is not None else {})

    def optimizer_settings(self, role: str) -> OptimizerSettings:
        return OptimizerSettings(learning_rate=self.cfg.gan_lr) if role == "critic" and self.cfg.dmd_weight == 0 \
            else OptimizerSettings()

    def updates(self, step: int) -> tuple[str, ...]:
        if self.cfg.dmd_weight == 0 and self.cfg.gan_weight == 0:
            return ("student",)
        return score_regulariser.update_schedule(step, self.cfg.student_update_every)

    # ---- TrigFlow velocities ---------------------------------------------------------------------------------------
    def velocity(self, role: str, x_hat: Tensor, t: Tensor, batch: Batch, guidance: float = 1.0) -> Tensor:
        """F of ``role`` at the unit state x̂ (B, C, h, w) and trig time t (B,), with CFG ``guidance`` (diffusers
        convention; 1: the conditional pass alone) on the raw output, which is the CFG of F (F is affine in it at
        fixed x̂, t)."""
        m = self.models
        c_in, net_t, a, s = trigflow.native_time(m.schedule, t)
        x_n = x_hat * c_in.reshape(-1, 1, 1, 1)
        out = m.net_out_at(role, x_n, net_t, batch.cond, batch.uncond, guidance)
        x0, eps = trigflow.split_native(out, x_n, a, s, m.schedule.prediction_type)
        return trigflow.velocity(x0, eps, t)

    def tangent_jvp(self, x_hat: Tensor, t: Tensor, F_teacher: Tensor, batch: Batch) -> Tensor:
        """J = cos t sin t · dF⁻/dt along d x̂/dt = F_teacher, without gradient: forward-mode AD or a central finite
        difference in trig time (clamped to the teacher's range). (B, C, h, w)."""
        cs = (torch.cos(t) * torch.sin(t)).reshape(-1, 1, 1, 1)
        with torch.no_grad(), self.models.no_checkpointing("student"):
            if self.cfg.jvp == "autograd":
                with forward_ad_attention():
                    _, dF = torch.func.jvp(lambda x, tt: self.velocity("student", x, tt, batch), (x_hat, t),
                                           (F_teacher, torch.ones_like(t)))
                return cs * dF
            h = self.cfg.fd_step
            t2, t1 = (t + h).clamp(max=self.t_hi), (t - h).clamp(min=self.t_lo)
            f2 = self.velocity("student", x_hat + (t2 - t).reshape(-1, 1, 1, 1) * F_teacher, t2, batch)
            f1 = self.velocity("student", x_hat + (t1 - t).reshape(-1, 1, 1, 1) * F_teacher, t1, batch)
            return cs * (f2 - f1) / (t2 - t1).reshape(-1, 1, 1, 1)

    def draw_time(self, batch: Batch, tag: str = "scm-tau") -> Tensor:
        """t = arctan(e^τ / σ_d), τ ~ N(P_mean, P_std²) per sample (keyed), inside the teacher's trig range (B,)."""
        tau = self.cfg.p_mean + self.cfg.p_std * batch.rng.randn((), tag)
        return trigflow.time_proposal(tau, self.cfg.sigma_data).clamp(self.t_lo, self.t_hi)

    # ---- losses ----------------------------------------------------------------------------------------------------
    def loss(self, role: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if role == "student":
            loss, logs, x0 = self._scm_loss(batch, step)
            if self.cfg.dmd_weight > 0:
                dmd, dlogs = self._dmd_loss(batch)
                loss = loss + self.cfg.dmd_weight * dmd
                logs.update(dlogs)
            if self.disc is not None:
                if self.cfg.gan_largest_time_prob > 0:  # at 0 the sCM step's own x̂0 is the fake: no second forward
                    x0 = self.gan_fake(batch)
                adv, alogs = self._gan_generator_loss(x0, batch)
                loss = loss + self.cfg.gan_weight * adv
                logs.update(alogs)
            return loss, logs
        if role == "critic":
            loss, logs = self._critic_loss(batch) if self.cfg.dmd_weight > 0 else (torch.zeros(()), {})
            if self.disc is not None:
                d, dlogs = self._gan_discriminator_loss(batch)
                loss = loss + d
                logs.update(dlogs)
            return loss, logs
        raise KeyError(role)

    def _scm_loss(self, batch: Batch, step: int) -> tuple[Tensor, dict[str, float], Tensor]:
        """sCM's loss (module docstring), its logs and the student's x̂0 at its input (with gradient; LADD's fake)."""
        m, c = self.models, self.cfg
        if batch.latents is None:
            raise UserError("sCM distils on data latents: give data.images or data.dataset")
        t = self.draw_time(batch)
        eps = batch.rng.randn(m.latent_shape, "scm-eps")
        x_hat = trigflow.add_noise(batch.latents, eps, t)
        with torch.no_grad():
            F_teacher = self.velocity("teacher", x_hat, t, batch, c.guidance_scale)
        J = self.tangent_jvp(x_hat, t, F_teacher, batch)
        F_theta = self.velocity("student", x_hat, t, batch)
        F_minus = F_theta.detach()
        g = trigflow.scm_tangent(F_minus, F_teacher, J, x_hat, t, warmup_ratio(step, c.tangent_warmup_steps),
                                 c.sigma_data)
        g_norm = float(g.flatten(1).norm(dim=1).mean())
        if c.tangent == "normalize":
            g = trigflow.normalize_tangent(g, c.tangent_c)
        elif c.tangent == "clip":
            g = trigflow.clip_tangent(g)
        logvar = self.weight(t) if self.weight is not None else torch.zeros_like(t)
        loss, bad = masked_mean(trigflow.scm_loss(F_theta, F_minus, g, t, logvar, c.sigma_data))
        return loss, {"nonfinite": float(bad), "g_norm": g_norm, "t": float(t.mean()),
                      "logvar": float(logvar.detach().mean())}, trigflow.consistency_x0(x_hat, F_theta, t)

    # ---- rCM: the score regulariser ---------------------------------------------------------------------------------
    def generate(self, batch: Batch, grad: bool) -> Tensor:
        """The student's x0 after k ~ U{dmd_min_steps..dmd_max_steps} steps (shared by the global batch) of its own
        consistency sampler at the nearest training timesteps, from the teacher's start latent; only the last step with
        gradient when ``grad``. (B, C, h, w)."""
        m, c = self.models, self.cfg
        k = score_regulariser.draw_steps(batch, c, "scm-dmd-k")
        ts = [trigflow.nearest_timestep(m.schedule, x) for x in trig_sampling_times(k, c.intermediate_time)]
        t0 = torch.full((len(batch),), ts[0], dtype=torch.long, device=m.device)
        return score_regulariser.consistency_sample(
            m, batch, lambda x, t: m.predict("student", x, t, batch.cond)[0], ts, "scm-dmd-noise", grad,
            start=lambda z: m.schedule.start_latent(z, t0))

    def _dmd_loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        x0 = self.generate(batch, grad=True)
        w = self.cfg.dmd_guidance(self.cfg.guidance_scale)
        return score_regulariser.dmd_loss(self.models, batch, x0, w, self.dmd_range, "scm-dmd")

    def _critic_loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """The fake score's denoising loss on the student's samples, the teacher's own target (DMD eq. 6)."""
        x0 = self.generate(batch, grad=False)
        return score_regulariser.fake_score_loss(self.models, batch, x0, "scm-critic")

    # ---- SANA-Sprint's LADD term -------------------------------------------------------------------------------------
    def gan_timesteps(self, batch: Batch) -> Tensor:
        """The teacher timesteps nearest to t_D = arctan(e^τ / σ_d), τ ~ N(gan_p_mean, gan_p_std²), per sample (B,)."""
        c = self.cfg
        tau = c.gan_p_mean + c.gan_p_std * batch.rng.randn((), "scm-gan-tau")
        return trigflow.nearest_timesteps(self.models.schedule, trigflow.time_proposal(tau, c.sigma_data))

    def _discriminate(self, x0: Tensor, t: Tensor, tag: str, batch: Batch, train: bool) -> list[Tensor]:
        """D on x0 noised to the teacher timesteps t with the keyed noise ``tag``."""
        m = self.models
        x = m.schedule.add_noise(x0, batch.rng.randn(m.latent_shape, tag), t)
        return adversarial.discriminate(m, self.disc, self.feature_names, x, t, batch.cond, train,
                                        stop=not self.cfg.gan_all_levels)

    def _gan_generator_loss(self, x0: Tensor, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """−D(x̂0 noised to t_D), mean over heads and positions (SANA-Sprint's adv_loss)."""
        g, _ = masked_mean(adversarial.hinge_g_loss(
            self._discriminate(x0, self.gan_timesteps(batch), "scm-gan-fake-noise", batch, False), saturating=False))
        return g, {"adv_g": float(g.detach())}

    def gan_fake(self, batch: Batch) -> Tensor:
        """The student's x̂0 (B, C, h, w), with gradient where it is enabled: at a fresh time (the sCM proposal)
        set to the largest time with probability ``gan_largest_time_prob`` and fresh noise; at 0, at the sCM step's
        own input (the same keyed draws)."""
        m, p = self.models, self.cfg.gan_largest_time_prob
        t_tag, eps_tag = ("scm-gan-t", "scm-gan-eps") if p > 0 else ("scm-tau", "scm-eps")
        t = self.draw_time(batch, t_tag)
        if p > 0:
            t = torch.where(batch.rng.rand("scm-gan-largest") < p, self.t_hi, t)
        x_hat = trigflow.add_noise(batch.latents, batch.rng.randn(m.latent_shape, eps_tag), t)
        return trigflow.consistency_x0(x_hat, self.velocity("student", x_hat, t, batch), t)

    def _gan_discriminator_loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """The heads' hinge loss: real latents against the student's x̂0 (:meth:`gan_fake`, no gradient), the pair
        noised to the same t_D with their own noise."""
        if batch.latents is None:
            raise UserError("sCM distils on data latents: give data.images or data.dataset")
        with torch.no_grad():
            x0 = self.gan_fake(batch)
        t_d = self.gan_timesteps(batch)
        d, bad = masked_mean(adversarial.hinge_d_loss(
            self._discriminate(x0, t_d, "scm-gan-fake-noise", batch, True),
            self._discriminate(batch.latents, t_d, "scm-gan-real-noise", batch, True)))
        return d, {"adv_d": float(d.detach()), "adv_nonfinite": float(bad)}

    # ---- export ----------------------------------------------------------------------------------------------------
    def sampling(self) -> SamplingSpec:
        """Per step count, the consistency sampler at the training timesteps nearest to its trig times; the first
        latent is the teacher's start at that timestep (flow: unit noise; VP: sqrt(1 − ᾱ) N(0, I)); no CFG."""
        m, c = self.models, self.cfg
        steps = {}
        for k in c.steps():
            ts = [trigflow.nearest_timestep(m.schedule, x) for x in trig_sampling_times(k, c.intermediate_time)]
            scale = m.schedule.start_scale(ts[0])
            vp = {"timestep_scaling": X0_TIMESTEP_SCALING, "clip_sample": False}  # the x0 prediction alone
            steps[k] = m.schedule.sampler("consistency", ts, init_noise_scale=scale, vp_kwargs=vp)
        return SamplingSpec(steps=steps, default_steps=c.default_steps)
