"""The teacher's frozen encoders: prompts to conditioning (each distinct prompt encoded once and cached), images to
normalised VAE latents and back. Methods never call these; the loop builds each step's :class:`Batch` with them.
How a family encodes is :mod:`distill_diffusion.families`' business; this module caches and batches."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import UserError
from .method import Cond


class Encoders:
    """Text encoder(s) and VAE of a teacher, through its family (``distill_diffusion.families.Family``).

    Prompt conditioning is cached on the CPU (never on the accelerator), least recently used first out, within
    ``cache_bytes``; new prompts are encoded ``encode_batch`` at a time (padded with the empty prompt to that size,
    so a prompt's rows come from a forward of one fixed shape); ``store``, when set, is an on-disk cache
    (:class:`PromptStore`) read before encoding and written after it.
    """

    def __init__(self, family: Any, cache_bytes: int = 2 << 30, encode_batch: int = 1,
                 store: PromptStore | None = None, latent_store: LatentStore | None = None) -> None:
        self.family, self.device = family, family.device
        self.cache_bytes, self.encode_batch, self.store = cache_bytes, encode_batch, store
        self.latent_store = latent_store
        self._prompt_cache: OrderedDict[str, Cond] = OrderedDict()
        self.cached_bytes = 0
        self._uncond_cache: Cond | None = None

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Conditioning for a list of prompts; each distinct prompt is encoded once while it stays in the cache."""
        rows = {q: self._prompt_cache.get(q) for q in dict.fromkeys(prompts)}
        missing = [q for q, r in rows.items() if r is None]
        rows |= self.encode_rows(missing)
        for q, r in rows.items():
            self._remember(q, r)
        return self.family.extras(_stack([rows[q] for q in prompts])._map(lambda _n, a, _b: a.to(self.device)))

    def encode_rows(self, prompts: list[str]) -> dict[str, Cond]:
        """CPU rows of prompts not in the memory cache: from the store, else encoded in fixed-size batches."""
        out = {q: r for q in prompts if self.store is not None and (r := self.store.get(q)) is not None}
        todo = [q for q in prompts if q not in out]
        k = self.encode_batch
        for i in range(0, len(todo), k):
            chunk = todo[i: i + k]
            # A fixed batch shape: a matmul's rounding depends on its batch size, and a prompt's embedding must not
            # depend on which other prompts were new at the same step (bit-identical resume).
            cond = self.family.encode_text(chunk + [""] * (k - len(chunk)))
            for j, q in enumerate(chunk):
                out[q] = cond.index(j)._map(lambda _n, a, _b: a.to("cpu", copy=True))
                if self.store is not None:
                    self.store.put(q, out[q])
        return out

    def _remember(self, prompt: str, row: Cond) -> None:
        """Put ``row`` in the memory cache as the most recent entry, dropping the oldest beyond ``cache_bytes``."""
        if prompt in self._prompt_cache:
            self._prompt_cache.move_to_end(prompt)
            return
        size = _nbytes(row)
        if size > self.cache_bytes:
            return
        while self.cached_bytes + size > self.cache_bytes:
            _, old = self._prompt_cache.popitem(last=False)
            self.cached_bytes -= _nbytes(old)
        self._prompt_cache[prompt] = row
        self.cached_bytes += size

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
        return self.latents(*self.posterior(images), noise)

    @torch.no_grad()
    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """The VAE posterior of images (B, 3, H, W): raw (mean, std), each (B, C, h, w); std None for a
        deterministic autoencoder (SANA's DC-AE)."""
        return self.family.vae_posterior(images.to(self.device, torch.float32))

    def stored_posterior(self, index: list[int], image: Any) -> tuple[Tensor, Tensor | None]:
        """The posterior of dataset images by index from :attr:`latent_store`; an image it lacks is decoded with
        ``image(i)`` ((3, H, W) in [-1, 1]), encoded alone and stored first."""
        rows = []
        for i in index:
            row = self.latent_store.get(i)
            if row is None:
                mean, std = self.posterior(image(i)[None])
                row = (mean[0].cpu(), None if std is None else std[0].cpu())
                self.latent_store.put(i, *row)
            rows.append(row)
        stds = [r[1] for r in rows]
        return torch.stack([r[0] for r in rows]), None if stds[0] is None else torch.stack(stds)

    def latents(self, mean: Tensor, std: Tensor | None, noise: Tensor | None = None) -> Tensor:
        """Normalised latents from a posterior: (mean + std · noise − shift) · scaling (the mean without noise)."""
        f = self.family
        mean = mean.to(self.device)
        z = mean if noise is None or std is None else mean + std.to(self.device) * noise
        return (z - f.vae_shift) * f.vae_scaling

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents -> images in [-1, 1]."""
        f = self.family
        return f.vae_decode(latents.float() / f.vae_scaling + f.vae_shift).clamp(-1, 1)


def _nbytes(c: Cond) -> int:
    total = 0
    for name in ("prompt_embeds", "pooled", "time_ids", "mask"):
        a = getattr(c, name)
        total += 0 if a is None else a.numel() * a.element_size()
    return total


class DiskStore:
    """Tensors on disk, one safetensors file per key under ``DIR/<2 hex>/<hash>.safetensors``, written atomically.

    ``fingerprint`` (what the tensors depend on: the teacher's weights hash and the settings) is written to
    ``DIR/store.json`` by the first writer; a folder made for another teacher or setting is refused, never mixed.
    ``option`` names the config key, for that message."""

    def __init__(self, root: str | Path, fingerprint: dict[str, Any], option: str) -> None:
        self.root = Path(root)
        meta = self.root / "store.json"
        if meta.is_file():
            have = json.loads(meta.read_text())
            if have != fingerprint:
                diff = sorted(k for k in set(have) | set(fingerprint) if have.get(k) != fingerprint.get(k))
                raise UserError(f"{option}={str(root)!r} holds tensors of another setting ({', '.join(diff)} "
                                "differ); give an empty folder for this teacher and data")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps(fingerprint, indent=1))

    def _path(self, key: str) -> Path:
        h = hashlib.blake2b(key.encode("utf-8"), digest_size=16).hexdigest()
        return self.root / h[:2] / f"{h}.safetensors"

    def has(self, key: str) -> bool:
        """Whether ``key`` is stored, without reading its tensors."""
        return self._path(key).is_file()

    def get_tensors(self, key: str) -> dict[str, Tensor] | None:
        from safetensors.torch import load_file

        p = self._path(key)
        return load_file(str(p)) if p.is_file() else None

    def put_tensors(self, key: str, tensors: dict[str, Tensor]) -> None:
        from safetensors.torch import save_file

        from .artifacts import atomic_file

        p = self._path(key)
        p.parent.mkdir(exist_ok=True)
        with atomic_file(p) as tmp:  # a reader never sees half a file
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"key": key})


class PromptStore(DiskStore):
    """Prompt conditioning on disk (``data.text_cache_dir``), for teachers whose text encoders cost more than a
    training step (T5-XXL): ``python -m distill_diffusion.precompute`` fills it once, training reads it."""

    def __init__(self, root: str | Path, fingerprint: dict[str, Any]) -> None:
        super().__init__(root, fingerprint, "data.text_cache_dir")

    def get(self, prompt: str) -> Cond | None:
        t = self.get_tensors(prompt)
        return None if t is None else Cond(**t)

    def put(self, prompt: str, row: Cond) -> None:
        self.put_tensors(prompt, {n: getattr(row, n) for n in ("prompt_embeds", "pooled", "time_ids", "mask")
                                  if getattr(row, n) is not None})


class LatentStore(DiskStore):
    """The VAE posterior (mean, std; raw, before normalisation) of each training image by its dataset index
    (``data.latent_cache_dir``): a run that reads it never decodes an image or runs the VAE encoder. Each image is
    encoded alone, so an entry does not depend on how the store was filled."""

    def __init__(self, root: str | Path, fingerprint: dict[str, Any]) -> None:
        super().__init__(root, fingerprint, "data.latent_cache_dir")

    def get(self, index: int) -> tuple[Tensor, Tensor | None] | None:
        t = self.get_tensors(str(index))
        return None if t is None else (t["mean"], t.get("std"))

    def put(self, index: int, mean: Tensor, std: Tensor | None) -> None:
        self.put_tensors(str(index), {"mean": mean} if std is None else {"mean": mean, "std": std})


def _stack(rows: list[Cond]) -> Cond:
    first = rows[0]
    return first._map(lambda n, _a, _b: torch.stack([getattr(r, n) for r in rows]))
