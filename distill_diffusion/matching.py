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
    return gradient_loss(x0, grad)


def gradient_loss(x0: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample ½ mean_{C,H,W} (x − sg(x − ∇))² for a given direction ∇ (B, C, h, w) computed without gradient:
    its gradient wrt x is ∇ / (C·H·W); shape (B,). Returns (per-sample loss, ok mask (B,) bool); a sample whose ∇
    or x is not finite gets the target sg(x) (zero loss, zero gradient), as :func:`dm_loss` describes."""
    with torch.no_grad():
        x = x0.detach()
        ok = torch.isfinite(grad).flatten(1).all(1) & torch.isfinite(x).flatten(1).all(1)
        target = torch.where(ok.reshape(-1, *[1] * (x.ndim - 1)), x - grad, x)
    return 0.5 * ((x0 - target) ** 2).flatten(1).mean(1), ok


def subinterval_pair(x_s: Tensor, eps: Tensor, a_s: Tensor, s_s: Tensor, a_t: Tensor, s_t: Tensor) -> tuple[
        Tensor, Tensor, Tensor]:
    """Score matching within a subinterval (Phased DMD, Fan et al., arXiv:2510.27684, sec. 2.2.2, eq. 11–12 and
    their derivation in appendix A): denoising targets for a fake score trained on samples x_s at level s whose clean
    end x0 is unknown, at a noisier level t > s.

    x_t = α_{t|s} x_s + σ_{t|s} ε with α_{t|s} = α_t / α_s, σ²_{t|s} = σ_t² − α²_{t|s} σ_s² (eq. 2). Replacing the
    marginal score in each full-interval target by the conditional one, ∇ log p(x_t | x_s) = −ε / σ_{t|s}, gives
    the pair (x̃0, ε̃) = (x_s / α_s − α_t σ_s² / (α_s² σ_{t|s}) ε, σ_t / σ_{t|s} ε): x̃0 is eq. 12's x-prediction
    target, ε̃ − x̃0 eq. 11's flow target, ε̃ the ε target, and α_t x̃0 + σ_t ε̃ = x_t, so any parameterisation's
    target is its usual function of (x̃0, ε̃, t) (``Models.denoising_target``). Both targets grow as 1 / σ_{t|s} near
    t = s; the paper weights the squared error by min(1, 10 σ²_{t|s}) there (eq. 13).

    x_s, eps (B, ...); the α, σ are (B,) (broadcast over the rest) or scalars. Returns (x_t, x̃0, ε̃). DMD2's
    ``phased`` option trains its critic on these targets.
    """
    def b(v: Tensor) -> Tensor:
        return v.reshape(-1, *[1] * (x_s.ndim - 1)) if v.ndim == 1 else v

    a_s, s_s, a_t, s_t = b(a_s), b(s_s), b(a_t), b(s_t)
    s_ts = subinterval_sigma2(a_s, s_s, a_t, s_t).sqrt()
    x_t = a_t / a_s * x_s + s_ts * eps
    return x_t, x_s / a_s - a_t * s_s**2 / (a_s**2 * s_ts) * eps, s_t / s_ts * eps


def subinterval_sigma2(a_s: Tensor, s_s: Tensor, a_t: Tensor, s_t: Tensor) -> Tensor:
    """σ²_{t|s} = σ_t² − (α_t / α_s)² σ_s², the variance of q(x_t | x_s) (Phased DMD eq. 2), clamped at 0; any
    broadcastable shapes."""
    return (s_t**2 - (a_t / a_s) ** 2 * s_s**2).clamp(min=0)


def subinterval_weight(sigma2_ts: Tensor, cap: float = 10.0) -> Tensor:
    """Phased DMD's weight min(1, cap σ²_{t|s}) on the subinterval denoising loss (eq. 13, cap 10): its targets
    grow as 1 / σ_{t|s} when t nears s, and this keeps their squared error bounded."""
    return (cap * sigma2_ts).clamp(max=1.0)
