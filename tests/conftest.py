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
# As every training run does (TrainConfig.retain_freed_memory): the suite's forwards reuse freed pages.
from distill_diffusion import memory as _memory  # noqa: E402

_memory.retain_freed_memory()


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


# ---------------------------------------------------------------------------------------------------------------------
# Tiny flow-matching teachers (SD3, FLUX.1 schnell-like and dev-like, SANA)
# ---------------------------------------------------------------------------------------------------------------------

FLOW_KINDS = ("sd3", "flux", "flux_dev", "sana")


def _tiny_t5(d_model: int = 32) -> torch.nn.Module:
    """A 1-layer T5 encoder over the CLIP vocabulary (49408 ids), so the CLIP tokenizer can fill the T5 slot."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=49408, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=49407,
                   eos_token_id=49407, decoder_start_token_id=49407)
    return T5EncoderModel(cfg)


def _tiny_kl_vae(latent_channels: int, scaling_factor: float, shift_factor: float) -> torch.nn.Module:
    """SD3/FLUX-style AutoencoderKL: 2 blocks (16 px -> 8×8 latents), no quant convs, a non-trivial scale and shift."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=latent_channels, norm_num_groups=4, sample_size=16, use_quant_conv=False,
                         use_post_quant_conv=False, scaling_factor=scaling_factor, shift_factor=shift_factor)


def make_tiny_flow_pipeline(kind: str, seed: int = 0):
    """A random flow-matching pipeline at 16×16 pixels.

    - "sd3": StableDiffusion3Pipeline, latents 16×8×8 (scaling 1.5305, shift 0.0609), transformer patch 2, two CLIP
      text encoders with projection + a T5 encoder (all fed by the CLIP tokenizer), FlowMatchEuler shift 3.0.
    - "flux" / "flux_dev": FluxPipeline, latents 16×8×8 (scaling 0.3611, shift 0.1159; packed into 16 tokens of 64),
      CLIP + T5, FlowMatchEuler with FLUX.1's dynamic shifting; "flux_dev" has guidance_embeds=True.
    - "sana": SanaPipeline, a 3-stage AutoencoderDC (4× down; scaling 0.41407, no shift): SanaPipeline only accepts
      multiples of 32 px, so sample it at 32 px -> latents 4×8×8 (the VAE alone also takes 16 px -> 4×4×4), with
      ``use_resolution_binning=False`` (binning maps small sizes to a 512-1024 px bin and needs sample_size 16..128).
      Text: a tiny Gemma2 encoder over the CLIP vocabulary with the CLIP tokenizer (encode_prompt works with and
      without the complex human instruction). Scheduler FlowMatchEuler shift 3.0 (the converter's "flow-euler"
      option; the released SANA folders ship DPMSolverMultistep with flow sigmas, flow_shift 3.0).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from distill_diffusion.toy.tokenizer import build_clip_tokenizer

    if kind not in FLOW_KINDS:
        raise ValueError(f"unknown flow pipeline kind {kind!r}; expected one of {FLOW_KINDS}")
    torch.manual_seed(seed)
    tok = build_clip_tokenizer(model_max_length=16)
    if kind == "sd3":
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        # two blocks: the last SD3 block is context_pre_only (no attn.to_add_out), LoRA defaults need a full one
        transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16,
                                            num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                            caption_projection_dim=16, joint_attention_dim=32,
                                            pooled_projection_dim=32, pos_embed_max_size=16)
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_tiny_kl_vae(16, 1.5305, 0.0609),
            text_encoder=_text_encoder(CLIPTextModelWithProjection), tokenizer=tok,
            text_encoder_2=_text_encoder(CLIPTextModelWithProjection), tokenizer_2=build_clip_tokenizer(16),
            text_encoder_3=_tiny_t5(32), tokenizer_3=build_clip_tokenizer(16))
    if kind in ("flux", "flux_dev"):
        from diffusers import FluxPipeline, FluxTransformer2DModel

        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=16, guidance_embeds=kind == "flux_dev",
                                             axes_dims_rope=(4, 4, 8))
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
        return FluxPipeline(transformer=transformer, scheduler=sched, vae=_tiny_kl_vae(16, 0.3611, 0.1159),
                            text_encoder=_text_encoder(CLIPTextModel), tokenizer=tok,
                            text_encoder_2=_tiny_t5(32), tokenizer_2=build_clip_tokenizer(16))
    from diffusers import AutoencoderDC, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                         num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                         cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=16,
                                         sample_size=8)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                        downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    gemma = Gemma2Model(Gemma2Config(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                     query_pre_attn_scalar=8, pad_token_id=49407, bos_token_id=49406,
                                     eos_token_id=49407, attn_implementation="eager"))
    # model_max_length only silences the "longer than the maximum" warning on the long complex human instruction
    return SanaPipeline(tokenizer=build_clip_tokenizer(model_max_length=512), text_encoder=gemma, vae=vae,
                        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


@pytest.fixture(scope="session")
def flow_teachers(tmp_path_factory) -> dict[str, str]:
    """Folders of tiny flow-matching teachers: "sd3", "flux", "flux_dev" (guidance-distilled), "sana"."""
    root = tmp_path_factory.mktemp("flow_teachers")
    out = {}
    for kind in FLOW_KINDS:
        p = root / kind
        make_tiny_flow_pipeline(kind).save_pretrained(p, safe_serialization=True)
        out[kind] = str(p)
    return out
