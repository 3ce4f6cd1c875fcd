"""The teacher's frozen encoders: prompts to conditioning (each distinct prompt encoded once and cached), images to
scaled VAE latents and back. Methods never call these; the loop builds each step's :class:`Batch` with them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .method import Cond


class Encoders:
    """Text encoder(s) and VAE of a teacher pipeline ``pipe`` (SD1.x / SD2.x / SDXL), on ``device``.

    resolution: the training resolution in pixels (SDXL's ``add_time_ids``); vae_scaling: the VAE's scaling factor.
    """

    def __init__(self, pipe: Any, device: torch.device, resolution: int, vae_scaling: float) -> None:
        self.pipe, self.device, self.resolution, self.vae_scaling = pipe, device, resolution, vae_scaling
        self.is_sdxl = type(pipe).__name__ == "StableDiffusionXLPipeline"
        self._prompt_cache: dict[str, tuple[Tensor, Tensor | None]] = {}
        self._uncond_cache: tuple[Tensor, Tensor | None] | None = None

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        p = self.pipe
        if self.is_sdxl:
            pe, _, pooled, _ = p.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
            return pe.float(), pooled.float()
        pe, _ = p.encode_prompt(prompts, self.device, 1, False)
        return pe.float(), None

    def _time_ids(self, b: int) -> Tensor:
        r = self.resolution
        # (original size, crop top-left, target size): SDXL's micro-conditioning for an uncropped square image.
        return torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=self.device).repeat(b, 1)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Conditioning for a list of prompts; each distinct prompt is encoded once and cached (frozen encoders)."""
        new = [q for q in dict.fromkeys(prompts) if q not in self._prompt_cache]
        if len(self._prompt_cache) + len(new) > 50_000:
            self._prompt_cache.clear()
        for q in new:
            # One prompt per forward: a matmul's rounding depends on its batch size, and a prompt's embedding must
            # not depend on which other prompts were new at the same step (bit-identical resume).
            pe, pooled = self._encode_text([q])
            self._prompt_cache[q] = (pe[0], None if pooled is None else pooled[0])
        rows = [self._prompt_cache[q] for q in prompts]
        pe = torch.stack([r[0] for r in rows])
        pooled = torch.stack([r[1] for r in rows]) if self.is_sdxl else None
        return Cond(pe, pooled, self._time_ids(len(prompts)) if self.is_sdxl else None)

    @torch.no_grad()
    def encode_uncond(self, b: int) -> Cond:
        """The unconditional branch: the empty prompt (SD1.x/2.x), zeros when SDXL forces them (its convention)."""
        if self._uncond_cache is None:
            if self.is_sdxl and self.pipe.config.get("force_zeros_for_empty_prompt", True):
                pe, pooled = self._encode_text([""])
                self._uncond_cache = (torch.zeros_like(pe[0]), torch.zeros_like(pooled[0]))
            else:
                pe, pooled = self._encode_text([""])
                self._uncond_cache = (pe[0], None if pooled is None else pooled[0])
        pe, pooled = self._uncond_cache
        return Cond(pe[None].expand(b, -1, -1), None if pooled is None else pooled[None].expand(b, -1),
                    self._time_ids(b) if self.is_sdxl else None)

    @torch.no_grad()
    def encode_images(self, images: Tensor, noise: Tensor | None = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, h, w); ``noise`` samples the posterior."""
        dist = self.pipe.vae.encode(images.to(self.device, torch.float32)).latent_dist
        z = dist.mean if noise is None else dist.mean + dist.std * noise
        shift = getattr(self.pipe.vae.config, "shift_factor", None) or 0.0
        return (z - shift) * self.vae_scaling

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [-1, 1]."""
        shift = getattr(self.pipe.vae.config, "shift_factor", None) or 0.0
        return self.pipe.vae.decode(latents.float() / self.vae_scaling + shift).sample.clamp(-1, 1)
