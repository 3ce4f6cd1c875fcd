"""Training data: image+caption folders, webdataset tar shards, saved `datasets`, prompt files, and Fashion-MNIST
for the embedded default.

Every source is a list of (image or None, caption) with random access. The order in which samples are visited is a
function of (seed, global sample index) only, so a resumed or multi-process run sees exactly the samples a single
uninterrupted run would; :meth:`Stream.batches` decodes them ahead of the step in DataLoader workers, in the same
order.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import UserError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def _key(*parts: Any) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def pil_to_tensor(img: Any, resolution: int, center_crop: bool = True) -> Tensor:
    """PIL image -> (3, R, R) float in [-1, 1]: shorter side resized to R, then centre-cropped (or squashed)."""
    import numpy as np
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    if center_crop:
        s = resolution / min(w, h)
        img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    else:
        img = img.resize((resolution, resolution), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return arr / 127.5 - 1.0


class Source:
    """A finite list of training samples."""

    has_images: bool = True

    def __len__(self) -> int:
        raise NotImplementedError

    def image(self, i: int) -> Tensor:
        """(3, R, R) in [-1, 1]."""
        raise NotImplementedError

    def caption(self, i: int, variant: int) -> str:
        """The caption of sample i; ``variant`` picks among templates where a source has several."""
        raise NotImplementedError


class ImageFolder(Source):
    """image.png + image.txt pairs (the common captioned-folder convention), searched recursively."""

    def __init__(self, root: str, resolution: int, center_crop: bool = True, check_images: bool = True) -> None:
        p = Path(root)
        if not p.is_dir():
            raise UserError(f"data.images={root!r} is not a folder")
        self.files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        if not self.files:
            raise UserError(f"data.images={root!r} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
        self.resolution, self.center_crop = resolution, center_crop
        if check_images:  # data.check_images=false skips it (millions of files: a broken one then fails mid-run)
            self._check_headers()

    def _check_headers(self) -> None:
        """Open every file's header (cheap: no pixels decoded) so that a broken image fails now, not hours in."""
        from PIL import Image, UnidentifiedImageError

        for f in self.files:
            try:
                with Image.open(f):
                    pass
            except (UnidentifiedImageError, OSError) as e:
                raise UserError(f"cannot read image {f} ({type(e).__name__}); remove or replace it") from None

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        f = self.files[i]
        try:
            with Image.open(f) as img:
                return pil_to_tensor(img, self.resolution, self.center_crop)
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read image {f} ({type(e).__name__}); remove or replace it") from None

    def caption(self, i: int, variant: int) -> str:
        t = self.files[i].with_suffix(".txt")
        return t.read_text(encoding="utf-8").strip() if t.is_file() else ""


