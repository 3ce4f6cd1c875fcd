"""Image-quality metrics: FID (clean-fid), a torchmetrics FID cross-check, CLIP score, prompt accuracy, diversity.

Features for FID: clean-fid's Inception (the torchscript network of Karras et al., its "clean" mode: a PIL bicubic
resize in float to 299 px, no quantisation; Parmar et al. 2022) when its weights are at hand, otherwise the shipped
domain evaluator's image embeddings (a small CLIP trained on Fashion-MNIST). Both are :class:`FeatureModel` modules
taking images in the uint8 range (B, 3, S, S), so the same module serves clean-fid's ``custom_feat_extractor`` and
torchmetrics' ``FrechetInceptionDistance(feature=...)``. Every score carries the name of its features: FIDs on
different features are not comparable.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distill_diffusion.artifacts import atomic_file, atomic_write
from distill_diffusion.errors import UserError

INCEPTION_FILE = "inception-2015-12-05.pt"  # clean-fid's file name; it downloads to /tmp on Linux
INCEPTION_DIRS = ("/tmp",)
EMBEDDED_EVALUATOR = Path(__file__).resolve().parent.parent / "distill_diffusion" / "assets" / "fmnist_evaluator"


# ---- the transformers 5 / torchmetrics 1.9 adapter (the one place) --------------------------------------------


def as_tensor(out: Any) -> Tensor:
    """The embedding tensor of ``get_image_features`` / ``get_text_features`` in any transformers version.

    transformers 5 returns a ``BaseModelOutputWithPooling`` whose ``pooler_output`` is the projected embedding;
    transformers 4 (and torchmetrics 1.9, which calls ``.norm`` on the result) expect the tensor itself.
    """
    if isinstance(out, Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    raise TypeError(f"cannot find an embedding tensor in {type(out).__name__}")


class TensorCLIP(nn.Module):
    """A CLIPModel whose ``get_image_features`` / ``get_text_features`` return (B, D) tensors.

    All CLIP calls in eval go through this wrapper (CLIP score via torchmetrics, zero-shot accuracy, evaluator
    features), so the transformers output-type change is handled once.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        self.config = model.config  # torchmetrics reads config.text_config.max_position_embeddings

    def get_image_features(self, pixel_values: Tensor, **kw: Any) -> Tensor:
        return as_tensor(self.model.get_image_features(pixel_values=pixel_values, **kw))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kw: Any) -> Tensor:
        return as_tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kw))


# ---- the shipped evaluator -------------------------------------------------------------------------------------


def load_evaluator(path: str | Path) -> tuple[nn.Module, Any]:
    """(CLIPModel in float32, CLIPTokenizer) from an evaluator folder; UserError when it is not one."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"evaluator {str(path)!r} is not a CLIPModel folder (no config.json); train it with "
                        "`python -m distill_diffusion.toy.train_evaluator` or pass --evaluator DIR")
    try:
        from distill_diffusion.toy.zero_shot import load_evaluator as _load
    except ImportError:
        _load = None
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    if _load is not None:
        model, tok = _load(path)
    else:
        from transformers import CLIPModel, CLIPTokenizer

        model, tok = CLIPModel.from_pretrained(path), CLIPTokenizer.from_pretrained(path)
    return model.float().eval().requires_grad_(False), tok


def evaluator_pixels(x: Tensor) -> Tensor:
    """Images in the uint8 range (B, 3, H, W) -> the evaluator's input: [-1, 1], its training range (no CLIP
    mean/std; see ``distill_diffusion.toy.train_evaluator.pixel_inputs``)."""
    return x.float() / 127.5 - 1.0


def clean_resizer(size: int) -> Callable[[np.ndarray], np.ndarray]:
    """clean-fid's "clean" resize to ``size`` px: PIL bicubic per channel in float32, no quantisation.

    (H, W, 3) uint8 -> (size, size, 3) float32 in [0, 255]; ``size`` = 299 is exactly ``build_resizer("clean")``.
    """
    from cleanfid.resize import make_resizer

    return make_resizer("PIL", False, "bicubic", (size, size))


def module_hash(module: nn.Module) -> str:
    """A hash of a module's weights (and buffers): features change exactly when this does."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureModel(nn.Module):
    """Images in the uint8 range (B, 3, S, S), uint8 or float -> features (B, D); ``size`` = S.

    ``name`` labels scores ("inception_v3" or "fmnist_evaluator"); ``key`` adds a hash of the weights, for caches.
    Inputs of another size are resized bicubically inside (torchmetrics feeds raw images); the evaluation path
    resizes outside with :func:`clean_resizer` first, as clean-fid does.
    """

    name: str = "features"
    size: int = 299
    num_features: int = 0

    def prepare(self, x: Tensor) -> Tensor:
        x = x.float()
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True,
                                          align_corners=False).clamp(0, 255)
        return x

    @property
    def key(self) -> str:
        if not hasattr(self, "_key"):
            self._key = f"{self.name}-{self.size}-{module_hash(self)}"
        return self._key

    def resizer(self) -> Callable[[np.ndarray], np.ndarray]:
        return clean_resizer(self.size)


