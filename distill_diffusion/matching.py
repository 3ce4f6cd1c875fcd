"""Distribution matching (DMD): the reverse-KL gradient of a generator from a real and a fake score, shared by DMD2
and sCM's rCM regulariser.

Yin et al., "One-step Diffusion with Distribution Matching Distillation", CVPR 2024 (arXiv:2311.18828), eq. 7;
the per-sample normaliser of DMD2 (arXiv:2405.14867, sec. 4.1; tianweiy/DMD2 main/sd_guidance.py), used unchanged by
rCM (arXiv:2510.08431; NVlabs/rcm ``_student_dmd_step``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def dm_gradient(x0: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """The normalised distribution-matching gradient (DMD eq. 7 with DMD2's per-sample normaliser), (B, C, h, w):

    ∇ = (x̂_fake − x̂_real) / mean_{C,H,W} |x − x̂_real|   (= (p_real − p_fake) / mean|p_real| with p = x − x̂).
    """
    denom = (x0 - x0_real).abs().flatten(1).mean(1).reshape(-1, *[1] * (x0.ndim - 1))
    return (x0_fake - x0_real) / denom


def dm_loss(x0: Tensor, x0_real: Tensor, x0_fake: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample L_DM = ½ mean_{C,H,W} (x − sg(x − ∇))², whose gradient wrt x is ∇ / (C·H·W); shape (B,).

    Returns (per-sample loss, ok mask (B,) bool). A sample whose ∇ is not finite (a non-finite score, or a zero
    normaliser) gets the target sg(x): zero loss and an exactly zero gradient, so it cannot poison the update.
    """
    with torch.no_grad():
        x = x0.detach()
        grad = dm_gradient(x, x0_real.to(x.dtype), x0_fake.to(x.dtype))
        ok = torch.isfinite(grad).flatten(1).all(1) & torch.isfinite(x).flatten(1).all(1)
        target = torch.where(ok.reshape(-1, *[1] * (x.ndim - 1)), x - grad, x)
    return 0.5 * ((x0 - target) ** 2).flatten(1).mean(1), ok
