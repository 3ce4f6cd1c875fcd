"""The shared maths equals diffusers' schedulers."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

from distill_diffusion import schedule

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@pytest.fixture
def ac() -> torch.Tensor:
    return DDPMScheduler(**SD).alphas_cumprod


def test_add_noise_matches_ddpm(ac):
    s = DDPMScheduler(**SD)
    x0, eps = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(schedule.add_noise(x0, eps, t, ac), s.add_noise(x0, eps, t))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_split_prediction_roundtrip(ac, pred):
    x0, eps = torch.randn(4, 4, 3, 3), torch.randn(4, 4, 3, 3)
    t = torch.tensor([1, 250, 700, 999])
    xt = schedule.add_noise(x0, eps, t, ac)
    out = schedule.model_target(x0, eps, t, ac, pred)
    x0_hat, eps_hat = schedule.split_prediction(out, xt, t, ac, pred)
    torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(eps_hat, eps, atol=2e-3, rtol=1e-3)


def test_v_target_matches_diffusers(ac):
    s = DDPMScheduler(**SD, prediction_type="v_prediction")
    x0, eps, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([10, 800])
    torch.testing.assert_close(schedule.model_target(x0, eps, t, ac, "v_prediction"), s.get_velocity(x0, eps, t))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddim_step_matches_scheduler(ac, pred):
    s = DDIMScheduler(**SD, prediction_type=pred, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    s.set_timesteps(10)
    xt, out = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    for i, t in enumerate(s.timesteps):
        tt = torch.full((2,), int(t))
        ref = s.step(out, t, xt, eta=0.0).prev_sample
        x0, eps = schedule.split_prediction(out, xt, tt, ac, pred)
        t_prev = int(s.timesteps[i + 1]) if i + 1 < len(s.timesteps) else 0  # final_alpha_cumprod = ᾱ[0]
        ours = schedule.ddim_step(x0, eps, torch.full((2,), t_prev), ac)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_ddim_negative_prev_is_clean(ac):
    x0, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(schedule.ddim_step(x0, eps, torch.tensor([-1]), ac), x0)


def test_boundary_scalings_match_lcm_scheduler():
    s = LCMScheduler(**SD)
    for t in (0, 19, 259, 999):
        ref = s.get_scalings_for_boundary_condition_discrete(t)
        ours = schedule.boundary_scalings(torch.tensor([t]))
        assert abs(float(ours[0]) - float(ref[0])) < 1e-6 and abs(float(ours[1]) - float(ref[1])) < 1e-6


def test_lcm_scheduler_step_equals_boundary_formula(ac):
    """LCMScheduler's denoised output is c_skip x + c_out x0 with our scalings."""
    s = LCMScheduler(**SD)
    s.set_timesteps(4)
    xt, out = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    t = s.timesteps[1]
    den = s.step(out, t, xt).denoised
    x0, _ = schedule.split_prediction(out, xt, torch.tensor([int(t)]), ac, "epsilon")
    c_skip, c_out = schedule.boundary_scalings(torch.tensor([int(t)]))
    torch.testing.assert_close(den, c_skip * xt + c_out * x0, atol=1e-5, rtol=1e-5)


def test_cfg_conventions():
    u, c = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(schedule.cfg(u, c, 1.0), c)
    # paper form cond + w'(cond - uncond) equals diffusers form with w = w' + 1
    w_paper = 4.0
    torch.testing.assert_close(c + w_paper * (c - u), schedule.cfg(u, c, schedule.paper_to_diffusers_guidance(w_paper)))
    w = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(schedule.cfg(u, c, w)[1], u[1] + 3 * (c[1] - u[1]))


def test_guidance_embedding_matches_pipeline():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([3.0, 7.5])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(schedule.guidance_embedding(w, 256), ref)


def test_pseudo_huber_closed_form():
    a, b = torch.zeros(1, 4), torch.full((1, 4), 3.0)
    c = 0.5
    expected = (9 + c * c) ** 0.5 - c
    assert abs(float(schedule.pseudo_huber(a, b, c)[0]) - expected) < 1e-6


