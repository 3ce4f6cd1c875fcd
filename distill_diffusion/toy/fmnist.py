"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) for the embedded default: IDX loader and class captions.

Looks in a folder the user gives, then Debian's package (``apt-get install dataset-fashion-mnist`` puts the IDX
files under /usr/share/datasets/fashion-mnist/), then torchvision's download layout (<root>/FashionMNIST/raw/).
"""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import torch
from torch import Tensor

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATES = ["a photo of {a} {c}", "{a} {c}", "a product photo of {a} {c}"]
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
HOW_TO_GET = ("Fashion-MNIST not found: run `sudo apt-get install dataset-fashion-mnist`, or pass "
              "data.fashion_mnist=DIR (a folder with the four IDX files, .gz or raw)")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(label: int, k: int) -> str:
    """Caption of a class with template ``k mod len(TEMPLATES)``: "a photo of a sneaker", "an ankle boot", ..."""
    c = CLASS_NAMES[label]
    return TEMPLATES[k % len(TEMPLATES)].format(a=_article(c), c=c)


def label_from_prompt(prompt: str) -> int | None:
    """The class a prompt names (longest class name that occurs as words), or None."""
    p = prompt.lower()
    best = None
    for i, c in enumerate(CLASS_NAMES):
        if re.search(rf"(^|[^a-z-]){re.escape(c)}($|[^a-z])", p) and (best is None or len(c) > len(CLASS_NAMES[best])):
            best = i
    return best


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(root: str | Path | None = None) -> Path:
    """The folder holding the IDX files; FileNotFoundError (one line saying how to get them) when absent."""
    candidates = []
    if root:
        r = Path(root)
        candidates += [r, r / "FashionMNIST" / "raw", r / "raw"]
    else:
        candidates += [DEBIAN_DIR, Path.home() / ".cache" / "FashionMNIST" / "raw", Path("data/FashionMNIST/raw")]
    for c in candidates:
        if all(_find_file(c, s) for s in _FILES["train"] + _FILES["test"]):
            return c
    raise FileNotFoundError(HOW_TO_GET)


def read_idx(path: Path) -> Tensor:
    """An IDX file (optionally gzipped) as a uint8 tensor of its declared shape."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8)
    return data.reshape(shape)


class FashionMNIST:
    """One split: ``images`` (N, 28, 28) uint8, ``labels`` (N,) int64; ``image(i)`` -> (3, 32, 32) in [-1, 1]."""

    def __init__(self, root: str | Path | None = None, split: str = "train") -> None:
        folder = find_fashion_mnist(root)
        img_f, lab_f = (_find_file(folder, s) for s in _FILES[split])
        self.images = read_idx(img_f)
        self.labels = read_idx(lab_f).long()
        if len(self.images) != len(self.labels):
            raise ValueError(f"{folder}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Tensor:
        """Image ``i`` as (3, 32, 32) float in [-1, 1]."""
        return to_rgb32(self.images[i : i + 1])[0]

    def all_images(self) -> Tensor:
        """(N, 3, 32, 32) in [-1, 1]."""
        return to_rgb32(self.images)


def to_rgb32(x: Tensor) -> Tensor:
    """(N, 28, 28) uint8 -> (N, 3, 32, 32) float in [-1, 1]: zero-pad 2 pixels (the background is black)."""
    x = x.float() / 127.5 - 1.0
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()
