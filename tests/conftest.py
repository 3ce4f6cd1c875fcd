"""Tiny diffusers pipelines built in memory (SD1.x epsilon, SD2.x v-prediction, SDXL), saved once per session.

Nothing is downloaded: the CLIP tokenizer comes from the BPE vocabulary bundled in open_clip_torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


def _share_loaded_tokenizers() -> None:
    """Every pipeline load reads the CLIP tokenizer's 49k-entry vocabulary again (0.6 s each; a training run loads
    its teacher once, but the suite loads the same tiny teachers a few hundred times). Tests share one tokenizer
    object per folder instead: nothing in the library mutates a tokenizer."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        load = cls.from_pretrained.__func__
        cache: dict[tuple, object] = {}

        def cached(klass, path, *args, _load=load, _cache=cache, **kwargs):
            key = (klass, str(path), args, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
            if key not in _cache:
                _cache[key] = _load(klass, path, *args, **kwargs)
            return _cache[key]

        cls.from_pretrained = classmethod(cached)


_share_loaded_tokenizers()


def _text_encoder(cls: type, hidden: int = 16, proj: int = 16) -> torch.nn.Module:
    from transformers import CLIPTextConfig

    cfg = CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=hidden,
                         intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, vocab_size=49408,
                         max_position_embeddings=16, projection_dim=proj, hidden_act="gelu")
    return cls(cfg)


def make_tiny_pipeline(kind: str = "sd", prediction_type: str = "epsilon", seed: int = 0):
    """A random SD-family pipeline: 16×16 pixels, 4×8×8 latents, a 2-layer CLIP text encoder of width 16."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from distill_diffusion.toy.tokenizer import build_clip_tokenizer

    torch.manual_seed(seed)
    tok = build_clip_tokenizer(model_max_length=16)
    common = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    if kind == "sdxl":
        unet = UNet2DConditionModel(**common, cross_attention_dim=32, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
                                    transformer_layers_per_block=1)
        te1 = _text_encoder(CLIPTextModel)
        te2 = _text_encoder(CLIPTextModelWithProjection)
        return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=build_clip_tokenizer(model_max_length=16), unet=unet,
                                         scheduler=sched, force_zeros_for_empty_prompt=True)
    unet = UNet2DConditionModel(**common, cross_attention_dim=16)
    return StableDiffusionPipeline(vae=vae, text_encoder=_text_encoder(CLIPTextModel), tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory) -> dict[str, str]:
    """Folders of tiny teachers: "sd" (SD1.x-like, epsilon), "v" (SD2.x-like, v-prediction), "sdxl"."""
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for name, kind, pred in (("sd", "sd", "epsilon"), ("v", "sd", "v_prediction"), ("sdxl", "sdxl", "epsilon")):
        p = root / name
        make_tiny_pipeline(kind, pred).save_pretrained(p, safe_serialization=True)
        out[name] = str(p)
    return out


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> str:
    """A folder of 12 small captioned images (the image.png + image.txt convention)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    words = ["a red square", "a blue circle", "a green field"]
    for i in range(12):
        arr = (rng.random((20, 24, 3)) * 255).astype("uint8")
        Image.fromarray(arr).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(words[i % 3])
    return str(root)
