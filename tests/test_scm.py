"""sCM: TrigFlow conversions against diffusers' schedulers and SANA-Sprint's wrapper, the JVP against a finite
difference, the loss against an independent computation, rCM's two roles."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchLCMScheduler, SCMScheduler

from distill_diffusion import trigflow
from distill_diffusion.schedule import FlowSchedule, VPSchedule
from methods.scm import SCM, trig_sampling_times, warmup_ratio
from tests.helpers import build, fixed_batch, optimizers, update


def _sd_betas() -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_vp_trig_time_is_the_schedules_noise_level():
    """x̂ at t = arctan(σ_i / α_i) is DDPMScheduler.add_noise at timestep i, and the continuous network timestep of
    that trig time is i itself."""
    sch = _sd_betas()
    vp = VPSchedule(sch.alphas_cumprod, "epsilon")
    i = torch.tensor([0, 1, 250, 500, 998, 999])
    a = sch.alphas_cumprod[i]
    t = torch.atan2((1 - a).sqrt(), a.sqrt())
    x0, eps = torch.randn(6, 4, 2, 2), torch.randn(6, 4, 2, 2)
    torch.testing.assert_close(trigflow.add_noise(x0, eps, t), sch.add_noise(x0, eps, i), rtol=1e-5, atol=1e-5)
    c_in, net_t, alpha, sigma = trigflow.native_time(vp, t)
    torch.testing.assert_close(net_t, i.float(), rtol=0, atol=2e-3)
    torch.testing.assert_close(c_in, torch.ones(6))
    assert trigflow.trig_range(vp)[1] == pytest.approx(float(t[-1]), abs=1e-6)
    assert [trigflow.nearest_timestep(vp, float(x)) for x in t] == i.tolist()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_velocity_is_cos_eps_minus_sin_x0(prediction_type):
    """F from any VP parameterisation equals cos t ε − sin t x0 of the (x0, ε) that produced x̂ (v-prediction: F = v)."""
    t = torch.tensor([0.3, 0.9, 1.4])
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    x = trigflow.add_noise(x0, eps, t)
    c, s = torch.cos(t).reshape(-1, 1, 1, 1), torch.sin(t).reshape(-1, 1, 1, 1)
    out = {"epsilon": eps, "v_prediction": c * eps - s * x0, "sample": x0}[prediction_type]
    F = trigflow.velocity(*trigflow.split_native(out, x, torch.cos(t), torch.sin(t), prediction_type), t)
    torch.testing.assert_close(F, c * eps - s * x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trigflow.consistency_x0(x, F, t), x0, rtol=1e-4, atol=1e-4)


def test_flow_velocity_matches_sana_sprints_wrapper():
    """The flow teacher read as TrigFlow equals SANA-Sprint's training-free transformation (its SanaTrigFlow:
    input x̂ · sqrt(s² + (1 − s)²) at s = sin/(sin + cos), output ((1 − 2s) x_s + (1 − 2s + 2s²) v) / sqrt(...))."""
    sched = FlowSchedule(torch.linspace(0.001, 1, 1000))
    t = torch.tensor([0.05, 0.7, 1.2, math.pi / 2])
    x_hat, v = torch.randn(4, 4, 3, 3), torch.randn(4, 4, 3, 3)
    c_in, net_t, a, s = trigflow.native_time(sched, t)
    s_ref = (torch.sin(t) / (torch.cos(t) + torch.sin(t))).reshape(-1, 1, 1, 1)
    norm = (s_ref**2 + (1 - s_ref) ** 2).sqrt()
    x_s = x_hat * norm
    torch.testing.assert_close(x_hat * c_in.reshape(-1, 1, 1, 1), x_s)
    torch.testing.assert_close(net_t, s_ref.flatten() * 1000)
    ref = ((1 - 2 * s_ref) * x_s + (1 - 2 * s_ref + 2 * s_ref**2) * v) / norm
    F = trigflow.velocity(*trigflow.split_native(v, x_s, a, s, "flow"), t)
    torch.testing.assert_close(F, ref, rtol=1e-5, atol=1e-5)


def test_consistency_sampling_equals_scm_scheduler():
    """Two steps of the exported sampler (FlowMatchLCMScheduler on the native velocity network at σ = s(t)) and of
    diffusers' SCMScheduler on the same network read as TrigFlow give the same image from the same noise."""
    torch.manual_seed(0)
    w = torch.randn(4, 4)

    def v_net(x_s, sig):  # any deterministic velocity network
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w, x_s)) * (1 + sig.reshape(-1, 1, 1, 1))

    times = trig_sampling_times(2, 1.3)
    sigmas = [math.sin(t) / (math.sin(t) + math.cos(t)) for t in times]
    z0 = torch.randn(2, 4, 3, 3)

    lcm = FlowMatchLCMScheduler(shift=1.0, use_dynamic_shifting=False)
    lcm.set_timesteps(sigmas=sigmas)
    gen, x = torch.Generator().manual_seed(1), z0.clone()
    for i, ts in enumerate(lcm.timesteps):
        x = lcm.step(v_net(x, torch.full((2,), sigmas[i])), ts, x, generator=gen).prev_sample

    flow = FlowSchedule(torch.linspace(0.001, 1, 1000))
    scm = SCMScheduler(sigma_data=1.0)
    scm.set_timesteps(2, max_timesteps=times[0], intermediate_timesteps=times[1])
    gen, y = torch.Generator().manual_seed(1), z0.clone()
    for ts in scm.timesteps[:-1]:
        t = torch.full((2,), float(ts))
        c_in, _, a, s = trigflow.native_time(flow, t)
        x_s = y * c_in.reshape(-1, 1, 1, 1)
        F = trigflow.velocity(*trigflow.split_native(v_net(x_s, s), x_s, a, s, "flow"), t)
        out = scm.step(F, ts, y, generator=gen)
        torch.testing.assert_close(out.pred_original_sample, trigflow.consistency_x0(y, F, t), rtol=1e-5, atol=1e-5)
        y = out.prev_sample
    torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)


