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
