"""DMD2: the DM gradient's closed form and masking, TTUR, the GAN head on the critic's bottleneck, backward
simulation, losses falling on a fixed batch, sampling with the trained timesteps, and runs through train.py;
Decoupled DMD's terms, schedules and bit-identity when off; Phased DMD's subinterval score-matching target."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distill_diffusion import artifacts, schedule
from distill_diffusion.config import method_object, parse_config
from distill_diffusion.errors import UserError
from distill_diffusion.matching import dm_gradient, dm_loss, subinterval_pair
from distill_diffusion.method import StepRNG
from methods import METHODS
from methods.dmd2 import (
    DMD2,
    DMD2Config,
    GANHead,
    ca_term,
    discriminator_gan_loss,
    dm_term,
    generator_gan_loss,
    initial_latent,
)
from tests.helpers import build, default_only, fixed_batch, optimizers, update

ROOT = Path(__file__).resolve().parent.parent
FOUR = [999, 749, 499, 249]


# ---- closed forms -------------------------------------------------------------------------------------------------


def test_dm_gradient_closed_form_and_paper_form():
    x0 = torch.ones(2, 1, 2, 2)
    x0_real = torch.zeros(2, 1, 2, 2)
    x0_fake = torch.tensor([2.0, -1.0]).reshape(2, 1, 1, 1).expand(2, 1, 2, 2)
    x0_real[1] = 0.5  # mean|x0 - x0_real| = 0.5 for sample 1
    g = dm_gradient(x0, x0_real, x0_fake)
    torch.testing.assert_close(g[0], torch.full((1, 2, 2), 2.0))  # (2 - 0) / 1
    torch.testing.assert_close(g[1], torch.full((1, 2, 2), -3.0))  # (-1 - 0.5) / 0.5
    # the reference's form: (p_real - p_fake) / mean|p_real| with p = x0 - x̂
    a, b, c = torch.randn(3, 3, 4, 5, 5).unbind(0)
    p_real, p_fake = a - b, a - c
    torch.testing.assert_close(dm_gradient(a, b, c), (p_real - p_fake) / p_real.abs().mean((1, 2, 3), keepdim=True))


def test_dm_loss_gradient_wrt_x0_is_the_normalised_score_difference():
    torch.manual_seed(0)
    B, C, H, W = 3, 2, 3, 3
    x0 = torch.randn(B, C, H, W, requires_grad=True)
    x0_real, x0_fake = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    per, ok = dm_loss(x0, x0_real, x0_fake)
    loss = per.sum() / ok.sum()
    loss.backward()
    denom = (x0.detach() - x0_real).abs().mean((1, 2, 3), keepdim=True)
    expected = (x0_fake - x0_real) / denom / (B * C * H * W)  # ∂/∂x ½ mean (x - sg(x - ∇))² = ∇ / N
    torch.testing.assert_close(x0.grad, expected)
    # and the value is ½ mean ∇² per sample
    torch.testing.assert_close(per.detach(), 0.5 * (((x0_fake - x0_real) / denom) ** 2).mean((1, 2, 3)))
    assert ok.all()


def test_dm_loss_masks_non_finite_samples():
    torch.manual_seed(1)
    x0 = torch.randn(3, 2, 2, 2, requires_grad=True)
    x0_real, x0_fake = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    x0_real[0, 0, 0, 0] = float("nan")  # a non-finite teacher score
    x0_real[2] = x0.detach()[2]  # a zero normaliser: ∇ = inf
    per, ok = dm_loss(x0, x0_real, x0_fake)
    assert ok.tolist() == [False, True, False]
    assert torch.isfinite(per).all() and per[0] == 0 and per[2] == 0
    (per.sum() / ok.sum()).backward()
    assert torch.equal(x0.grad[0], torch.zeros_like(x0.grad[0]))
    assert torch.equal(x0.grad[2], torch.zeros_like(x0.grad[2]))
    good = dm_gradient(x0.detach()[1:2], x0_real[1:2], x0_fake[1:2])[0] / 8  # one valid sample of 8 entries
    torch.testing.assert_close(x0.grad[1], good)


def test_gan_losses_closed_form():
    z = torch.zeros(2)
    torch.testing.assert_close(generator_gan_loss(z), torch.full((2,), 2.0).log())
    torch.testing.assert_close(discriminator_gan_loss(z, z), 2 * torch.full((2,), 2.0).log())
    real, fake = torch.tensor([1.5]), torch.tensor([-0.5])
    expected = -torch.log(1 - torch.sigmoid(fake)) - torch.log(torch.sigmoid(real))  # DMD2 eq. 4
    torch.testing.assert_close(discriminator_gan_loss(real, fake), expected)
    torch.testing.assert_close(generator_gan_loss(fake), -torch.log(torch.sigmoid(fake)))


def test_config_checks():
    for bad in (dict(real_guidance_scale=0.5), dict(min_step_ratio=0.5, max_step_ratio=0.4),
                dict(student_update_every=0), dict(conditioning_timesteps=[249, 999]),
                dict(conditioning_timesteps=[]), dict(critic_lr=0.0), dict(gan_discriminator_weight=-1.0)):
        with pytest.raises(UserError):
            DMD2Config(**bad).check()
    DMD2Config(conditioning_timesteps=FOUR).check()


# ---- Decoupled DMD (Liu et al., arXiv:2511.22677) ------------------------------------------------------------------


def test_decoupled_terms_closed_form_and_sum_to_the_dmd2_gradient():
    x, c, u, f = (torch.full((1, 1, 2, 2), v) for v in (1.0, 0.0, 0.5, 2.0))
    # guided x̂ = 0.5 + 3 (0 - 0.5) = -1, normaliser mean|1 - (-1)| = 2
    torch.testing.assert_close(dm_term(x, c, u, f, 3.0), torch.full_like(x, 1.0))  # (2 - 0) / 2
    torch.testing.assert_close(ca_term(x, c, u, 3.0), torch.full_like(x, 0.25))  # (0.5 - 0) / 2
    torch.manual_seed(0)
    x, c, u, f = torch.randn(4, 3, 2, 5, 5).double().unbind(0)
    w = 1.75
    guided = schedule.cfg(u, c, w)
    # eq. 6: DM + (α − 1) CA at one noise level is DMD2's gradient with the guided real score
    torch.testing.assert_close(dm_term(x, c, u, f, w) + (w - 1) * ca_term(x, c, u, w), dm_gradient(x, guided, f))
    # signs against scores s = (α x̂ − x_τ) / σ²: term × normaliser × α / σ² = −(s_real_cond − s_fake_cond), and
    # −(s_real_cond − s_real_uncond) for CA
    xt, a, sig = torch.randn(3, 2, 5, 5).double(), 0.6, 0.8
    score = lambda x0: (a * x0 - xt) / sig**2  # noqa: E731
    norm = (x - guided).abs().mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(dm_term(x, c, u, f, w) * norm * a / sig**2, -(score(c) - score(f)))
    torch.testing.assert_close(ca_term(x, c, u, w) * norm * a / sig**2, -(score(c) - score(u)))


class _SharedNoiseRNG(StepRNG):
    """The CA term draws the DM term's timesteps and noise: the two schedules set equal, sample for sample."""

    def _gen(self, *key):
        tag = key[0].replace("dmd2-ca-", "dmd2-dm-") if isinstance(key[0], str) else key[0]
        return super()._gen(tag, *key[1:])