class EvaluatorFeatures(FeatureModel):
    """The shipped evaluator's projected image embeddings (a small CLIP trained on Fashion-MNIST)."""

    def __init__(self, clip: nn.Module, name: str = "fmnist_evaluator") -> None:
        super().__init__()
        self.clip = clip if isinstance(clip, TensorCLIP) else TensorCLIP(clip)
        self.name = name
        self.size = int(self.clip.config.vision_config.image_size)
        self.num_features = int(self.clip.config.projection_dim)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.clip.get_image_features(evaluator_pixels(self.prepare(x)))


class InceptionFeatures(FeatureModel):
    """clean-fid's Inception-v3 (torchscript, 2048-d pool features) from a weights file; the same computation as
    ``cleanfid.inception_torchscript.InceptionV3W(resize_inside=False)``."""

    name = "inception_v3"
    size = 299
    num_features = 2048

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        try:
            self.base = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as e:  # a wrong or truncated file
            raise UserError(f"{path} is not clean-fid's Inception torchscript file ({type(e).__name__}); "
                            f"expected {INCEPTION_FILE}") from None
        self.path = str(path)

    @property
    def key(self) -> str:
        if not hasattr(self, "_key"):
            h = hashlib.sha1()
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            self._key = f"{self.name}-{self.size}-{h.hexdigest()[:16]}"
        return self._key

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        x = self.prepare(x)
        return self.base.layers.forward((x - 128) / 128).view(x.shape[0], 2048)


def _offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "DISTILL_OFFLINE"))


def _network(host: str = "nvlabs-fi-cdn.nvidia.com") -> bool:
    if _offline():
        return False
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def find_inception(weights: str | None, cache_dir: Path | None = None) -> Path | None:
    """A local Inception weights file: the one the user names, else clean-fid's download location."""
    if weights:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise UserError(f"--inception-weights {weights!r} does not exist (clean-fid's {INCEPTION_FILE})")
        return p
    for d in [*INCEPTION_DIRS, *([str(cache_dir)] if cache_dir else [])]:
        if (Path(d) / INCEPTION_FILE).is_file():
            return Path(d) / INCEPTION_FILE
    return None


