"""Score identity Distillation (SiD), with long-and-short guidance (SiD-LSG) and few-step generation.

Zhou, Zheng, Wang, Yin, Huang. "Score identity Distillation: Exponentially Fast Distillation of Pretrained Diffusion
Models for One-Step Generation", ICML 2024 (arXiv:2404.04057);
Zhou, Wang, Zheng, Huang. "Long and Short Guidance in Score identity Distillation for One-Step Text-to-Image
Generation" / "Guided Score identity Distillation for Data-Free One-Step Text-to-Image Generation", ICLR 2025
(arXiv:2406.01561);
Zhou, Gu, Wang. "Few-Step Diffusion via Score identity Distillation", 2025 (arXiv:2505.12674);
Zhou, Zheng, Gu, Wang, Huang. "Adversarial Score identity Distillation: Rapidly Surpassing the Teacher in One Step",
ICLR 2025 (arXiv:2410.14919, SiDA).
Checked against the reference code: mingyuanzhou/SiD (training/sid_loss.py), mingyuanzhou/SiD-LSG
(training/sid_training_loop.py, training/sid_sd_util.py), the few-step loop of apple-aiml-research/ml-sid-dit and
mingyuanzhou/SiDA (sida_training/sida_loss.py, sida_training_loop.py, the EDM2 encoder's logits).

Data-free: only prompts are needed. Two trainable roles start from the teacher: the generator ``student`` (G_θ) and
the fake score ``critic`` (f_ψ); the teacher is the pretrained score f_φ. Every step updates the critic, then the
student (1:1):

  generation  x_g = G_θ: step 1 sees add_noise(0, z, t_init) = sqrt(1 - ᾱ(t_init)) z at timestep t_init and outputs the
              x0 prediction; step i > 1 re-noises the previous x0 to τ_i with fresh noise (K steps, τ_1 = t_init).
  critic      t ~ U[t_min, t_max), x_t = noise(sg(x_g), t); the teacher's own denoising loss on the critic's output
              with guidance κ1 (eps-MSE; v-MSE · snr/(snr+1) for v-prediction), summed over pixels.
  student     x_t = noise(x_g, t); y_real = x0 of the teacher (guidance κ4), y_fake = x0 of the critic (κ2 = κ3),
              both with gradient through x_t into x_g (their weights frozen);
              L = (y_real − y_fake)·((y_real − x_g) − α (y_real − y_fake)) / w,  w = sg(mean|x_g − y_real|)
              (SiD's generator loss, normalised as SiD-LSG), summed over pixels and averaged over the batch.

Few-step (K > 1): each step draws k ~ U{1..K}, shared by the global batch, runs steps 1..k-1 without gradient and
matches the output of step k: the uniform mixture of all K intermediate outputs (Few-step SiD); one network
serves every step. Sampling with the first k of the K timesteps therefore gives a trained k-step student.

SiDA (``adversarial``): the critic's encoder is also a discriminator, with no head of its own: D(x_t) is the channel
mean of the critic's encoder output (here the family's bottleneck block), one logit per position. The critic adds
λ_D (softplus(−D(real_t)) + softplus(D(fake_t))) / 2, averaged over positions, with real latents noised by the same ε
and t as its denoising loss; the generator minimises (1 − λ) L_SiD + λ L_adv with L_adv = softplus(−clamp(D(x_t),
±10)) averaged over positions, × (C·h·w) / w: the same x_t, normaliser w and pixel-sum scale as L_SiD (λ = 0.5 in the
reference loop). The reference divides the batch-mean BCE by each sample's w; we keep each sample's own BCE.

Guidance follows the diffusers convention uncond + κ (cond − uncond) (κ = 1: none), as the SiD-LSG code does, so no
conversion is needed. ``guidance_mode`` picks the scales: "lsg" uses κ1..κ4; "zero_cfg" (Few-step SiD) runs the
teacher without CFG (κ4 = 1) and removes text from the critic (κ1 = κ2 = κ3 = 0: the empty prompt only);
"anti_cfg" runs the teacher without CFG and the critic with a negative scale (κ1 = κ2 = κ3 = anti_cfg_scale < 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distill_diffusion.adversarial import logistic_d_loss, logistic_g_loss
from distill_diffusion.errors import UserError
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
from distill_diffusion.schedule import X0_TIMESTEP_SCALING

GUIDANCE_MODES = ("lsg", "zero_cfg", "anti_cfg")


@dataclass
class SiDConfig:
    alpha: float = 1.0  # α of the generator loss: 1.2 for EDM teachers (SiD), 1.0 for Stable Diffusion (SiD-LSG)
    guidance_mode: str = "lsg"  # lsg | zero_cfg | anti_cfg (Few-step SiD's diversity-preserving variants)
    kappa1: float = 2.0  # κ1: critic's guidance while it is trained ("long" guidance); reference sets κ1..κ4 = 2
    kappa2: float = 2.0  # κ2 = κ3: critic's guidance inside the student loss (one value, as cfg_eval_fake)
    kappa4: float = 2.0  # κ4: the teacher's guidance inside the student loss
    anti_cfg_scale: float = -1.0  # guidance_mode=anti_cfg: the critic's (negative) scale κ1 = κ2 = κ3
    cond_dropout: float = 0.1  # share of critic prompts replaced by "" when the critic is guided (κ1 or κ2 != 1)
    t_min: int = 20  # t ~ U[t_min, t_max) for both losses
    t_max: int = 980
    init_timestep: int = 625  # t_init: the first generation step's timestep (SiD-LSG for SD1.5/2.1)
    num_steps: int = 1  # K generation steps
    timesteps: list[int] | None = None  # τ_1 > ... > τ_K; None: τ_i = floor(t_init (1 - (i-1)/K)) (reference)
    # SiDA: the critic's encoder doubles as a discriminator against real latents (needs data.images or the
    # embedded dataset). Generator: (1 − λ) L_SiD + λ L_adv, λ = adv_generator_weight (the reference: 0.5 / 0.5);
    # the critic adds adv_critic_weight × D's logistic loss (the reference weights it by EDM's λ(σ); our critic's
    # ε-loss is unweighted, so one constant).
    adversarial: bool = False
    adv_generator_weight: float = 0.5
    adv_critic_weight: float = 1.0
    max_grad_value: float | None = 1.0  # element-wise gradient clip of both roles (SiD-LSG clips G at 1 under fp16,
    #                                      SiD-DiT clips both networks at 1); null: none

    def check(self) -> None:
        if self.guidance_mode not in GUIDANCE_MODES:
            raise UserError(f"method.guidance_mode={self.guidance_mode!r}: choose one of {', '.join(GUIDANCE_MODES)}")
        if self.guidance_mode == "anti_cfg" and not self.anti_cfg_scale < 0:
            raise UserError(f"method.anti_cfg_scale={self.anti_cfg_scale}: anti_cfg needs a negative scale "
                            "(diffusers convention; 0 is zero_cfg)")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise UserError(f"method.cond_dropout={self.cond_dropout}: must be in [0, 1)")
        if not 0 <= self.t_min < self.t_max <= 1000:
            raise UserError(f"method.t_min={self.t_min}, method.t_max={self.t_max}: need 0 <= t_min < t_max <= 1000")
        if not 1 <= self.init_timestep <= 999:
            raise UserError(f"method.init_timestep={self.init_timestep}: must be in [1, 999]")
        if self.num_steps < 1:
            raise UserError(f"method.num_steps={self.num_steps}: must be at least 1")
        if self.timesteps is not None:
            ts = list(self.timesteps)
            if len(ts) != self.num_steps or ts[0] != self.init_timestep:
                raise UserError(f"method.timesteps={ts}: need method.num_steps={self.num_steps} entries starting at "
                                f"method.init_timestep={self.init_timestep}")
            if any(b >= a for a, b in zip(ts, ts[1:])) or ts[-1] < 1:
                raise UserError(f"method.timesteps={ts}: must be strictly decreasing and at least 1")
        if not 0.0 <= self.adv_generator_weight <= 1.0 or self.adv_critic_weight < 0:
            raise UserError(f"method.adv_generator_weight={self.adv_generator_weight}, method.adv_critic_weight="
                            f"{self.adv_critic_weight}: need 0 <= adv_generator_weight <= 1 and adv_critic_weight >= 0")
        if self.max_grad_value is not None and self.max_grad_value <= 0:
            raise UserError(f"method.max_grad_value={self.max_grad_value}: must be positive (or null for none)")

    def generation_timesteps(self) -> list[int]:
        """τ_1..τ_K: the explicit list, or the reference's linear spacing t_init (1 - i/K), i = 0..K-1."""
        if self.timesteps is not None:
            return [int(t) for t in self.timesteps]
        return [int(self.init_timestep * (1 - i / self.num_steps)) for i in range(self.num_steps)]

    def guidance_scales(self) -> tuple[float, float, float]:
        """(κ1, κ2 = κ3, κ4) in the diffusers convention for the chosen ``guidance_mode``."""
        if self.guidance_mode == "zero_cfg":
            return 0.0, 0.0, 1.0  # κ = 0 is the unconditional branch alone: a text-free critic
        if self.guidance_mode == "anti_cfg":
            return self.anti_cfg_scale, self.anti_cfg_scale, 1.0
        return self.kappa1, self.kappa2, self.kappa4