def _grad_wrt_x(method: DMD2, batch, x: torch.Tensor) -> torch.Tensor:
    """∂(generator loss)/∂x at a fixed generator output x (the generator itself is bypassed)."""
    x = x.clone().requires_grad_(True)
    method.generate = lambda batch, grad: (x, 0)
    loss, _ = method.loss("student", batch, 0)
    loss.backward()
    return x.grad


@pytest.mark.parametrize("ca_weight", [None, 2.0])
def test_decoupled_gradient_equals_dmd2_with_equal_schedules(ca_weight, tiny_teachers):
    """With τ_CA = τ_DM (same draws), weights (1, α − 1) give DMD2's gradient wrt the generator's output x; another CA
    weight changes it by exactly (ca_weight − (α − 1)) × the CA term."""
    w = 3.0
    models, plain, tcfg = build(DMD2, tiny_teachers["sd"], "lora", real_guidance_scale=w, gan=False)
    with torch.no_grad():
        for p in models.parameters("critic"):
            p.add_(0.05 * torch.randn_like(p))
    dec_cfg = DMD2Config(real_guidance_scale=w, gan=False, decoupled=True, ca_schedule="full", dm_schedule="full",
                         ca_weight=ca_weight)
    decoupled = DMD2(dec_cfg, tcfg, models)
    b = fixed_batch(models, b=3)
    batch = type(b)(b.latents, b.cond, b.uncond, b.prompts, _SharedNoiseRNG(0, 0, torch.arange(3)))
    x = torch.randn(3, *models.latent_shape)
    g_plain, g_dec = _grad_wrt_x(plain, batch, x), _grad_wrt_x(decoupled, batch, x)
    assert g_plain.abs().sum() > 0
    if ca_weight is None:
        torch.testing.assert_close(g_dec, g_plain, rtol=1e-4, atol=1e-7)
        return
    t = batch.rng.randint(decoupled.min_step, decoupled.max_step + 1, "dmd2-dm-t")
    xt = models.schedule.add_noise(x, batch.rng.randn(models.latent_shape, "dmd2-dm-noise"), t)
    c, u = decoupled.real_pair(xt, t, batch)
    extra = (ca_weight - (w - 1)) * ca_term(x, c, u, w) / x[0].numel()  # the proxy loss's gradient is ∇ / (C·H·W)
    torch.testing.assert_close(g_dec, g_plain + extra / len(x), rtol=1e-4, atol=1e-7)