def select_features(mode: str, evaluator: str | Path | None, inception_weights: str | None = None,
                    cache_dir: Path | None = None) -> FeatureModel:
    """``auto``: Inception if its weights are at hand (a named file, clean-fid's cached one, or clean-fid's download
    where there is network), else the evaluator. ``inception`` / ``evaluator`` force one (UserError if missing)."""
    if mode not in ("auto", "inception", "evaluator"):
        raise UserError(f"--features must be auto, evaluator or inception, not {mode!r}")
    if mode in ("auto", "inception"):
        path = find_inception(inception_weights, cache_dir)
        if path is None and (mode == "inception" and not _offline() or mode == "auto" and _network()):
            try:
                from cleanfid.downloads_helper import check_download_inception

                path = Path(check_download_inception(INCEPTION_DIRS[0]))
            except Exception as e:  # no network after all, a proxy, a full disk
                if mode == "inception":
                    raise UserError(f"could not get clean-fid's Inception weights ({type(e).__name__}); pass "
                                    "--inception-weights FILE or --features evaluator") from None
        if path is not None:
            return InceptionFeatures(path)
        if mode == "inception":
            raise UserError("Inception weights are not at hand offline: pass --inception-weights FILE "
                            f"({INCEPTION_FILE}) or --features evaluator")
    if evaluator is None or not Path(evaluator).is_dir():
        raise UserError(f"no feature model for FID: the evaluator {str(evaluator)!r} does not exist and Inception "
                        "weights are not at hand; pass --inception-weights FILE or --evaluator DIR")
    model, _ = load_evaluator(evaluator)
    return EvaluatorFeatures(model, name=evaluator_name(evaluator))


def evaluator_name(path: str | Path) -> str:
    return "fmnist_evaluator" if Path(path).resolve() == EMBEDDED_EVALUATOR else f"evaluator:{Path(path).name}"


def to_model_input(images: np.ndarray, resize: Callable[[np.ndarray], np.ndarray]) -> Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, S, S) float32 in [0, 255], image by image as clean-fid's ResizeDataset does."""
    out = [torch.from_numpy(np.ascontiguousarray(resize(im))).permute(2, 0, 1) for im in images]
    return torch.stack(out).float()


@torch.no_grad()
def extract(fm: FeatureModel, images: np.ndarray, device: str | torch.device = "cpu",
            resize: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Features (B, D) float64 of (B, H, W, 3) uint8 images, through clean-fid's resize and ``fm``."""
    x = to_model_input(images, resize or fm.resizer()).to(device)
    return fm(x).double().cpu().numpy()


# ---- FID ---------------------------------------------------------------------------------------------------------


def gaussian(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) as clean-fid computes them (np.mean, np.cov with rowvar=False)."""
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def fid_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """clean-fid's Fréchet distance ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½)."""
    from cleanfid.fid import frechet_distance

    return float(frechet_distance(mu1, s1, mu2, s2))


class _Precomputed(nn.Module):
    """The identity on feature vectors: torchmetrics' FID fed with features already extracted."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: Tensor) -> Tensor:
        return x


def fid_torchmetrics(fake: np.ndarray, real: np.ndarray, feature: nn.Module | None = None,
                     batch_size: int = 256) -> float:
    """torchmetrics' ``FrechetInceptionDistance(feature=...)``: a cross-check of the Fréchet arithmetic.

    ``fake``/``real``: precomputed features (N, D) when ``feature`` is None, else images the module takes
    ((N, 3, S, S) in the uint8 range).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    module = feature if feature is not None else _Precomputed(fake.shape[1])
    m = FrechetInceptionDistance(feature=module, reset_real_features=False)
    for arr, real_flag in ((real, True), (fake, False)):
        t = torch.as_tensor(arr)
        for i in range(0, len(t), batch_size):
            m.update(t[i : i + batch_size], real=real_flag)
    return float(m.compute())


# ---- reference statistics --------------------------------------------------------------------------------------


@dataclass
class Reference:
    """Where reference images come from: ``kind`` "fmnist" (the Fashion-MNIST test split), "folder" or "stats"."""

    kind: str
    path: str | None = None

    def describe(self) -> str:
        return {"fmnist": "Fashion-MNIST test split", "folder": f"folder {self.path}",
                "stats": f"statistics {self.path}"}[self.kind]


@dataclass
class RefStats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int | None
    feats: np.ndarray | None  # kept for the torchmetrics cross-check; None for a user's stats file
    source: str
    feature_key: str


def image_files(folder: str | Path) -> list[str]:
    """The images clean-fid would read from a folder (recursive, its extensions), sorted."""
    from cleanfid.utils import EXTENSIONS

    folder = Path(folder)
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix[1:] in EXTENSIONS)


