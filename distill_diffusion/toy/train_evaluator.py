"""Train the shipped evaluator: a small transformers ``CLIPModel`` on Fashion-MNIST, for offline FID features,
CLIP score and prompt accuracy.

    python -m distill_diffusion.toy.train_evaluator --out distill_diffusion/assets/fmnist_evaluator [--steps 2000]

Contrastive training (Radford et al. 2021) adapted to a dataset whose captions repeat: each image is scored against
every distinct caption (10 classes × templates) and its positives are all captions of its class (a multi-positive
InfoNCE); the text side is trained symmetrically over the batch. The model is independent of the teacher's text
encoder, so scoring the teacher with it is not scoring the teacher with itself.

Images enter in [-1, 1], the teacher's pixel range, with no CLIP mean/std (see :func:`pixel_inputs`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .fmnist import CLASS_NAMES, TEMPLATES, FashionMNIST, caption
from .tokenizer import build_clip_tokenizer
from .zero_shot import _pooled, image_embeds, zero_shot_accuracy

MAX_TOKENS = 16  # the longest caption is 9 tokens with <start>/<end>; a short context keeps the text tower cheap


def make_evaluator():
    """A 2.6M-parameter CLIPModel: ViT 32×32 / patch 4 (64 patches, width 64, 4 layers), text width 48 (2 layers).

    The text width is kept small because its token embedding (49408 × width, 2.4M of the parameters) dominates the
    file size; the vision tower is sized for ~1 s per batch-128 step on one loaded CPU core.
    """
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=49408, hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=MAX_TOKENS, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                projection_dim=64)
    vision = dict(image_size=32, patch_size=4, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_channels=3, projection_dim=64)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def pixel_inputs(images: Tensor) -> Tensor:
    """Images (B, 3, 32, 32) in [-1, 1] -> the evaluator's input: unchanged (our own model, trained on this range)."""
    return images


def class_captions() -> tuple[list[str], Tensor]:
    """Every distinct caption (class-major: class c, template k at c * len(TEMPLATES) + k) and its label (N,)."""
    caps = [caption(c, k) for c in range(len(CLASS_NAMES)) for k in range(len(TEMPLATES))]
    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(len(TEMPLATES))
    return caps, labels


def random_shift(x: Tensor, g: torch.Generator, max_shift: int = 2) -> Tensor:
    """Per-image random translation by up to ``max_shift`` pixels, filling with the black background (-1).

    (B, C, H, W) -> (B, C, H, W). Fashion-MNIST items are centred; shifts keep the ViT from keying on exact pixels.
    """
    b, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(-1, x.shape[1], -1, w + 2 * p)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(-1, x.shape[1], h, -1)
    return cropped.gather(3, cols)


def contrastive_loss(img: Tensor, txt: Tensor, y: Tensor, cap_labels: Tensor, logit_scale: Tensor) -> Tensor:
    """Multi-positive symmetric InfoNCE.

    img (B, D) and txt (N, D) normalised embeddings; y (B,) image labels; cap_labels (N,) caption labels.
    Image -> text: -log of the softmax mass on the captions of the image's class. Text -> image: the same over the
    batch's images, for captions whose class occurs in the batch.
    """
    logits = logit_scale.exp().clamp(max=100) * img @ txt.T  # (B, N)
    pos = y[:, None] == cap_labels[None, :]
    neg_inf = torch.finfo(logits.dtype).min
    loss_i = (torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~pos, neg_inf), 1)).mean()
    lt, pos_t = logits.T, pos.T
    has = pos_t.any(1)
    loss_t = (torch.logsumexp(lt, 1) - torch.logsumexp(lt.masked_fill(~pos_t, neg_inf), 1))[has].mean()
    return 0.5 * (loss_i + loss_t)


def save_evaluator(model, tok, out: Path) -> int:
    """Save in fp16 (halves the file) with the config's dtype set to float32, so a plain ``from_pretrained`` (whose
    default dtype is "auto", read from the config) gives float32 weights; the tokenizer goes into the same folder.
    Returns the folder's size in bytes."""
    import copy

    out.mkdir(parents=True, exist_ok=True)
    copy.deepcopy(model).half().save_pretrained(out, safe_serialization=True)
    cfg_f = out / "config.json"
    cfg = json.loads(cfg_f.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    for sub in ("text_config", "vision_config"):
        for key in ("dtype", "torch_dtype"):
            if key in cfg.get(sub, {}):
                cfg[sub][key] = "float32"
    cfg_f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(out)
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="distill_diffusion/assets/fmnist_evaluator")
    ap.add_argument("--data", default=None, help="Fashion-MNIST folder (default: Debian's or torchvision's)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # model initialisation
    out = Path(args.out)
    ds = FashionMNIST(args.data, "train")
    data = ds.all_images()  # (60000, 3, 32, 32) in [-1, 1]
    tok = build_clip_tokenizer(MAX_TOKENS)
    caps, cap_labels = class_captions()
    enc = tok(caps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    model = make_evaluator()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    log: list[dict] = []
    bar = tqdm(range(args.steps), desc="evaluator")
    for step in bar:
        # linear warm-up then linear decay to 5%
        for gr in opt.param_groups:
            gr["lr"] = args.lr * min(1.0, (step + 1) / 100) * max(0.05, 1 - step / args.steps)
        idx = torch.randint(0, len(data), (args.batch_size,), generator=g)
        x, y = random_shift(data[idx], g), ds.labels[idx]
        img = image_embeds(model, pixel_inputs(x))  # (B, D), unit norm
        txt = F.normalize(_pooled(model.get_text_features(**enc)), dim=-1)  # (N, D)
        loss = contrastive_loss(img, txt, y, cap_labels, model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log.append({"step": step + 1, "loss": round(loss.item(), 4), "elapsed": round(time.time() - t0, 1)})
    train_s = time.time() - t0
    model.eval()
    size = save_evaluator(model, tok, out)

    acc = zero_shot_accuracy(out, args.data)
    summary = {"args": vars(args), "train_seconds": round(train_s, 1), "bytes": size, "zero_shot_test_accuracy": acc,
               "log": log}
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"evaluator written to {out} ({size / 2**20:.1f} MiB), trained in {train_s:.0f} s, "
          f"zero-shot accuracy on the test split {acc:.4f}")


if __name__ == "__main__":
    main()
