"""Small helpers shared by tests: build a method on a tiny teacher and take updates on a fixed batch."""

from __future__ import annotations

import socket
from typing import Any

import torch
from omegaconf import OmegaConf

from distill_diffusion.config import TrainConfig
from distill_diffusion.method import Batch, StepRNG
from distill_diffusion.models import Models, build_models


def default_only(values: list[Any], keep: set[Any]) -> list[Any]:
    """``values`` as pytest params, those not in ``keep`` marked ``slow``: the README's test command runs one
    representative case of a long end-to-end test, CI's slow set runs the others."""
    import pytest

    return [v if v in keep else pytest.param(v, marks=pytest.mark.slow) for v in values]


def free_port() -> int:
    """A TCP port free right now: each `accelerate launch` of the suite gets its own rendezvous port, so two
    launched in parallel by pytest-xdist never meet on the default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(method_cls: type, teacher: str, student: str = "lora", rank: int = 4, alpha: float = 8, **method_kw: Any):
    """(models, method, train_cfg) for a tiny teacher; ``method_kw`` overrides the method's config."""
    mcfg = method_cls.Config(**method_kw)
    tcfg = OmegaConf.structured(TrainConfig(teacher=teacher, student=student, lora_rank=rank, lora_alpha=alpha,
                                            method=mcfg))
    models = build_models(tcfg, method_cls.spec(mcfg, student))
    return models, method_cls(mcfg, tcfg, models), tcfg


def fixed_batch(models: Models, b: int = 4, seed: int = 0, step: int = 0, with_latents: bool = True) -> Batch:
    g = torch.Generator().manual_seed(seed)
    prompts = [["a red square", "a blue circle"][i % 2] for i in range(b)]
    latents = torch.randn(b, *models.latent_shape, generator=g) * 0.8 if with_latents else None
    return Batch(latents, models.encode_prompts(prompts), models.encode_uncond(b), prompts,
                 StepRNG(seed, step, torch.arange(b)))


def update(models: Models, method: Any, role: str, batch: Batch, opt: torch.optim.Optimizer, step: int) -> float:
    """One update of ``role`` the way the loop takes it (trainable flags, role context, backward, step)."""
    for r, m in method.extra_modules().items():
        m.requires_grad_(r == role)
    opt.zero_grad(set_to_none=True)
    with models.trainable(role), models.role(role):
        loss, _ = method.loss(role, batch, step)
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    for name, spec in models.targets.items():
        if spec.source == role:
            models.update_target(name)
    return float(loss.detach())


def optimizers(models: Models, method: Any, lr: float = 1e-3) -> dict[str, torch.optim.Optimizer]:
    extras = method.extra_modules()
    out = {}
    for role in models.roles:
        ps = models.parameters(role) + (list(extras[role].parameters()) if role in extras else [])
        out[role] = torch.optim.Adam(ps, lr=lr)
    return out


def snapshot(module: torch.nn.Module, lora: bool | None = None) -> dict[str, torch.Tensor]:
    """Copies of a module's tensors; ``lora`` True/False keeps only LoRA / only base tensors."""
    out = {}
    for n, p in module.named_parameters():
        if lora is None or (("lora_" in n) == lora):
            out[n] = p.detach().clone()
    return out
