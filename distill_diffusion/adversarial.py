"""Discriminator heads on the frozen teacher's features, with hinge losses: one mechanism for the methods that add
an adversarial term on the teacher's own representation.

PCM (Wang et al. 2024, arXiv:2405.18407, sec. 4.3 and its ``_adv`` scripts) puts heads on the teacher's features of
re-noised consistency outputs (TSCD's ``adversarial``); LADD (Sauer et al. 2024, arXiv:2403.12015, sec. 3) and
SANA-Sprint (Chen et al. 2025, arXiv:2503.09641, sec. 3.3) do the same for one-step generators against noised real
latents (sCM's ``gan_weight``). The teacher stays frozen: only the heads train (a headless role, or heads beside a
critic's network), and the generator's gradient flows through the frozen teacher into its sample.

Logistic (non-saturating) loss (Goodfellow et al. 2014; DMD2 eq. 3-4; SiDA's BCE): D minimises softplus(D(fake)) +
softplus(−D(real)), the generator softplus(−D(fake)), elementwise (callers average over positions).

Hinge loss (Lim & Ye 2017; LADD eq. 1-2): D minimises relu(1 + D(fake)) + relu(1 − D(real)); the generator
relu(1 − D(fake)) (PCM) or −D(fake) (LADD, SANA-Sprint): ``hinge_g_loss(..., saturating=False)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .method import Cond
from .models import frozen


def logistic_g_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss softplus(−D(fake)) = −log σ(D(fake)), elementwise."""
    return torch.nn.functional.softplus(-logits_fake)


def logistic_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """softplus(D(fake)) + softplus(−D(real)) = −log(1 − σ(D(fake))) − log σ(D(real)), elementwise."""
    return torch.nn.functional.softplus(logits_fake) + torch.nn.functional.softplus(-logits_real)


def hinge_d_loss(fake_logits: list[Tensor], real_logits: list[Tensor]) -> Tensor:
    """Discriminator hinge loss per sample (B,): mean over heads of mean relu(1 + D(fake)) + mean relu(1 - D(real))."""
    per = [torch.relu(1 + f.float()).flatten(1).mean(1) + torch.relu(1 - r.float()).flatten(1).mean(1)
           for f, r in zip(fake_logits, real_logits)]
    return torch.stack(per).mean(0)


def hinge_g_loss(fake_logits: list[Tensor], saturating: bool = True) -> Tensor:
    """Generator loss per sample (B,), mean over heads: relu(1 - D(fake)) (PCM) or, ``saturating=False``, −D(fake)
    (LADD / SANA-Sprint's ``-mean(pred_fake)``), each averaged over the head's positions."""
    if saturating:
        return torch.stack([torch.relu(1 - f.float()).flatten(1).mean(1) for f in fake_logits]).mean(0)
    return torch.stack([-f.float().flatten(1).mean(1) for f in fake_logits]).mean(0)


class DiscriminatorHead(nn.Module):
    """conv3x3-GN-LeakyReLU, a residual conv3x3-GN-LeakyReLU, conv1x1 -> one logit per position: (B, C, h, w) ->
    (B, 1, h, w). PCM's head (it notes LeakyReLU instead of the paper's GELU)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        groups = math.gcd(32, channels)

        def block() -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), nn.GroupNorm(groups, channels),
                                 nn.LeakyReLU(0.01))

        self.conv1, self.conv2 = block(), block()
        self.out = nn.Conv2d(channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        return self.out(self.conv2(x) + x)


class FeatureDiscriminator(nn.Module):
    """``heads_per_level`` heads on each teacher feature level; forward(features) -> list of logits maps."""

    def __init__(self, channels: list[int], heads_per_level: int = 4) -> None:
        super().__init__()
        self.levels = nn.ModuleList(
            nn.ModuleList(DiscriminatorHead(c) for _ in range(heads_per_level)) for c in channels)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        if len(features) != len(self.levels):
            raise RuntimeError(f"{len(features)} feature levels for {len(self.levels)} head groups")
        return [h(f.float()) for f, heads in zip(features, self.levels) for h in heads]


def teacher_discriminator(models: Any, names: list[str], heads_per_level: int) -> FeatureDiscriminator:
    """Heads for the teacher's feature blocks ``names`` (``Models.feature_blocks``), on the models' device."""
    channels = [c for c, _ in models.feature_shapes(names)]
    return FeatureDiscriminator(channels, heads_per_level).to(models.device)


def discriminate(models: Any, disc: FeatureDiscriminator, names: list[str], x: Tensor, t: Tensor, cond: Cond,
                 train_heads: bool, stop: bool) -> list[Tensor]:
    """D(x_t, t): ``disc`` on the frozen teacher's features of blocks ``names`` at (x_t, t) (the teacher's own
    timesteps), a list of (B, 1, h, w) logits; ``stop``: the teacher's forward ends after the last of them.

    ``train_heads=True`` (D's turn): features without gradient, so only the heads learn. False (the generator's
    turn): heads frozen, the gradient flows through the teacher into x.
    """
    with models.no_checkpointing("teacher"):
        if train_heads:
            with torch.no_grad():
                feats = models.features("teacher", x.detach(), t, cond, names, stop)
            return disc(feats)
        with frozen(list(disc.parameters())):
            return disc(models.features("teacher", x, t, cond, names, stop))