def test_solver_timesteps():
    t = schedule.solver_timesteps(1000, 50)
    assert t[0] == 19 and t[-1] == 999 and len(t) == 50


# ---- the pieces several methods share ----------------------------------------------------------------------------


def test_paper_cfg_is_the_papers_form_of_our_w():
    c, u = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    w = torch.tensor([6.0, 1.0, 2.5])  # diffusers convention; LCM's / PCM's ω = w - 1
    g = schedule.paper_cfg(u, c, w)
    torch.testing.assert_close(g[0], c[0] + 5.0 * (c[0] - u[0]))
    assert torch.equal(g[1], c[1])  # w = 1: no guidance, exactly the conditional prediction
    torch.testing.assert_close(g, schedule.cfg(u, c, w))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_guided_ddim_step_is_ddim_on_the_guided_output(ac, pred):
    """x0 and eps are affine in the network output at fixed (x_t, t), so guiding them (the papers' form) and taking
    the DDIM step is diffusers' DDIMScheduler.step on the CFG-combined output."""
    s = DDIMScheduler(**SD, prediction_type=pred, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    s.set_timesteps(50)  # k = 20: the LCM / PCM skipping-step grid
    xt, out_c, out_u = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    w = torch.tensor([3.0, 3.0])
    for t in (int(s.timesteps[0]), int(s.timesteps[25])):
        ref = s.step(schedule.cfg(out_u, out_c, 3.0), t, xt, eta=0.0).prev_sample
        tt = torch.full((2,), t)
        ours = schedule.guided_ddim_step(out_c, out_u, xt, tt, tt - 20, w, ac, pred)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
        unguided = s.step(out_c, t, xt, eta=0.0).prev_sample
        torch.testing.assert_close(schedule.guided_ddim_step(out_c, None, xt, tt, tt - 20, w, ac, pred), unguided,
                                   atol=1e-4, rtol=1e-4)


def test_renoise_composes_forward_diffusion(ac):
    x0, e1, e2 = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t1, t2 = torch.tensor([100, 400]), torch.tensor([600, 400])
    # from "before the first step" (ᾱ = 1) it is DDPMScheduler.add_noise
    torch.testing.assert_close(schedule.renoise(x0, e1, torch.tensor([-1, -1]), t2, ac),
                               DDPMScheduler(**SD).add_noise(x0, e1, t2))
    # q(x_t2 | x_t1) after q(x_t1 | x0): x0 keeps sqrt(ᾱ_t2), the two noises' variances add up to 1 - ᾱ_t2
    x2 = schedule.renoise(schedule.add_noise(x0, e1, t1, ac), e2, t1, t2, ac)
    a1, a2 = ac[t1].reshape(-1, 1, 1, 1), ac[t2].reshape(-1, 1, 1, 1)
    r = a2 / a1
    expected = a2.sqrt() * x0 + (r * (1 - a1)).sqrt() * e1 + (1 - r).sqrt() * e2
    torch.testing.assert_close(x2, expected)
    torch.testing.assert_close(r * (1 - a1) + (1 - r), 1 - a2)
    assert torch.equal(x2[1], schedule.add_noise(x0, e1, t1, ac)[1])  # t_to = t_from: unchanged


def test_consistency_distance_closed_forms():
    a, b = torch.zeros(1, 2), torch.tensor([[3.0, 4.0]])
    c = 0.001
    expected = ((9 + c * c) ** 0.5 - c + (16 + c * c) ** 0.5 - c) / 2
    assert abs(float(schedule.consistency_distance(a, b, "huber", c)[0]) - expected) < 1e-5
    assert abs(float(schedule.consistency_distance(a, b, "l2")[0]) - 12.5) < 1e-6
    assert schedule.consistency_distance(torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)).shape == (5,)


def test_student_rollout_closed_form(ac):
    out = schedule.student_rollout(lambda x, t: 2 * x, torch.ones(1, 1), [9, 5], [torch.zeros(1, 1)], ac)
    torch.testing.assert_close(out, ac[5].sqrt() * 2 * torch.ones(1, 1))
    x = torch.randn(2, 3)
    assert torch.equal(schedule.student_rollout(lambda x, t: 2 * x, x, [9], [], ac), x)  # step 0: the input itself
    with pytest.raises(ValueError):
        schedule.student_rollout(lambda x, t: x, x, [9], [torch.zeros(2, 3)], ac)


