"""rCM's score regulariser on the consistency methods (LCM, TSCD, sCM): the student's sample is its exported
sampler's, DMD's term has its closed-form gradient, the critic learns on the student's samples, and each role's step
moves only its own tensors."""

import math

import pytest
import torch

from distill_diffusion import artifacts, score_regulariser
from distill_diffusion.errors import UserError
from distill_diffusion.matching import dm_gradient
from distill_diffusion.score_regulariser import dmd_loss
from methods.lcm import LCM
from methods.scm import SCM
from methods.tscd import TSCD
from tests.helpers import build, fixed_batch, optimizers, update

CASES = {  # method, a step where the regulariser acts, extra config
    "lcm": (LCM, 0, {}),
    "tscd": (TSCD, 900, {}),  # the last of four stages of max_steps 1000: one segment
    "scm": (SCM, 0, {"tangent_warmup_steps": 0, "jvp": "finite_difference"}),
}


def _build(name, teacher, student="lora", **kw):
    cls, _, extra = CASES[name]
    return build(cls, teacher, student, dmd_weight=1.0, **(extra | kw))


@pytest.mark.parametrize("name", list(CASES))
def test_student_sample_is_what_its_exported_sampler_draws(name, tiny_teachers, monkeypatch):
    """The DMD term's sample after k = 2 steps equals the run's exported 2-step sampler (the diffusers scheduler of
    sampling.json, stepped on the same network and the same noises): the regulariser matches the student that
    ships."""
    models, method, _ = _build(name, tiny_teachers["sd"])
    monkeypatch.setattr(score_regulariser, "draw_steps", lambda *a: 2)
    batch = fixed_batch(models, b=3)
    with torch.no_grad(), models.role("student"):
        ours = method.generate(batch, grad=False)
    s = method.sampling().steps[2]
    sched = artifacts.make_scheduler(models.teacher_pipeline().scheduler.config, s)
    sched.set_timesteps(timesteps=s.timesteps)
    tag = f"{name}-dmd-noise"
    noises = [batch.rng.randn(models.latent_shape, f"{tag}-{j}") for j in range(2)]
    monkeypatch.setattr("diffusers.schedulers.scheduling_lcm.randn_tensor", lambda *a, **k: noises[1])
    x = noises[0] * sched.init_noise_sigma
    with torch.no_grad(), models.role("student"):
        for t in sched.timesteps:
            tt = torch.full((3,), int(t), dtype=torch.long)
            out = models.net_out("student", x, tt, batch.cond)
            x, denoised = sched.step(out, t, x, return_dict=False)
    torch.testing.assert_close(ours, denoised, rtol=1e-4, atol=1e-5)


def test_dmd_term_has_the_normalised_distribution_matching_gradient(tiny_teachers):
    """d loss / d x0 = ∇ / (C H W B), ∇ = (x̂_fake − x̂_real) / mean|x0 − x̂_real| at x0 noised to the keyed t (DMD eq. 7
    with DMD2's normaliser), the teacher guided, the critic not."""
    models, method, _ = _build("lcm", tiny_teachers["sd"])
    batch = fixed_batch(models, b=3)
    x0 = (0.5 * torch.randn(3, *models.latent_shape)).requires_grad_(True)
    loss, logs = dmd_loss(models, batch, x0, 2.5, (20, 980), "probe")
    loss.backward()
    t = batch.rng.randint(20, 981, "probe-t")
    xt = models.schedule.add_noise(x0.detach(), batch.rng.randn(models.latent_shape, "probe-noise"), t)
    with torch.no_grad():
        real, _ = models.predict("teacher", xt, t, batch.cond, batch.uncond, guidance=2.5)
        fake, _ = models.predict("critic", xt, t, batch.cond)
    expected = dm_gradient(x0.detach(), real, fake) / (x0[0].numel() * 3)
    torch.testing.assert_close(x0.grad, expected, rtol=1e-4, atol=1e-7)
    assert logs["dm_nonfinite"] == 0


@pytest.mark.parametrize("name", ["lcm", "tscd"])
@pytest.mark.parametrize("student", ["lora", "full"])
def test_regulariser_roles_train_their_own_tensors(name, student, tiny_teachers):
    """With dmd_weight > 0 a critic role joins; the critic's step moves only the critic, the student's only the
    student, and the student's loss is the consistency loss plus λ × DMD's term."""
    models, method, _ = _build(name, tiny_teachers["sd"], student, student_update_every=2)
    step = CASES[name][1]
    assert models.roles == ("student", "critic") and not models.headless
    assert method.updates(step) == ("critic",) and method.updates(step + 1) == ("student", "critic")
    opts = optimizers(models, method)

    def params(role):
        return {n: p.detach().clone() for n, p in models.named_parameters(role)}

    before = {r: params(r) for r in ("student", "critic")}
    batch = fixed_batch(models)
    assert math.isfinite(update(models, method, "critic", batch, opts["critic"], step))
    assert all(torch.equal(v, params("student")[k]) for k, v in before["student"].items()), "critic moved the student"
    assert any(not torch.equal(v, params("critic")[k]) for k, v in before["critic"].items())
    mid = params("critic")
    with models.role("student"), torch.no_grad():
        total, logs = method.loss("student", batch, step + 1)
    assert "dm" in logs and math.isfinite(float(total))
    assert math.isfinite(update(models, method, "student", batch, opts["student"], step + 1))
    assert any(not torch.equal(v, params("student")[k]) for k, v in before["student"].items())
    assert all(torch.equal(v, params("critic")[k]) for k, v in mid.items()), "the student's step moved the critic"


def test_tscd_regularises_its_one_segment_stage_only(tiny_teachers):
    """TSCD's segmented stages train as before (no critic update, no DMD term); the last, one-segment stage (the
    student that samples by re-noising, which the term's sample assumes) adds them."""
    models, method, _ = _build("tscd", tiny_teachers["sd"])
    assert method.updates(10) == ("student",) and not method.regularised(10)
    assert method.updates(900) == ("student", "critic") and method.regularised(900)
    batch = fixed_batch(models)
    with models.role("student"), torch.no_grad():
        _, early = method.loss("student", batch, 10)
    assert "dm" not in early


def test_bad_regulariser_settings_are_refused():
    with pytest.raises(UserError, match="choose one"):
        TSCD.Config(adversarial=True, dmd_weight=1.0).check()
    with pytest.raises(UserError, match="min_step_ratio"):
        LCM.Config(min_step_ratio=0.9, max_step_ratio=0.5).check()
    with pytest.raises(UserError, match="dmd_weight"):
        SCM.Config(dmd_weight=-1.0).check()
    with pytest.raises(UserError, match="dmd_min_steps=8 > method.dmd_max_steps=4"):
        LCM.Config(dmd_min_steps=8).check()