def _teacher_timesteps(method: DMD2, models, batch) -> list[torch.Tensor]:
    """The timesteps of every teacher call the generator loss makes (each a batched cond + uncond pass)."""
    calls = []

    def recording(role, xt, t, *a, _net_out=models.net_out, **k):
        if role == "teacher":
            calls.append(t[: len(t) // 2].clone())
        return _net_out(role, xt, t, *a, **k)

    models.net_out = recording
    try:
        with torch.no_grad():
            method.loss("student", batch, 0)
    finally:
        del models.net_out
    return calls


def test_decoupled_schedules_and_zero_weights(tiny_teachers):
    """Decoupled-Hybrid (the paper's ④): τ_DM over [min_step, max_step], τ_CA below each step's input timestep t_k;
    a zero weight skips its term's forwards."""
    models, method, tcfg = build(DMD2, tiny_teachers["sd"], "lora", conditioning_timesteps=FOUR, gan=False,
                                 decoupled=True)
    seen_k = set()
    for step in range(40):
        batch = fixed_batch(models, b=4, step=step)
        k = method.pick_step(batch)
        t_dm, t_ca = _teacher_timesteps(method, models, batch)
        assert t_dm.min() >= method.min_step and t_dm.max() <= method.max_step
        assert t_ca.min() >= method.min_step and t_ca.max() < min(FOUR[k], method.max_step + 1)
        seen_k.add(k)
        if len(seen_k) == 4:
            break
    assert seen_k == {0, 1, 2, 3}
    for kw, n in ((dict(ca_weight=0.0), 1), (dict(dm_weight=0.0), 1), (dict(real_guidance_scale=1.0), 1)):
        m = DMD2(DMD2Config(gan=False, decoupled=True, **kw), tcfg, models)  # the same networks, another config
        assert len(_teacher_timesteps(m, models, fixed_batch(models, b=2))) == n, kw


def test_decoupled_config_checks(tiny_teachers):
    for bad in (dict(ca_schedule="above"), dict(dm_schedule="constrainted"), dict(dm_weight=-1.0),
                dict(ca_weight=-0.5)):
        with pytest.raises(UserError):
            DMD2Config(**bad).check()
    models, _, tcfg = build(DMD2, tiny_teachers["sd"], "lora", gan=False, decoupled=True, ca_schedule="full",
                            conditioning_timesteps=[999, 15])
    with pytest.raises(UserError, match="no room"):  # a last step at t = 15 leaves nothing in [min_step=20, 15)
        DMD2(DMD2Config(gan=False, decoupled=True, conditioning_timesteps=[999, 15]), tcfg, models)


@pytest.mark.slow
def test_decoupled_on_flow_teachers(flow_teachers):
    """Refused on a guidance-embedded teacher (no CFG to decouple); one student loss and backward on SD3."""
    with pytest.raises(UserError, match="guidance-embedded"):
        build(DMD2, flow_teachers["flux_dev"], "lora", gan=False, decoupled=True)
    models, method, _ = build(DMD2, flow_teachers["sd3"], "lora", gan=False, decoupled=True,
                              conditioning_timesteps=[999, 500])
    with models.trainable("student"), models.role("student"):
        loss, logs = method.loss("student", fixed_batch(models, b=2), 0)
        loss.backward()
    assert torch.isfinite(loss) and {"t_dm", "t_ca", "grad_dm", "grad_ca"} <= set(logs)


@pytest.mark.slow
def test_decoupled_off_is_bit_identical(tiny_teachers, image_folder, tmp_path):
    """A short fixed-seed run with method.decoupled absent and explicitly false: the same losses, the same weights."""
    from safetensors.torch import load_file

    from distill_diffusion.loop import train

    def run(out: Path, *extra: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
        cfg, _ = parse_config(["--method", "dmd2", f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}",
                               "max_steps=4", "batch_size=2", f"output_dir={out}", "report_to=none",
                               "validation_seeds=0", "logging_steps=1", "checkpointing_steps=4", "lora_rank=4",
                               "method.student_update_every=2", "method.conditioning_timesteps=[999,499]", *extra],
                              METHODS)
        train(cfg, DMD2)
        rows = [{k: v for k, v in json.loads(line).items() if k != "sec_per_step"}
                for line in (out / "metrics.jsonl").read_text().splitlines()]
        return rows, load_file(str(out / "checkpoints" / "checkpoint-4" / "trainable.safetensors"))

    rows_a, w_a = run(tmp_path / "absent")
    rows_b, w_b = run(tmp_path / "off", "method.decoupled=false")
    assert rows_a == rows_b and any("student/dm" in r for r in rows_a)
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)


# ---- Phased DMD's subinterval target (Fan et al., arXiv:2510.27684, sec. 2.2.2) ----------------------------------


def test_subinterval_target_is_the_papers_eq_11_to_13():
    torch.manual_seed(0)
    x_s, eps, psi = torch.randn(3, 4, 3).double().unbind(0)
    a_s, s_s, a_t, s_t = (torch.tensor(v).double() for v in (0.8, 0.6, 0.5, 0.9))  # any α, σ with SNR falling
    a_ts = a_t / a_s
    s_ts = (s_t**2 - a_ts**2 * s_s**2).sqrt()
    x_t, x0_t, eps_t = subinterval_pair(x_s, eps, a_s, s_s, a_t, s_t)
    torch.testing.assert_close(x_t, a_ts * x_s + s_ts * eps)  # eq. 2
    torch.testing.assert_close(x0_t, x_s / a_s - a_t * s_s**2 / (a_s**2 * s_ts) * eps)  # eq. 12 (x-prediction)
    torch.testing.assert_close(eps_t - x0_t, (a_s**2 * s_t + a_t * s_s**2) / (a_s**2 * s_ts) * eps - x_s / a_s)  # 11
    torch.testing.assert_close(a_t * x0_t + s_t * eps_t, x_t)  # a decomposition of x_t: any target follows
    # eq. 13: clamp(1/σ²_{t|s}) ‖σ_{t|s} ψ − σ_{t|s} (eq. 11's target)‖² = min(1, 10 σ²_{t|s}) ‖ψ − target‖²
    target = eps_t - x0_t
    lhs = torch.clamp(1 / s_ts**2, 0, 10) * ((s_ts * psi - s_ts * target) ** 2).sum()
    torch.testing.assert_close(lhs, torch.clamp(10 * s_ts**2, max=1) * ((psi - target) ** 2).sum())


@pytest.mark.parametrize("s, t", [(100, 400), (300, 900), (600, 610), (-1, 500)])
def test_subinterval_target_regresses_to_the_true_posterior_mean(s, t):
    """Gaussian data x0 ~ N(0, c²): the least-squares fit of a target on x_t is Cov(target, x_t) / Var(x_t) · x_t,
    computed here from the joint Gaussian of (x_s, ε); it must equal the true E[x0 | x_t] = α_t c² / (α_t² c² + σ_t²)
    x_t of the full-interval objective (and E[ε | x_t] likewise). Treating x_s as the clean sample does not."""
    ac = torch.linspace(0.9991, 0.0047, 1000).double()  # an ᾱ from clean to noisy, as a VP schedule's
    a_s, s_s = schedule.alpha_sigma(torch.tensor([s]), ac)
    a_t, s_t = schedule.alpha_sigma(torch.tensor([t]), ac)
    c2 = 0.7
    v_s = a_s**2 * c2 + s_s**2  # Var(x_s)
    # x_t = A x_s + B ε and each target = P x_s + Q ε are linear: read A, B, P, Q off unit inputs
    one, zero = torch.ones(1).double(), torch.zeros(1).double()
    coef = [subinterval_pair(xs, e, a_s, s_s, a_t, s_t) for xs, e in ((one, zero), (zero, one))]
    (A, P0, Pe), (B, Q0, Qe) = coef
    var_t = A**2 * v_s + B**2

    def fitted(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
        return (P * A * v_s + Q * B) / var_t

    denom = a_t**2 * c2 + s_t**2
    torch.testing.assert_close(fitted(P0, Q0), a_t * c2 / denom)
    torch.testing.assert_close(fitted(Pe, Qe), s_t / denom)
    if s >= 0:  # the biased target ‖ψ − (ε − x_s)‖² of the paper's Fig. 2c: x_s taken for x0
        assert not torch.allclose(fitted(one, zero), a_t * c2 / denom, rtol=1e-3)


# ---- schedule, scores, head, simulation on tiny teachers ----------------------------------------------------------


def test_update_schedule(tiny_teachers):
    _, method, _ = build(DMD2, tiny_teachers["sd"], "lora", student_update_every=5, gan=False)
    plan = [method.updates(s) for s in range(15)]
    assert plan[4] == plan[9] == plan[14] == ("student", "critic")  # the generator first within a step
    assert all(plan[s] == ("critic",) for s in range(15) if (s + 1) % 5)
    assert method.optimizer_settings("student").learning_rate == 1e-5
    assert method.optimizer_settings("critic").weight_decay == 0.01


def test_real_score_is_diffusers_cfg_and_fake_is_unguided(tiny_teachers):
    models, method, _ = build(DMD2, tiny_teachers["sd"], "lora", real_guidance_scale=3.0, gan=False)
    with torch.no_grad():
        for p in models.parameters("critic"):
            p.add_(0.05 * torch.randn_like(p))
    batch = fixed_batch(models, b=2)
    xt, t = torch.randn(2, *models.latent_shape), torch.tensor([100, 700])
    real, fake = method.scores(xt, t, batch)
    with torch.no_grad():
        c, _ = models.predict("teacher", xt, t, batch.cond)
        u, _ = models.predict("teacher", xt, t, batch.uncond)
        f, _ = models.predict("critic", xt, t, batch.cond)
    torch.testing.assert_close(real, u + 3.0 * (c - u), atol=1e-5, rtol=1e-4)  # x0 is affine in the output
    torch.testing.assert_close(fake, f)


@pytest.mark.parametrize("spatial,downs", [(8, 1), (32, 3), (4, 0), (2, 0), (6, 1)])
def test_head_depth_follows_bottleneck_size(spatial, downs):
    head = GANHead(8, spatial, groups=4)
    assert head.num_downsamples == downs  # SD1.5 8x8 -> 4x4 -> 1, SDXL 32x32 -> 16 -> 8 -> 4 -> 1
    assert head(torch.randn(3, 8, spatial, spatial)).shape == (3,)


@pytest.mark.parametrize("teacher", default_only(["sd", "sdxl"], {"sd"}))
def test_bottleneck_is_the_mid_block_output(teacher, tiny_teachers):
    models, method, _ = build(DMD2, tiny_teachers[teacher], "lora")
    with torch.no_grad():
        for p in models.parameters("critic"):
            p.add_(0.05 * torch.randn_like(p))
    b = 3
    cond = models.encode_prompts(["a red square", "a blue circle", "x"])
    xt, t = torch.randn(b, *models.latent_shape), torch.tensor([5, 500, 990])
    captured = {}
    hook = models.denoiser.mid_block.register_forward_hook(lambda mod, inp, out: captured.update(mid=out))
    names = [models.bottleneck_block()]
    with torch.no_grad():
        with models.role("critic") as net:
            models.family.forward(net, xt, t, cond)
        hook.remove()
        h = models.features("critic", xt, t, cond, names, stop=True)[0]
    torch.testing.assert_close(h, captured["mid"])
    c, s = models.feature_shapes(names)[0]
    assert h.shape == (b, c, s, s) and (c, s) == (16, 4)
    with torch.no_grad():
        assert method.discriminate(xt, t, cond, train=True).shape == (b,)
        # the critic's adapter is in use (not the teacher's weights)
        assert not torch.allclose(models.features("teacher", xt, t, cond, names, stop=True)[0], h)


def test_backward_simulation_matches_manual_unroll(tiny_teachers):
    models, method, _ = build(DMD2, tiny_teachers["sd"], "lora", conditioning_timesteps=FOUR, gan=False)
    with torch.no_grad():
        for p in models.parameters("student"):
            p.add_(0.05 * torch.randn_like(p))
    step = next(s for s in range(100) if fixed_batch(models, b=2, step=s).rng.shared_randint(0, 4, "dmd2-k") == 3)
    batch = fixed_batch(models, b=2, step=step)
    assert method.pick_step(batch) == 3
    ac = models.schedule.alphas_cumprod
    n = [batch.rng.randn(models.latent_shape, f"dmd2-gen-noise-{j}") for j in range(4)]
    x = n[0]
    with torch.no_grad():
        for j in range(3):
            x0, _ = models.predict("student", x, torch.full((2,), FOUR[j]), batch.cond)
            a = ac[FOUR[j + 1]]
            x = a.sqrt() * x0 + (1 - a).sqrt() * n[j + 1]  # re-noise to the next conditioning timestep
    torch.testing.assert_close(method.generator_input(batch, 3), x)
    assert torch.equal(method.generator_input(batch, 0), n[0])  # step 0: pure noise


def test_generator_turn_leaves_critic_and_head_without_gradient(tiny_teachers):
    models, method, _ = build(DMD2, tiny_teachers["sd"], "lora", gan_generator_weight=1.0)
    batch = fixed_batch(models, b=2)
    with models.trainable("student"), models.role("student"):
        loss, logs = method.loss("student", batch, 0)
        loss.backward()
    assert "gan_g" in logs
    assert all(p.grad is None for p in models.parameters("critic") + list(method.head.parameters()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.parameters("student"))
    with models.trainable("critic"), models.role("critic"):
        loss, logs = method.loss("critic", batch, 0)
        loss.backward()
    assert {"denoise", "gan_d", "p_real", "p_fake"} <= set(logs)
    assert all(p.grad is not None for p in method.head.parameters())


def test_generator_gradient_is_the_same_with_checkpointing(tiny_teachers):
    """The generator's GAN term backpropagates through the critic; with a checkpointed shared base it must not be
    recomputed under the student's adapter."""
    models, method, _ = build(DMD2, tiny_teachers["sd"], "lora", gan_generator_weight=1.0)
    with torch.no_grad():
        for p in models.parameters("critic"):
            p.add_(0.05 * torch.randn_like(p))
    batch = fixed_batch(models, b=2)

    def grads() -> list[torch.Tensor]:
        with models.trainable("student"), models.role("student"):
            loss, _ = method.loss("student", batch, 0)
            loss.backward()
        out = [p.grad.clone() for p in models.parameters("student")]
        for p in models.parameters("student"):
            p.grad = None
        return out

    plain = grads()
    models.set_gradient_checkpointing(True)
    ckpt = grads()
    models.set_gradient_checkpointing(False)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# ---- training signal -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gan", default_only([False, True], {True}))
def test_generator_loss_falls_on_fixed_batch(gan, tiny_teachers):
    models, method, _ = build(DMD2, tiny_teachers["sd"], "lora", real_guidance_scale=3.0, gan=gan,
                              gan_generator_weight=1.0)
    opt = optimizers(models, method, lr=1e-2)["student"]
    batch = fixed_batch(models, b=2)
    losses = [update(models, method, "student", batch, opt, step=0) for _ in range(12)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.85 * first, (first, last)


def test_critic_loss_falls_on_fixed_batch(tiny_teachers):
    models, method, _ = build(DMD2, tiny_teachers["sd"], "lora")
    opt = optimizers(models, method, lr=1e-2)["critic"]
    batch = fixed_batch(models, b=2)
    losses = [update(models, method, "critic", batch, opt, step=0) for _ in range(12)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.85 * first, (first, last)


def test_critic_timesteps_follow_the_configured_density(tiny_teachers):
    """The critic's denoising loss draws t from the configured density (uniform keeps the old integer draw)."""
    seen = {}
    for density in ("uniform", "logit_normal"):
        models, method, _ = build(DMD2, tiny_teachers["sd"], "lora", gan=False, critic_t_density=density)
        batch = fixed_batch(models, b=2)
        calls = []

        def recording(role, xt, t, *a, _net_out=models.net_out, _calls=calls, **k):
            _calls.append((role, t.clone()))
            return _net_out(role, xt, t, *a, **k)

        models.net_out = recording
        loss, _ = method.loss("critic", batch, step=0)
        assert torch.isfinite(loss)
        seen[density] = next(t for role, t in calls if role == "critic")
    want = schedule.density_timesteps(batch.rng, "dmd2-critic-t", 1000, "logit_normal")
    assert torch.equal(seen["logit_normal"], want) and not torch.equal(seen["uniform"], want)
    with pytest.raises(UserError, match="critic_t_density"):
        DMD2Config(critic_t_density="lognormal").check()


def test_frozen_generator_cannot_pass(tiny_teachers):
    """The same check fails for a generator that never trains: the tests above can fail."""
    models, method, _ = build(DMD2, tiny_teachers["sd"], "lora", real_guidance_scale=3.0, gan=False)
    opt = torch.optim.Adam(models.parameters("student"), lr=0.0)
    batch = fixed_batch(models, b=2)
    losses = [update(models, method, "student", batch, opt, step=0) for _ in range(4)]
    assert not losses[-1] < 0.85 * losses[0]


# ---- sampling ------------------------------------------------------------------------------------------------------


def test_load_student_samples_with_the_trained_timesteps(tiny_teachers, tmp_path):
    """sampling.json records only the trained count; the pipeline visits exactly those timesteps and reproduces the
    training-time generator chain (x0, then re-noise with fresh noise to the next conditioning timestep)."""
    ts = [999, 600, 250]
    models, method, _ = build(DMD2, tiny_teachers["sd"], "lora", conditioning_timesteps=ts, gan=False)
    with torch.no_grad():
        for p in models.parameters("student"):
            p.add_(0.05 * torch.randn_like(p))
    artifacts.save_run(models, "dmd2", method.sampling(), tmp_path)
    info = json.loads((tmp_path / "sampling.json").read_text())
    assert list(info["steps"]) == ["3"] and info["steps"]["3"]["timesteps"] == ts
    assert info["steps"]["3"]["scheduler"] == "LCMScheduler" and info["steps"]["3"]["guidance_scale"] == 1.0

    pipe = artifacts.load_student(tmp_path)
    prompt = "a red square"
    g = torch.Generator().manual_seed(7)
    lat = pipe(prompt, timesteps=ts, guidance_scale=1.0, generator=g, output_type="latent", height=16,
               width=16).images
    assert [int(t) for t in pipe.scheduler.timesteps] == ts
    # the same chain by hand, drawing noise from the same generator in the pipeline's order
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn((1, *models.latent_shape), generator=g) for _ in ts]
    cond = models.encode_prompts([prompt])
    with torch.no_grad():
        x = schedule.student_rollout(lambda x, t: models.predict("student", x, t, cond)[0], noises[0], ts,
                                     noises[1:3], models.schedule.alphas_cumprod)
        x0, _ = models.predict("student", x, torch.tensor([ts[-1]]), cond)
    torch.testing.assert_close(lat, x0, atol=1e-4, rtol=1e-4)


def test_scaled_initial_noise_in_training_and_sampling(tiny_teachers, tmp_path):
    """With scaled_init_noise the first input is add_noise(0, z, t_0) = sqrt(1 − ᾱ_{t_0}) z in training (every k's
    backward simulation starts there) and the exported pipeline draws the same initial latent; off, it is z."""
    ts = [625, 312]
    models, method, _ = build(DMD2, tiny_teachers["sd"], "lora", conditioning_timesteps=ts, gan=False,
                              scaled_init_noise=True)
    ac = models.schedule.alphas_cumprod
    scale = (1 - ac[625]).sqrt()
    z = torch.randn(2, 1, 2, 2)
    torch.testing.assert_close(initial_latent(z, models.schedule.noise_level(625), True), scale * z)
    assert torch.equal(initial_latent(z, models.schedule.noise_level(625), False), z)
    step = next(s for s in range(100) if fixed_batch(models, b=2, step=s).rng.shared_randint(0, 2, "dmd2-k") == 0)
    batch = fixed_batch(models, b=2, step=step)
    n0 = batch.rng.randn(models.latent_shape, "dmd2-gen-noise-0")
    torch.testing.assert_close(method.generator_input(batch, 0), scale * n0)
    assert method.sampling().steps[2].init_noise_scale == pytest.approx(float(scale))
    # the exported pipeline reproduces the training chain from the scaled start
    with torch.no_grad():
        for p in models.parameters("student"):
            p.add_(0.05 * torch.randn_like(p))
    artifacts.save_run(models, "dmd2", method.sampling(), tmp_path)
    pipe = artifacts.load_student(tmp_path)
    prompt = "a red square"
    g = torch.Generator().manual_seed(3)
    lat = pipe(prompt, timesteps=ts, guidance_scale=1.0, generator=g, output_type="latent", height=16,
               width=16).images
    g = torch.Generator().manual_seed(3)
    noises = [torch.randn((1, *models.latent_shape), generator=g) for _ in ts]
    noises[0] = scale * noises[0]
    cond = models.encode_prompts([prompt])
    with torch.no_grad():
        x = schedule.student_rollout(lambda x, t: models.predict("student", x, t, cond)[0], noises[0], ts,
                                     noises[1:2], ac)
        x0, _ = models.predict("student", x, torch.tensor([ts[-1]]), cond)
    torch.testing.assert_close(lat, x0, atol=1e-4, rtol=1e-4)
    # the paper's default: unit noise at t = 999, initial latent scale 1
    _, plain, _ = build(DMD2, tiny_teachers["sd"], "lora", gan=False)
    assert plain.sampling().steps[1].init_noise_scale == 1.0


# ---- runs ----------------------------------------------------------------------------------------------------------


def _train(args: list[str]) -> subprocess.CompletedProcess:
    # one thread: the tiny UNet gains nothing from more, and a shared machine makes extra threads very slow
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)


@pytest.mark.slow
def test_train_py_run_and_second_stage(tiny_teachers, image_folder, tmp_path):
    """A four-step GAN run through train.py, then a second stage that starts the student and critic from it."""
    first = tmp_path / "first"
    r = _train(["--method", "dmd2", f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}", "max_steps=4",
                "batch_size=2", "lora_rank=4", "lora_alpha=4", f"output_dir={first}", "report_to=none",
                "method.student_update_every=2", "method.conditioning_timesteps=[999,749,499,249]",
                "method.student_lr=1e-3", "method.critic_lr=1e-3", "validation_seeds=0"])
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((first / "sampling.json").read_text())
    assert info["method"] == "dmd2" and info["steps"]["4"]["timesteps"] == FOUR and info["default_steps"] == 4
    rows = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert "student/loss" not in rows[0] and "critic/gan_d" in rows[0]  # step 0: the critic alone
    assert "student/gan_g" in rows[-1] and all(torch.isfinite(torch.tensor(v)) for v in rows[-1].values())
    pipe = artifacts.load_student(first)
    imgs, _ = artifacts.sample(pipe, ["a red square"], seeds=[0], output_type="np")
    assert imgs.shape == (1, 16, 16, 3)

    # second stage: init_from + init_critic (the loop's set-up, in-process to compare tensors)
    from safetensors.torch import load_file

    from distill_diffusion.loop import build_trainer, check_start

    args = ["--method", "dmd2", f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}", "lora_rank=4",
            "lora_alpha=4", f"init_from={first}", "method.init_critic=true",
            "method.conditioning_timesteps=[999,749,499,249]", f"output_dir={tmp_path / 'second'}"]
    cfg, _ = parse_config(args, METHODS)
    spec = DMD2.spec(method_object(cfg), "lora")
    assert spec.init_roles == ("student", "critic")
    tr = build_trainer(cfg, spec, DMD2, SimpleNamespace(device=torch.device("cpu")))
    saved = load_file(str(first / "checkpoints" / "checkpoint-4" / "trainable.safetensors"))
    for n, p in tr.models.named_parameters("critic"):
        assert torch.equal(p.detach(), saved[f"critic/{n}"])
    for k, v in tr.extras["critic"].state_dict().items():
        assert torch.equal(v, saved[f"extra/critic/{k}"])
    cfg_no_run, _ = parse_config(args[:5] + ["method.init_critic=true"], METHODS)
    with pytest.raises(UserError, match="init_from"):
        check_start(cfg_no_run, DMD2.spec(method_object(cfg_no_run), "lora"), tmp_path / "third")


@pytest.mark.parametrize("teacher", default_only(["v", "sdxl"], {"sdxl"}))
def test_train_in_process_v_and_sdxl(teacher, tiny_teachers, image_folder, tmp_path):
    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train
    from methods import METHODS

    cfg, _ = parse_config(["--method", "dmd2", f"teacher={tiny_teachers[teacher]}", f"data.images={image_folder}",
                           "max_steps=2", "batch_size=2", f"output_dir={tmp_path}", "report_to=none",
                           "validation_seeds=0", "method.student_update_every=1"], METHODS)
    train(cfg, DMD2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["student/loss"])) for r in rows)
    pipe = artifacts.load_student(tmp_path)
    imgs, _ = artifacts.sample(pipe, ["a red square"], seeds=[0], output_type="np")
    assert imgs.shape == (1, 16, 16, 3)