def test_student_rollout_is_lcm_scheduler_between_steps(ac):
    """LCMScheduler with c_skip ≈ 0 (timestep_scaling 1e4) takes the model's x0 and re-noises it with fresh noise
    to the next timestep: the rollout's input at step k is its sample after k steps, given the same noise."""
    ts = [999, 749, 499, 249]
    s = LCMScheduler(**SD, timestep_scaling=1.0e4, original_inference_steps=1000)
    s.set_timesteps(timesteps=ts)

    def eps_model(x: torch.Tensor) -> torch.Tensor:
        return 0.3 * x + 0.1

    x_init = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    sample = x_init
    for t in s.timesteps[:3]:
        sample = s.step(eps_model(sample), t, sample, generator=g).prev_sample
    g = torch.Generator().manual_seed(1)
    noises = [torch.randn(x_init.shape, generator=g) for _ in range(3)]

    def predict_x0(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return schedule.split_prediction(eps_model(x), x, t, ac, "epsilon")[0]

    torch.testing.assert_close(schedule.student_rollout(predict_x0, x_init, ts, noises, ac), sample,
                               atol=1e-5, rtol=1e-5)


# ---- rectified flow against FlowMatchEulerDiscreteScheduler -------------------------------------------------------

FLUX_SHIFT = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                  max_image_seq_len=4096)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_training_sigmas_are_the_schedulers_shifted_ones(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(shift=shift)
    flow = schedule.FlowSchedule.from_scheduler_config(s.config)
    torch.testing.assert_close(flow.sigmas, s.sigmas.flip(0))  # ours ascending, the scheduler's descending
    t = torch.tensor([0, 499, 999])
    torch.testing.assert_close(flow.net_timestep(t), s.timesteps.flip(0)[t])  # σ · 1000, what SD3's pipeline feeds
    torch.testing.assert_close(schedule.shift_sigmas(torch.tensor([0.5]), shift), torch.tensor([shift / (1 + shift)]))


def test_flow_dynamic_shift_is_fluxs_resolution_dependent_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    s = FlowMatchEulerDiscreteScheduler(shift=3.0, **FLUX_SHIFT)
    for seq in (256, 1024, 4096):
        mu = schedule.dynamic_shift_mu(seq)
        assert mu == pytest.approx(calculate_shift(seq, 256, 4096, 0.5, 1.15))
        flow = schedule.FlowSchedule.from_scheduler_config(s.config, mu=mu)
        base = torch.arange(1000, 0, -1, dtype=torch.float32) / 1000
        s.set_timesteps(sigmas=base.numpy(), mu=mu)
        torch.testing.assert_close(flow.sigmas, s.sigmas[:-1].flip(0), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="needs mu"):
        schedule.FlowSchedule.from_scheduler_config(s.config)


def test_flow_noising_split_and_target_match_the_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow = schedule.FlowSchedule.from_scheduler_config(s.config)
    x0, eps = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    t = torch.tensor([0, 600, 999])
    xt = flow.add_noise(x0, eps, t)
    torch.testing.assert_close(xt, s.scale_noise(x0, flow.net_timestep(t), eps))
    v = flow.target(x0, eps, t)
    torch.testing.assert_close(v, eps - x0)
    x0_hat, eps_hat = flow.split(v, xt, t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=1e-5)
    a, sg = flow.alpha_sigma(torch.tensor([-1, 999]))  # before the first step: the clean sample
    assert a.tolist() == [1.0, 0.0] and sg.tolist() == [0.0, 1.0]


def test_flow_step_is_the_euler_step_of_the_scheduler():
    """The (x0, eps) jump (DDIM's form) equals FlowMatchEulerDiscreteScheduler.step's x + (σ' − σ) v."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    base = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow = schedule.FlowSchedule.from_scheduler_config(base.config)
    t, t_to = 899, 449
    s = FlowMatchEulerDiscreteScheduler.from_config(base.config, shift=1.0)
    s.set_timesteps(sigmas=[float(flow.sigmas[t]), float(flow.sigmas[t_to])])
    xt, v = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    want = s.step(v, s.timesteps[0], xt).prev_sample
    x0, eps = flow.split(v, xt, torch.full((2,), t))
    torch.testing.assert_close(flow.step(x0, eps, torch.full((2,), t_to)), want, atol=1e-5, rtol=1e-5)


def test_flow_renoise_has_the_forward_marginal():
    """x_{t'} from x_t: mean coefficient α_{t'} on x0 and variance σ_{t'}² (the closed form of the forward process)."""
    flow = schedule.FlowSchedule(schedule.shift_sigmas(torch.arange(1, 1001) / 1000, 3.0))
    t_from, t_to = torch.tensor([100, 400]), torch.tensor([700, 400])
    x0 = torch.ones(2, 1, 1, 1)
    a_f, s_f = flow.alpha_sigma(t_from)
    a_t, s_t = flow.alpha_sigma(t_to)
    # x_t = α x0 + σ e1 and renoise = r x_t + std e2: coefficient of x0 = r α_from, variance (r σ_from)² + std²
    on_x0 = flow.renoise(a_f.reshape(-1, 1, 1, 1) * x0, torch.zeros_like(x0), t_from, t_to)
    on_e1 = flow.renoise(s_f.reshape(-1, 1, 1, 1) * x0, torch.zeros_like(x0), t_from, t_to)
    on_e2 = flow.renoise(torch.zeros_like(x0), x0, t_from, t_to)
    torch.testing.assert_close(on_x0.flatten(), a_t)
    torch.testing.assert_close((on_e1**2 + on_e2**2).flatten(), s_t**2)
    assert on_e2.flatten()[1] == 0  # t_to = t_from: nothing added


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_timestep_density_matches_diffusers(scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    want = compute_density_for_timestep_sampling(scheme, 64, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                                 generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    u = torch.randn(64, generator=g) if scheme == "logit_normal" else torch.rand(64, generator=g)
    torch.testing.assert_close(schedule.timestep_density(u, scheme), want)
    flow = schedule.FlowSchedule(torch.arange(1, 1001) / 1000)
    idx = schedule.index_of_density(want, 1000)  # diffusers indexes its descending timesteps with floor(u T)
    torch.testing.assert_close(flow.sigmas[idx], (1000 - (want * 1000).long()).float() / 1000)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_density_timesteps_draws_each_density(scheme):
    from distill_diffusion.method import StepRNG

    rng = StepRNG(seed=3, step=7, sample_ids=torch.arange(4000))
    t = schedule.density_timesteps(rng, "tag", 1000, scheme)
    assert t.dtype == torch.int64 and t.shape == (4000,) and 0 <= int(t.min()) and int(t.max()) < 1000
    if scheme == "uniform":  # the plain integer draw every VP method made before densities existed
        assert torch.equal(t, rng.randint(0, 1000, "tag"))
    elif scheme == "logit_normal":  # sigmoid(N(0, 1)) of the way from noise: the same per-sample draws, mapped
        u = rng.randn((), "tag")
        assert torch.equal(t, 999 - (torch.sigmoid(u) * 1000).long())
        assert abs(float(t.float().mean()) - 499.5) < 15 and float(t.float().std()) < 240  # centred, no uniform
    else:  # mode_scale 1.29 leans towards the middle too, less than logit-normal
        assert float(t.float().std()) < 288


def test_flow_shift_of_a_flow_sigma_dpm_solver_config():
    """SANA ships DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3): its training sigmas are
    FlowMatchEuler's at shift 3 (sigma 0.75 at the middle step), not the unshifted ones."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    dpm = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    a = schedule.FlowSchedule.from_scheduler_config(dpm.config).sigmas
    b = schedule.FlowSchedule.from_scheduler_config(euler.config).sigmas
    assert torch.equal(a, b) and abs(float(a[499]) - 0.75) < 1e-6
