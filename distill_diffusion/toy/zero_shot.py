"""The shipped evaluator: loading, embeddings, and its zero-shot accuracy on the Fashion-MNIST test split.

    python -m distill_diffusion.toy.zero_shot [--evaluator PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .fmnist import CLASS_NAMES, TEMPLATES, FashionMNIST, caption


def evaluator_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "fmnist_evaluator"


def load_evaluator(path: str | Path | None = None) -> tuple[Any, Any]:
    """(CLIPModel in fp32 eval mode, CLIPTokenizer) from the shipped folder or ``path``."""
    from transformers import CLIPModel, CLIPTokenizer

    p = Path(path or evaluator_path())
    model = CLIPModel.from_pretrained(p).float().eval()
    return model, CLIPTokenizer.from_pretrained(p)


def _pooled(out: Any) -> Tensor:
    # transformers 5 returns an output object from get_*_features; earlier versions returned the tensor.
    return out if torch.is_tensor(out) else out.pooler_output


def image_embeds(model: Any, images: Tensor) -> Tensor:
    """Images (B, 3, 32, 32) in [-1, 1] -> unit-norm embeddings (B, D)."""
    return F.normalize(_pooled(model.get_image_features(pixel_values=images)), dim=-1)


def text_embeds(model: Any, tokenizer: Any, prompts: list[str]) -> Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return F.normalize(_pooled(model.get_text_features(input_ids=ids)), dim=-1)


@torch.no_grad()
def class_embeds(model: Any, tokenizer: Any) -> Tensor:
    """(10, D): each class's text embedding averaged over the caption templates, renormalised."""
    caps = [caption(c, k) for c in range(len(CLASS_NAMES)) for k in range(len(TEMPLATES))]
    e = text_embeds(model, tokenizer, caps).view(len(CLASS_NAMES), len(TEMPLATES), -1).mean(1)
    return F.normalize(e, dim=-1)


@torch.no_grad()
def classify(model: Any, tokenizer: Any, images: Tensor, batch: int = 500) -> Tensor:
    """Zero-shot class of each image (B,)."""
    ce = class_embeds(model, tokenizer)
    return torch.cat([(image_embeds(model, images[i:i + batch]) @ ce.T).argmax(1)
                      for i in range(0, len(images), batch)])


def zero_shot_accuracy(evaluator: str | Path | None = None, data: str | None = None) -> float:
    model, tok = load_evaluator(evaluator)
    ds = FashionMNIST(data, "test")
    pred = classify(model, tok, ds.all_images())
    return float((pred == ds.labels).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description="Zero-shot accuracy of the evaluator on the Fashion-MNIST test split")
    ap.add_argument("--evaluator", default=None)
    ap.add_argument("--data", default=None)
    a = ap.parse_args()
    acc = zero_shot_accuracy(a.evaluator, a.data)
    print(f"zero-shot accuracy on the 10,000 test images: {100 * acc:.2f}%")


if __name__ == "__main__":
    main()