def test_warmup_counts_iterations_not_updates(tiny_teachers, image_folder, tmp_path):
    """lr warm-up per iteration (DMD2's reference steps both schedulers every iteration): at TTUR 2 the generator,
    which updates every second iteration, has the critic's learning rate, not the rate of half as many updates."""
    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train
    from methods import METHODS

    cfg, _ = parse_config(["--method", "dmd2", f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}",
                           "max_steps=4", "batch_size=2", f"output_dir={tmp_path}", "report_to=none",
                           "validation_seeds=0", "method.student_update_every=2", "lr_warmup_steps=4",
                           "logging_steps=1", "lora_rank=2", "method.student_lr=1e-3",
                           "method.critic_lr=1e-3"], METHODS)
    train(cfg, DMD2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # logged after the iteration's schedule step: iteration i leaves the factor min(1, (i + 2) / 4)
    assert [r["critic/lr"] for r in rows] == pytest.approx([1e-3 * min(1, (i + 2) / 4) for i in range(4)])
    assert [r["student/lr"] for r in rows if "student/lr" in r] == pytest.approx([1e-3 * 3 / 4, 1e-3])


# ---- Phased DMD (Fan et al., arXiv:2510.27684) ---------------------------------------------------------------------


def test_phase_schedule_and_critic_restarts(tiny_teachers):
    """Phases are equal consecutive blocks of the run; the critic restarts at each phase start after the first."""
    from methods.dmd2 import phase_of

    assert [phase_of(s, 1000, 4) for s in (0, 249, 250, 499, 500, 999, 1200)] == [0, 0, 1, 1, 2, 3, 3]
    assert [phase_of(s, 10, 3) for s in range(10)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    models, method, tcfg = build(DMD2, tiny_teachers["sd"], "lora", conditioning_timesteps=FOUR, gan=False,
                                 phased=True)
    starts = [s for s in range(tcfg.max_steps) if method.resets(s)]
    assert starts == [250, 500, 750] and method.resets(250) == ("critic",)
    method.cfg.phase_critic_reset = False
    assert not any(method.resets(s) for s in range(tcfg.max_steps))
    for bad in (dict(phased=True, decoupled=True), dict(subinterval_weight_cap=0.0)):
        with pytest.raises(UserError):
            DMD2Config(**bad).check()


def test_subinterval_variance_and_weight_closed_form():
    from distill_diffusion.matching import subinterval_sigma2, subinterval_weight

    a_s, s_s, a_t, s_t = (torch.tensor(v) for v in (0.8, 0.6, 0.6, 0.8))
    # σ²_{t|s} = 0.64 − (0.6 / 0.8)² 0.36 = 0.4375; eq. 13: min(1, 10 × 0.4375) = 1, and 10 × 0.01 = 0.1
    torch.testing.assert_close(subinterval_sigma2(a_s, s_s, a_t, s_t), torch.tensor(0.4375))
    torch.testing.assert_close(subinterval_weight(torch.tensor([0.4375, 0.01])), torch.tensor([1.0, 0.1]))


def _phased(tiny_teachers, student="lora"):
    models, method, tcfg = build(DMD2, tiny_teachers["sd"], student, conditioning_timesteps=FOUR, gan=False,
                                 phased=True)
    with torch.no_grad():
        for p in models.parameters("student") + models.parameters("critic"):
            p.add_(0.05 * torch.randn_like(p))
    return models, method, tcfg


def test_phased_output_is_the_deterministic_rollout(tiny_teachers):
    """Phase k: DDIM jumps (x̂0, ε̂) -> t_{j+1} for j < k, then step k's jump to t_{k+1} (its x0 in the last)."""
    torch.manual_seed(0)
    models, method, _ = _phased(tiny_teachers)
    batch = fixed_batch(models, b=2)
    ac = models.schedule.alphas_cumprod
    x = batch.rng.randn(models.latent_shape, "dmd2-gen-noise-0")
    with torch.no_grad():
        for k in range(4):
            x0, eps = models.predict("student", x, torch.full((2,), FOUR[k]), batch.cond)
            x_s, x0_k, s = method.phased_output(batch, k, grad=False)
            torch.testing.assert_close(x0_k, x0)
            if k == 3:
                assert s == -1 and torch.equal(x_s, x0)
                break
            a = ac[FOUR[k + 1]]
            x = a.sqrt() * x0 + (1 - a).sqrt() * eps
            assert s == FOUR[k + 1]
            torch.testing.assert_close(x_s, x)


def test_phased_generator_gradient_is_dmd_on_the_noisy_output(tiny_teachers):
    """Phase k < K−1: ∂loss/∂x_s = (x̂_fake − x̂_real) / mean|x̂0 − x̂_real| / (B·C·H·W), both scores at x_t ~
    q(x_t | x_s) with t in (s, max_step]."""
    torch.manual_seed(1)
    models, method, _ = _phased(tiny_teachers)
    batch = fixed_batch(models, b=3)
    x_s = torch.randn(3, *models.latent_shape, requires_grad=True)
    x0 = torch.randn(3, *models.latent_shape)
    s = FOUR[2]
    method.phased_output = lambda batch, phase, grad: (x_s, x0, s)
    loss, logs = method.loss("student", batch, 500)  # step 500 of 1000: phase 2
    loss.backward()
    t = batch.rng.randint(s + 1, method.max_step + 1, "dmd2-dm-t")
    assert logs["phase"] == 2 and t.min() > s
    eps = batch.rng.randn(models.latent_shape, "dmd2-dm-noise")
    ac = models.schedule.alphas_cumprod
    a_ts = (ac[t] / ac[s]).sqrt().reshape(-1, 1, 1, 1)
    xt = a_ts * x_s.detach() + (1 - ac[t] - a_ts.flatten() ** 2 * (1 - ac[s])).sqrt().reshape(-1, 1, 1, 1) * eps
    real, fake = method.scores(xt, t, batch)
    expected = (fake - real) / (x0 - real).abs().mean((1, 2, 3), keepdim=True) / x_s[0].numel() / 3
    torch.testing.assert_close(x_s.grad, expected, rtol=1e-4, atol=1e-7)


def test_phased_critic_loss_is_eq_11_to_13(tiny_teachers):
    """Phase k < K−1: the critic regresses the subinterval target at x_t ~ q(x_t | x_s), weighted min(1, 10 σ²)."""
    torch.manual_seed(2)
    models, method, _ = _phased(tiny_teachers)
    batch = fixed_batch(models, b=3)
    with torch.no_grad():
        x_s, _, s = method.phased_output(batch, 1, grad=False)
        loss, logs = method.loss("critic", batch, 300)  # phase 1
        t = batch.rng.randint(s + 1, models.num_train_timesteps, "dmd2-critic-t")
        eps = batch.rng.randn(models.latent_shape, "dmd2-critic-noise")
        ac = models.schedule.alphas_cumprod
        a_s, s2_s, a_t, s2_t = ac[s].sqrt(), 1 - ac[s], ac[t].sqrt(), 1 - ac[t]
        var = s2_t - (a_t / a_s) ** 2 * s2_s  # eq. 2
        b = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
        xt = b(a_t / a_s) * x_s + b(var.sqrt()) * eps
        # ε target: the conditional score −ε / σ_{t|s} in place of the marginal one (eq. 11–12): ε̃ = σ_t ε / σ_{t|s}
        target = b(s2_t.sqrt() / var.sqrt()) * eps
        out = models.net_out("critic", xt, t, batch.cond)
        expected = ((10 * var).clamp(max=1) * ((out - target) ** 2).mean((1, 2, 3))).mean()
    assert logs["phase"] == 1 and t.min() > s
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


def test_gan_in_every_phase_sees_both_sides_above_the_phase_boundary(tiny_teachers):
    """gan_all_phases (phase k < K−1): D gets real latents noised to t_r and the output x_s noised through
    q(x_t | x_s) to t_f, both in (s, gan_max_timestep); the generator's term is λ_G × −log σ(D) on x_s so noised.
    Off, a middle phase has no GAN term (the default's losses, bit for bit)."""
    torch.manual_seed(3)
    models, method, _ = build(DMD2, tiny_teachers["sd"], "lora", conditioning_timesteps=FOUR, phased=True,
                              gan_all_phases=True, gan_generator_weight=0.5, gan_discriminator_weight=0.25)
    batch = fixed_batch(models, b=3)
    ac = models.schedule.alphas_cumprod
    b = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731

    def noised_from(x_s, s, t, tag):  # eq. 2 of Fan et al.: x_t = α_{t|s} x_s + σ_{t|s} ε
        a = (ac[t] / ac[s]).sqrt()
        return b(a) * x_s + b((1 - ac[t] - a ** 2 * (1 - ac[s])).sqrt()) * batch.rng.randn(models.latent_shape, tag)

    with torch.no_grad():
        x_s, _, s = method.phased_output(batch, 1, grad=False)
        loss, logs = method.loss("critic", batch, 300)  # phase 1: s = FOUR[2]
        t_r = batch.rng.randint(s + 1, 1000, "dmd2-gan-real-t")
        t_f = batch.rng.randint(s + 1, 1000, "dmd2-gan-critic-fake-t")
        x_r = models.schedule.add_noise(batch.latents, batch.rng.randn(models.latent_shape, "dmd2-gan-real-noise"),
                                        t_r)
        x_f = noised_from(x_s, s, t_f, "dmd2-gan-critic-fake-noise")
        d = discriminator_gan_loss(method.discriminate(x_r, t_r, batch.cond, True),
                                   method.discriminate(x_f, t_f, batch.cond, True)).mean()
        method.cfg.gan_all_phases = False
        plain, plain_logs = method.loss("critic", batch, 300)
        method.cfg.gan_all_phases = True
    assert s == FOUR[2] and t_r.min() > s and t_f.min() > s and "gan_d" not in plain_logs
    torch.testing.assert_close(loss, plain + 0.25 * d)
    torch.testing.assert_close(torch.tensor(logs["gan_d"]), d)

    x_s = torch.randn(3, *models.latent_shape, requires_grad=True)
    method.phased_output = lambda batch, phase, grad: (x_s, torch.zeros_like(x_s), s)
    loss, logs = method.loss("student", batch, 300)
    method.cfg.gan_all_phases = False
    plain, _ = method.loss("student", batch, 300)
    with torch.no_grad():
        t_g = batch.rng.randint(s + 1, 1000, "dmd2-gan-fake-t")
        xg = noised_from(x_s, s, t_g, "dmd2-gan-fake-noise")
        g = generator_gan_loss(method.discriminate(xg, t_g, batch.cond, False)).mean()
    assert t_g.min() > s
    torch.testing.assert_close(loss, plain + 0.5 * g)
    for bad in (dict(gan_all_phases=True), dict(gan_all_phases=True, phased=True, gan=False),
                dict(gan_all_phases=True, phased=True, conditioning_timesteps=FOUR, gan_max_timestep=FOUR[1])):
        with pytest.raises(UserError):
            DMD2Config(**bad).check()


@pytest.mark.parametrize("student", ["lora", "full"])
def test_reset_role_gives_the_teacher_back(student, tiny_teachers):
    models, _, _ = _phased(tiny_teachers, student)
    xt, t = torch.randn(2, *models.latent_shape), torch.tensor([100, 800])
    cond = models.encode_prompts(["a red square", "x"])
    with torch.no_grad():
        teacher = models.net_out("teacher", xt, t, cond)
        assert not torch.allclose(models.net_out("critic", xt, t, cond), teacher)
        student_before = models.net_out("student", xt, t, cond)
        models.reset_role("critic")
        torch.testing.assert_close(models.net_out("critic", xt, t, cond), teacher, rtol=1e-5, atol=1e-6)
        assert torch.equal(models.net_out("student", xt, t, cond), student_before)


def test_phased_run_restarts_the_critic_and_exports_the_deterministic_sampler(tiny_teachers, image_folder, tmp_path):
    from distill_diffusion import loop
    from distill_diffusion.loop import train

    restarts = []
    real_restart = loop.restart_role

    def spy(tr, role):
        restarts.append((role, len(tr.optimizers[role].state)))
        real_restart(tr, role)
        assert len(tr.optimizers[role].state) == 0

    cfg, _ = parse_config(["--method", "dmd2", f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}",
                           "max_steps=4", "batch_size=2", f"output_dir={tmp_path}", "report_to=none",
                           "validation_seeds=0", "method.student_update_every=1", "method.phased=true",
                           "method.conditioning_timesteps=[999,499]", "method.gan=false", "lora_rank=2",
                           "logging_steps=1"], METHODS)
    loop.restart_role = spy
    try:
        train(cfg, DMD2)
    finally:
        loop.restart_role = real_restart
    assert restarts and restarts[0][0] == "critic" and restarts[0][1] > 0 and len(restarts) == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("student/phase") for r in rows] == [0.0, 0.0, 1.0, 1.0]
    info = json.loads((tmp_path / "sampling.json").read_text())["steps"]["2"]
    assert info["scheduler"] == "TCDScheduler" and info["timesteps"] == [999, 499]


