"""SiD: the generator loss's closed form and gradient, guidance scales, the initial-latent scale through the run
folder, the few-step mixture, data-free runs through train.py, and the refusal of gradient checkpointing."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill_diffusion import artifacts
from distill_diffusion.errors import UserError
from distill_diffusion.method import StepRNG
from methods.sid import (
    SiD,
    SiDConfig,
    critic_loss,
    draw_mixture_step,
    sid_generator_loss,
    sid_student_objective,
    sid_weight,
)
from tests.helpers import build, fixed_batch, optimizers, snapshot, update

ROOT = Path(__file__).resolve().parent.parent


def _train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


# ---- closed forms ---------------------------------------------------------------------------------------------------


def test_generator_loss_is_zero_when_fake_equals_real():
    g = torch.Generator().manual_seed(0)
    x_g, y = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    for alpha in (1.0, 1.2):
        assert torch.equal(sid_generator_loss(x_g, y, y.clone(), alpha), torch.zeros(3))


def test_generator_loss_value_and_gradient_match_the_formula():
    """Hand-made tensors: L_i = Σ (r - f)((r - x) - α(r - f)) / w_i, w_i = mean|x_i - r_i| held constant."""
    g = torch.Generator().manual_seed(1)
    x, r, f = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    alpha = 1.2
    x.requires_grad_(True)
    r.requires_grad_(True)
    f.requires_grad_(True)
    per = sid_generator_loss(x, r, f, alpha)
    w = (x - r).detach().abs().flatten(1).mean(1).reshape(-1, 1, 1, 1)
    d = (r - f).detach()
    e = (r - x).detach()
    expected = (d * (e - alpha * d)).flatten(1).sum(1) / w.flatten()
    torch.testing.assert_close(per.double(), expected, rtol=1e-5, atol=1e-5)
    per.mean().backward()
    b = x.shape[0]
    torch.testing.assert_close(x.grad.double(), (-d / w / b), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.grad.double(), ((e - alpha * d) + (1 - alpha) * d) / w / b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f.grad.double(), (-(e - alpha * d) + alpha * d) / w / b, rtol=1e-5, atol=1e-6)
    # α = 1 is the reference's shortcut (r - f)(f - x) / w
    torch.testing.assert_close(sid_generator_loss(x, r, f, 1.0),
                               ((r - f) * (f - x)).flatten(1).sum(1).float() / w.flatten().float())


def test_weight_is_clamped_and_nonfinite_samples_are_dropped():
    x = torch.zeros(3, 1, 2, 2, requires_grad=True)
    r = torch.zeros(3, 1, 2, 2)  # |x - r| = 0 -> w clamps at 1e-5
    f = torch.full((3, 1, 2, 2), -1.0)
    f[2, 0, 0, 0] = float("nan")
    loss, dropped = sid_student_objective(x, r, f, 1.0)
    assert dropped == 1
    # per finite sample: Σ (0 - (-1)) ((0 - 0) - (0 + 1)) / 1e-5 = -4 / 1e-5
    torch.testing.assert_close(loss, torch.tensor(-4 / 1e-5))
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad[2], torch.zeros(1, 2, 2))


def test_critic_loss_weights_v_prediction_by_snr_over_snr_plus_one():
    from distill_diffusion.schedule import FlowSchedule, VPSchedule

    ac = torch.linspace(0.99, 0.01, 1000)
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    t = torch.tensor([10, 900])
    torch.testing.assert_close(critic_loss(pred, target, t, VPSchedule(ac, "epsilon")), torch.tensor([4.0, 4.0]))
    snr = ac[t] / (1 - ac[t])
    torch.testing.assert_close(critic_loss(pred, target, t, VPSchedule(ac, "v_prediction")), 4 * snr / (snr + 1))
    flow = FlowSchedule(torch.linspace(0.001, 1, 1000))  # flow matching: the plain squared velocity error
    torch.testing.assert_close(critic_loss(pred, target, t, flow), torch.tensor([4.0, 4.0]))


def test_init_noise_scale_and_timesteps():
    from distill_diffusion.schedule import FlowSchedule, VPSchedule

    ac = torch.linspace(0.99, 0.01, 1000)
    assert VPSchedule(ac, "epsilon").start_scale(625) == pytest.approx(math.sqrt(1 - float(ac[625])))
    assert FlowSchedule(torch.linspace(0.001, 1, 1000)).start_scale(625) == 1.0  # flow pipelines: unit noise
    assert SiDConfig(num_steps=4).generation_timesteps() == [625, 468, 312, 156]  # t_init (1 - i/K), reference
    assert SiDConfig(num_steps=4, init_timestep=999).generation_timesteps() == [999, 749, 499, 249]
    assert SiDConfig(num_steps=2, timesteps=[625, 300]).generation_timesteps() == [625, 300]


def test_guidance_modes_map_to_diffusers_scales():
    assert SiDConfig().guidance_scales() == (2.0, 2.0, 2.0)  # the reference's LSG κ1 = κ2 = κ3 = κ4 = 2
    assert SiDConfig(guidance_mode="zero_cfg").guidance_scales() == (0.0, 0.0, 1.0)
    assert SiDConfig(guidance_mode="anti_cfg", anti_cfg_scale=-0.5).guidance_scales() == (-0.5, -0.5, 1.0)


@pytest.mark.parametrize("kw, fragment", [
    ({"guidance_mode": "cfg"}, "guidance_mode"),
    ({"guidance_mode": "anti_cfg", "anti_cfg_scale": 1.5}, "anti_cfg_scale"),
    ({"num_steps": 0}, "num_steps"),
    ({"num_steps": 2, "timesteps": [625]}, "timesteps"),
    ({"num_steps": 2, "timesteps": [625, 700]}, "decreasing"),
    ({"t_min": 500, "t_max": 400}, "t_min"),
    ({"init_timestep": 1000}, "init_timestep"),
    ({"cond_dropout": 1.0}, "cond_dropout"),
    ({"max_grad_value": 0.0}, "max_grad_value"),
])
def test_bad_values_are_one_line_errors(kw, fragment):
    with pytest.raises(UserError) as e:
        SiDConfig(**kw).check()
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_mixture_step_is_shared_and_covers_every_step():
    K = 4
    seen = []
    for step in range(200):
        k = draw_mixture_step(StepRNG(0, step, torch.arange(0, 8)), K)
        # the same on another process's samples (rank-independent) and on a resume (keyed by step)
        assert k == draw_mixture_step(StepRNG(0, step, torch.arange(8, 16)), K)
        seen.append(k)
    counts = [seen.count(k) for k in range(1, K + 1)]
    assert set(seen) == {1, 2, 3, 4} and min(counts) > 25, counts
    assert draw_mixture_step(StepRNG(0, 3, torch.arange(4)), 1) == 1


def test_cond_where_replaces_only_dropped_rows():
    from distill_diffusion.method import Cond

    c = Cond(torch.ones(3, 2, 4), torch.ones(3, 5), torch.ones(3, 6))
    u = Cond(torch.zeros(1, 2, 4).expand(3, -1, -1), torch.zeros(3, 5), torch.ones(3, 6))
    m = c.where(torch.tensor([True, False, True]), u)
    assert m.prompt_embeds[:, 0, 0].tolist() == [1, 0, 1] and m.pooled[:, 0].tolist() == [1, 0, 1]


# ---- on the tiny teachers -------------------------------------------------------------------------------------------


def test_guided_outputs_follow_the_diffusers_convention(tiny_teachers):
    models, method, _ = build(SiD, tiny_teachers["sd"])
    batch = fixed_batch(models, b=2, with_latents=False)
    xt = torch.randn(2, *models.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    with torch.no_grad():
        cond = models.net_out("teacher", xt, t, batch.cond)
        unc = models.net_out("teacher", xt, t, batch.uncond)
        g1, g0, g25 = (method.guided("teacher", xt, t, batch.cond, batch.uncond, s) for s in (1.0, 0.0, 2.5))
        ref = models.net_out("teacher", xt, t, batch.cond, batch.uncond, guidance=2.5)
    torch.testing.assert_close(g1, cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g0, unc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g25, unc + 2.5 * (cond - unc), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g25, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("student", ["lora", "full"])
def test_student_loss_vanishes_while_critic_equals_teacher(student, tiny_teachers):
    """At initialisation the critic is the teacher (LoRA B = 0, or a copy) and κ2 = κ4: y_fake = y_real, so the loss
    and its gradient vanish; after the critic moves, both are clearly non-zero."""
    models, method, _ = build(SiD, tiny_teachers["sd"], student)
    batch = fixed_batch(models, b=3, with_latents=False)

    def student_loss() -> tuple[float, float]:
        with models.trainable("student"), models.role("student"):
            loss, logs = method.loss("student", batch, 0)
            loss.backward()
        grads = [p.grad for p in models.parameters("student") if p.grad is not None]
        norm = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads))) if grads else 0.0
        for p in models.parameters("student"):
            p.grad = None
        return float(loss.detach()), norm

    loss0, norm0 = student_loss()
    assert abs(loss0) < 1e-4 and norm0 < 1e-4, (loss0, norm0)
    with torch.no_grad():
        for p in models.parameters("critic"):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    loss1, norm1 = student_loss()
    assert abs(loss1) > 1e-3 and norm1 > 1000 * max(norm0, 1e-9), (loss1, norm1, norm0)


def test_critic_loss_falls_on_a_fixed_batch(tiny_teachers):
    models, method, _ = build(SiD, tiny_teachers["sd"], "lora")
    opt = torch.optim.Adam(models.parameters("critic"), lr=1e-2)
    batch = fixed_batch(models, b=4, with_latents=False)
    losses = [update(models, method, "critic", batch, opt, step=0) for _ in range(20)]  # about 0.6 by 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_frozen_critic_cannot_pass(tiny_teachers):
    """The check above fails when the critic does not learn (lr 0): it can fail."""
    models, method, _ = build(SiD, tiny_teachers["sd"], "lora")
    opt = torch.optim.Adam(models.parameters("critic"), lr=0.0)
    batch = fixed_batch(models, b=2, with_latents=False)
    losses = [update(models, method, "critic", batch, opt, step=0) for _ in range(6)]
    assert not losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("teacher, kw", [
    ("v", {"num_steps": 2, "init_timestep": 999}),
    ("sdxl", {"guidance_mode": "zero_cfg"}),
    ("sd", {"guidance_mode": "anti_cfg", "num_steps": 3, "alpha": 1.2}),
])
def test_roles_move_only_their_own_tensors(teacher, kw, tiny_teachers):
    models, method, _ = build(SiD, tiny_teachers[teacher], "lora", **kw)
    opts = optimizers(models, method)
    batch = fixed_batch(models, b=2, with_latents=False)
    base = snapshot(models.denoiser, lora=False)
    assert method.updates(0) == ("critic", "student")
    for role in method.updates(0):
        before = {r: [p.detach().clone() for p in models.parameters(r)] for r in models.roles}
        loss = update(models, method, role, batch, opts[role], 0)
        assert math.isfinite(loss)
        for r in models.roles:
            moved = any(not torch.equal(a, b) for a, b in zip(before[r], models.parameters(r)))
            assert moved == (r == role), f"{teacher}: role {r} moved={moved} during {role}'s update"
    after = snapshot(models.denoiser, lora=False)
    assert all(torch.equal(base[k], after[k]) for k in base)


def test_few_step_unrolls_earlier_steps_without_gradient(tiny_teachers):
    models, method, _ = build(SiD, tiny_teachers["sd"], "lora", num_steps=3)
    batch = fixed_batch(models, b=2, with_latents=False)
    with models.trainable("student"), models.role("student"):
        x_g, x_in = method.generate(batch, 3, "student", grad=True)
        assert x_g.requires_grad and not x_in.requires_grad
        x1, x1_in = method.generate(batch, 1, "student", grad=True)
    # step 1's input is the scaled noise sqrt(1 - ᾱ(t_init)) z, the same z whatever k is
    z = batch.rng.randn(models.latent_shape, "sid-student-noise-0")
    torch.testing.assert_close(x1_in, models.schedule.start_scale(625) * z)
    # the critic and the student see the same mixture component at a step
    logs = {}
    for role in ("critic", "student"):
        with models.trainable(role), models.role(role):
            logs[role] = method.loss(role, batch, 5)[1]
    assert logs["critic"]["k"] == logs["student"]["k"] == draw_mixture_step(batch.rng, 3)


class _ListRNG:
    """Stands in for StepRNG in ``generate``: returns given noise per tag."""

    def __init__(self, noises: dict[str, torch.Tensor]) -> None:
        self.noises = noises

    def randn(self, shape, tag, dtype=torch.float32):
        return self.noises[tag]


@pytest.mark.parametrize("num_steps", [1, 2])
def test_initial_latent_scale_round_trips_through_the_run_folder(num_steps, tiny_teachers, tmp_path):
    """sampling.json records sqrt(1 - ᾱ(t_init)); load_student applies it (scheduler.init_noise_sigma) and its K-step
    sampling equals the training-time generation from the same noises."""
    models, method, _ = build(SiD, tiny_teachers["sd"], "lora", num_steps=num_steps)
    with torch.no_grad():
        for p in models.parameters("student"):  # a student that differs from the teacher
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    artifacts.save_run(models, "sid", method.sampling(), tmp_path)
    info = json.loads((tmp_path / "sampling.json").read_text())
    scale = math.sqrt(1 - float(models.schedule.alphas_cumprod[625]))
    assert info["steps"][str(num_steps)]["init_noise_scale"] == pytest.approx(scale)
    assert info["steps"][str(num_steps)]["timesteps"] == method.gen_t

    pipe = artifacts.load_student(tmp_path)
    prompts, seeds = ["a red square", "a blue circle"], [3, 4]
    ours, _ = artifacts.sample(pipe, prompts, steps=num_steps, seeds=seeds, output_type="latent")
    assert pipe.scheduler.init_noise_sigma == pytest.approx(scale)

    # the pipeline draws z, then one fresh noise per later step, from each sample's generator
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    draws = [torch.cat([torch.randn(1, *models.latent_shape, generator=g) for g in gens]) for _ in range(num_steps)]
    batch = fixed_batch(models, b=2, with_latents=False)
    batch.prompts, batch.cond = prompts, models.encode_prompts(prompts)
    batch.rng = _ListRNG({f"sid-x-noise-{i}": d for i, d in enumerate(draws)})
    with torch.no_grad():
        manual, _ = method.generate(batch, num_steps, "x", grad=False)
        if num_steps == 1:  # spelled out: the student's x0 from sqrt(1 - ᾱ(625)) z at timestep 625
            x0, _ = models.predict("student", scale * draws[0], torch.tensor([625, 625]), batch.cond)
            torch.testing.assert_close(manual, x0)
        unit, _ = models.predict("student", draws[0], torch.full((2,), method.gen_t[0]), batch.cond)
    torch.testing.assert_close(ours, manual, atol=2e-5, rtol=1e-4)
    if num_steps == 1:
        assert (ours - unit).abs().max() > 1e-3  # unit-variance noise would give something else


def test_sampling_exports_every_prefix_of_the_training_steps(tiny_teachers):
    models, method, _ = build(SiD, tiny_teachers["sd"], "lora", num_steps=3, init_timestep=700)
    spec = method.sampling()
    assert spec.default_steps == 3 and sorted(spec.steps) == [1, 2, 3]
    assert [spec.steps[k].timesteps for k in (1, 2, 3)] == [[700], [700, 466], [700, 466, 233]]
    assert all(s.scheduler == "LCMScheduler" and s.guidance_scale == 1.0 for s in spec.steps.values())
    assert method.optimizer_settings("critic").betas == (0.0, 0.999)
    assert method.optimizer_settings("student").betas == (0.0, 0.999)


# ---- the real CLI ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_py_from_a_prompt_file_without_images(tiny_teachers, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\n\na green field\n")
    out = tmp_path / "run"
    r = _train(["--method", "sid", f"teacher={tiny_teachers['sd']}", f"data.prompts={prompts}", "max_steps=2",
                "batch_size=2", "lora_rank=4", "method.num_steps=2", f"output_dir={out}", "report_to=none",
                "logging_steps=1", "validation_seeds=0"])
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "sampling.json").read_text())
    assert info["method"] == "sid" and info["default_steps"] == 2 and sorted(info["steps"]) == ["1", "2"]
    assert info["steps"]["2"]["timesteps"] == [625, 312]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(row["critic/loss"]) and math.isfinite(row["student/loss"])
                                  for row in rows)
    pipe = artifacts.load_student(out)
    imgs, _ = artifacts.sample(pipe, ["a red square"], steps=2, seeds=[0], output_type="np")
    assert imgs.shape == (1, 16, 16, 3)


def test_gradient_checkpointing_is_refused_in_one_line(tiny_teachers, tmp_path, capsys):
    from distill_diffusion.loop import run_main
    from methods import METHODS

    rc = run_main(["--method", "sid", f"teacher={tiny_teachers['sd']}", f"data.prompts={tmp_path / 'p.txt'}",
                   "gradient_checkpointing=true", f"output_dir={tmp_path / 'run'}", "report_to=none"], METHODS)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "gradient_checkpointing=true is not safe for sid" in lines[0], err


# ---- SiDA: the critic's encoder as a discriminator ------------------------------------------------------------------


def _encoder_logits(models, xt, t, cond):
    """D(x_t) computed apart from the method: the critic's mid-block output through a forward hook, channel mean."""
    with models.role("critic"):
        maps = models.features("critic", xt, t, cond, ["mid_block"], stop=True)
    return maps[0].mean(1, keepdim=True)


