"""The embedded default: Fashion-MNIST loader, captions, the CLIP tokenizer, and the shipped teacher and evaluator."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from distill_diffusion.toy import fmnist
from distill_diffusion.toy.fmnist import CLASS_NAMES, TEMPLATES, FashionMNIST, caption, find_fashion_mnist

ASSETS = Path(__file__).resolve().parent.parent / "distill_diffusion" / "assets"
TEACHER, EVALUATOR = ASSETS / "fmnist_teacher", ASSETS / "fmnist_evaluator"


def _idx_bytes(array: torch.Tensor) -> bytes:
    """An unsigned-byte IDX file: magic 0x0000, type 0x08, ndim, big-endian dims, then the data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + array.to(torch.uint8).numpy().tobytes()


def _write_split(folder: Path, images: torch.Tensor, labels: torch.Tensor, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = _idx_bytes(arr)
            if gz:
                (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)


def _tiny_data(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.int64)
    images[0] = 255  # an all-white image: its 28×28 centre must map to exactly 1
    return images, torch.arange(n) % 10


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_loader_reads_idx(tmp_path: Path, gz: bool) -> None:
    images, labels = _tiny_data()
    _write_split(tmp_path, images, labels, gz)
    assert find_fashion_mnist(str(tmp_path)) == tmp_path
    for split in ("train", "test"):
        ds = FashionMNIST(tmp_path, split)
        assert len(ds) == 5
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (5, 28, 28)
        assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
        assert torch.equal(ds.images.long(), images)
        x = ds.image(0)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert torch.all(x[:, 2:30, 2:30] == 1.0)  # 255 -> 1
        assert torch.all(x[:, :2] == -1.0) and torch.all(x[:, :, -2:] == -1.0)  # padding is the black background
        y = ds.image(3)
        assert torch.equal(y[0], y[1]) and torch.equal(y[1], y[2])  # grey replicated to RGB
        assert torch.allclose(y[0, 2:30, 2:30], images[3].float() / 127.5 - 1.0)
        assert ds.all_images().shape == (5, 3, 32, 32)


def test_loader_torchvision_layout(tmp_path: Path) -> None:
    images, labels = _tiny_data()
    _write_split(tmp_path / "FashionMNIST" / "raw", images, labels, gz=False)
    assert find_fashion_mnist(str(tmp_path)) == tmp_path / "FashionMNIST" / "raw"
    assert len(FashionMNIST(tmp_path, "train")) == 5


def test_missing_data_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError) as e:
        find_fashion_mnist(str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "\n" not in msg
    assert "sudo apt-get install dataset-fashion-mnist" in msg and "data.fashion_mnist=DIR" in msg
    # the default search (no root) fails the same way when neither Debian's nor torchvision's copy exists
    monkeypatch.setattr(fmnist, "DEBIAN_DIR", tmp_path / "absent")
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist()


def test_captions_and_labels() -> None:
    assert CLASS_NAMES[0] == "t-shirt" and CLASS_NAMES[9] == "ankle boot" and len(CLASS_NAMES) == 10
    assert caption(7, 0) == "a photo of a sneaker"
    assert caption(9, 0) == "a photo of an ankle boot"
    assert caption(9, 1) == "an ankle boot"
    assert caption(3, 2) == "a product photo of a dress"
    assert caption(5, len(TEMPLATES)) == caption(5, 0)  # template index wraps around
    for c in range(10):
        for k in range(len(TEMPLATES)):
            assert fmnist.label_from_prompt(caption(c, k)) == c
    assert fmnist.label_from_prompt("A Shirt on a table") == 6  # not "t-shirt"
    assert fmnist.label_from_prompt("a T-shirt") == 0
    assert fmnist.label_from_prompt("a photo of a cat") is None


def test_tokenizer_matches_open_clip() -> None:
    import open_clip

    from distill_diffusion.toy.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(model_max_length=24)
    assert len(tok) == 49408 and tok.model_max_length == 24
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    prompts = ["a photo of a sneaker", "an ankle boot", "a product photo of a t-shirt", "Hello, World! 12 naïve"]
    ours = tok(prompts, padding="max_length", max_length=24, truncation=True).input_ids
    ref = open_clip.tokenize(prompts, context_length=24).tolist()
    for a, b in zip(ours, ref, strict=True):
        n = b.index(49407) + 1  # open_clip pads with 0 after <|endoftext|>, Stable Diffusion with <|endoftext|>
        assert a[:n] == b[:n] and all(t == 49407 for t in a[n:])
    assert ours[0][:7] == [49406, 320, 1125, 539, 320, 24781, 49407]


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@pytest.mark.skipif(not (TEACHER / "model_index.json").is_file(),
                    reason="teacher not trained yet: python -m distill_diffusion.toy.train_teacher")
def test_shipped_teacher_loads_and_samples() -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    assert _size(TEACHER) <= 30 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(TEACHER)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    cfg = pipe.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps) == (
        "scaled_linear", 0.00085, 0.012, 1000)
    assert (cfg.prediction_type, cfg.set_alpha_to_one, cfg.steps_offset, cfg.clip_sample) == ("epsilon", False, 1,
                                                                                                False)
    assert all(m.dtype == torch.float32 for m in (pipe.unet, pipe.vae, pipe.text_encoder))
    assert pipe.vae.config.scaling_factor != 0.18215  # measured, not Stable Diffusion's
    assert pipe.unet.config.sample_size == 16 and pipe.tokenizer.model_max_length == \
        pipe.text_encoder.config.max_position_embeddings
    out = pipe(["a photo of a sneaker", "a bag"], height=32, width=32, num_inference_steps=2, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, 32, 32, 3) and out.min() >= 0 and out.max() <= 1 and out.std() > 0.01


@pytest.mark.skipif(not (EVALUATOR / "config.json").is_file(),
                    reason="evaluator not trained yet: python -m distill_diffusion.toy.train_evaluator")
def test_shipped_evaluator_loads_and_classifies() -> None:
    from distill_diffusion.toy.zero_shot import load_evaluator

    assert _size(EVALUATOR) <= 10 * 2**20
    model, tok = load_evaluator(EVALUATOR)
    assert model.dtype == torch.float32 and model.config.vision_config.image_size == 32
    try:
        ds = FashionMNIST(None, "test")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from distill_diffusion.toy.zero_shot import classify

    pred = classify(model, tok, ds.all_images()[:300])
    assert (pred == ds.labels[:300]).float().mean() > 0.7
