"""What to generate (prompts, seeds, rows) and how: batched generation with component timing and an NFE check.

Every row (teacher at a step count and guidance, a student at a step count, a hybrid) generates image i from
prompt ``prompts[i]`` and seed ``seeds[i]``, so rows differ only by the model. Teacher rows are cached on disk under a
key of the teacher's weights hash, the prompts, seeds, steps, guidance and batch size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill_diffusion import artifacts
from distill_diffusion.errors import UserError
from distill_diffusion.families import family_of
from distill_diffusion.hybrid import hybrid_sample

from .metrics import save_json, to_uint8

MAX_CACHED_IMAGE_BYTES = 1 << 30  # teacher images above this are not kept (features and scores still are)


# ---- prompts and seeds -----------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """N (prompt, seed) pairs shared by every row, with class labels where prompts name a Fashion-MNIST class."""

    prompts: list[str]
    seeds: list[int]
    labels: list[int | None]
    source: str
    grid: list[int] = field(default_factory=list)  # indices shown in the comparison grid

    def __len__(self) -> int:
        return len(self.prompts)

    def key(self) -> str:
        h = hashlib.sha1(json.dumps([self.prompts, self.seeds]).encode())
        return h.hexdigest()[:16]


def grid_indices(prompts: list[str], labels: list[int | None], n_prompts: int = 4, per_prompt: int = 2) -> list[int]:
    """Up to ``n_prompts`` distinct prompts (distinct classes first), ``per_prompt`` seeds each, in index order."""
    chosen: list[str] = []
    seen_labels: set[int] = set()
    for p, lab in zip(prompts, labels):
        if len(chosen) == n_prompts:
            break
        if p in chosen or (lab is not None and lab in seen_labels):
            continue
        chosen.append(p)
        if lab is not None:
            seen_labels.add(lab)
    out = []
    for p in chosen:
        out += [i for i, q in enumerate(prompts) if q == p][:per_prompt]
    return out


def fmnist_eval_set(n: int, seed: int, root: str | None = None) -> EvalSet:
    """Captions of the first ``n`` Fashion-MNIST test labels (templates cycling), seeds ``seed + i``."""
    from distill_diffusion.toy.fmnist import FashionMNIST, caption

    try:
        labels = FashionMNIST(root, "test").labels[:n].tolist()
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    prompts = [caption(lab, i) for i, lab in enumerate(labels)]
    return EvalSet(prompts, [seed + i for i in range(n)], labels, "Fashion-MNIST test captions",
                   grid_indices(prompts, labels))


def file_eval_set(path: str, n: int, seed: int, seeds_per_prompt: int = 1) -> EvalSet:
    """One prompt a line (blank lines skipped); prompt ``i // seeds_per_prompt`` (cycling) for image i."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"prompt file {path!r} does not exist")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise UserError(f"prompt file {path!r} is empty (one prompt a line)")
    prompts = [lines[(i // seeds_per_prompt) % len(lines)] for i in range(n)]
    from distill_diffusion.toy.fmnist import label_from_prompt

    labels = [label_from_prompt(q) for q in prompts]
    return EvalSet(prompts, [seed + i for i in range(n)], labels, f"prompts from {p}",
                   grid_indices(prompts, labels))


def with_seed_offset(es: EvalSet, offset: int) -> EvalSet:
    """The same prompts with seeds shifted by ``offset`` (another seed set)."""
    return EvalSet(es.prompts, [s + offset for s in es.seeds], es.labels, es.source, es.grid)


# ---- rows --------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the report: ``kind`` "teacher" | "student" | "hybrid" at ``steps`` steps."""

    name: str
    kind: str
    steps: int
    guidance: float | None = None  # the teacher's (teacher and hybrid rows); students use their run's
    run: str | None = None
    method: str | None = None

    @property
    def label(self) -> str:
        if self.kind == "teacher":
            return f"teacher (w={self.guidance:g})"
        if self.kind == "hybrid":
            return f"{self.name} (w={self.guidance:g})"
        return self.name


# ---- timing ------------------------------------------------------------------------------------------------------


class ComponentTimer:
    """Forward hooks that time the denoising network ("unet": a UNet or a transformer), the VAE decoder and the text
    encoder(s), and count network evaluations.

    ``unet_samples`` counts every sample the network processes, so a CFG step (a doubled batch) counts twice: NFE per
    image = unet_samples / images.
    """

    def __init__(self, pipes: list[Any], device: str | torch.device = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.parts: dict[str, list[nn.Module]] = {"unet": [], "vae_decode": [], "text_encoder": []}
        for p in pipes:
            self.parts["unet"].append(family_of(p).pipe_net(p))
            self.parts["vae_decode"] += [m for m in (p.vae.decoder, getattr(p.vae, "post_quant_conv", None))
                                         if m is not None]
            self.parts["text_encoder"] += [m for n, m in p.components.items()
                                           if n.startswith("text_encoder") and m is not None]
        self.handles: list[Any] = []
        self.reset()

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.parts, 0.0)
        self.unet_samples = 0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __enter__(self) -> ComponentTimer:
        for part, modules in self.parts.items():
            for m in modules:
                starts: list[float] = []

                def pre(mod: nn.Module, args: Any, kwargs: Any, part: str = part, starts: list = starts) -> None:
                    self._sync()
                    starts.append(time.perf_counter())
                    if part == "unet":
                        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
                        self.unet_samples += int(x.shape[0])

                def post(mod: nn.Module, args: Any, kwargs: Any, out: Any, part: str = part,
                         starts: list = starts) -> None:
                    self._sync()
                    self.seconds[part] += time.perf_counter() - starts.pop()

                self.handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
                self.handles.append(m.register_forward_hook(post, with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@dataclass
class Speed:
    """Per-image cost of a row at ``batch_size``: NFE (checked against the hooks), median latency over full batches
    after a warm-up."""

    nfe: float
    latency_ms: float
    images_per_s: float
    batch_size: int
    ms_per_image: dict[str, float]  # unet, vae_decode, text_encoder, other

    def to_json(self) -> dict[str, Any]:
        return {"nfe": self.nfe, "latency_ms": self.latency_ms, "images_per_s": self.images_per_s,
                "batch_size": self.batch_size, "ms_per_image": self.ms_per_image}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Speed:
        return cls(**d)


# ---- generation --------------------------------------------------------------------------------------------------


class Generator:
    """Generates a row's images batch by batch (uint8, (B, H, W, 3)), timing each batch."""

    def __init__(self, row: Row, teacher: Any | None, student: Any | None, device: str | torch.device = "cpu",
                 image_size: int | None = None) -> None:
        self.row, self.teacher, self.student = row, teacher, student
        self.device, self.image_size = device, image_size
        pipes = [p for p in (teacher if row.kind != "student" else None, student if row.kind != "teacher" else None)
                 if p is not None]
        self.timer = ComponentTimer(pipes, device)
        self.batch_seconds: list[tuple[int, float]] = []

    def _call(self, prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, float]:
        r = self.row
        if r.kind == "teacher":
            out, sec = artifacts.sample(self.teacher, prompts, r.steps, seeds, guidance_scale=r.guidance,
                                        output_type="np")
        elif r.kind == "student":
            out, sec = artifacts.sample(self.student, prompts, r.steps, seeds, output_type="np")
        else:
            out, sec = hybrid_sample(self.teacher, self.student, prompts, r.steps, seeds, r.guidance,
                                     output_type="np")
        return to_uint8(np.asarray(out)), sec

    def stream(self, es: EvalSet, batch_size: int, warmup: bool = True) -> Iterator[tuple[int, np.ndarray]]:
        n = len(es)
        with self.timer:
            if warmup:  # first calls pay for allocations and lazy initialisation: not measured
                k = min(batch_size, n)
                self._call(es.prompts[:k], es.seeds[:k])
            self.timer.reset()
            for i in range(0, n, batch_size):
                j = min(n, i + batch_size)
                imgs, sec = self._call(es.prompts[i:j], es.seeds[i:j])
                self.batch_seconds.append((j - i, sec))
                yield i, resize_images(imgs, self.image_size)

    def nfe(self) -> int:
        """The row's UNet evaluations per image as :mod:`distill_diffusion.artifacts` states them (the app's too)."""
        r = self.row
        if r.kind == "teacher":
            return artifacts.nfe(self.teacher, r.steps, r.guidance)
        if r.kind == "student":
            return artifacts.nfe(self.student, r.steps)
        return artifacts.hybrid_nfe(self.teacher, self.student, r.steps, r.guidance)

    def speed(self, batch_size: int) -> Speed:
        """The row's cost; the NFE stated by :meth:`nfe` must be what the hooks counted, else the report is wrong."""
        n = sum(b for b, _ in self.batch_seconds)
        total = sum(s for _, s in self.batch_seconds)
        full = [s / b for b, s in self.batch_seconds if b == batch_size] or [s / b for b, s in self.batch_seconds]
        ms = {k: 1000 * v / n for k, v in self.timer.seconds.items()}
        ms["other"] = max(0.0, 1000 * total / n - sum(ms.values()))
        nfe = self.nfe()
        if self.timer.unet_samples != nfe * n:
            raise RuntimeError(f"{self.row.label} at {self.row.steps} steps: the hooks counted "
                               f"{self.timer.unet_samples / n:g} UNet evaluations per image, artifacts.nfe says {nfe}")
        return Speed(nfe=float(nfe), latency_ms=1000 * statistics.median(full),
                     images_per_s=n / total, batch_size=batch_size, ms_per_image=ms)


def resize_images(images: np.ndarray, size: int | None) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, size, size, 3) with PIL bicubic (antialiased) when ``size`` differs."""
    if size is None or images.shape[1] == size and images.shape[2] == size:
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


# ---- the teacher cache -------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTILL_CACHE") or Path.home() / ".cache" / "distill-diffusion") / "eval"


class TeacherCache:
    """One folder per teacher row: ``meta.json``, ``speed.json``, ``grid.npy``, ``images.npy`` (if small),
    ``feats_<feature key>.npy`` and ``scores_<scoring key>.json`` (CLIP score, accuracy).

    Key: the teacher's weights hash, prompts, seeds, steps, guidance, batch size, image size, device and dtype.
    """

    def __init__(self, root: Path, teacher_hash: str, es: EvalSet, row: Row, batch_size: int,
                 image_size: int | None, device: str, sampler: str | None = None,
                 resolution: int | None = None) -> None:
        meta = {"teacher_hash": teacher_hash, "eval_set": es.key(), "steps": row.steps, "guidance": row.guidance,
                "batch_size": batch_size, "image_size": image_size, "device": torch.device(device).type,
                "dtype": "float32", "n": len(es),
                "sampler": sampler or f"DDIM eta 0, {artifacts.TEACHER_SPACING} spacing"}
        if resolution is not None:  # the runs' training resolution (absent: the teacher's own, as before)
            meta["resolution"] = resolution
        self.meta = meta
        key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
        self.dir = root / "teacher" / key

    def path(self, name: str) -> Path:
        return self.dir / name

    def has(self, *names: str) -> bool:
        return all(self.path(n).is_file() for n in names)

    def write_meta(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        save_json(self.path("meta.json"), self.meta)

    def save_array(self, name: str, arr: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with artifacts.atomic_file(self.path(name)) as tmp:
            np.save(tmp, arr)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ImageSink:
    """Writes a row's images into a .npy memmap as they stream (only when the whole set is small enough)."""

    def __init__(self, cache: TeacherCache | None, n: int) -> None:
        self.cache, self.n = cache, n
        self.arr: np.ndarray | None = None
        self.enabled = cache is not None
        self._file = contextlib.ExitStack()  # holds the atomic write of images.npy from the first batch to close()

    def add(self, start: int, images: np.ndarray) -> None:
        if not self.enabled:
            return
        if self.arr is None:
            shape = (self.n, *images.shape[1:])
            if int(np.prod(shape)) > MAX_CACHED_IMAGE_BYTES:
                self.enabled = False
                return
            self.cache.dir.mkdir(parents=True, exist_ok=True)
            tmp = self._file.enter_context(artifacts.atomic_file(self.cache.path("images.npy")))
            self.arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        self.arr[start : start + len(images)] = images

    def close(self) -> None:
        if self.enabled and self.arr is not None:
            self.arr.flush()
            del self.arr
            self._file.close()


def cached_images(cache: TeacherCache, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    arr = np.load(cache.path("images.npy"), mmap_mode="r")
    for i in range(0, len(arr), batch_size):
        yield i, np.asarray(arr[i : i + batch_size])


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' per-call warnings (e.g. LCMScheduler's note on schedules that do not start at T - 1)."""
    from diffusers.utils import logging as dlog

    old = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(old)


# ---- evaluating rows ---------------------------------------------------------------------------------------------


def _short(key: str) -> str:
    return hashlib.sha1(key.encode()).hexdigest()[:16]


@dataclass
class Context:
    """Everything rows share: the eval set, reference statistics, feature/CLIP models, the teacher, settings."""

    es: EvalSet
    ref: Any  # metrics.RefStats | None
    fm: Any  # metrics.FeatureModel
    clip: Any  # metrics.ClipModel | None (CLIP score)
    zero_shot: Any  # metrics.ZeroShot | None (prompt accuracy)
    teacher_ref: str
    teacher_hash: str
    teacher_resolution: int | None = None  # the runs' training resolution (None: the teacher pipeline's own)
    teacher_sampler: str | None = None  # its reference rows' scheduler (None: DDIM, as VP teachers)
    batch_size: int = 64
    device: str = "cpu"
    image_size: int | None = None
    cache_dir: Path | None = None
    progress: bool = True
    _teacher: Any = None

    def teacher(self) -> Any:
        if self._teacher is None:
            self._teacher = artifacts.load_teacher(self.teacher_ref, device=self.device,
                                                   resolution=self.teacher_resolution)
        return self._teacher

    @property
    def scoring_key(self) -> str:
        zs = self.zero_shot.clip.key if self.zero_shot is not None else "-"
        return _short(f"{self.clip.key if self.clip is not None else '-'}|{zs}")

    def scorer(self, es: EvalSet) -> Any:
        from .metrics import Scorer

        return Scorer(self.fm, es.prompts, es.labels, self.clip, self.zero_shot, self.device)


def _consume(ctx: Context, label: str, es: EvalSet, source: Iterator[tuple[int, np.ndarray]],
             sink: ImageSink | None = None) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    from tqdm.auto import tqdm

    scorer = ctx.scorer(es)
    grid: dict[int, np.ndarray] = {}
    want = set(es.grid)
    with tqdm(total=len(es), desc=label, unit="img", disable=not ctx.progress, leave=False) as bar:
        for start, imgs in source:
            scorer.add(start, imgs)
            if sink is not None:
                sink.add(start, imgs)
            for k in range(len(imgs)):
                if start + k in want:
                    grid[start + k] = imgs[k]
            bar.update(len(imgs))
    if sink is not None:
        sink.close()
    feats, scores = scorer.finish()
    grid_arr = np.stack([grid[i] for i in es.grid]) if es.grid else np.zeros((0, 1, 1, 3), np.uint8)
    return feats, scores, grid_arr


def evaluate_row(ctx: Context, row: Row, student: Any | None = None, es: EvalSet | None = None) -> dict[str, Any]:
    """Generate (or load from the teacher cache) a row's images, score them, and return the row's numbers.

    The result holds ``grid`` (the grid images, (G, H, W, 3) uint8) besides JSON-able numbers.
    """
    from .metrics import row_scores

    es = es or ctx.es
    cached = False
    with quiet_diffusers():
        if row.kind == "teacher" and ctx.cache_dir is not None:
            cache = TeacherCache(ctx.cache_dir, ctx.teacher_hash, es, row, ctx.batch_size, ctx.image_size, ctx.device,
                                 ctx.teacher_sampler, ctx.teacher_resolution)
            feats_f, scores_f = f"feats_{_short(ctx.fm.key)}.npy", f"scores_{ctx.scoring_key}.json"
            if cache.has("speed.json", "grid.npy", feats_f, scores_f):
                feats = np.load(cache.path(feats_f))
                scores = json.loads(cache.path(scores_f).read_text())
                grid = np.load(cache.path("grid.npy"))
                cached = True
            elif cache.has("speed.json", "grid.npy", "images.npy"):
                feats, scores, grid = _consume(ctx, f"{row.label} {row.steps} steps (cached images)", es,
                                               cached_images(cache, ctx.batch_size))
                cache.save_array(feats_f, feats)
                save_json(cache.path(scores_f), scores)
                cached = True
            else:
                cache.clear()
                gen = Generator(row, ctx.teacher(), None, ctx.device, ctx.image_size)
                feats, scores, grid = _consume(ctx, f"{row.label} {row.steps} steps", es,
                                               gen.stream(es, ctx.batch_size), ImageSink(cache, len(es)))
                cache.write_meta()
                save_json(cache.path("speed.json"), gen.speed(ctx.batch_size).to_json())
                cache.save_array("grid.npy", grid)
                cache.save_array(feats_f, feats)
                save_json(cache.path(scores_f), scores)
            speed = Speed.from_json(json.loads(cache.path("speed.json").read_text()))
        else:
            teacher = ctx.teacher() if row.kind in ("teacher", "hybrid") else None
            gen = Generator(row, teacher, student, ctx.device, ctx.image_size)
            feats, scores, grid = _consume(ctx, f"{row.label} {row.steps} steps", es, gen.stream(es, ctx.batch_size))
            speed = gen.speed(ctx.batch_size)
    out: dict[str, Any] = {
        "name": row.name, "label": row.label, "kind": row.kind, "method": row.method, "run": row.run,
        "steps": row.steps, "guidance": row.guidance, "n": int(len(feats)), "cached": cached,
        "features": ctx.fm.name, "clip_model": ctx.clip.name if ctx.clip is not None else None,
        **row_scores(feats, es.prompts, ctx.ref), **scores,
        "nfe": speed.nfe, "latency_ms": speed.latency_ms, "images_per_s": speed.images_per_s,
        "ms_per_image": speed.ms_per_image, "grid": grid,
    }
    return out


def best_teacher_rows(ctx: Context, steps: list[int], guidances: list[float],
                      es: EvalSet | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The teacher at each step count and guidance; per step count the FID-minimising guidance is "best".

    Returns (best row per step count, every row evaluated).
    """
    if len(guidances) > 1 and ctx.ref is None:
        raise UserError("a guidance grid picks the FID-minimising guidance and needs a reference (--reference)")
    best, every = [], []
    for s in steps:
        rows = [evaluate_row(ctx, Row("teacher", "teacher", s, g, method="ddim"), es=es) for g in guidances]
        every += rows
        pick = min(rows, key=lambda r: r["fid"]) if len(rows) > 1 else rows[0]
        best.append(pick)
    return best, every