def reference_count(ref: Reference, fmnist_root: str | None = None) -> int | None:
    """How many reference images there are (None for a stats file without a count)."""
    if ref.kind == "fmnist":
        from distill_diffusion.toy.fmnist import FashionMNIST

        try:
            return len(FashionMNIST(fmnist_root, "test"))
        except FileNotFoundError as e:
            raise UserError(str(e)) from None
    if ref.kind == "folder":
        return len(image_files(ref.path))
    try:
        with np.load(ref.path) as z:
            return int(z["n"]) if "n" in z.files else None
    except (OSError, ValueError) as e:
        raise UserError(f"{ref.path} is not a readable .npz ({type(e).__name__})") from None


def _source_id(ref: Reference, fmnist_root: str | None) -> str:
    if ref.kind == "fmnist":
        from distill_diffusion.toy.fmnist import find_fashion_mnist

        folder = find_fashion_mnist(fmnist_root)
        files = sorted(p for p in folder.iterdir() if p.name.startswith("t10k"))
    else:
        files = [Path(f) for f in image_files(ref.path)]
    h = hashlib.sha1(ref.kind.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def fmnist_reference_images(fmnist_root: str | None = None) -> np.ndarray:
    """The Fashion-MNIST test images as (N, 32, 32, 3) uint8 (padded to 32 px, as the teacher was trained)."""
    from distill_diffusion.toy.fmnist import FashionMNIST

    x = FashionMNIST(fmnist_root, "test").all_images()  # (N, 3, 32, 32) in [-1, 1]
    return to_uint8(((x + 1) / 2).permute(0, 2, 3, 1).numpy())


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (N, H, W, 3) -> uint8, rounding as diffusers' ``numpy_to_pil`` does."""
    return (images * 255).round().clip(0, 255).astype(np.uint8)


def reference_stats(ref: Reference, fm: FeatureModel, cache_dir: Path | None, device: str | torch.device = "cpu",
                    batch_size: int = 64, fmnist_root: str | None = None, verbose: bool = True) -> RefStats:
    """(mu, sigma) of the reference under ``fm``, computed once and cached on disk.

    The cache key holds the reference's identity (file names, sizes, mtimes) and ``fm.key`` (feature name, input
    size and weight hash), so changing the features (or the reference) computes new statistics. A user's ``.npz``
    (clean-fid's format: ``mu``, ``sigma``) is used as is, after a dimension check.
    """
    if ref.kind == "stats":
        with np.load(ref.path) as z:
            if "mu" not in z.files or "sigma" not in z.files:
                raise UserError(f"{ref.path} has no mu/sigma arrays (clean-fid's statistics format)")
            mu, sigma = z["mu"], z["sigma"]
            n = int(z["n"]) if "n" in z.files else None
            fk = str(z["feature_key"]) if "feature_key" in z.files else None
        if mu.shape != (fm.num_features,):
            raise UserError(f"{ref.path} holds {mu.shape[0]}-d statistics but the {fm.name} features are "
                            f"{fm.num_features}-d; compute them with the same features")
        if fk is not None and fk != fm.key:
            raise UserError(f"{ref.path} was computed with features {fk}, not {fm.key}")
        return RefStats(mu, sigma, n, None, ref.describe(), fm.key)

    key = hashlib.sha1(f"{_source_id(ref, fmnist_root)}|{fm.key}".encode()).hexdigest()[:20]
    cached = cache_dir / "reference" / f"{key}.npz" if cache_dir else None
    if cached is not None and cached.is_file():
        with np.load(cached) as z:
            if str(z["feature_key"]) == fm.key:
                return RefStats(z["mu"], z["sigma"], int(z["n"]), z["feats"], ref.describe(), fm.key)
    if ref.kind == "fmnist":
        from tqdm.auto import tqdm

        imgs = fmnist_reference_images(fmnist_root)
        resize = fm.resizer()
        parts = []
        for i in tqdm(range(0, len(imgs), batch_size), desc="reference features", disable=not verbose):
            parts.append(extract(fm, imgs[i : i + batch_size], device, resize))
        feats = np.concatenate(parts)
    else:
        from cleanfid.fid import get_folder_features

        feats = get_folder_features(str(ref.path), fm, num_workers=0, batch_size=batch_size,
                                    device=torch.device(device), mode="clean", custom_fn_resize=fm.resizer(),
                                    description="reference features", verbose=verbose).astype(np.float64)
    mu, sigma = gaussian(feats)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(cached) as tmp:
            np.savez(tmp, mu=mu, sigma=sigma, n=len(feats), feats=feats.astype(np.float32), feature_key=fm.key,
                     source=ref.describe())
    return RefStats(mu, sigma, len(feats), feats, ref.describe(), fm.key)


# ---- CLIP score, zero-shot accuracy, diversity ------------------------------------------------------------------


class EvaluatorProcessor:
    """A CLIPProcessor stand-in for the evaluator (whose folder holds no image-processor config): images (uint8
    range, (3, H, W) each) -> clean resize to its size -> [-1, 1]; text -> its tokenizer."""

    def __init__(self, tokenizer: Any, size: int) -> None:
        self.tokenizer, self.size = tokenizer, size
        self.resize = clean_resizer(size)

    def __call__(self, images: list[Tensor] | None = None, text: list[str] | None = None,
                 return_tensors: str = "pt", padding: bool = True, **kw: Any) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if images is not None:
            arr = np.stack([im.permute(1, 2, 0).cpu().numpy().astype(np.uint8) for im in images])
            out["pixel_values"] = evaluator_pixels(to_model_input(arr, self.resize))
        if text is not None:
            tok = self.tokenizer(list(text), padding=True, truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt")
            out["input_ids"], out["attention_mask"] = tok["input_ids"], tok["attention_mask"]
        return out


@dataclass
class ClipModel:
    """A CLIP for CLIP score: the adapter-wrapped model, its processor, a display name and a cache key."""

    model: TensorCLIP
    processor: Any
    name: str
    key: str


def load_clip(clip: str | None, evaluator: str | Path | None) -> ClipModel | None:
    """An OpenAI CLIP folder (``--clip``), else the evaluator, else None (CLIP score not computed)."""
    if clip:
        from transformers import CLIPModel, CLIPProcessor

        p = Path(clip).expanduser()
        if not (p / "config.json").is_file():
            raise UserError(f"--clip {clip!r} is not a CLIP model folder (config.json missing); give a local copy "
                            "of e.g. openai/clip-vit-large-patch14 (model and processor)")
        try:
            model, proc = CLIPModel.from_pretrained(p).eval(), CLIPProcessor.from_pretrained(p)
        except (OSError, ValueError) as e:
            raise UserError(f"could not load --clip {clip!r} ({str(e).splitlines()[0][:160]})") from None
        wrapped = TensorCLIP(model.requires_grad_(False))
        return ClipModel(wrapped, proc, f"clip:{p.name}", f"clip:{module_hash(wrapped)}")
    if evaluator is not None and Path(evaluator).is_dir():
        model, tok = load_evaluator(evaluator)
        wrapped = TensorCLIP(model)
        name = evaluator_name(evaluator)
        return ClipModel(wrapped, EvaluatorProcessor(tok, int(model.config.vision_config.image_size)), name,
                         f"{name}:{module_hash(wrapped)}")
    return None


class ClipScore:
    """torchmetrics' CLIPScore (100 · cos(image, caption), clipped at 0 on the mean) over a stream of batches."""

    def __init__(self, clip: ClipModel) -> None:
        from torchmetrics.multimodal.clip_score import CLIPScore

        self.metric = CLIPScore(model_name_or_path=lambda: (clip.model, clip.processor))

    def update(self, images: np.ndarray, prompts: list[str]) -> None:
        """images (B, H, W, 3) uint8."""
        self.metric.update([torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1) for im in images],
                           list(prompts))

    def compute(self) -> float:
        return float(self.metric.compute())


class ZeroShot:
    """Zero-shot classification with the evaluator over the Fashion-MNIST class names (prompt ensembling over the
    caption templates it was trained on: mean of the normalised text embeddings per class)."""

    def __init__(self, clip: ClipModel) -> None:
        from distill_diffusion.toy.fmnist import CLASS_NAMES, TEMPLATES, caption

        self.clip = clip
        caps = [caption(c, k) for c in range(len(CLASS_NAMES)) for k in range(len(TEMPLATES))]
        with torch.no_grad():
            tok = clip.processor(text=caps)
            t = nn.functional.normalize(clip.model.get_text_features(tok["input_ids"], tok["attention_mask"]), dim=-1)
        t = t.reshape(len(CLASS_NAMES), len(TEMPLATES), -1).mean(1)
        self.text = nn.functional.normalize(t, dim=-1)  # (10, D)

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> class indices (B,)."""
        ims = [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1) for im in images]
        pix = self.clip.processor(images=ims)["pixel_values"]
        f = nn.functional.normalize(self.clip.model.get_image_features(pix), dim=-1)
        return (f @ self.text.T).argmax(-1).numpy()


def diversity(feats: np.ndarray, prompts: list[str]) -> float | None:
    """Mean pairwise cosine distance 1 - cos(f_i, f_j) among images of the same prompt (different seeds), averaged
    over prompts with at least two images; None when no prompt repeats."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    vals = []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        f = feats[idx]
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        d = 1.0 - f @ f.T
        n = len(idx)
        vals.append(float(d[np.triu_indices(n, 1)].mean()))
    return float(np.mean(vals)) if vals else None


# ---- scoring a stream of generated images ----------------------------------------------------------------------


class Scorer:
    """Consumes batches of generated images (in index order) and returns features plus image-level scores.

    FID is not computed here: it is a cheap function of the features and the reference (see :func:`row_scores`).
    """

    def __init__(self, fm: FeatureModel, prompts: list[str], labels: list[int | None], clip: ClipModel | None,
                 zero_shot: ZeroShot | None, device: str | torch.device = "cpu") -> None:
        self.fm, self.prompts, self.labels, self.device = fm, prompts, labels, device
        self.resize = fm.resizer()
        self.clip = ClipScore(clip) if clip is not None else None
        self.zero_shot = zero_shot if zero_shot is not None and all(lab is not None for lab in labels) else None
        self.feats: list[np.ndarray] = []
        self.correct = 0
        self.n = 0

    def add(self, start: int, images: np.ndarray) -> None:
        """images (B, H, W, 3) uint8 for indices start..start+B-1."""
        b = len(images)
        self.feats.append(extract(self.fm, images, self.device, self.resize))
        prompts = self.prompts[start : start + b]
        if self.clip is not None:
            self.clip.update(images, prompts)
        if self.zero_shot is not None:
            pred = self.zero_shot.predict(images)
            self.correct += int((pred == np.array(self.labels[start : start + b])).sum())
        self.n += b

    def finish(self) -> tuple[np.ndarray, dict[str, float | None]]:
        feats = np.concatenate(self.feats) if self.feats else np.zeros((0, self.fm.num_features))
        scores = {"clip": self.clip.compute() if self.clip is not None else None,
                  "accuracy": self.correct / self.n if self.zero_shot is not None and self.n else None}
        return feats, scores


def row_scores(feats: np.ndarray, prompts: list[str], ref: RefStats | None) -> dict[str, float | None]:
    """FID (clean-fid) and its torchmetrics cross-check against the reference, and diversity, from features."""
    out: dict[str, float | None] = {"fid": None, "fid_torchmetrics": None,
                                    "diversity": diversity(feats, prompts[: len(feats)])}
    if ref is not None and len(feats) >= 2:
        mu, sigma = gaussian(feats)
        out["fid"] = fid_from_stats(mu, sigma, ref.mu, ref.sigma)
        if ref.feats is not None:
            out["fid_torchmetrics"] = fid_torchmetrics(feats, ref.feats.astype(np.float64))
    return out


def batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    for i in range(0, n, size):
        yield i, min(n, i + size)


def save_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically: a killed eval leaves the cache's old file or none, never half of one."""
    atomic_write(path, json.dumps(obj, indent=1))
