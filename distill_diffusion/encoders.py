"""The teacher's frozen encoders: prompts to conditioning (each distinct prompt encoded once and cached), images to
normalised VAE latents and back. Methods never call these; the loop builds each step's :class:`Batch` with them.
How a family encodes is :mod:`distill_diffusion.families`' business; this module caches and batches."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .method import Cond


class Encoders:
    """Text encoder(s) and VAE of a teacher, through its family (``distill_diffusion.families.Family``)."""

    def __init__(self, family: Any) -> None:
        self.family, self.device = family, family.device
        self._prompt_cache: dict[str, Cond] = {}
        self._uncond_cache: Cond | None = None

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Conditioning for a list of prompts; each distinct prompt is encoded once and cached (frozen encoders)."""
        new = [q for q in dict.fromkeys(prompts) if q not in self._prompt_cache]
        if len(self._prompt_cache) + len(new) > 50_000:
            self._prompt_cache.clear()
        for q in new:
            # One prompt per forward: a matmul's rounding depends on its batch size, and a prompt's embedding must
            # not depend on which other prompts were new at the same step (bit-identical resume).
            self._prompt_cache[q] = self.family.encode_text([q]).index(0)
        return self.family.extras(_stack([self._prompt_cache[q] for q in prompts]))

    @torch.no_grad()
    def encode_uncond(self, b: int) -> Cond:
        """The unconditional branch as the teacher's pipeline builds it (the empty prompt; SDXL's zeros)."""
        if self._uncond_cache is None:
            self._uncond_cache = self.family.encode_empty().index(0)
        one = self._uncond_cache
        return self.family.extras(one._map(lambda _n, a, _b: a[None].expand(b, *a.shape)))

    @torch.no_grad()
    def encode_images(self, images: Tensor, noise: Tensor | None = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> normalised latents (z − shift) · scaling (B, C, h, w); ``noise``
        samples the posterior."""
        f = self.family
        z = f.vae_encode(images.to(self.device, torch.float32), noise)
        return (z - f.vae_shift) * f.vae_scaling

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents -> images in [-1, 1]."""
        f = self.family
        return f.vae_decode(latents.float() / f.vae_scaling + f.vae_shift).clamp(-1, 1)


def _stack(rows: list[Cond]) -> Cond:
    first = rows[0]
    return first._map(lambda n, _a, _b: torch.stack([getattr(r, n) for r in rows]))
