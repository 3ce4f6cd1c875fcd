"""Latent Consistency Distillation (LCM / LCM-LoRA).

Luo, Tan, Huang, Li, Zhao. "Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step
Inference", 2023 (arXiv:2310.04378), and "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module", 2023
(arXiv:2311.05556). Checked against diffusers' examples/consistency_distillation/train_lcm_distill_*.py.

One update per step for the student:
  n ~ U{0..N-1}, t_n = (n+1)k - 1 on the skipping-step grid (k = T/N), x_{t_n} = noise(x0, t_n);
  student:  f_θ(x_{t_n}, t_n) = c_skip(t_n) x_{t_n} + c_out(t_n) x̂0_θ                  (LCM eq. 9)
  teacher:  one guided DDIM step t_n -> t_n - k, x̂0 = cond + ω (cond - uncond)          (LCM eq. 8)
  target:   f_θ⁻(x̂_{t_n-k}, t_n - k) with θ⁻ = EMA(θ) (full) or θ without gradient (LoRA)
  loss:     pseudo-Huber d(f_θ, f_θ⁻) with c = 0.001                                     (LCM-LoRA recipes)
The paper's ω (cond + ω(cond - uncond)) is ``w - 1`` of our diffusers-convention w; full students embed ω (where the
family's network can: the SD families) exactly as diffusers' pipelines feed ``guidance_scale - 1`` at inference.

Optional (``dmd_weight > 0``): rCM's score regulariser (``distill_diffusion.score_regulariser``; Zheng et al. 2025,
arXiv:2510.08431, sec. 4) adds λ × DMD's reverse-divergence term on the student's own k-step samples (its exported
multistep sampler, k ~ U{dmd_min_steps..dmd_max_steps}, gradient through the last step), with a fake score (the
``critic`` role) that learns those samples. rCM pairs it with continuous-time consistency; on LCM it is our extension.

Spaces. The paper defines everything on the discrete VP schedule: the solver step is DDIM in (x0, ε), the
consistency function uses c_skip/c_out of the integer timestep. On a flow teacher the same update runs through the
schedule layer: the solver step is the Euler step in (x0, ε) (= DDIM's form), c_skip = 0 and c_out = 1 (x0 = x − σv
meets the boundary condition at σ = 0; FlowMatchLCMScheduler samples so), and t indexes the teacher's shifted sigmas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distill_diffusion import schedule, score_regulariser
from distill_diffusion.errors import UserError
from distill_diffusion.method import (
    Batch,
    Method,
    MethodSpec,
    RunContext,
    SamplingSpec,
    TargetSpec,
    masked_mean,
)


@dataclass
class LCMConfig(score_regulariser.RegulariserConfig):
    num_ddim_timesteps: int = 50  # N, skipping-step solver grid (k = T / N = 20)
    w_min: float = 6.0  # guidance range, diffusers convention (the paper's ω_min = 5, plus 1)
    w_max: float = 16.0  # (the paper's ω_max = 15, plus 1)
    loss_type: str = "huber"  # "huber" (pseudo-Huber) or "l2"
    huber_c: float = 0.001  # c of the pseudo-Huber metric
    ema_decay: float = 0.95  # μ, target network EMA: full students, and LoRA students with lora_ema_target
    lora_ema_target: bool = False  # LoRA students: an EMA adapter (decay ema_decay) as target instead of their own
    timestep_scaling: float = 10.0  # boundary-condition scaling of t (diffusers' LCMScheduler)
    sigma_data: float = 0.5  # σ_data of the boundary conditions
    w_embedding_dim: int = 256  # full students: guidance embedding size (time_cond_proj_dim)
    sample_guidance: float = 8.0  # full students: guidance fed to the embedding at sampling (diffusers convention)
    sampling_steps: tuple[int, ...] = (1, 2, 4, 8)  # exported step counts
    default_steps: int = 4
    tcd_gamma: float | None = None  # export TCD's stochastic sampler at this γ instead of LCMScheduler (VP teachers)
    tcd_steps: list[int] | None = None  # the step counts that get it (None: every one of sampling_steps)
    # rCM's score regulariser (RegulariserConfig: dmd_weight > 0 adds a critic role; dmd_guidance_scale None: w_max)

    def check(self) -> None:
        self.check_regulariser()
        schedule.check_tcd_gamma(self.tcd_gamma, self.tcd_steps)
        if not 1 <= self.w_min <= self.w_max:
            raise UserError(f"method.w_min={self.w_min}, method.w_max={self.w_max}: need 1 <= w_min <= w_max "
                            "(diffusers convention, 1 = no guidance)")
        if self.loss_type not in ("huber", "l2"):
            raise UserError(f"method.loss_type={self.loss_type!r}: huber or l2")
        if self.num_ddim_timesteps < 2 or 1000 % self.num_ddim_timesteps:
            raise UserError("method.num_ddim_timesteps must divide the 1000 training timesteps (e.g. 50)")
        if not self.sampling_steps or min(self.sampling_steps) < 1 or self.default_steps not in self.sampling_steps:
            raise UserError("method.sampling_steps must be positive and contain method.default_steps")


def consistency_output(xt: Tensor, x0: Tensor, scalings: tuple[Tensor, Tensor]) -> Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x̂0 (LCM eq. 9). xt, x0: (B, C, h, w); scalings (c_skip, c_out), (B,) each."""
    c_skip, c_out = scalings
    return c_skip.reshape(-1, 1, 1, 1) * xt + c_out.reshape(-1, 1, 1, 1) * x0