def expand_braces(pattern: str) -> list[str]:
    """webdataset's shard patterns: ``{000..009}`` (zero-padded numeric ranges, the width of the first bound) and
    ``{a,b}`` lists, any number of groups, expanded left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end():], m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo:
            raise UserError(f"data.webdataset={pattern!r}: the range {{{body}}} runs backwards")
        items = [str(i).zfill(len(r.group(1))) for i in range(lo, hi + 1)]
    else:
        items = body.split(",")
    return [head + x + rest for x in items for rest in expand_braces(tail)]


def _open_shard(url: str) -> Any:
    """A seekable binary file of a local shard or, through fsspec, of a remote one (http(s), s3, gs, ...)."""
    if "://" in url and not url.startswith("file://"):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb")


CAPTION_EXTS = ("txt", "caption", "json")
JSON_CAPTION_KEYS = ("caption", "text", "prompt")


class WebDataset(Source):
    """webdataset tar shards: members ``KEY.jpg`` / ``.png`` / ``.webp`` with ``KEY.txt`` or ``KEY.json`` (its
    "caption", "text" or "prompt" field) in the same shard, KEY being the member path up to the first dot of its
    file name (webdataset's rule).

    The shards' headers are read once at start into an index (shard, byte offset, size) of every sample, so an image
    is one seek and one read: random access, hence the keyed order, the multi-process split and bit-identical resume
    of every other source. Remote shards (any fsspec URL) need a server that answers range requests.
    """

    def __init__(self, pattern: str, resolution: int, center_crop: bool = True) -> None:
        self.urls = [u for p in pattern.split("::") for u in expand_braces(p)]
        self.resolution, self.center_crop = resolution, center_crop
        self.samples: list[tuple[int, tuple[int, int], tuple[int, int, str] | None]] = []
        for k, url in enumerate(self.urls):
            self.samples += self._index(k, url)
        if not self.samples:
            raise UserError(f"data.webdataset={pattern!r}: no KEY.jpg / KEY.png samples in {len(self.urls)} shard(s)")
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def _index(self, k: int, url: str) -> list[tuple[int, tuple[int, int], tuple[int, int, str] | None]]:
        try:
            with _open_shard(url) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                members = [m for m in tar if m.isfile()]
        except (OSError, tarfile.TarError) as e:
            raise UserError(f"data.webdataset: cannot read shard {url} ({type(e).__name__}: {e})") from None
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        for m in members:
            folder, _, name = m.name.rpartition("/")
            stem, _, ext = name.partition(".")
            groups.setdefault(f"{folder}/{stem}", {})[ext.lower()] = m
        out = []
        for parts in groups.values():
            img = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
            cap = next(((parts[e], e) for e in CAPTION_EXTS if e in parts), None)
            if img is not None:
                out.append((k, (img.offset_data, img.size),
                            None if cap is None else (cap[0].offset_data, cap[0].size, cap[1])))
        return out

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if os.getpid() != self._pid:  # a DataLoader worker: its own file handles, never the parent's positions
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = _open_shard(self.urls[shard])
        f = self._files[shard]
        f.seek(offset)
        return f.read(size)

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, i: int) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        shard, (off, size), _ = self.samples[i]
        try:
            with Image.open(io.BytesIO(self._read(shard, off, size))) as img:
                return pil_to_tensor(img, self.resolution, self.center_crop)
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot decode sample {i} of shard {self.urls[shard]} ({type(e).__name__})") from None

    def caption(self, i: int, variant: int) -> str:
        shard, _, cap = self.samples[i]
        if cap is None:
            return ""
        text = self._read(shard, cap[0], cap[1]).decode("utf-8")
        if cap[2] == "json":
            d = json.loads(text)
            return str(next((d[k] for k in JSON_CAPTION_KEYS if k in d), "")).strip()
        return text.strip()


class SavedDataset(Source):
    """A `datasets` dataset saved with ``save_to_disk`` (or a hub name where there is network)."""

    def __init__(self, path: str, image_column: str, caption_column: str, resolution: int, center_crop: bool) -> None:
        import datasets

        try:
            ds = datasets.load_from_disk(path) if os.path.isdir(path) else datasets.load_dataset(path, split="train")
        except Exception as e:
            raise UserError(f"data.dataset={path!r} could not be loaded ({type(e).__name__}); "
                            "give a folder written by Dataset.save_to_disk") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        for col, key in ((image_column, "image_column"), (caption_column, "caption_column")):
            if col not in ds.column_names:
                raise UserError(f"data.dataset has no column {col!r} (columns: {', '.join(ds.column_names)}); "
                                f"set data.{key}")
        self.ds, self.ic, self.cc = ds, image_column, caption_column
        self.resolution, self.center_crop = resolution, center_crop

    def __len__(self) -> int:
        return len(self.ds)

    def image(self, i: int) -> Tensor:
        return pil_to_tensor(self.ds[i][self.ic], self.resolution, self.center_crop)

    def caption(self, i: int, variant: int) -> str:
        return str(self.ds[i][self.cc])


class PromptFile(Source):
    """One prompt a line, for data-free methods."""

    has_images = False

    def __init__(self, path: str) -> None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"data.prompts={path!r}: no such file")
        self.prompts = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not self.prompts:
            raise UserError(f"data.prompts={path!r} is empty; write one prompt a line")

    def __len__(self) -> int:
        return len(self.prompts)

    def caption(self, i: int, variant: int) -> str:
        return self.prompts[i]


class FashionMNISTSource(Source):
    """Fashion-MNIST train split at 32×32 RGB, captioned from class names with templates."""

    def __init__(self, root: str | None, resolution: int) -> None:
        from .toy.fmnist import FashionMNIST, caption, find_fashion_mnist

        try:
            folder = find_fashion_mnist(root)
        except FileNotFoundError as e:
            raise UserError(str(e).strip().splitlines()[0]) from None
        self.ds = FashionMNIST(folder, "train")
        self._caption = caption
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.ds)

    def image(self, i: int) -> Tensor:
        x = self.ds.image(i)
        if x.shape[-1] != self.resolution:
            x = torch.nn.functional.interpolate(x[None], size=self.resolution, mode="bilinear", antialias=True)[0]
        return x

    def caption(self, i: int, variant: int) -> str:
        return self._caption(int(self.ds.labels[i]), variant)


def build_source(data: Any, resolution: int, embedded_teacher: bool, needs_images: bool) -> Source:
    """Pick the data source from the config; explain what to set when nothing fits."""
    given = [k for k in ("images", "webdataset", "dataset", "prompts", "fashion_mnist") if getattr(data, k)]
    if len(given) > 1:
        raise UserError(f"give one data source, not {' and '.join('data.' + k for k in given)}")
    if data.images:
        return ImageFolder(data.images, resolution, data.center_crop, data.check_images)
    if data.webdataset:
        return WebDataset(data.webdataset, resolution, data.center_crop)
    if data.dataset:
        return SavedDataset(data.dataset, data.image_column, data.caption_column, resolution, data.center_crop)
    if data.prompts:
        if needs_images:
            raise UserError("this method trains on real images; data.prompts gives prompts only: "
                            "set data.images or data.dataset")
        return PromptFile(data.prompts)
    if data.fashion_mnist or embedded_teacher:
        return FashionMNISTSource(data.fashion_mnist, resolution)
    raise UserError("no training data: set data.images (a folder of images with .txt captions), data.webdataset "
                    "(tar shards), data.dataset, or "
                    "data.prompts (one prompt a line; data-free methods)")


@dataclass
class Samples:
    images: Tensor | None  # (B, 3, R, R) in [-1, 1]
    prompts: list[str]
    ids: Tensor  # (B,) global sample indices, the keys of every random draw
    index: list[int] | None = None  # the source's indices of the samples (the latent store's keys)


class Stream:
    """Deterministic batches: global sample g visits dataset index perm_(g // N)[g % N], perm keyed by (seed, epoch).

    A process with rank r of W, at step s and micro-batch m of M, takes the global indices
    ((s·M + m)·W + r)·B + [0, B).
    """

    def __init__(self, source: Source, seed: int, batch_size: int, rank: int = 0, world: int = 1,
                 accum: int = 1, empty_prompt_prob: float = 0.0, load_images: bool = True) -> None:
        self.source, self.seed, self.b, self.rank, self.world, self.accum = source, seed, batch_size, rank, world, accum
        self.empty_prompt_prob = empty_prompt_prob
        self.load_images = load_images and source.has_images
        self._perm: tuple[int, Tensor] | None = None

    def _perm_for(self, epoch: int) -> Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(_key(self.seed, "epoch", epoch))
            self._perm = (epoch, torch.randperm(len(self.source), generator=g))
        return self._perm[1]

    def ids(self, step: int, micro: int = 0) -> Tensor:
        start = ((step * self.accum + micro) * self.world + self.rank) * self.b
        return torch.arange(start, start + self.b)

    def get(self, step: int, micro: int = 0) -> Samples:
        ids = self.ids(step, micro)
        n = len(self.source)
        images, prompts, index = [], [], []
        for g in ids.tolist():
            i = int(self._perm_for(g // n)[g % n])
            index.append(i)
            if self.load_images:
                images.append(self.source.image(i))
            drop = self.empty_prompt_prob > 0 and (_key(self.seed, "drop", g) % 10_000) < self.empty_prompt_prob * 1e4
            prompts.append("" if drop else self.source.caption(i, _key(self.seed, "variant", g) % 1_000))
        return Samples(torch.stack(images) if images else None, prompts, ids, index)

    def batches(self, start: int, stop: int, num_workers: int = 0, prefetch: int = 2) -> Iterator[Samples]:
        """``get(step, micro)`` for steps ``start`` .. ``stop`` - 1 and each micro-batch, in that order; with
        ``num_workers`` > 0 decoded ahead in DataLoader worker processes (``prefetch`` batches each). Every batch
        is a function of its (step, micro) alone, so workers change when it is decoded, never what it holds."""
        if num_workers == 0:
            return (self.get(k // self.accum, k % self.accum) for k in range(start * self.accum, stop * self.accum))
        from torch.utils.data import DataLoader

        loader = DataLoader(_StepBatches(self), batch_size=None, num_workers=num_workers, prefetch_factor=prefetch,
                            sampler=range(start * self.accum, stop * self.accum), collate_fn=_no_collate)
        return iter(loader)


class _StepBatches(torch.utils.data.Dataset):
    """Map-style view of a stream: item k is micro-batch k % accum of step k // accum."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def __getitem__(self, k: int) -> Samples:
        return self.stream.get(k // self.stream.accum, k % self.stream.accum)


def _no_collate(s: Samples) -> Samples:
    return s