# ---- the paper's maths as pure functions ----------------------------------------------------------------------------


def sid_weight(x_g: Tensor, y_real: Tensor) -> Tensor:
    """w = mean|x_g − y_real| per sample, without gradient, clamped at 1e-5 (SiD-LSG). (B, ...) -> (B,)."""
    return (x_g.detach().float() - y_real.detach().float()).abs().flatten(1).mean(1).clamp(min=1e-5)


def sid_generator_loss(x_g: Tensor, y_real: Tensor, y_fake: Tensor, alpha: float) -> Tensor:
    """Per-sample SiD generator loss (B,), summed over pixels (normalised as SiD-LSG):

    (y_real − y_fake)·((y_real − x_g) − α (y_real − y_fake)) / w,  w = sg(mean|x_g − y_real|).
    With α = 1 it is (y_real − y_fake)·(y_fake − x_g) / w. Zero whenever y_fake = y_real.
    x_g, y_real, y_fake: (B, C, h, w).
    """
    d = y_real.float() - y_fake.float()
    per_pixel = d * ((y_real.float() - x_g.float()) - alpha * d)
    return per_pixel.flatten(1).sum(1) / sid_weight(x_g, y_real)


def sid_student_objective(x_g: Tensor, y_real: Tensor, y_fake: Tensor, alpha: float) -> tuple[Tensor, int]:
    """The batch's generator loss: :func:`sid_generator_loss` averaged over the samples whose x_g, y_real and y_fake
    are all finite (the reference drops non-finite samples); returns (loss, number of samples dropped)."""
    finite = torch.stack([torch.isfinite(v.detach()).flatten(1).all(1) for v in (x_g, y_real, y_fake)]).all(0)
    # Zero the dropped rows before the loss: torch.where passes them an exact zero gradient, whereas a NaN inside
    # the product would turn their zero gradient into NaN (0 · NaN).
    keep = finite.reshape(-1, *[1] * (x_g.ndim - 1))
    x_g, y_real, y_fake = (torch.where(keep, v, torch.zeros_like(v)) for v in (x_g, y_real, y_fake))
    per_sample = sid_generator_loss(x_g, y_real, y_fake, alpha)
    return masked_mean(torch.where(finite, per_sample, torch.full_like(per_sample, float("nan"))))