class LCM(Method):
    Config = LCMConfig

    @classmethod
    def spec(cls, cfg: LCMConfig, student: str) -> MethodSpec:
        ema = student == "full" or cfg.lora_ema_target
        # A full student gets the guidance embedding (LCM's w-conditioning); LCM-LoRA keeps the teacher's network.
        return MethodSpec(roles=("student", "critic") if cfg.dmd_weight > 0 else ("student",),
                          targets={"target": TargetSpec("student", cfg.ema_decay if ema else None)},
                          student_guidance_embedding=cfg.w_embedding_dim if student == "full" else None)

    def __init__(self, cfg: LCMConfig, run: RunContext, models: Any) -> None:
        super().__init__(cfg, run, models)
        T = models.num_train_timesteps
        self.k = T // cfg.num_ddim_timesteps
        self.solver_t = schedule.solver_timesteps(T, cfg.num_ddim_timesteps).to(models.device)
        # Families whose network cannot embed w (transformers) train the full student like LCM-LoRA: w unseen.
        self.w_embed = models.student_w_embedding
        schedule.check_tcd_gamma(cfg.tcd_gamma, sched=models.schedule)
        self.dmd_range = score_regulariser.dmd_timestep_range(cfg, T)

    def updates(self, step: int) -> tuple[str, ...]:
        if self.cfg.dmd_weight == 0:
            return ("student",)
        return score_regulariser.update_schedule(step, self.cfg.student_update_every)

    def loss(self, role: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        if role == "critic":
            x0 = self.generate(batch, grad=False)
            return score_regulariser.fake_score_loss(self.models, batch, x0, "lcm-critic")
        loss, logs = self.consistency_loss(batch)
        if self.cfg.dmd_weight > 0:
            x0 = self.generate(batch, grad=True)
            w = self.cfg.dmd_guidance(self.cfg.w_max)
            dmd, dlogs = score_regulariser.dmd_loss(self.models, batch, x0, w, self.dmd_range, "lcm-dmd")
            loss = loss + self.cfg.dmd_weight * dmd
            logs.update(dlogs)
        return loss, logs

    def consistency_loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """LCM's update (module docstring) and its logs."""
        m, c = self.models, self.cfg
        x0 = batch.latents
        n = batch.rng.randint(0, c.num_ddim_timesteps, "lcm-n")
        t_n = self.solver_t[n]
        t_prev = (t_n - self.k).clamp(min=0)  # the first grid point steps to ᾱ[0], as diffusers' DDIMSolver
        eps = batch.rng.randn(tuple(x0.shape[1:]), "lcm-noise")
        x_tn = m.schedule.add_noise(x0, eps, t_n)
        w = batch.rng.uniform(c.w_min, c.w_max, "lcm-w")
        w_cond = None
        if self.w_embed:
            w_cond = schedule.guidance_embedding(schedule.diffusers_to_paper_guidance(w), c.w_embedding_dim)

        # Student: consistency function at t_n (with gradient).
        x0_s, _ = m.predict("student", x_tn, t_n, batch.cond, timestep_cond=w_cond)
        pred = consistency_output(x_tn, x0_s, m.schedule.consistency_scalings(t_n, c.sigma_data, c.timestep_scaling))

        with torch.no_grad():
            # Teacher: one guided DDIM step, CFG in the paper's form on both x0 and eps (same forward, batched).
            x_prev = m.schedule.step(*m.guided("teacher", x_tn, t_n, batch.cond, batch.uncond, w), t_prev)
            # Target network at t_n - k on the teacher's result.
            x0_tgt, _ = m.predict("target", x_prev, t_prev, batch.cond, timestep_cond=w_cond)
            target = consistency_output(x_prev, x0_tgt, m.schedule.consistency_scalings(t_prev, c.sigma_data,
                                                                                        c.timestep_scaling))

        per_sample = schedule.consistency_distance(pred, target, c.loss_type, c.huber_c)
        loss, dropped = masked_mean(per_sample)
        return loss, {"nonfinite": float(dropped), "w": float(w.mean()), "t": float(t_n.float().mean())}

    # ---- rCM's score regulariser (dmd_weight > 0) ---------------------------------------------------------------
    def generate(self, batch: Batch, grad: bool) -> Tensor:
        """The student's sample after k ~ U{dmd_min_steps..dmd_max_steps} steps of its exported multistep sampler (its
        consistency output, then fresh noise to the next timestep; the last step with gradient when ``grad``); a
        full student's guidance embedding gets ``sample_guidance`` as at sampling. (B, C, h, w)."""
        m, c = self.models, self.cfg
        k = score_regulariser.draw_steps(batch, c, "lcm-dmd-k")
        w_cond = None
        if self.w_embed:
            w = torch.full((len(batch),), c.sample_guidance, device=m.device)
            w_cond = schedule.guidance_embedding(schedule.diffusers_to_paper_guidance(w), c.w_embedding_dim)

        def predict_x0(x: Tensor, t: Tensor) -> Tensor:
            x0, _ = m.predict("student", x, t, batch.cond, timestep_cond=w_cond)
            return consistency_output(x, x0, m.schedule.consistency_scalings(t, c.sigma_data, c.timestep_scaling))

        return score_regulariser.consistency_sample(m, batch, predict_x0, self.sampling_timesteps(k), "lcm-dmd-noise",
                                                    grad)

    # ---- export --------------------------------------------------------------------------------------------------
    def sampling_timesteps(self, k: int) -> list[int]:
        """The skipping-step grid points LCMScheduler picks for k steps from the ``num_ddim_timesteps`` grid the
        student was trained on, from the top."""
        from diffusers import LCMScheduler

        grid = LCMScheduler(num_train_timesteps=self.models.num_train_timesteps,
                            original_inference_steps=self.cfg.num_ddim_timesteps,
                            timestep_scaling=self.cfg.timestep_scaling)
        grid.set_timesteps(k)
        return [int(t) for t in grid.timesteps]

    def sampling(self) -> SamplingSpec:
        """LCM's multistep sampler at :meth:`sampling_timesteps`; on flow teachers FlowMatchLCMScheduler at the
        sigmas of the same grid points. With ``tcd_gamma``: TCD's stochastic sampler at those timesteps (TCD sec.
        4.3; γ = 1 is LCM's re-noising without its boundary scalings) for the ``tcd_steps`` counts; the regulariser's
        rollout keeps LCM's."""
        kwargs = {"original_inference_steps": self.cfg.num_ddim_timesteps,
                  "timestep_scaling": self.cfg.timestep_scaling}
        steps = {}
        for k in self.cfg.sampling_steps:
            gamma = schedule.tcd_at(self.cfg.tcd_gamma, self.cfg.tcd_steps, k)
            steps[k] = self.models.schedule.sampler("consistency" if gamma is None else "tcd",
                                                    self.sampling_timesteps(k),
                                                    guidance_scale=self.cfg.sample_guidance if self.w_embed else 1.0,
                                                    vp_kwargs=kwargs, gamma=gamma)
        return SamplingSpec(steps=steps, default_steps=self.cfg.default_steps)
