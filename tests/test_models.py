"""Roles on one shared base: the adapter context manager, trainable flags, encoders."""

import math

import pytest
import torch

from distill_diffusion.method import TargetSpec
from distill_diffusion.models import Models, _tuner_layers


def lora_params(m: Models, adapter: str) -> list[torch.nn.Parameter]:
    return [p for n, p in m.denoiser.named_parameters() if f".{adapter}." in n]


def test_role_context_restores_adapter_and_never_touches_requires_grad(tiny_teachers):
    """The role context switches adapters only; requires_grad belongs to ``trainable`` (peft's set_adapter would
    rewrite it at every switch)."""
    m = Models(tiny_teachers["sd"], "lora", roles=("student", "critic"), lora_rank=2, lora_alpha=4)
    before = {n: p.requires_grad for n, p in m.denoiser.named_parameters()}
    with m.trainable("student"):
        inside = {n: p.requires_grad for n, p in m.denoiser.named_parameters()}
        with m.role("teacher") as teacher_net:
            # The teacher is the base's own tensors without LoRA wrappers; the shared base is left as it was.
            assert teacher_net is not m.denoiser and not _tuner_layers(teacher_net)
            assert all(t.active_adapters == ["student"] and not t.disable_adapters for t in m._tuners)
            with m.role("critic"):
                assert all(t.active_adapters == ["critic"] and not t.disable_adapters for t in m._tuners)
                assert {n: p.requires_grad for n, p in m.denoiser.named_parameters()} == inside
            assert all(t.active_adapters == ["student"] and not t.disable_adapters for t in m._tuners)
            assert {n: p.requires_grad for n, p in m.denoiser.named_parameters()} == inside
    assert {n: p.requires_grad for n, p in m.denoiser.named_parameters()} == before
    assert all(t.active_adapters == ["student"] and not t.disable_adapters for t in m._tuners)


@pytest.mark.parametrize("lora_merge", ["off", "always"])
def test_role_outputs_match_peft_switching(tiny_teachers, lora_merge):
    """Each role's forward equals the same forward after peft's own adapter switching (set_adapter /
    enable_adapters): bit for bit through peft's wrappers, to float32 rounding on merged weights (the teacher's
    plain view is bit-identical either way)."""
    m = Models(tiny_teachers["sd"], "lora", roles=("student", "critic"), lora_rank=2, lora_alpha=4,
               lora_merge=lora_merge)
    with torch.no_grad():
        for i, r in enumerate(("student", "critic")):
            for p in m.parameters(r):
                p.add_(0.05 * (i + 1))
    xt, t = torch.randn(2, *m.latent_shape), torch.tensor([10, 900])
    cond = m.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        ours = {r: m.net_out(r, xt, t, cond) for r in ("critic", "teacher", "student")}
        for r in ("critic", "teacher", "student"):
            for layer in m._tuners:
                if r == "teacher":
                    layer.enable_adapters(False)
                else:
                    layer.enable_adapters(True)
                    layer.set_adapter(r)
            ref = m.family.forward(m.denoiser, xt, t, cond)
            if lora_merge == "off" or r == "teacher":
                assert torch.equal(ours[r], ref), r
            else:
                assert not torch.equal(ours[r], ref), r  # the merged path ran
                torch.testing.assert_close(ours[r], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_teacher_net_is_the_base_without_wrappers(tiny_teachers, kind):
    """A LoRA run's teacher forward goes through a plain UNet whose tensors are the base's own objects (no copy):
    the same output, bit for bit, as the wrapped UNet with adapters disabled, and it sees an in-place change."""
    m = Models(tiny_teachers[kind], "lora", roles=("student",), lora_rank=2, lora_alpha=4)
    with torch.no_grad():
        for p in m.parameters("student"):
            p.add_(0.05)
    plain = m.net("teacher")
    base = {id(p) for n, p in m.denoiser.named_parameters() if "lora_" not in n}
    assert {id(p) for p in plain.parameters()} == base
    xt, t = torch.randn(2, *m.latent_shape), torch.tensor([10, 900])
    cond = m.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        ours = m.net_out("teacher", xt, t, cond)
        for layer in m._tuners:
            layer.enable_adapters(False)
        ref = m.family.forward(m.denoiser, xt, t, cond)
        for layer in m._tuners:
            layer.enable_adapters(True)
        assert torch.equal(ours, ref)
        conv = m.denoiser.conv_in
        w = conv.weight if hasattr(conv, "weight") else conv.base_layer.weight
        w.mul_(2)
        assert not torch.equal(m.net_out("teacher", xt, t, cond), ours)


def test_trainable_only_one_role(tiny_teachers):
    m = Models(tiny_teachers["sd"], "lora", roles=("student", "critic"), lora_rank=2, lora_alpha=4)
    with m.trainable("critic"):
        assert all(p.requires_grad for p in m.parameters("critic"))
        assert not any(p.requires_grad for p in m.parameters("student"))
    base = [p for n, p in m.denoiser.named_parameters() if "lora_" not in n]
    assert base and not any(p.requires_grad for p in base)


def test_teacher_equals_base_and_adapters_start_at_teacher(tiny_teachers):
    m = Models(tiny_teachers["sd"], "lora", roles=("student", "critic"), lora_rank=2, lora_alpha=4)
    xt, t = torch.randn(2, *m.latent_shape), torch.tensor([10, 900])
    cond = m.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        a = m.net_out("teacher", xt, t, cond)
        b = m.net_out("student", xt, t, cond)
        for p in m.parameters("student"):
            p.add_(0.1)
        c = m.net_out("student", xt, t, cond)
        d = m.net_out("teacher", xt, t, cond)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, d)
    assert not torch.allclose(a, c)


