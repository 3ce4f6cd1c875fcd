"""DMD2: distribution matching distillation with a two time-scale critic and a GAN on the critic's bottleneck.

Yin, Gharbi, Park, Zhang, Shechtman, Durand, Freeman. "Improved Distribution Matching Distillation for Fast Image
Synthesis", NeurIPS 2024 (arXiv:2405.14867); DMD: Yin et al., CVPR 2024 (arXiv:2311.18828). Details checked against
the authors' code (tianweiy/DMD2: main/sd_guidance.py, main/sd_unified_model.py, main/train_sd.py).

Roles: the generator G_θ ("student"), the fake score μ_fake^φ ("critic", with a GAN classification head D on its
bottleneck), the frozen real score μ_real (the teacher; with LoRA the base network's own weights).

Generator. Input: pure noise z at the conditioning timestep t_k of step k (few-step: t = 999, 749, 499, 249); output
x = G_θ(x_k, t_k), the teacher's parameterisation turned into x0. Optionally (``scaled_init_noise``, not in the paper)
the first input is add_noise(0, z, t_0) = sqrt(1 − ᾱ_{t_0}) z at a t_0 below T − 1, as SiD-LSG starts its one-step
generator: an ε-teacher's x0 = (x_t − σ ε̂)/α multiplies the generator's ε error by 1/α, 14.6 at t = 999 for SD's
schedule (2.7 at t = 625). For k > 0 the input comes from backward simulation
(DMD2 sec. 4.4): run G without gradient from noise through steps 0..k-1, re-noising each x0 with fresh noise to the
next conditioning timestep; k is drawn once per step for the whole global batch.

Distribution matching (DMD eq. 7, DMD2 sec. 4.1), t ~ U[0.02T, 0.98T], x_t = α_t x + σ_t ε:
  x̂_real = μ_real(x_t, t) with CFG w (diffusers convention), x̂_fake = μ_fake(x_t, t) without guidance,
  ∇ = (x̂_fake − x̂_real) / mean_{C,H,W}|x − x̂_real|,   L_DM = ½ ‖x − sg(x − ∇)‖² (mean)  =>  ∂L_DM/∂x ∝ ∇.
Critic: the teacher's own denoising loss (ε- or v-MSE) on sg(x), t ~ U[0, T)          (DMD eq. 6; two time-scale
  update rule, DMD2 sec. 4.2: the critic updates every step, the generator every ``student_update_every`` steps).
GAN (DMD2 sec. 4.3, eq. 3-4): D(x_t, t) = head(bottleneck of μ_fake at (x_t, t)) with real latents and generated x
  noised at t ~ U[0, T); non-saturating: L_G = softplus(−D(fake)) (weight λ_G = 1e-3, SDXL 5e-3), L_D =
  softplus(D(fake)) + softplus(−D(real)) (weight λ_D = 1e-2) added to the critic's loss; the head is the critic's.

Decoupled DMD (``decoupled``; Liu, Gao, Liu, Du, Li, Wu, Jin, Cao, Zhang, Li, Hoi, "Decoupled DMD: CFG Augmentation
as the Spear, Distribution Matching as the Shield", arXiv:2511.22677). With the guided real score, DMD's gradient is
−(s_cond − s_fake) − (α − 1)(s_cond − s_uncond) (their eq. 6): distribution matching (DM) plus CFG augmentation (CA).
Eq. 8 evaluates the two at their own re-noisings x_{τ_DM}, x_{τ_CA} of sg(x); Algorithm 1 draws τ_CA ~ U(t, 1) (less
noisy than the step's input, t = 1 clean in their notation) and τ_DM ~ U(0, 1). Here, in x0 form and inside DMD2's
[min_step, max_step]:  ∇ = dm_weight (x̂_fake − x̂_cond)/N_DM + ca_weight (x̂_uncond − x̂_cond)/N_CA, every x̂ at
its own term's timestep, N the DMD2 normaliser mean|x − x̂_cfg| at that timestep (our choice: the paper's
Algorithm 1 shows no normaliser; with one shared τ it is DMD2's gradient exactly). The critic and GAN are unchanged.

Phased DMD (``phased``; Fan, Qiu, Wu, Wang, Lin, Ren, Lin, Gong, Yang, "Phased DMD: Few-step Distribution Matching
Distillation via Score Matching within Subintervals", arXiv:2510.27684). The K conditioning timesteps cut the noise
range into K phases, trained one after another (progressive distribution matching, sec. 2.2.1): in phase k the
generator runs steps 0..k−1 without gradient as deterministic DDIM jumps (x̂0, ε̂) -> t_{j+1}, then step k, and its
output is x_s = the jump to s = t_{k+1} (x0 in the last phase). Its loss matches the marginal at s through levels
t in (s, T) with x_t ~ q(x_t | x_s) (eq. 10); the fake score has no clean sample there and learns the subinterval
targets (eq. 11–12, ``distill_diffusion.matching.subinterval_pair``) weighted min(1, 10 σ²_{t|s}) (eq. 13), and
starts over from the teacher at each phase start. The last phase is DMD2's losses on a deterministic rollout. The
sampler is the same deterministic rollout (TCDScheduler, γ = 0). Not the paper's: one network serves every phase
(the paper trains one expert per phase, LoRA on a shared base, and keeps earlier experts frozen), so a later phase
can move what an earlier one learnt; the export stays one network that loads in the vanilla pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from distill_diffusion.adversarial import logistic_d_loss, logistic_g_loss
from distill_diffusion.errors import UserError
from distill_diffusion.matching import (
    dm_gradient,
    dm_loss,
    gradient_loss,
    subinterval_pair,
    subinterval_sigma2,
    subinterval_weight,
)
from distill_diffusion.method import (
    Batch,
    Cond,
    Method,
    MethodSpec,
    OptimizerSettings,
    RunContext,
    SamplingSpec,
    masked_mean,
)
from distill_diffusion.models import frozen
from distill_diffusion.schedule import density_timesteps


@dataclass
class DMD2Config:
    """Paper defaults: SD1.5, one step (DMD2 appendix / the reference's SD1.5 script). The learning rates and weight
    decay here replace the shared ``learning_rate`` / ``adam_weight_decay`` keys, which DMD2 does not read."""

    real_guidance_scale: float = 1.75  # w of μ_real, diffusers convention (1 = none); SD1.5 1.75, SDXL 8
    min_step_ratio: float = 0.02  # DM loss: t ~ U[0.02 T, 0.98 T]
    max_step_ratio: float = 0.98
    student_update_every: int = 10  # TTUR: critic updates per generator update (SD1.5 10, SDXL 5)
    student_lr: float = 1e-5  # generator lr: SD1.5 full 1e-5 (GAN stage 5e-7), SDXL full 5e-7, SDXL LoRA 5e-5
    critic_lr: float = 1e-5  # fake-score (+ GAN head) lr, same values as the generator's in the paper
    weight_decay: float = 0.01  # AdamW (0.9, 0.999), weight decay 0.01 for both roles
    # Conditioning timesteps t_k of the generator, descending. [999] one step (SDXL one step: 399 after an ODE
    # warm start); [999, 749, 499, 249] four steps with backward simulation.
    conditioning_timesteps: list[int] = field(default_factory=lambda: [999])
    # The first step's input: False = unit noise z (the paper, right for t_0 = 999 where sqrt(1 − ᾱ) ≈ 1); True =
    # add_noise(0, z, t_0) = sqrt(1 − ᾱ_{t_0}) z, SiD-LSG's one-step input, for a first step below T − 1.
    scaled_init_noise: bool = False
    gan: bool = True  # the GAN term on the critic's bottleneck (the SD1.5 recipe adds it in a second stage)
    gan_generator_weight: float = 1e-3  # λ_G (SDXL 5e-3)
    gan_discriminator_weight: float = 1e-2  # λ_D
    gan_max_timestep: int = 1000  # real and fake inputs of D are noised at t ~ U[0, gan_max_timestep)
    # The critic's denoising-loss timesteps: "uniform" as in the paper and its code, or SD3's "logit_normal" / "mode"
    # training densities (SD3 paper sec. 3.1; ours to offer, not a DMD2 setting).
    critic_t_density: str = "uniform"
    critic_t_logit_mean: float = 0.0
    critic_t_logit_std: float = 1.0
    critic_t_mode_scale: float = 1.29
    # Start the critic (and the GAN head, when the earlier run had one) from the last checkpoint of the run that
    # ``init_from`` names, as the paper's second stage resumes both networks.
    init_critic: bool = False
    # Decoupled DMD (Liu et al. 2025, arXiv:2511.22677, eq. 8 and Algorithm 1): the generator's gradient as two
    # terms with their own weights and re-noising timesteps. DM = real_cond − fake_cond (no CFG), CA = real_cond −
    # real_uncond. "full": U[min_step, max_step] as plain DMD2; "constrained": below the generator's input timestep
    # t_k (the paper's τ > t, cleaner than the step's input), within the same bounds. The paper's proposal
    # (Decoupled-Hybrid, Tab. 1 ④): ca "constrained", dm "full". Off: the DMD2 gradient above, unchanged.
    decoupled: bool = False
    dm_weight: float = 1.0  # weight of the DM term (eq. 6/8: 1)
    ca_weight: float | None = None  # weight of the CA term; None = real_guidance_scale − 1 (eq. 6/8: α − 1)
    ca_schedule: str = "constrained"  # τ_CA: "constrained" (Alg. 1 line 11, τ_CA ~ U(t, 1)) or "full"
    dm_schedule: str = "full"  # τ_DM: "full" (Alg. 1 line 12, τ_DM ~ U(0, 1)) or "constrained"
    # Phased DMD (Fan et al. 2025, arXiv:2510.27684): the run's iterations split into one phase per conditioning
    # timestep; phase k trains step k only, on a deterministic rollout of steps < k, its output the noisy x_{t_{k+1}}
    # (the last phase: x0); the critic learns with subinterval targets and starts over from the teacher at each
    # phase start. One network for every phase (the paper trains an expert per phase): see the module docstring.
    phased: bool = False
    phase_critic_reset: bool = True  # the critic (and its optimizer state) from the teacher at each phase start
    subinterval_weight_cap: float = 10.0  # eq. 13's min(1, 10 σ²_{t|s}) on the critic's subinterval loss
    # The GAN term in every phase, not only the last (ours, not the paper's): in phase k, D compares the output x_s
    # and real images, both noised to t ~ U(s, gan_max_timestep), where their marginals should agree.
    gan_all_phases: bool = False

    def check(self) -> None:
        if self.real_guidance_scale < 1:
            raise UserError(f"method.real_guidance_scale={self.real_guidance_scale}: need >= 1 (diffusers "
                            "convention, 1 = no guidance)")
        if not 0 <= self.min_step_ratio < self.max_step_ratio <= 1:
            raise UserError("method.min_step_ratio / max_step_ratio: need 0 <= min < max <= 1 (paper 0.02, 0.98)")
        if self.student_update_every < 1:
            raise UserError(f"method.student_update_every={self.student_update_every}: must be at least 1")
        if self.student_lr <= 0 or self.critic_lr <= 0:
            raise UserError("method.student_lr and method.critic_lr must be positive")
        if self.weight_decay < 0:
            raise UserError(f"method.weight_decay={self.weight_decay}: must be >= 0")
        ts = list(self.conditioning_timesteps)
        if not ts or min(ts) < 0 or any(a <= b for a, b in zip(ts, ts[1:])):
            raise UserError(f"method.conditioning_timesteps={ts}: need non-negative timesteps in strictly "
                            "descending order, e.g. [999] or [999, 749, 499, 249]")
        if self.gan_generator_weight < 0 or self.gan_discriminator_weight < 0:
            raise UserError("method.gan_generator_weight and method.gan_discriminator_weight must be >= 0")
        if self.gan_max_timestep < 1:
            raise UserError(f"method.gan_max_timestep={self.gan_max_timestep}: must be at least 1")
        if self.critic_t_density not in ("uniform", "logit_normal", "mode"):
            raise UserError(f"method.critic_t_density={self.critic_t_density!r}: uniform, logit_normal or mode")
        if self.critic_t_logit_std <= 0:
            raise UserError(f"method.critic_t_logit_std={self.critic_t_logit_std}: must be positive")
        self._check_variants()

    def _check_variants(self) -> None:
        """Decoupled DMD's and Phased DMD's keys."""
        if self.dm_weight < 0 or (self.ca_weight is not None and self.ca_weight < 0):
            raise UserError("method.dm_weight and method.ca_weight must be >= 0")
        for key in ("ca_schedule", "dm_schedule"):
            if getattr(self, key) not in ("full", "constrained"):
                raise UserError(f"method.{key}={getattr(self, key)!r}: full or constrained")
        if self.phased and self.decoupled:
            raise UserError("method.phased=true and method.decoupled=true: choose one")
        if self.subinterval_weight_cap <= 0:
            raise UserError(f"method.subinterval_weight_cap={self.subinterval_weight_cap}: must be positive")
        if self.gan_all_phases and not (self.phased and self.gan):
            raise UserError("method.gan_all_phases=true needs method.phased=true and method.gan=true")
        if self.gan_all_phases and self.gan_max_timestep <= max(self.conditioning_timesteps[1:], default=0) + 1:
            raise UserError(f"method.gan_max_timestep={self.gan_max_timestep}: with gan_all_phases=true it must "
                            "lie above every phase boundary (each conditioning timestep after the first) + 1")


# ---- pure maths ---------------------------------------------------------------------------------------------------


# DMD2 eq. 3 (generator) and eq. 4 (discriminator), per sample on (B,) logits: the library's logistic pair.
generator_gan_loss = logistic_g_loss
discriminator_gan_loss = logistic_d_loss


def guided_normaliser(x0: Tensor, x0_cond: Tensor, x0_uncond: Tensor, w: float) -> Tensor:
    """DMD2's per-sample normaliser mean_{C,H,W} |x − x̂_real| with x̂_real = x̂_uncond + w (x̂_cond − x̂_uncond), the
    guided real x0 at the same noise level; (B, C, h, w) -> (B, 1, 1, 1)."""
    x0_real = x0_uncond + w * (x0_cond - x0_uncond)
    return (x0 - x0_real).abs().flatten(1).mean(1).reshape(-1, *[1] * (x0.ndim - 1))


def dm_term(x0: Tensor, x0_cond: Tensor, x0_uncond: Tensor, x0_fake: Tensor, w: float) -> Tensor:
    """Decoupled DMD's distribution-matching term (Liu et al. eq. 6 / 8, −(s_real_cond − s_fake_cond)) in DMD2's x0
    form at its own τ_DM: (x̂_fake − x̂_cond) / guided_normaliser, all x̂ at τ_DM; (B, C, h, w).

    A score is s(x_τ) = (α_τ x̂ − x_τ) / σ_τ², so score differences are x0 differences times α_τ / σ_τ², the factor
    DMD2's normaliser replaces (DMD eq. 8). The normaliser is DMD2's own (the guided x̂ at τ_DM), so that with
    τ_DM = τ_CA this term plus (w − 1) :func:`ca_term` is the DMD2 gradient (x̂_fake − x̂_cfg) / mean|x − x̂_cfg|.
    """
    return (x0_fake - x0_cond) / guided_normaliser(x0, x0_cond, x0_uncond, w)


def ca_term(x0: Tensor, x0_cond: Tensor, x0_uncond: Tensor, w: float) -> Tensor:
    """Decoupled DMD's CFG-augmentation term (Liu et al. eq. 6 / 8 without its weight α − 1, −(s_real_cond −
    s_real_uncond)) in DMD2's x0 form at its own τ_CA: (x̂_uncond − x̂_cond) / guided_normaliser, all x̂ at τ_CA;
    (B, C, h, w). ``w`` only sets the normaliser (DMD2's guided x̂ at τ_CA)."""
    return (x0_uncond - x0_cond) / guided_normaliser(x0, x0_cond, x0_uncond, w)


def phase_of(step: int, max_steps: int, phases: int) -> int:
    """Phased DMD's progressive schedule (Fan et al. sec. 2.2.1): the phase of an iteration, the run's
    ``max_steps`` iterations cut into ``phases`` consecutive blocks of (nearly) equal length."""
    return min(phases - 1, step * phases // max(max_steps, 1))


def initial_latent(z: Tensor, noise_level: float, scaled: bool) -> Tensor:
    """The generator's first input x_0 from unit noise z: z itself, or add_noise(0, z, t_0) = σ_{t_0} z with
    ``noise_level`` σ_{t_0} (VP: sqrt(1 − ᾱ_{t_0}))."""
    return z * noise_level if scaled else z


# ---- the critic's bottleneck and the GAN head ---------------------------------------------------------------------


class GANHead(nn.Module):
    """The classification branch on the critic's bottleneck: (B, C, s, s) -> (B,) logits.

    [conv 4x4 stride 2 + GroupNorm + SiLU] while the map is larger than 4x4, then a conv covering the whole map
    (-> 1x1) + GroupNorm + SiLU, then a 1x1 conv to one logit (the reference: SD1.5 8 -> 4 -> 1, SDXL 32 -> ... -> 1).
    """

    def __init__(self, channels: int, spatial: int, groups: int = 32) -> None:
        super().__init__()
        g = groups if channels % groups == 0 else math.gcd(channels, groups)
        layers: list[nn.Module] = []
        s = spatial
        while s > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(g, channels), nn.SiLU()]
            s = (s + 2 - 4) // 2 + 1
        layers += [nn.Conv2d(channels, channels, s), nn.GroupNorm(g, channels), nn.SiLU(), nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)
        self.num_downsamples = sum(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in layers)

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h.float()).flatten(1).squeeze(1)




