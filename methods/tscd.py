"""Segmented consistency distillation: Hyper-SD's TSCD and the Phased Consistency Model.

Ren, Xia, Lu, Zhang, Wu, Xiao, Wen, Chen, Wang, Liu, Zhou. "Hyper-SD: Trajectory Segmented Consistency Model for
Efficient Image Synthesis", 2024 (arXiv:2404.13686): Trajectory Segmented Consistency Distillation, sec. 3.1.
Wang, Zhang, Ye, Liu, Yuan, Tang, Luo. "Phased Consistency Models", NeurIPS 2024 (arXiv:2405.18407), sec. 3-4.
Segment mechanics checked against PCM's public code (G-U-N/Phased-Consistency-Model, code/text_to_image_sd15/).

The probability-flow ODE is cut into S segments; inside each, the student is a consistency model whose boundary is
the segment's lower edge, so S student evaluations sample an image. One update of the student:
  grid:     N DDIM solver timesteps t_n = (n+1)k - 1, k = T/N (n = 0..N-1)                  (LCM's skipping grid)
  segments: starts s_j = floor(linspace(0, N, S, endpoint=False))_j; edge_j = t_{s_j - 1} (0 for s_0 = 0);
            solver index n lies in segment j(n) = max{j : s_j <= n}                             (PCM sec. 3.1)
  student:  (x̂0, ε̂) = θ(x_{t_n}, t_n) (c_skip = 0, c_out = 1), jumped by DDIM to the edge:
            f_θ(x_{t_n}) = sqrt(ᾱ_e) x̂0 + sqrt(1 - ᾱ_e) ε̂,  e = edge_{j(n)}                     (PCM eq. 5)
  teacher:  one DDIM step t_n -> t_n - k with CFG in the papers' form x̂ = cond + ω (cond - uncond)
  target:   f_θ⁻(x̂_{t_n - k}) jumped to the same edge, θ⁻ = EMA(θ) (full; LoRA with lora_ema_target) or θ
            without gradient (LoRA, as PCM's and diffusers' LCM-LoRA scripts);
            when t_n - k is the edge itself (n = s_j), the teacher's step is the target         (PCM's c_skip = 1)
  loss:     pseudo-Huber sqrt(d² + c²) - c, c = 0.001 (PCM), or MSE (Hyper-SD)
Hyper-SD shrinks S over stages (8 -> 4 -> 2 -> 1), each stage continuing from the previous one; here the stages run
in one training run (``segments``, ``stage_fractions`` of max_steps) and each finished stage is exported.

Guidance: configs use the diffusers convention w (uncond + w (cond - uncond), 1 = none); the papers' ω is w - 1
(PCM's published ω ∈ [4, 5] is w ∈ [5, 6]).

Sampling (TCDScheduler, γ = eta = 0, explicit timesteps): for S steps the student is evaluated at the top of each
segment, from the top: [t_{N-1}, edge_{S-1}, ..., edge_1] (N = 50, S = 4: [999, 739, 499, 239]); each step jumps by
DDIM to the next timestep of that list and the last one to t = 0 = edge_0, exactly the jumps trained above. These
timesteps all lie on the solver grid, i.e. they are the timesteps the student was trained at.

Optional score regulariser (``dmd_weight > 0``; rCM, Zheng et al. 2025, arXiv:2510.08431, sec. 4;
``distill_diffusion.score_regulariser``): in one-segment stages, λ × DMD's reverse-divergence term on the final
student's own k-step samples (its re-noising sampler, k ~ U{dmd_min_steps..dmd_max_steps}, gradient through the last
step) and a fake score (the ``critic`` role, a network: not with the adversarial heads) that learns them. Segmented
stages sample by deterministic jumps to their edges, which that sample does not model, so they train as before. Our
extension of rCM's recipe, which pairs the term with continuous-time consistency.

Optional adversarial term (PCM sec. 4.3, its ``_adv`` scripts): discriminator heads on the frozen teacher's features
(every down, mid and up block, 4 heads per level; its SDXL script: down and mid blocks, 1 head each); the prediction
f_θ and the consistency target are both re-noised from the edge e to t' ~ U[e, e + T/S), the target playing the
"real" sample; hinge loss (D: relu(1 + D(fake)) + relu(1 - D(real)); G: λ relu(1 - D(fake)), λ = 0.1); D and G
alternate on even/odd steps; D's Adam has betas (0, 0.999), lr 1e-5. The heads are a headless "critic" role (no LoRA
adapter or network copy of its own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distill_diffusion import schedule, score_regulariser
from distill_diffusion.adversarial import (
    FeatureDiscriminator,
    discriminate,
    hinge_d_loss,
    hinge_g_loss,
    teacher_discriminator,
)
from distill_diffusion.errors import UserError
from distill_diffusion.method import (
    Batch,
    Cond,
    Method,
    MethodSpec,
    OptimizerSettings,
    RunContext,
    SamplingSpec,
    StepSampling,
    TargetSpec,
    masked_mean,
)


@dataclass
class TSCDConfig(score_regulariser.RegulariserConfig):
    num_ddim_timesteps: int = 50  # N, DDIM solver grid (k = T / N = 20); PCM's SDXL recipe uses 40
    segments: list[int] = field(default_factory=lambda: [8, 4, 2, 1])  # S per stage (Hyper-SD: 8 -> 4 -> 2 -> 1)
    stage_fractions: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25, 0.25])  # stage lengths / max_steps
    w_min: float = 5.0  # teacher guidance range, diffusers convention (PCM's recipe ω = 4..5, plus 1)
    w_max: float = 6.0  # w_min = w_max = 1 runs the teacher without CFG (one forward instead of two)
    loss_type: str = "huber"  # "huber" (pseudo-Huber, PCM) or "l2" (Hyper-SD's MSE)
    huber_c: float = 0.001  # c of the pseudo-Huber metric
    ema_decay: float = 0.95  # target network EMA: full students, and LoRA students with lora_ema_target
    lora_ema_target: bool = False  # LoRA students: an EMA adapter (decay ema_decay) as target instead of their own
    adversarial: bool = False  # PCM's adversarial consistency term (adds a headless "critic" role)
    adv_weight: float = 0.1  # λ, weight of the generator's hinge term
    adv_lr: float = 1e-5  # discriminator heads' learning rate (Adam betas (0, 0.999))
    adv_heads_per_level: int = 4  # discriminator heads per teacher feature level (PCM SD1.5: 4; SDXL: 1)
    adv_up_blocks: bool = True  # heads on the up blocks too (PCM SD1.5); its SDXL script uses down + mid only
    sampling_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # step counts of the final student
    default_steps: int = 4
    tcd_gamma: float | None = None  # export every student (stage ones too) with TCD's sampler at this γ (VP teachers)
    tcd_steps: list[int] | None = None  # the step counts that get it (None: every one)
    # rCM's score regulariser (RegulariserConfig's fields), in one-segment stages: dmd_weight > 0 adds a critic role
    # (a fake score); dmd_guidance_scale None: w_max

    def check(self) -> None:
        self.check_regulariser()
        schedule.check_tcd_gamma(self.tcd_gamma, self.tcd_steps)
        if self.adversarial and self.dmd_weight > 0:
            raise UserError("method.adversarial and method.dmd_weight > 0 both train the critic role: choose one")
        N = self.num_ddim_timesteps
        if N < 2 or 1000 % N:
            raise UserError(f"method.num_ddim_timesteps={N}: must divide the 1000 training timesteps (e.g. 50, 40)")
        if not self.segments or any(not 1 <= s <= N for s in self.segments):
            raise UserError(f"method.segments={list(self.segments)}: each stage needs 1 <= S <= num_ddim_timesteps")
        if len(self.stage_fractions) != len(self.segments):
            raise UserError(f"method.stage_fractions has {len(self.stage_fractions)} values for "
                            f"{len(self.segments)} stages in method.segments")
        if any(f <= 0 for f in self.stage_fractions) or abs(sum(self.stage_fractions) - 1.0) > 1e-6:
            raise UserError(f"method.stage_fractions={list(self.stage_fractions)}: positive values summing to 1")
        if not 1 <= self.w_min <= self.w_max:
            raise UserError(f"method.w_min={self.w_min}, method.w_max={self.w_max}: need 1 <= w_min <= w_max "
                            "(diffusers convention, 1 = no guidance)")
        if self.loss_type not in ("huber", "l2"):
            raise UserError(f"method.loss_type={self.loss_type!r}: huber or l2")
        if self.huber_c <= 0:
            raise UserError(f"method.huber_c={self.huber_c}: must be positive")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"method.ema_decay={self.ema_decay}: must be in [0, 1)")
        if self.adv_weight < 0 or self.adv_lr <= 0 or self.adv_heads_per_level < 1:
            raise UserError("method.adv_weight >= 0, method.adv_lr > 0 and method.adv_heads_per_level >= 1 needed")
        if not self.sampling_steps or any(not 1 <= k <= N for k in self.sampling_steps):
            raise UserError(f"method.sampling_steps={list(self.sampling_steps)}: each in [1, num_ddim_timesteps]")
        if self.default_steps not in self.sampling_steps:
            raise UserError(f"method.default_steps={self.default_steps} is not in method.sampling_steps")


# ---- segment geometry --------------------------------------------------------------------------------------------


def segment_starts(num_solver_steps: int, segments: int) -> Tensor:
    """Solver indices where the S segments start: floor(linspace(0, N, S, endpoint=False)), shape (S,).

    numpy's float linspace, as PCM's code and diffusers' TCDScheduler compute it (for a few (N, S) with S close to N
    it differs from the integer floor(jN/S)).
    """
    starts = np.floor(np.linspace(0, num_solver_steps, num=segments, endpoint=False)).astype(np.int64)
    return torch.from_numpy(starts)


def previous_timesteps(solver_t: Tensor) -> Tensor:
    """t_{n-1} on the solver grid, 0 for n = 0 (the DDIM step t_n -> t_n - k lands there), shape (N,)."""
    return torch.cat([solver_t.new_zeros(1), solver_t[:-1]])


def segment_edges(solver_t: Tensor, segments: int) -> Tensor:
    """Edge (lower boundary) timestep of each segment, ascending, shape (S,): t_{s_j - 1}, and 0 for s_0 = 0.

    N = 50, S = 4: starts (0, 12, 25, 37), edges (0, 239, 499, 739).
    """
    return previous_timesteps(solver_t)[segment_starts(len(solver_t), segments).to(solver_t.device)]


def edge_of(n: Tensor, solver_t: Tensor, segments: int) -> Tensor:
    """The edge timestep of the segment holding solver index n (B,) -> (B,)."""
    starts = segment_starts(len(solver_t), segments).to(n.device)
    seg = (n[:, None] >= starts[None, :]).sum(1) - 1  # last start <= n
    return segment_edges(solver_t, segments).to(n.device)[seg]


def sampling_timesteps(solver_t: Tensor, segments: int) -> list[int]:
    """The S timesteps at which an S-segment student is evaluated, from the top: the top of each segment.

    [t_{N-1}, edge_{S-1}, ..., edge_1]; each is a solver timestep, so the student was trained there, and the segment
    holding edge_j is segment j - 1, whose jump lands on edge_{j-1} (the next entry, and 0 after the last).
    """
    edges = segment_edges(solver_t, segments)
    return [int(solver_t[-1])] + [int(e) for e in edges[1:].flip(0)]


def stage_ends(fractions: list[float], max_steps: int) -> list[int]:
    """Cumulative end step of each stage (exclusive), the last exactly ``max_steps``."""
    ends = [int(round(float(np.sum(fractions[: i + 1])) * max_steps)) for i in range(len(fractions))]
    ends[-1] = max_steps
    return ends


def stage_index(step: int, ends: list[int]) -> int:
    """The stage that step ``step`` (0-based) belongs to; steps past the end stay in the last stage."""
    for i, e in enumerate(ends):
        if step < e:
            return i
    return len(ends) - 1


# ---- the maths of one update -------------------------------------------------------------------------------------




def consistency_target(x_prev: Tensor, on_edge: Tensor, target_jump: Callable[[Tensor], Tensor]) -> Tensor:
    """The target: the teacher's step x_prev (B, ...) where it already sits on the edge (``on_edge`` (B,) bool),
    else ``target_jump(idx)`` (the target network's jump to the edge for the samples ``idx``, (len(idx), ...)).

    ``target_jump`` is not called when every sample is on its edge.
    """
    target = x_prev.clone()
    idx = (~on_edge).nonzero().flatten()
    if len(idx):
        target[idx] = target_jump(idx).to(target.dtype)
    return target


# ---- the method ----------------------------------------------------------------------------------------------------


class TSCD(Method):
    Config = TSCDConfig

    @classmethod
    def spec(cls, cfg: TSCDConfig, student: str) -> MethodSpec:
        ema = student == "full" or cfg.lora_ema_target
        # The adversarial critic is only the heads: its features are the frozen teacher's (a headless role).
        return MethodSpec(roles=("student", "critic") if cfg.adversarial or cfg.dmd_weight > 0 else ("student",),
                          headless=("critic",) if cfg.adversarial else (),
                          targets={"target": TargetSpec("student", cfg.ema_decay if ema else None)},
                          fixed_length=True)  # stage_fractions of max_steps

    def __init__(self, cfg: TSCDConfig, run: RunContext, models: Any) -> None:
        super().__init__(cfg, run, models)
        T, N = models.num_train_timesteps, cfg.num_ddim_timesteps
        if T % N:
            raise UserError(f"method.num_ddim_timesteps={N} must divide the teacher's {T} training timesteps")
        self.k = T // N
        self.solver_t = schedule.solver_timesteps(T, N).to(models.device)
        schedule.check_tcd_gamma(cfg.tcd_gamma, sched=models.schedule)
        max_steps = int(run.max_steps)
        self.ends = stage_ends(list(cfg.stage_fractions), max_steps)
        starts = [0] + self.ends[:-1]
        if any(e <= s for s, e in zip(starts, self.ends)):
            raise UserError(f"max_steps={max_steps} leaves a stage of method.segments={list(cfg.segments)} without "
                            f"steps (stage ends {self.ends}); raise max_steps or use fewer stages")
        self.disc: FeatureDiscriminator | None = None
        if cfg.adversarial:
            self.feature_names = models.feature_blocks(cfg.adv_up_blocks)
            self.disc = teacher_discriminator(models, self.feature_names, cfg.adv_heads_per_level)
        self.dmd_range = score_regulariser.dmd_timestep_range(cfg, T)

    # ---- declarations --------------------------------------------------------------------------------------------
    def segments_at(self, step: int) -> int:
        """S of the stage that ``step`` belongs to."""
        return int(self.cfg.segments[stage_index(step, self.ends)])

    def regularised(self, step: int) -> bool:
        """rCM's regulariser acts at ``step``: on, in a one-segment stage (the student that samples by re-noising)."""
        return self.cfg.dmd_weight > 0 and self.segments_at(step) == 1

    def updates(self, step: int) -> tuple[str, ...]:
        if self.cfg.dmd_weight > 0:
            if not self.regularised(step):
                return ("student",)
            return score_regulariser.update_schedule(step, self.cfg.student_update_every)
        if not self.cfg.adversarial:
            return ("student",)
        return ("critic",) if step % 2 == 0 else ("student",)  # PCM: D on even steps, G on odd ones

    def optimizer_settings(self, role: str) -> OptimizerSettings:
        if role == "critic":
            return OptimizerSettings(learning_rate=self.cfg.adv_lr, betas=(0.0, 0.999))
        return OptimizerSettings()

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"critic": self.disc} if self.disc is not None else {}

    # ---- the maths -----------------------------------------------------------------------------------------------
    def teacher_step(self, x_tn: Tensor, t_n: Tensor, t_prev: Tensor, batch: Batch, w: Tensor) -> Tensor:
        """One guided DDIM step of the teacher from t_n to t_prev (B,); CFG in the papers' form on x0 and eps."""
        m = self.models
        uncond = None if self.cfg.w_max == 1.0 else batch.uncond  # w = 1: the conditional prediction alone
        return m.schedule.step(*m.guided("teacher", x_tn, t_n, batch.cond, uncond, w), t_prev)

    def consistency_pair(self, batch: Batch, n: Tensor, eps: Tensor, w: Tensor,
                         segments: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(prediction, target, edge, on_edge) for solver indices n (B,), noise eps (B, C, h, w), guidance w (B,).

        The prediction carries the student's gradient (when grad is enabled); the target never does.
        """
        m = self.models
        x0 = batch.latents
        t_n = self.solver_t[n]
        t_prev = (t_n - self.k).clamp(min=0)  # n = 0 steps to ᾱ[0], as PCM's ddim_timesteps_prev
        edge = edge_of(n, self.solver_t, segments)
        x_tn = m.schedule.add_noise(x0, eps, t_n)

        x0_s, eps_s = m.predict("student", x_tn, t_n, batch.cond)
        pred = m.schedule.step(x0_s, eps_s, edge)  # the DDIM (flow: Euler) jump to the segment's edge

        with torch.no_grad():
            x_prev = self.teacher_step(x_tn, t_n, t_prev, batch, w)
            on_edge = t_prev == edge

            def target_jump(idx: Tensor) -> Tensor:
                x0_t, eps_t = m.predict("target", x_prev[idx], t_prev[idx], batch.cond.index(idx))
                return m.schedule.step(x0_t, eps_t, edge[idx])

            target = consistency_target(x_prev, on_edge, target_jump)
        return pred, target, edge, on_edge

    def discriminate(self, x: Tensor, t: Tensor, cond: Cond, train_heads: bool) -> list[Tensor]:
        """D(x_t, t): the heads on the frozen teacher's features (:func:`distill_diffusion.adversarial.discriminate`),
        a list of (B, 1, h, w) logits; ``train_heads=False``: the student's turn."""
        assert self.disc is not None
        return discriminate(self.models, self.disc, self.feature_names, x, t, cond, train_heads,
                            stop=not self.cfg.adv_up_blocks)

    def adversarial_timesteps(self, batch: Batch, edge: Tensor, segments: int) -> Tensor:
        """t' ~ U{edge, ..., edge + T/S - 1} per sample (B,), below T."""
        T = self.models.num_train_timesteps
        u = batch.rng.rand("tscd-adv-t")
        return (edge + (u * (T // segments)).long()).clamp(max=T - 1)

    def loss(self, role: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        m, c, rng = self.models, self.cfg, batch.rng
        S = self.segments_at(step)
        n = rng.randint(0, c.num_ddim_timesteps, "tscd-n")
        eps = rng.randn(m.latent_shape, "tscd-noise")
        w = rng.uniform(c.w_min, c.w_max, "tscd-w")
        logs: dict[str, float] = {"segments": float(S)}

        if role == "critic" and c.dmd_weight > 0:
            x0 = self.generate(batch, grad=False)
            return score_regulariser.fake_score_loss(m, batch, x0, "tscd-critic")
        if role == "critic":
            with torch.no_grad():
                pred, target, edge, _ = self.consistency_pair(batch, n, eps, w, S)
            t_adv = self.adversarial_timesteps(batch, edge, S)
            fake = m.schedule.renoise(pred, rng.randn(m.latent_shape, "tscd-adv-fake"), edge, t_adv)
            real = m.schedule.renoise(target, rng.randn(m.latent_shape, "tscd-adv-real"), edge, t_adv)
            per = hinge_d_loss(self.discriminate(fake, t_adv, batch.cond, True),
                               self.discriminate(real, t_adv, batch.cond, True))
            loss, dropped = masked_mean(per)
            return loss, {**logs, "nonfinite": float(dropped)}

        pred, target, edge, on_edge = self.consistency_pair(batch, n, eps, w, S)
        per = schedule.consistency_distance(pred, target, c.loss_type, c.huber_c)
        logs.update(consistency=float(per.detach().mean()), on_edge=float(on_edge.float().mean()),
                    t=float(self.solver_t[n].float().mean()), w=float(w.mean()))
        if c.adversarial and c.adv_weight > 0:
            t_adv = self.adversarial_timesteps(batch, edge, S)
            fake = m.schedule.renoise(pred, rng.randn(m.latent_shape, "tscd-adv-fake"), edge, t_adv)
            g = hinge_g_loss(self.discriminate(fake, t_adv, batch.cond, False))
            per = per + c.adv_weight * g
            logs["adv_g"] = float(g.detach().mean())
        loss, dropped = masked_mean(per)
        if self.regularised(step):
            x0 = self.generate(batch, grad=True)
            dmd, dlogs = score_regulariser.dmd_loss(m, batch, x0, c.dmd_guidance(c.w_max), self.dmd_range, "tscd-dmd")
            loss = loss + c.dmd_weight * dmd
            logs.update(dlogs)
        return loss, {**logs, "nonfinite": float(dropped)}

    def generate(self, batch: Batch, grad: bool) -> Tensor:
        """The final student's sample after k ~ U{dmd_min_steps..dmd_max_steps} steps of its exported sampler (x0,
        re-noised to the next k-segment timestep; :meth:`consistency_sampling`), the last step with gradient when
        ``grad``. (B, C, h, w)."""
        m = self.models
        k = score_regulariser.draw_steps(batch, self.cfg, "tscd-dmd-k")
        return score_regulariser.consistency_sample(
            m, batch, lambda x, t: m.predict("student", x, t, batch.cond)[0],
            sampling_timesteps(self.solver_t.cpu(), k), "tscd-dmd-noise", grad)

    # ---- export --------------------------------------------------------------------------------------------------
    def step_sampling(self, segments: int) -> StepSampling:
        """TCDScheduler (γ = 0: the pipelines' default eta, or ``tcd_gamma`` at ``tcd_steps``; flow:
        FlowMatchEulerDiscreteScheduler, the same jump in (x0, eps)) at the S-segment student's timesteps."""
        gamma = schedule.tcd_at(self.cfg.tcd_gamma, self.cfg.tcd_steps, segments)
        return self.models.schedule.sampler(
            "deterministic" if gamma is None else "tcd", sampling_timesteps(self.solver_t.cpu(), segments),
            vp_kwargs={"original_inference_steps": self.cfg.num_ddim_timesteps}, gamma=gamma)

    def consistency_sampling(self, k: int) -> StepSampling:
        """k-step sampling of a one-segment student (a consistency model to t = 0): its x0 re-noised with fresh noise
        to each next timestep (LCMScheduler; TCD's γ = 1; flow: FlowMatchLCMScheduler), at the k-segment timesteps.

        timestep_scaling 1e4 makes LCMScheduler's boundary scalings the identity (c_skip ≈ 0, c_out ≈ 1 for t >= 1):
        this student is trained on plain x0 predictions, without LCM's boundary parameterisation. With
        ``tcd_gamma``: TCD's stochastic sampler at the same timesteps instead (γ = 1 is this re-noising).
        """
        if schedule.tcd_at(self.cfg.tcd_gamma, self.cfg.tcd_steps, k) is not None:
            return self.step_sampling(k)
        return self.models.schedule.sampler(
            "consistency", sampling_timesteps(self.solver_t.cpu(), k),
            vp_kwargs={"timestep_scaling": 1.0e4, "original_inference_steps": self.cfg.num_ddim_timesteps})

    def sampling(self) -> SamplingSpec:
        """The final student at every ``sampling_steps`` count. After a one-segment last stage the student maps every
        t to t = 0, and a deterministic jump to the next edge (TCD, γ = 0) reuses its ε, which this stage no longer
        trains to be consistent; re-noising with fresh noise is the consistency model's own multi-step sampler
        (measured better on the embedded teacher: the README's TSCD section).
        Stage students (``exports``) keep TCD γ = 0: they were trained to land on their segment edges.
        ``tcd_gamma`` samples every student, stage ones too, with TCD's γ instead."""
        final_s = int(self.cfg.segments[-1])
        make = self.consistency_sampling if final_s == 1 else self.step_sampling
        steps = {int(k): make(int(k)) for k in self.cfg.sampling_steps}
        return SamplingSpec(steps=steps, default_steps=self.cfg.default_steps)

    def exports(self, step: int) -> dict[str, SamplingSpec]:
        """After the last update of each stage but the final one: ``student_S<S>`` sampling with its own S edges."""
        out = {}
        for i, end in enumerate(self.ends[:-1]):
            if step == end:
                S = int(self.cfg.segments[i])
                out[f"student_S{S}"] = SamplingSpec(steps={S: self.step_sampling(S)}, default_steps=S)
        return out