def test_guided_batched_forward_equals_two_passes(tiny_teachers):
    m = Models(tiny_teachers["sdxl"], "lora", roles=("student",), lora_rank=2, lora_alpha=2)
    xt, t = torch.randn(2, *m.latent_shape), torch.tensor([100, 600])
    cond, uncond = m.encode_prompts(["a", "b"]), m.encode_uncond(2)
    assert cond.pooled is not None and cond.time_ids.shape == (2, 6)
    assert torch.count_nonzero(uncond.prompt_embeds) == 0  # SDXL's zero unconditional embedding
    with torch.no_grad():
        g = m.net_out("teacher", xt, t, cond, uncond, guidance=3.0)
        c = m.net_out("teacher", xt, t, cond)
        u = m.net_out("teacher", xt, t, uncond)
    torch.testing.assert_close(g, u + 3.0 * (c - u), atol=1e-5, rtol=1e-4)


def test_full_roles_and_ema_target(tiny_teachers):
    m = Models(tiny_teachers["sd"], "full", roles=("student",), targets={"target": TargetSpec("student", 0.5)},
               guidance_embedding_dim=8)
    assert m.net("student").config.time_cond_proj_dim == 8 and m.student_w_embedding
    assert m.net("teacher") is m.denoiser and not any(p.requires_grad for p in m.denoiser.parameters())
    tgt0 = [p.clone() for p in m.parameters("target")]
    with torch.no_grad():
        for p in m.parameters("student"):
            p.add_(1.0)
    m.update_target("target")
    for p0, p, s in zip(tgt0, m.parameters("target"), m.parameters("student")):
        torch.testing.assert_close(p, 0.5 * p0 + 0.5 * s)


def test_lora_ema_target(tiny_teachers):
    """A LoRA target with a decay is an adapter of its own: starts as the student, follows it by EMA, and its
    role computes with its own tensors (not the student's)."""
    m = Models(tiny_teachers["sd"], "lora", roles=("student",), targets={"target": TargetSpec("student", 0.5)},
               lora_rank=2, lora_alpha=2)
    src, dst = m.parameters("student"), m.parameters("target")
    assert len(src) == len(dst) > 0 and not {id(p) for p in src} & {id(p) for p in dst}
    for s, d in zip(src, dst):
        torch.testing.assert_close(s, d)
    tgt0 = [p.clone() for p in dst]
    with torch.no_grad():
        for p in src:
            p.add_(0.1)
    m.update_target("target")
    for p0, p, s in zip(tgt0, dst, src):
        torch.testing.assert_close(p, 0.5 * p0 + 0.5 * s)
    xt, t = torch.randn(1, *m.latent_shape), torch.tensor([500])
    cond = m.encode_prompts(["a"])
    with torch.no_grad():
        out = {r: m.net_out(r, xt, t, cond) for r in ("student", "target", "teacher")}
    assert not torch.allclose(out["student"], out["target"]) and not torch.allclose(out["target"], out["teacher"])


def test_prompt_cache_encodes_each_prompt_once(tiny_teachers, monkeypatch):
    m = Models(tiny_teachers["sd"], "lora", roles=("student",), lora_rank=2, lora_alpha=2)
    calls = []
    orig = m.family.encode_text
    monkeypatch.setattr(m.family, "encode_text", lambda ps: calls.append(list(ps)) or orig(ps))
    a = m.encode_prompts(["x", "y", "x"])
    b = m.encode_prompts(["y", "x"])
    assert calls == [["x"], ["y"]]
    torch.testing.assert_close(a.prompt_embeds[0], b.prompt_embeds[1])


def _train_losses(tiny_teachers, image_folder, out, *extra):
    import json

    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train
    from methods import METHODS

    cfg, _ = parse_config(["--method", "lcm", f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}",
                           "max_steps=2", "batch_size=2", "lora_rank=2", "lora_alpha=4", f"output_dir={out}",
                           "report_to=none", "validation_seeds=0", "logging_steps=1", *extra], METHODS)
    train(cfg, METHODS["lcm"])
    return [json.loads(line)["student/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("student", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_channels_last_trains_with_the_same_loss(student, tiny_teachers, image_folder, tmp_path):
    off = _train_losses(tiny_teachers, image_folder, tmp_path / "off", f"student={student}")
    on = _train_losses(tiny_teachers, image_folder, tmp_path / "on", f"student={student}", "channels_last=true")
    assert len(on) == len(off) == 2
    torch.testing.assert_close(torch.tensor(on), torch.tensor(off), rtol=1e-4, atol=1e-6)
    assert (tmp_path / "on" / "sampling.json").is_file()


@pytest.mark.slow
def test_compile_trains_two_steps(tiny_teachers, image_folder, tmp_path, monkeypatch):
    """compile=true through the loop. Dynamo traces every UNet call (adapters, grad modes, batch sizes) with its
    "eager" backend here: inductor's C++ code generation took 7 minutes for these two steps on this CPU; the
    benchmark (benchmarks/lean.py) runs the default backend."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    losses = _train_losses(tiny_teachers, image_folder, tmp_path / "c", "compile=true")
    off = _train_losses(tiny_teachers, image_folder, tmp_path / "off")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(off), rtol=1e-3, atol=1e-5)


def test_compile_failure_falls_back_with_one_warning_line(tiny_teachers, image_folder, tmp_path, monkeypatch,
                                                          capfd):
    def broken(fn, *a, **k):
        def call(*args, **kwargs):
            raise RuntimeError("C++ compiler not found\nmore detail")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    losses = _train_losses(tiny_teachers, image_folder, tmp_path / "c", "compile=true")
    assert len(losses) == 2
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "torch.compile failed" in ln]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].split("\r")[-1].startswith("warning: compile=true: torch.compile failed on this machine "
                                              "(RuntimeError: C++ compiler not found)")