# ---- the method ---------------------------------------------------------------------------------------------------


class DMD2(Method):
    Config = DMD2Config

    @classmethod
    def spec(cls, cfg: DMD2Config, student: str) -> MethodSpec:
        # The generator first, then the critic, as the reference's train_one_step. Images are always asked for
        # (gan=false reads only their captions). Checkpointing is safe: the one gradient through another role's
        # forward (the generator's GAN term through the critic) runs with checkpointing off (no_checkpointing).
        init = ("student", "critic") if cfg.init_critic else ("student",)
        return MethodSpec(roles=("student", "critic"), init_roles=init, fixed_length=cfg.phased)

    def __init__(self, cfg: DMD2Config, run: RunContext, models: Any) -> None:
        super().__init__(cfg, run, models)
        T = models.num_train_timesteps
        self.timesteps = [int(t) for t in cfg.conditioning_timesteps]
        if max(self.timesteps) >= T:
            raise UserError(f"method.conditioning_timesteps={self.timesteps}: must be below the teacher's {T} "
                            "training timesteps")
        self.min_step, self.max_step = int(cfg.min_step_ratio * T), min(int(cfg.max_step_ratio * T), T - 1)
        self.head: GANHead | None = None
        if cfg.scaled_init_noise and models.schedule.kind == "flow":
            raise UserError("method.scaled_init_noise=true: flow pipelines start from unit noise; set it to false")
        if cfg.decoupled:
            self._check_decoupled()
        if cfg.phased and any(t + 1 > self.max_step for t in self.timesteps[1:]):
            raise UserError(f"method.conditioning_timesteps={self.timesteps}: with phased=true every phase boundary "
                            f"(each timestep after the first) must lie below max_step={self.max_step}")
        if cfg.gan:
            c, s = models.feature_shapes([models.bottleneck_block()])[0]
            self.head = GANHead(c, s, models.feature_groups()).to(models.device)

    def _check_decoupled(self) -> None:
        m, c = self.models, self.cfg
        if m.family.guidance_embedded(m.net("teacher")):
            raise UserError("method.decoupled=true needs separate conditional and unconditional teacher passes; this "
                            "teacher takes guidance as an input (guidance-embedded): set method.decoupled=false")
        used = [s for s, wt in ((c.ca_schedule, self.ca_weight), (c.dm_schedule, c.dm_weight)) if wt > 0]
        if "constrained" in used and min(self.timesteps) - 1 < self.min_step:
            raise UserError(f"method.conditioning_timesteps={self.timesteps}: a constrained schedule draws below "
                            f"each step's timestep and above min_step={self.min_step}; the last step leaves no room")

    @property
    def ca_weight(self) -> float:
        """The CA term's weight: method.ca_weight, or α − 1 with α = real_guidance_scale (Liu et al. eq. 6)."""
        c = self.cfg
        return c.real_guidance_scale - 1 if c.ca_weight is None else c.ca_weight

    # ---- declarations --------------------------------------------------------------------------------------------
    def optimizer_settings(self, role: str) -> OptimizerSettings:
        lr = self.cfg.student_lr if role == "student" else self.cfg.critic_lr
        return OptimizerSettings(learning_rate=lr, weight_decay=self.cfg.weight_decay)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"critic": self.head} if self.head is not None else {}

    def resets(self, step: int) -> tuple[str, ...]:
        """Phased DMD: the critic starts over from the teacher at each phase start after the first (sec. 2.2.1: the
        fake score of phase k models the new generator's distribution, not the previous phase's)."""
        c, n = self.cfg, len(self.timesteps)
        if not (c.phased and c.phase_critic_reset) or step == 0:
            return ()
        new_phase = phase_of(step, self.run.max_steps, n) != phase_of(step - 1, self.run.max_steps, n)
        return ("critic",) if new_phase else ()

    def updates(self, step: int) -> tuple[str, ...]:
        """TTUR: the critic every step, the generator every ``student_update_every``-th step.

        The generator updates on the last step of each block of r steps (the reference: the first; same rate), so the
        critic has had r - 1 updates first and the generator's logs land on logging steps that are multiples of r.
        """
        r = self.cfg.student_update_every
        return ("student", "critic") if (step + 1) % r == 0 else ("critic",)

    # ---- pieces --------------------------------------------------------------------------------------------------
    def pick_step(self, batch: Batch) -> int:
        """The step k whose input the generator sees, shared by the whole global batch (and by both roles)."""
        n = len(self.timesteps)
        return batch.rng.shared_randint(0, n, "dmd2-k") if n > 1 else 0

    def generator_input(self, batch: Batch, k: int) -> Tensor:
        """x_k: pure noise for k = 0, else backward simulation through steps 0..k-1 (no gradient), (B, C, h, w)."""
        m = self.models
        noises = [batch.rng.randn(m.latent_shape, f"dmd2-gen-noise-{j}") for j in range(k + 1)]
        noises[0] = initial_latent(noises[0], m.schedule.noise_level(self.timesteps[0]), self.cfg.scaled_init_noise)
        with torch.no_grad():
            return m.schedule.rollout(lambda x, t: m.predict("student", x, t, batch.cond)[0], noises[0],
                                      self.timesteps, noises[1:])

    def generate(self, batch: Batch, grad: bool) -> tuple[Tensor, int]:
        """The generator's x0 at a keyed step k (with gradient when ``grad``), and k."""
        k = self.pick_step(batch)
        x_k = self.generator_input(batch, k)
        t_k = torch.full((len(batch),), self.timesteps[k], dtype=torch.long, device=x_k.device)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            x0, _ = self.models.predict("student", x_k, t_k, batch.cond)
        return x0, k

    @torch.no_grad()
    def scores(self, xt: Tensor, t: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """(x̂_real, x̂_fake): the teacher's guided x0 (uncond + w (cond − uncond)) and the critic's unguided x0."""
        m = self.models
        x0_real, _ = m.predict("teacher", xt, t, batch.cond, batch.uncond, guidance=self.cfg.real_guidance_scale)
        x0_fake, _ = m.predict("critic", xt, t, batch.cond)
        return x0_real, x0_fake

    @torch.no_grad()
    def real_pair(self, xt: Tensor, t: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """(x̂_cond, x̂_uncond): the teacher's conditional and unconditional x0 at (x_t, t), one batched forward."""
        m = self.models
        out = m.net_out("teacher", torch.cat([xt, xt]), torch.cat([t, t]), batch.cond.cat(batch.uncond))
        out_c, out_u = out.chunk(2)
        return m.schedule.split(out_c, xt, t)[0], m.schedule.split(out_u, xt, t)[0]

    def renoise_timesteps(self, batch: Batch, schedule: str, k: int, tag: str) -> Tensor:
        """Decoupled DMD's re-noising timesteps (B,): "full" U[min_step, max_step]; "constrained" below step k's
        input timestep t_k (Liu et al. Alg. 1 line 11, τ > t in their clean-at-1 time) down to min_step."""
        hi = self.max_step if schedule == "full" else min(self.max_step, self.timesteps[k] - 1)
        return batch.rng.randint(self.min_step, hi + 1, tag)

    def discriminate(self, x: Tensor, t: Tensor, cond: Cond, train: bool) -> Tensor:
        """D(x_t, t): the critic's bottleneck through the GAN head, (B,) logits.

        ``train=False`` (the generator's turn): the critic and the head are frozen and gradients flow only to x.
        """
        m, head = self.models, self.head
        assert head is not None
        names = [m.bottleneck_block()]
        if train:
            return head(m.features("critic", x, t, cond, names, stop=True)[0])
        with frozen(m.parameters("critic") + list(head.parameters())), m.no_checkpointing("critic"):
            return head(m.features("critic", x, t, cond, names, stop=True)[0])

    # ---- losses --------------------------------------------------------------------------------------------------
    def loss(self, role: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        phase = phase_of(step, self.run.max_steps, len(self.timesteps)) if self.cfg.phased else None
        if phase is not None and phase < len(self.timesteps) - 1:
            return self._phased_generator_loss(batch, phase) if role == "student" else \
                self._phased_critic_loss(batch, phase)
        if role == "student":
            return self._generator_loss(batch, phase)
        if role == "critic":
            return self._critic_loss(batch, phase)
        raise KeyError(role)

    def _generator_loss(self, batch: Batch, phase: int | None = None) -> tuple[Tensor, dict[str, float]]:
        """DMD2's generator loss; ``phase``: Phased DMD's last phase (step k = phase on a deterministic rollout)."""
        m, c, rng = self.models, self.cfg, batch.rng
        x0, k = self.generate(batch, grad=True) if phase is None else (self.phased_output(batch, phase, True)[1], phase)
        if c.decoupled:
            per_sample, ok, logs = self._decoupled_dm(x0, k, batch)
        else:
            t = rng.randint(self.min_step, self.max_step + 1, "dmd2-dm-t")
            xt = m.schedule.add_noise(x0.detach(), rng.randn(m.latent_shape, "dmd2-dm-noise"), t)
            x0_real, x0_fake = self.scores(xt, t, batch)
            per_sample, ok = dm_loss(x0, x0_real, x0_fake)
            logs = {"t": float(t.float().mean())}
        loss = per_sample.sum() / ok.sum().clamp(min=1)  # masked samples give 0 and count for nothing
        logs = {"dm": float(loss.detach()), "nonfinite": float((~ok).sum()), "k": float(k), **logs}
        if phase is not None:
            logs["phase"] = float(phase)
        if self.head is not None and c.gan_generator_weight > 0:
            t_g = rng.randint(0, c.gan_max_timestep, "dmd2-gan-fake-t")
            xg = m.schedule.add_noise(x0, rng.randn(m.latent_shape, "dmd2-gan-fake-noise"), t_g)
            loss = loss + self._generator_gan_term(batch, xg, t_g, logs)
        return loss, logs

    def _generator_gan_term(self, batch: Batch, xg: Tensor, t_g: Tensor, logs: dict[str, float]) -> Tensor:
        """λ_G × softplus(−D) on the generator's output noised to ``t_g`` (``xg``, with gradient); logs gan_g."""
        g, _ = masked_mean(generator_gan_loss(self.discriminate(xg, t_g, batch.cond, train=False)))
        logs["gan_g"] = float(g.detach())
        return self.cfg.gan_generator_weight * g

    def _decoupled_dm(self, x0: Tensor, k: int, batch: Batch) -> tuple[Tensor, Tensor, dict[str, float]]:
        """Decoupled DMD (Liu et al. eq. 8, Alg. 1 lines 9-27): dm_weight × :func:`dm_term` at τ_DM plus ca_weight ×
        :func:`ca_term` at τ_CA, each on its own re-noising of sg(x) with its own noise; a zero weight skips its term.
        Returns the per-sample proxy loss (B,), the finite mask (B,) and logs (mean timesteps, mean |term|)."""
        m, c, rng, w = self.models, self.cfg, batch.rng, self.cfg.real_guidance_scale
        x, terms, logs = x0.detach(), [], {}
        for name, weight, schedule in (("dm", c.dm_weight, c.dm_schedule), ("ca", self.ca_weight, c.ca_schedule)):
            if weight <= 0:
                continue
            t = self.renoise_timesteps(batch, schedule, k, f"dmd2-{name}-t")
            xt = m.schedule.add_noise(x, rng.randn(m.latent_shape, f"dmd2-{name}-noise"), t)
            x0_cond, x0_uncond = self.real_pair(xt, t, batch)
            if name == "dm":
                with torch.no_grad():
                    x0_fake, _ = m.predict("critic", xt, t, batch.cond)
                term = dm_term(x, x0_cond, x0_uncond, x0_fake, w)
            else:
                term = ca_term(x, x0_cond, x0_uncond, w)
            terms.append(weight * term)
            logs[f"t_{name}"] = float(t.float().mean())
            logs[f"grad_{name}"] = float(masked_mean((weight * term).abs().flatten(1).mean(1))[0])
        grad = sum(terms) if terms else torch.zeros_like(x)
        per_sample, ok = gradient_loss(x0, grad)
        return per_sample, ok, logs

    # ---- Phased DMD ----------------------------------------------------------------------------------------------
    def phased_output(self, batch: Batch, phase: int, grad: bool) -> tuple[Tensor, Tensor, int]:
        """Phase k's generator output (Fan et al. sec. 2.2.1, Fig. 1): from noise, steps 0..k−1 of the student
        without gradient, each a deterministic DDIM jump (x̂0, ε̂) -> t_{j+1}; then step k (with gradient when
        ``grad``), its jump to s = t_{k+1}, or its x0 at the last step (s = −1, clean).

        Returns (x_s, x̂0 of step k, s), x_s and x̂0 (B, C, h, w)."""
        m, ts = self.models, self.timesteps
        x = initial_latent(batch.rng.randn(m.latent_shape, "dmd2-gen-noise-0"),
                           m.schedule.noise_level(ts[0]), self.cfg.scaled_init_noise)

        def at(t: int) -> Tensor:
            return torch.full((len(batch),), t, dtype=torch.long, device=x.device)

        with torch.no_grad():
            for j in range(phase):
                x = m.schedule.step(*m.predict("student", x, at(ts[j]), batch.cond), at(ts[j + 1]))
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            x0, eps = m.predict("student", x, at(ts[phase]), batch.cond)
            if phase == len(ts) - 1:
                return x0, x0, -1
            return m.schedule.step(x0, eps, at(ts[phase + 1])), x0, ts[phase + 1]

    def subinterval_noising(self, x_s: Tensor, s: int, t: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor,
                                                                                           Tensor]:
        """x_t ~ q(x_t | x_s) at t > s and the subinterval targets (x̃0, ε̃) (``matching.subinterval_pair``, eq.
        11–12), with σ²_{t|s} (B,)."""
        m = self.models
        a_s, s_s = m.schedule.alpha_sigma(torch.full_like(t, s))
        a_t, s_t = m.schedule.alpha_sigma(t)
        xt, x0_t, eps_t = subinterval_pair(x_s, eps, a_s, s_s, a_t, s_t)
        return xt, x0_t, eps_t, subinterval_sigma2(a_s, s_s, a_t, s_t)

    def _phased_generator_loss(self, batch: Batch, phase: int) -> tuple[Tensor, dict[str, float]]:
        """Phase k < K−1 (Fan et al. eq. 10): distribution matching of the noisy output x_s at levels t in (s, T),
        x_t ~ q(x_t | x_s). The score difference at x_t is α_t (x̂_fake − x̂_real) / σ_t² and ∂x_t/∂x_s = α_{t|s}:
        the gradient on x_s is DMD2's direction (x̂_fake − x̂_real), normalised as DMD2 does with step k's own x̂0
        in place of the clean sample (our choice; the paper leaves the weighting open). With ``gan_all_phases``
        (ours), DMD2's GAN term on x_s noised to t_g ~ U(s, gan_max_timestep) through q(x_t | x_s): where real images
        noised to t_g have the same marginal if x_s has the teacher's."""
        m, rng = self.models, batch.rng
        x_s, x0, s = self.phased_output(batch, phase, grad=True)
        t = rng.randint(max(self.min_step, s + 1), self.max_step + 1, "dmd2-dm-t")
        xt = self.subinterval_noising(x_s.detach(), s, t, rng.randn(m.latent_shape, "dmd2-dm-noise"))[0]
        x0_real, x0_fake = self.scores(xt, t, batch)
        per_sample, ok = gradient_loss(x_s, dm_gradient(x0.detach(), x0_real, x0_fake))
        loss = per_sample.sum() / ok.sum().clamp(min=1)
        logs = {"dm": float(loss.detach()), "nonfinite": float((~ok).sum()), "k": float(phase),
                "phase": float(phase), "t": float(t.float().mean())}
        if self.head is not None and self.cfg.gan_all_phases and self.cfg.gan_generator_weight > 0:
            t_g = rng.randint(s + 1, self.cfg.gan_max_timestep, "dmd2-gan-fake-t")
            xg = self.subinterval_noising(x_s, s, t_g, rng.randn(m.latent_shape, "dmd2-gan-fake-noise"))[0]
            loss = loss + self._generator_gan_term(batch, xg, t_g, logs)
        return loss, logs

    def _phased_critic_loss(self, batch: Batch, phase: int) -> tuple[Tensor, dict[str, float]]:
        """Phase k < K−1: score matching within the subinterval (Fan et al. eq. 11–13): the critic denoises x_t ~
        q(x_t | x_s), t ~ U(s, T), towards the subinterval targets, weighted min(1, cap σ²_{t|s})."""
        m, rng = self.models, batch.rng
        with torch.no_grad():
            x_s, _, s = self.phased_output(batch, phase, grad=False)
        t = rng.randint(s + 1, m.num_train_timesteps, "dmd2-critic-t")
        xt, x0_t, eps_t, sigma2 = self.subinterval_noising(x_s, s, t, rng.randn(m.latent_shape, "dmd2-critic-noise"))
        out = m.net_out("critic", xt, t, batch.cond)
        err = ((out - m.denoising_target(x0_t, eps_t, t)) ** 2).flatten(1).mean(1)
        loss, dropped = masked_mean(subinterval_weight(sigma2, self.cfg.subinterval_weight_cap) * err)
        logs = {"denoise": float(loss.detach()), "nonfinite": float(dropped), "phase": float(phase)}
        if self.head is not None and self.cfg.gan_all_phases:
            t_f = rng.randint(s + 1, self.cfg.gan_max_timestep, "dmd2-gan-critic-fake-t")
            x_f = self.subinterval_noising(x_s, s, t_f, rng.randn(m.latent_shape, "dmd2-gan-critic-fake-noise"))[0]
            loss = loss + self._discriminator_term(batch, x_f, t_f, s + 1, logs)
        return loss, logs

    def _critic_loss(self, batch: Batch, phase: int | None = None) -> tuple[Tensor, dict[str, float]]:
        """The fake score's denoising loss on the generator's x0 (+ the GAN's); ``phase``: Phased DMD's last."""
        m, c, rng = self.models, self.cfg, batch.rng
        with torch.no_grad():
            x0 = self.generate(batch, grad=False)[0] if phase is None else self.phased_output(batch, phase, False)[1]
        t = density_timesteps(rng, "dmd2-critic-t", m.num_train_timesteps, c.critic_t_density,
                              c.critic_t_logit_mean, c.critic_t_logit_std, c.critic_t_mode_scale)
        eps = rng.randn(m.latent_shape, "dmd2-critic-noise")
        xt = m.schedule.add_noise(x0, eps, t)
        out = m.net_out("critic", xt, t, batch.cond)
        per_sample = ((out - m.denoising_target(x0, eps, t)) ** 2).flatten(1).mean(1)
        loss, dropped = masked_mean(per_sample)
        logs = {"denoise": float(loss.detach()), "nonfinite": float(dropped)}
        if phase is not None:
            logs["phase"] = float(phase)
        if self.head is not None:
            t_f = rng.randint(0, c.gan_max_timestep, "dmd2-gan-critic-fake-t")
            x_f = m.schedule.add_noise(x0, rng.randn(m.latent_shape, "dmd2-gan-critic-fake-noise"), t_f)
            loss = loss + self._discriminator_term(batch, x_f, t_f, 0, logs)
        return loss, logs

    def _discriminator_term(self, batch: Batch, x_f: Tensor, t_f: Tensor, t_min: int, logs: dict[str, float]) -> Tensor:
        """λ_D × D's loss: real latents noised to t_r ~ U[t_min, gan_max_timestep) against the fakes ``x_f`` at
        ``t_f`` (drawn from the same range by the caller); logs gan_d, p_real, p_fake."""
        m, c, rng = self.models, self.cfg, batch.rng
        if batch.latents is None:
            raise UserError("method.gan=true needs real images (data.images or data.dataset)")
        t_r = rng.randint(t_min, c.gan_max_timestep, "dmd2-gan-real-t")
        x_r = m.schedule.add_noise(batch.latents, rng.randn(m.latent_shape, "dmd2-gan-real-noise"), t_r)
        d_real = self.discriminate(x_r, t_r, batch.cond, train=True)
        d_fake = self.discriminate(x_f, t_f, batch.cond, train=True)
        d, _ = masked_mean(discriminator_gan_loss(d_real, d_fake))
        logs.update(gan_d=float(d.detach()), p_real=float(torch.sigmoid(d_real.detach()).mean()),
                    p_fake=float(torch.sigmoid(d_fake.detach()).mean()))
        return c.gan_discriminator_weight * d

    def sampling(self) -> SamplingSpec:
        """LCMScheduler (flow: FlowMatchLCMScheduler) with exactly the trained conditioning timesteps: between steps
        it re-noises x0 with fresh noise to the next timestep, as backward simulation does in training; no CFG.
        Phased: TCDScheduler with γ = 0 (flow: FlowMatchEulerDiscreteScheduler), the deterministic DDIM jumps of
        its rollout. Only the trained count."""
        n, m = len(self.timesteps), self.models
        scale = float(initial_latent(torch.ones(()), m.schedule.noise_level(self.timesteps[0]),
                                     self.cfg.scaled_init_noise))
        # every timestep is on the k = 1 grid, so LCMScheduler warns about none of them
        kind = "deterministic" if self.cfg.phased else "consistency"
        s = m.schedule.sampler(kind, self.timesteps, init_noise_scale=scale,
                               vp_kwargs={"original_inference_steps": m.num_train_timesteps})
        return SamplingSpec(steps={n: s}, default_steps=n)
