"""Roles on one shared base: the adapter context manager, trainable flags, encoders."""

import torch

from distill_diffusion.method import TargetSpec
from distill_diffusion.models import Models


def lora_params(m: Models, adapter: str) -> list[torch.nn.Parameter]:
    return [p for n, p in m.unet.named_parameters() if f".{adapter}." in n]


def test_role_context_restores_adapter_and_requires_grad(tiny_teachers):
    m = Models(tiny_teachers["sd"], "lora", roles=("student", "critic"), lora_rank=2, lora_alpha=4)
    before = {n: p.requires_grad for n, p in m.unet.named_parameters()}
    with m.role("teacher"):
        assert m._tuners[0].disable_adapters
        assert not any(p.requires_grad for p in lora_params(m, "student"))
        with m.role("critic"):
            assert m._tuners[0].active_adapters == ["critic"] and not m._tuners[0].disable_adapters
        assert m._tuners[0].disable_adapters
    assert {n: p.requires_grad for n, p in m.unet.named_parameters()} == before
    assert m._tuners[0].active_adapters == ["student"] and not m._tuners[0].disable_adapters


def test_trainable_only_one_role(tiny_teachers):
    m = Models(tiny_teachers["sd"], "lora", roles=("student", "critic"), lora_rank=2, lora_alpha=4)
    with m.trainable("critic"):
        assert all(p.requires_grad for p in m.parameters("critic"))
        assert not any(p.requires_grad for p in m.parameters("student"))
    base = [p for n, p in m.unet.named_parameters() if "lora_" not in n]
    assert base and not any(p.requires_grad for p in base)


def test_teacher_equals_base_and_adapters_start_at_teacher(tiny_teachers):
    m = Models(tiny_teachers["sd"], "lora", roles=("student", "critic"), lora_rank=2, lora_alpha=4)
    xt, t = torch.randn(2, *m.latent_shape), torch.tensor([10, 900])
    cond = m.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        a = m.unet_out("teacher", xt, t, cond)
        b = m.unet_out("student", xt, t, cond)
        for p in m.parameters("student"):
            p.add_(0.1)
        c = m.unet_out("student", xt, t, cond)
        d = m.unet_out("teacher", xt, t, cond)
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
        g = m.unet_out("teacher", xt, t, cond, uncond, guidance=3.0)
        c = m.unet_out("teacher", xt, t, cond)
        u = m.unet_out("teacher", xt, t, uncond)
    torch.testing.assert_close(g, u + 3.0 * (c - u), atol=1e-5, rtol=1e-4)


def test_full_roles_and_ema_target(tiny_teachers):
    m = Models(tiny_teachers["sd"], "full", roles=("student",), targets={"target": TargetSpec("student", 0.5)},
               unet_overrides={"time_cond_proj_dim": 8})
    assert m.net("student").config.time_cond_proj_dim == 8
    assert m.net("teacher") is m.unet and not any(p.requires_grad for p in m.unet.parameters())
    tgt0 = [p.clone() for p in m.parameters("target")]
    with torch.no_grad():
        for p in m.parameters("student"):
            p.add_(1.0)
    m.update_target("target")
    for p0, p, s in zip(tgt0, m.parameters("target"), m.parameters("student")):
        torch.testing.assert_close(p, 0.5 * p0 + 0.5 * s)


def test_prompt_cache_encodes_each_prompt_once(tiny_teachers, monkeypatch):
    m = Models(tiny_teachers["sd"], "lora", roles=("student",), lora_rank=2, lora_alpha=2)
    calls = []
    orig = m._encode_text
    monkeypatch.setattr(m, "_encode_text", lambda ps: calls.append(list(ps)) or orig(ps))
    a = m.encode_prompts(["x", "y", "x"])
    b = m.encode_prompts(["y", "x"])
    assert calls == [["x"], ["y"]]
    torch.testing.assert_close(a.prompt_embeds[0], b.prompt_embeds[1])