def test_loss_pieces_closed_form():
    """The tangent, its normalisation and the loss's gradient at F_θ = F⁻: −(2/D) e^{−w} g / (σ_d tan t)."""
    t = torch.tensor([0.4, 1.1])
    F_m, F_t, J, x = (torch.randn(2, 3, 2, 2) for _ in range(4))
    g = trigflow.scm_tangent(F_m, F_t, J, x, t, 0.5, 0.5)
    c, s = torch.cos(t).reshape(-1, 1, 1, 1), torch.sin(t).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(g, -c * c * 0.5 * (F_m - F_t) - 0.5 * (c * s * 0.5 * x + 0.5 * J))
    gn = trigflow.normalize_tangent(g, 0.1)
    torch.testing.assert_close(gn.flatten(1).norm(dim=1), g.flatten(1).norm(dim=1) / (g.flatten(1).norm(dim=1) + 0.1))
    F_theta = F_m.clone().requires_grad_(True)
    w = torch.tensor([0.3, -0.2])
    trigflow.scm_loss(F_theta, F_m, gn, t, w, 0.5).sum().backward()
    expect = -2 / 12 * torch.exp(-w).reshape(-1, 1, 1, 1) * gn / (0.5 * torch.tan(t)).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(F_theta.grad, expect)
    assert warmup_ratio(0, 10) == 0 and warmup_ratio(5, 10) == 0.5 and warmup_ratio(50, 10) == 1
    assert warmup_ratio(0, 0) == 1


@pytest.mark.parametrize("teacher", ["sd", "sd3"])
def test_jvp_matches_a_finite_difference(teacher, tiny_teachers, flow_teachers):
    """torch.func.jvp through the student (LoRA on a UNet or an MMDiT) equals a central difference in trig time."""
    path = tiny_teachers["sd"] if teacher == "sd" else flow_teachers["sd3"]
    models, method, _ = build(SCM, path, "lora")
    with torch.no_grad():  # move the student off the teacher so the derivative is its own
        for _n, p in models.named_parameters("student"):
            p.add_(0.05 * torch.randn_like(p))
    batch = fixed_batch(models, b=2)
    t = torch.tensor([0.6, 1.2])
    x_hat = trigflow.add_noise(batch.latents, torch.randn_like(batch.latents), t)
    F_t = torch.randn_like(x_hat)
    auto = method.tangent_jvp(x_hat, t, F_t, batch)
    method.cfg.jvp = "finite_difference"  # at the default step, 1e-4
    fd = method.tangent_jvp(x_hat, t, F_t, batch)
    assert auto.abs().mean() > 1e-3
    torch.testing.assert_close(auto, fd, rtol=2e-2, atol=2e-3 * float(auto.abs().max()))