def encoder_logits(h: Tensor) -> Tensor:
    """SiDA's discriminator on the critic's encoder output: its channel mean, one logit per position (no trained
    head). (B, C, h, w) -> (B, 1, h, w); flow transformers' token maps work the same way."""
    return h.float().mean(1, keepdim=True)


def sida_generator_adv_loss(logits_fake: Tensor, x_g: Tensor, y_real: Tensor) -> Tensor:
    """Per-sample adversarial generator loss (B,) of SiDA: softplus(−clamp(D, −10, 10)) = BCE(D, 1) averaged over
    positions, times the pixel count of x_g and divided by SiD's w = sg(mean|x_g − y_real|), so that it shares
    L_SiD's scale (a sum over pixels, normalised by w). logits_fake (B, 1, h, w); x_g, y_real (B, C, H, W)."""
    bce = logistic_g_loss(logits_fake.float().clamp(-10, 10)).flatten(1).mean(1)
    return bce * x_g[0].numel() / sid_weight(x_g, y_real)


def sida_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Per-sample logistic discriminator loss (B,) of SiDA: (BCE(D(real), 1) + BCE(D(fake), 0)) / 2, each averaged
    over positions: (softplus(−D_real) + softplus(D_fake)) / 2. logits (B, 1, h, w)."""
    return logistic_d_loss(logits_real.float(), logits_fake.float()).flatten(1).mean(1) / 2


def critic_loss(pred: Tensor, target: Tensor, t: Tensor, schedule: Any) -> Tensor:
    """Per-sample denoising loss of the fake score (B,), summed over pixels as the reference does.

    eps (or x0) targets: plain squared error; v-prediction: squared error weighted by snr/(snr+1) (= ᾱ_t), the
    reference's weighting for v-prediction teachers; flow velocity: plain squared error (the flow-matching loss of
    SD3 and SiD-DiT). pred, target: (B, C, h, w); t: (B,); ``schedule`` the teacher's (VP or flow).
    """
    err = (pred.float() - target.float()) ** 2
    if schedule.prediction_type == "v_prediction":
        snr = schedule.snr(t)
        err = err * (snr / (snr + 1)).reshape(-1, *[1] * (err.ndim - 1))
    return err.flatten(1).sum(1)




def draw_mixture_step(rng: Any, num_steps: int) -> int:
    """k ~ U{1..K}, one value for the whole global batch at this step (the uniform mixture of Few-step SiD)."""
    return rng.shared_randint(1, num_steps + 1, "sid-k") if num_steps > 1 else 1


class SiD(Method):
    Config = SiDConfig

    @classmethod
    def spec(cls, cfg: SiDConfig, student: str) -> MethodSpec:
        # Data-free (prompts alone) unless SiDA's discriminator needs real latents; the student's gradient passes
        # through the teacher's and the critic's forwards, so gradient checkpointing is not safe.
        return MethodSpec(roles=("student", "critic"), needs_images=cfg.adversarial, checkpointing_safe=False)

    def __init__(self, cfg: SiDConfig, run: RunContext, models: Any) -> None:
        super().__init__(cfg, run, models)
        self.gen_t = cfg.generation_timesteps()
        self.kappa1, self.kappa2, self.kappa4 = cfg.guidance_scales()
        # The critic learns the empty prompt too whenever it is evaluated with guidance (reference: κ1 or κ2 != 1);
        # a text-free critic (κ1 = 0) never sees the prompts, so there is nothing to drop.
        guided = self.kappa1 != 1 or self.kappa2 != 1
        self.dropout = cfg.cond_dropout if (guided and self.kappa1 != 0) else 0.0

    def updates(self, step: int) -> tuple[str, ...]:
        return ("critic", "student")  # 1:1, the fake score first (SiD's algorithm and reference loop)

    def optimizer_settings(self, role: str) -> OptimizerSettings:
        # Adam β = (0, 0.999); ε 1e-8, or 1e-6 under fp16 (SiD-LSG sid_train.py).
        fp16 = self.run.mixed_precision == "fp16"
        return OptimizerSettings(betas=(0.0, 0.999), eps=1e-6 if fp16 else None,
                                 max_grad_value=self.cfg.max_grad_value)

    # ---- pieces ----------------------------------------------------------------------------------------------------
    def _t(self, value: int | Tensor, b: int) -> Tensor:
        dev = self.models.device
        if isinstance(value, Tensor):
            return value.to(dev, torch.long)
        return torch.full((b,), int(value), dtype=torch.long, device=dev)

    def guided(self, role: str, xt: Tensor, t: Tensor, cond: Cond, uncond: Cond, scale: float) -> Tensor:
        """Raw output of ``role`` at (x_t, t) with guidance κ = ``scale``: uncond + κ (cond − uncond).

        κ = 1 runs only the conditional forward, κ = 0 only the unconditional one; otherwise both run as one batched
        forward (``Models.net_out``'s CFG). xt (B, C, h, w), t (B,). Returns (B, C, h, w).
        """
        if scale == 0:
            return self.models.net_out(role, xt, t, uncond)
        return self.models.net_out(role, xt, t, cond, uncond, guidance=scale)

    def x0(self, role: str, xt: Tensor, t: Tensor, cond: Cond, uncond: Cond, scale: float) -> Tensor:
        """x0 of ``role`` with guidance ``scale`` (CFG on the raw output; x0 is linear in it at fixed x_t, t)."""
        out = self.guided(role, xt, t, cond, uncond, scale)
        return self.models.schedule.split(out, xt, t)[0]

    def generate(self, batch: Batch, k: int, tag: str, grad: bool) -> tuple[Tensor, Tensor]:
        """The student's output after k of its K steps, and the input of step k.

        Steps 1..k-1 run without gradient; step k runs with gradient when ``grad``. Step 1's input is
        add_noise(0, z, τ_1) = sqrt(1 − ᾱ(τ_1)) z on VP teachers (SiD-LSG) and z itself on flow teachers (their
        pipelines start from unit noise: ``schedule.start_latent``); step i re-noises the previous x0 to τ_i with
        fresh keyed noise, as LCMScheduler does between sampling steps. Returns (x_g, x_in), both (B, C, h, w).
        """
        m, b = self.models, len(batch)
        noises = [batch.rng.randn(m.latent_shape, f"sid-{tag}-noise-{i}") for i in range(k)]
        x_in = m.schedule.start_latent(noises[0], self._t(self.gen_t[0], b))
        with torch.no_grad():
            x_in = m.schedule.rollout(lambda x, t: m.predict("student", x, t, batch.cond)[0], x_in,
                                      self.gen_t, noises[1:])
        with torch.set_grad_enabled(grad):
            x0 = m.predict("student", x_in, self._t(self.gen_t[k - 1], b), batch.cond)[0]
        return x0, x_in

    def discriminate(self, xt: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """SiDA's D(x_t, t): :func:`encoder_logits` of the critic's bottleneck at (x_t, t) with the prompts (the
        forward stops there). Its weights learn only in the critic's turn (the loop freezes them otherwise).
        Returns (B, 1, h, w)."""
        m = self.models
        return encoder_logits(m.features("critic", xt, t, cond, [m.bottleneck_block()], stop=True)[0])

    # ---- the two losses --------------------------------------------------------------------------------------------
    def loss(self, role: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        k = draw_mixture_step(batch.rng, self.cfg.num_steps)  # shared by both roles at this step (reference)
        if role == "critic":
            return self._critic_loss(batch, k)
        if role == "student":
            return self._student_loss(batch, k)
        raise KeyError(role)

    def _critic_loss(self, batch: Batch, k: int) -> tuple[Tensor, dict[str, float]]:
        m, c = self.models, self.cfg
        with torch.no_grad():
            x_g, _ = self.generate(batch, k, "critic", grad=False)
        t = batch.rng.randint(c.t_min, c.t_max, "sid-critic-t").to(m.device)
        eps = batch.rng.randn(m.latent_shape, "sid-critic-eps")
        xt = m.schedule.add_noise(x_g, eps, t)
        cond = batch.cond
        dropped = 0.0
        if self.dropout > 0:
            keep = batch.rng.rand("sid-critic-drop") >= self.dropout  # keyed per sample (reference: 10% -> "")
            cond = batch.cond.where(keep, batch.uncond)
            dropped = float((~keep).float().mean())
        pred = self.guided("critic", xt, t, cond, batch.uncond, self.kappa1)
        target = m.denoising_target(x_g, eps, t)
        per_sample = critic_loss(pred, target, t, m.schedule)
        logs = {"k": float(k), "dropped_prompts": dropped}
        if c.adversarial:
            per_sample = per_sample + c.adv_critic_weight * self._discriminator_term(batch, xt, eps, t, logs)
        loss, bad = masked_mean(per_sample)
        return loss, {"nonfinite": float(bad), **logs}

    def _discriminator_term(self, batch: Batch, xt: Tensor, eps: Tensor, t: Tensor,
                            logs: dict[str, float]) -> Tensor:
        """SiDA's D loss per sample (B,): the critic's own noised sample ``xt`` against real latents noised with the
        same ε and t (the reference's shared n and σ); logs adv_d, p_real, p_fake."""
        if batch.latents is None:
            raise UserError("method.adversarial=true needs real images (data.images or data.dataset)")
        m = self.models
        d_real = self.discriminate(m.schedule.add_noise(batch.latents, eps, t), t, batch.cond)
        d_fake = self.discriminate(xt, t, batch.cond)
        d = sida_discriminator_loss(d_real, d_fake)
        logs.update(adv_d=float(d.detach().mean()), p_real=float(torch.sigmoid(d_real.detach()).mean()),
                    p_fake=float(torch.sigmoid(d_fake.detach()).mean()))
        return d

    def _student_loss(self, batch: Batch, k: int) -> tuple[Tensor, dict[str, float]]:
        m, c = self.models, self.cfg
        x_g, _ = self.generate(batch, k, "student", grad=True)
        t = batch.rng.randint(c.t_min, c.t_max, "sid-student-t").to(m.device)
        eps = batch.rng.randn(m.latent_shape, "sid-student-eps")
        xt = m.schedule.add_noise(x_g, eps, t)
        # No torch.no_grad here: the loss's gradient reaches x_g through x_t in both networks; their weights are
        # frozen by the loop (trainable("student")), so only the student's tensors receive gradient.
        y_real = self.x0("teacher", xt, t, batch.cond, batch.uncond, self.kappa4)
        y_fake = self.x0("critic", xt, t, batch.cond, batch.uncond, self.kappa2)
        loss, bad = sid_student_objective(x_g, y_real, y_fake, c.alpha)
        with torch.no_grad():
            gap = float((y_real - y_fake).abs().mean())
            w = float(sid_weight(x_g, y_real).mean())
        logs = {"nonfinite": float(bad), "k": float(k), "score_gap": gap, "w": w}
        if c.adversarial:
            adv, _ = masked_mean(sida_generator_adv_loss(self.discriminate(xt, t, batch.cond), x_g, y_real))
            logs["adv_g"] = float(adv.detach())
            loss = (1 - c.adv_generator_weight) * loss + c.adv_generator_weight * adv
        return loss, logs

    # ---- export ----------------------------------------------------------------------------------------------------
    def sampling(self) -> SamplingSpec:
        """k-step sampling for k = 1..K with the first k training timesteps (each is a trained mixture component).

        LCMScheduler with explicit timesteps (flow: FlowMatchLCMScheduler with their sigmas): x0 from the student's
        output, fresh noise to the next timestep; the initial latent is the generator's first input
        (``schedule.start_latent``: sqrt(1 − ᾱ(t_init)) N(0, I) on VP, N(0, I) on flow); no CFG at sampling.
        """
        m = self.models
        scale = m.schedule.start_scale(self.gen_t[0])
        vp = {"timestep_scaling": X0_TIMESTEP_SCALING, "clip_sample": False}
        steps = {k: m.schedule.sampler("consistency", self.gen_t[:k], init_noise_scale=scale, vp_kwargs=vp)
                 for k in range(1, self.cfg.num_steps + 1)}
        return SamplingSpec(steps=steps, default_steps=self.cfg.num_steps)