def test_phased_on_a_flow_teacher(flow_teachers, tmp_path):
    """SD3: every phase's student and critic losses are finite with gradient; the rollout is the flow Euler jump;
    the export is FlowMatchEulerDiscreteScheduler at the trained sigmas."""
    models, method, tcfg = build(DMD2, flow_teachers["sd3"], "lora", gan=False, phased=True,
                                 conditioning_timesteps=[999, 600, 300])
    batch = fixed_batch(models, b=2)
    for step in (0, 400, 900):  # phases 0, 1, 2 of 1000
        for role in ("student", "critic"):
            with models.trainable(role), models.role(role):
                loss, logs = method.loss(role, batch, step)
                loss.backward()
            assert torch.isfinite(loss) and logs["phase"] == step * 3 // 1000
    with torch.no_grad():
        x_s, x0, s = method.phased_output(batch, 1, grad=False)
        x1 = method.phased_output(batch, 0, grad=False)[0]
        _, eps = models.predict("student", x1, torch.full((2,), 600), batch.cond)
        sig = models.schedule.sigmas[s]
        torch.testing.assert_close(x_s, (1 - sig) * x0 + sig * eps)  # x_σ = (1 − σ) x0 + σ ε at σ_s
    assert method.sampling().steps[3].scheduler == "FlowMatchEulerDiscreteScheduler"