def test_scm_loss_equals_an_independent_computation(flow_teachers):
    """The student's loss on a fixed batch (SD3 teacher, LoRA) against the formula computed here from the raw
    transformer with SANA-Sprint's wrapper, an explicit CFG and a finite-difference tangent of that wrapper."""
    models, method, _ = build(SCM, flow_teachers["sd3"], "lora", tangent_warmup_steps=4, guidance_scale=3.0,
                              jvp="finite_difference")
    with torch.no_grad():
        method.weight.linear.bias.fill_(0.25)
    batch = fixed_batch(models, b=3)
    step = 2
    loss, _ = method.loss("student", batch, step)

    # independent: same keyed draws, the diffusers transformer called directly
    t = torch.atan(torch.exp(-0.8 + 1.6 * batch.rng.randn((), "scm-tau")) / 0.5).clamp(*trigflow.trig_range(
        models.schedule))
    x_hat = torch.cos(t).reshape(-1, 1, 1, 1) * batch.latents + torch.sin(t).reshape(-1, 1, 1, 1) * batch.rng.randn(
        models.latent_shape, "scm-eps")

    def F(tt, x, cond, role="teacher"):
        s = (torch.sin(tt) / (torch.sin(tt) + torch.cos(tt))).reshape(-1, 1, 1, 1)
        norm = (s**2 + (1 - s) ** 2).sqrt()
        with models.role(role) as net:
            v = net(hidden_states=x * norm, timestep=s.flatten() * 1000, encoder_hidden_states=cond.prompt_embeds,
                    pooled_projections=cond.pooled).sample
        return ((1 - 2 * s) * x * norm + (1 - 2 * s + 2 * s**2) * v) / norm

    with torch.no_grad():
        F_c, F_u = F(t, x_hat, batch.cond), F(t, x_hat, batch.uncond)
        F_T = F_u + 3.0 * (F_c - F_u)
        F_theta = F(t, x_hat, batch.cond, "student")
        h = 1e-4
        dF = (F(t + h, x_hat + h * F_T, batch.cond, "student").clone() -
              F(t - h, x_hat - h * F_T, batch.cond, "student")) / (2 * h)
    c, s = torch.cos(t).reshape(-1, 1, 1, 1), torch.sin(t).reshape(-1, 1, 1, 1)
    r = step / 4
    g = -c * c * (0.5 * F_theta - 0.5 * F_T) - r * (c * s * 0.5 * x_hat + 0.5 * c * s * dF)
    g = g / (g.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) + 0.1)
    weight = 1 / (0.5 * torch.tan(t))
    ref = ((weight.reshape(-1, 1, 1, 1) / math.exp(0.25)) * g**2 + 0.25).mean()  # F_θ − F⁻ = 0 in value
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("student", ["lora", "full"])
def test_rcm_roles_train_their_own_tensors(student, flow_teachers):
    """With the score regulariser: the critic learns on student samples; the student's step moves only the student
    (and its adaptive weight); both losses are finite."""
    models, method, _ = build(SCM, flow_teachers["sd3"], student, dmd_weight=1.0, dmd_max_steps=2,
                              student_update_every=2, tangent_warmup_steps=0)
    assert models.roles == ("student", "critic") and method.updates(0) == ("critic",)
    assert method.updates(1) == ("student", "critic")
    opts = optimizers(models, method)

    def params(role):
        return {n: p.detach().clone() for n, p in models.named_parameters(role)}

    before = {r: params(r) for r in ("student", "critic")}
    batch = fixed_batch(models)
    assert math.isfinite(update(models, method, "critic", batch, opts["critic"], 1))
    assert all(torch.equal(v, params("student")[k]) for k, v in before["student"].items()), "critic moved the student"
    assert any(not torch.equal(v, params("critic")[k]) for k, v in before["critic"].items())
    w0 = method.weight.linear.bias.clone()
    mid = params("critic")
    assert math.isfinite(update(models, method, "student", batch, opts["student"], 1))
    assert any(not torch.equal(v, params("student")[k]) for k, v in before["student"].items())
    assert all(torch.equal(v, params("critic")[k]) for k, v in mid.items()), "the student's step moved the critic"
    assert not torch.equal(w0, method.weight.linear.bias), "the adaptive weight did not learn"