@pytest.mark.parametrize("num_steps", [1, 3])
def test_sida_terms_equal_an_independent_computation(num_steps, tiny_teachers):
    """SiDA (Zhou et al. 2025, arXiv:2410.14919): the critic adds λ_D (BCE(D(real_t), 1) + BCE(D(fake_t), 0)) / 2
    with real latents noised by its own ε and t; the generator's loss is (1 − λ) L_SiD + λ BCE(D(x_t), 1) C·H·W / w
    on its own x_t. Off, both losses are the plain SiD ones."""
    torch.manual_seed(5)
    models, method, _ = build(SiD, tiny_teachers["sd"], "lora", num_steps=num_steps, adversarial=True,
                              adv_generator_weight=0.3, adv_critic_weight=0.7)
    with torch.no_grad():  # a critic apart from the teacher, so that y_fake != y_real
        for p in models.parameters("critic"):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    batch = fixed_batch(models, b=3)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    k = draw_mixture_step(batch.rng, num_steps)
    with torch.no_grad():
        loss, logs = method.loss("critic", batch, 0)
        method.cfg.adversarial = False
        plain, plain_logs = method.loss("critic", batch, 0)
        method.cfg.adversarial = True
        x_g, _ = method.generate(batch, k, "critic", grad=False)
        t = batch.rng.randint(20, 980, "sid-critic-t")
        eps = batch.rng.randn(models.latent_shape, "sid-critic-eps")
        ac = models.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        real_t, fake_t = (ac.sqrt() * x + (1 - ac).sqrt() * eps for x in (batch.latents, x_g))
        d_real, d_fake = (_encoder_logits(models, x, t, batch.cond) for x in (real_t, fake_t))
        d = torch.stack([(bce(d_real[i], torch.ones_like(d_real[i])) + bce(d_fake[i], torch.zeros_like(d_fake[i]))) / 2
                         for i in range(3)])
    assert "adv_d" not in plain_logs
    torch.testing.assert_close(loss, plain + 0.7 * d.mean())
    torch.testing.assert_close(torch.tensor(logs["adv_d"]), d.mean())

    with models.trainable("student"), models.role("student"):
        loss, logs = method.loss("student", batch, 0)
        method.cfg.adversarial = False
        plain, _ = method.loss("student", batch, 0)
        method.cfg.adversarial = True
    with torch.no_grad():
        x_g, _ = method.generate(batch, k, "student", grad=False)
        t = batch.rng.randint(20, 980, "sid-student-t")
        eps = batch.rng.randn(models.latent_shape, "sid-student-eps")
        ac = models.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        xt = ac.sqrt() * x_g + (1 - ac).sqrt() * eps
        y_real = method.x0("teacher", xt, t, batch.cond, batch.uncond, 2.0)
        logits = _encoder_logits(models, xt, t, batch.cond).clamp(-10, 10)
        w = (x_g - y_real).abs().flatten(1).mean(1).clamp(min=1e-5)
        adv = torch.stack([bce(logits[i], torch.ones_like(logits[i])) for i in range(3)]) * x_g[0].numel() / w
    torch.testing.assert_close(w, sid_weight(x_g, y_real))
    torch.testing.assert_close(loss, 0.7 * plain + 0.3 * adv.mean(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(logs["adv_g"]), adv.mean(), rtol=1e-4, atol=1e-4)


def test_sida_discriminator_learns_and_needs_images(tiny_teachers):
    """A few critic updates on a fixed batch separate real from generated latents (p_real − p_fake grows); the
    spec asks for images only with the option on, and a batch without latents is one clear error."""
    models, method, _ = build(SiD, tiny_teachers["sd"], "lora", adversarial=True, adv_critic_weight=100.0)
    assert SiD.spec(method.cfg, "lora").needs_images and not SiD.spec(SiDConfig(), "lora").needs_images
    opt = torch.optim.Adam(models.parameters("critic"), lr=1e-2)
    batch = fixed_batch(models, b=4)
    gaps = []
    for _ in range(12):
        update(models, method, "critic", batch, opt, step=0)
        with torch.no_grad():
            _, logs = method.loss("critic", batch, 0)
        gaps.append(logs["p_real"] - logs["p_fake"])
    assert gaps[-1] > gaps[0] + 0.1, gaps
    with pytest.raises(UserError, match="needs real images"):
        method.loss("critic", fixed_batch(models, b=2, with_latents=False), 0)
    for bad in (dict(adv_generator_weight=1.5), dict(adv_critic_weight=-1.0)):
        with pytest.raises(UserError):
            SiDConfig(**bad).check()


def test_sid_configs_parse():
    from distill_diffusion.config import parse_config
    from methods import METHODS

    for f in sorted((ROOT / "configs" / "sid").glob("*.yaml")):
        cfg, _ = parse_config(["--method", "sid", "--config", str(f)], METHODS)
        assert cfg.method_name == "sid" and not cfg.gradient_checkpointing, f
    cfg, _ = parse_config(["--method", "sid", "--config", str(ROOT / "configs/sid/sd15_1step.yaml")], METHODS)
    assert cfg.method.alpha == 1.0 and cfg.method.kappa1 == cfg.method.kappa2 == cfg.method.kappa4 == 1.5
    assert cfg.learning_rate == 1e-6 and cfg.method.init_timestep == 625 and cfg.method.num_steps == 1
    cfg, _ = parse_config(["--method", "sid", "--config", str(ROOT / "configs/sid/sdxl_4step.yaml")], METHODS)
    assert cfg.method.num_steps == 4