@pytest.mark.parametrize("teacher,largest", [("sd3", 0.0), ("sd3", 0.5), ("sd", 0.5)])
def test_ladd_terms_equal_an_independent_computation(teacher, largest, tiny_teachers, flow_teachers):
    """SANA-Sprint's LADD term: heads on the frozen teacher's features (a headless critic role without rCM); the
    student's loss adds λ × −D(x̂0 noised to t_D), x̂0 = cos t x̂ − sin t F_θ its own prediction (at the sCM input,
    or at a fresh time set to π/2 with probability ``gan_largest_time_prob``); the heads' loss is the hinge on real
    latents and that x̂0, both noised to the same t_D; the heads' step moves only the heads, the student's step only
    the student."""
    path = flow_teachers["sd3"] if teacher == "sd3" else tiny_teachers["sd"]
    models, method, _ = build(SCM, path, "lora", gan_weight=0.5, tangent_warmup_steps=0, jvp="finite_difference",
                              gan_largest_time_prob=largest)
    assert models.roles == ("student", "critic") and models.headless == frozenset({"critic"})
    assert method.updates(0) == ("student", "critic") and models.parameters("critic") == []
    batch = fixed_batch(models, b=3)
    m, rng = models, batch.rng
    c = method.cfg
    t_d = trigflow.nearest_timesteps(m.schedule, torch.atan(torch.exp(-0.6 + 1.0 * rng.randn((), "scm-gan-tau")) / 0.5))
    names = m.feature_blocks(True)

    def D(x0, tag):
        x = m.schedule.add_noise(x0, rng.randn(m.latent_shape, tag), t_d)
        with torch.no_grad():
            return method.disc(m.features("teacher", x, t_d, batch.cond, names, False))

    lo, hi = trigflow.trig_range(m.schedule)
    if largest:
        t = torch.atan(torch.exp(-0.8 + 1.6 * rng.randn((), "scm-gan-t")) / 0.5).clamp(lo, hi)
        t = torch.where(rng.rand("scm-gan-largest") < largest, hi, t)
        assert 0 < int((t == hi).sum()) < 3 or teacher != "sd3"  # these draws put one or two samples at π/2
        x_hat = trigflow.add_noise(batch.latents, rng.randn(m.latent_shape, "scm-gan-eps"), t)
    else:
        t = torch.atan(torch.exp(-0.8 + 1.6 * rng.randn((), "scm-tau")) / 0.5).clamp(lo, hi)
        x_hat = trigflow.add_noise(batch.latents, rng.randn(m.latent_shape, "scm-eps"), t)
    with torch.no_grad():
        x0 = trigflow.consistency_x0(x_hat, method.velocity("student", x_hat, t, batch), t)
        scm, _, _ = method._scm_loss(batch, 0)
        fake, real = D(x0, "scm-gan-fake-noise"), D(batch.latents, "scm-gan-real-noise")
        d_ref = torch.stack([(torch.relu(1 + f).flatten(1).mean(1) + torch.relu(1 - r).flatten(1).mean(1))
                             for f, r in zip(fake, real)]).mean(0).mean()
        g_ref = torch.stack([-f.flatten(1).mean(1) for f in fake]).mean(0).mean()
        g_loss, logs = method.loss("student", batch, 0)
        d_loss, dlogs = method.loss("critic", batch, 0)
    torch.testing.assert_close(g_loss, scm + c.gan_weight * g_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_loss, d_ref, rtol=1e-5, atol=1e-6)
    assert logs["adv_g"] == pytest.approx(float(g_ref), rel=1e-5) and dlogs["adv_d"] == pytest.approx(float(d_ref))

    opts = optimizers(models, method)
    heads = [p.detach().clone() for p in method.disc.parameters()]
    student = [p.detach().clone() for p in models.parameters("student")]
    assert math.isfinite(update(models, method, "critic", batch, opts["critic"], 0))
    assert all(torch.equal(a, b) for a, b in zip(student, models.parameters("student")))
    assert any(not torch.equal(a, b) for a, b in zip(heads, method.disc.parameters()))
    heads = [p.detach().clone() for p in method.disc.parameters()]
    assert math.isfinite(update(models, method, "student", batch, opts["student"], 0))
    assert any(not torch.equal(a, b) for a, b in zip(student, models.parameters("student")))
    assert all(torch.equal(a, b) for a, b in zip(heads, method.disc.parameters())), "the student's step moved D"
