"""The per-family calls of flow-matching teachers (SD3 / SD3.5, FLUX.1, SANA), written to match diffusers' pipelines.

Pure functions over a loaded diffusers pipeline or its transformer; nothing here depends on the rest of the project.
Conventions shared by every family:

- Latents are UNPACKED ``(B, C, h, w)`` in the normalised space ``(z - shift) * scaling`` the pipelines sample in
  (FLUX's 2×2 packing happens inside :func:`forward` only).
- Rectified flow: ``x_σ = (1 - σ) x0 + σ ε``; the network predicts ``v = ε - x0``.
- ``timestep`` handed to :func:`forward` is ``σ·1000``, i.e. an entry of ``FlowMatchEulerDiscreteScheduler.timesteps``;
  :func:`forward` turns it into what each pipeline feeds its network (SD3: as is; FLUX: ``/ 1000``; SANA:
  ``· transformer.config.timestep_scale``).
- Conditioning is a dict with ``prompt_embeds`` (B, L, D) always, ``pooled`` (B, D2) for SD3 / FLUX, ``mask`` (B, L)
  (int64 as the tokenizer returns it, 1 = keep) for SANA.

``tests/test_flow_families.py`` checks that a 2-step Euler sampler written with these functions reproduces each
pipeline's own ``output_type="latent"`` result.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from torch import Tensor

FAMILIES = ("sd3", "flux", "sana")

PIPELINE_FAMILIES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "SanaPipeline": "sana"}
TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux",
                        "SanaTransformer2DModel": "sana"}

# Default LoRA targets of diffusers' examples/dreambooth scripts (train_dreambooth_lora_sd3.py, _flux.py, _sana.py).
# peft matches a name against the end of a module path, so "attn.to_q" hits FLUX's single blocks too; SD3.5's second
# attention (attn2.*) is not targeted by the SD3 script's default either.
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "sd3": ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
            "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"],
    "flux": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
             "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
             "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"],
    "sana": ["to_k", "to_q", "to_v"],
}

# Defaults of FluxPipeline's calculate_shift call (StableDiffusion3Pipeline uses max_shift 1.16 when its scheduler
# config has no max_shift; both read the scheduler config first).
_SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
_DEFAULT_PATCH = {"sd3": 2, "flux": 2, "sana": 1}

_PIPELINE_DEFAULT = object()  # "use the default of the pipeline's __call__"


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown flow family {family!r}; expected one of {FAMILIES}")
    return family


def _unwrap(net: Any) -> Any:
    """The diffusers model under DDP / torch.compile wrappers (for its config)."""
    while True:
        inner = getattr(net, "module", None)
        if inner is None:
            inner = getattr(net, "_orig_mod", None)
        if inner is None or inner is net:
            return net
        net = inner


def family_of(obj: Any) -> str:
    """"sd3" / "flux" / "sana" for a pipeline or a transformer (DDP / compiled wrappers allowed)."""
    for cls in type(_unwrap(obj)).__mro__:
        fam = PIPELINE_FAMILIES.get(cls.__name__) or TRANSFORMER_FAMILIES.get(cls.__name__)
        if fam:
            return fam
    raise ValueError(f"{type(obj).__name__} is not a supported flow pipeline or transformer "
                     f"({', '.join(list(PIPELINE_FAMILIES) + list(TRANSFORMER_FAMILIES))})")


def _call_default(pipe: Any, name: str) -> Any:
    return inspect.signature(type(pipe).__call__).parameters[name].default


def default_lora_targets(family: str) -> list[str]:
    """A copy of the LoRA target module names diffusers' DreamBooth LoRA script uses for this family."""
    return list(DEFAULT_LORA_TARGETS[_check_family(family)])


# ---------------------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------------------


def encode_text(pipe: Any, prompts: list[str], device: torch.device | str, *, max_sequence_length: int | None = None,
                complex_human_instruction: Any = _PIPELINE_DEFAULT) -> dict[str, Tensor]:
    """Encode prompts with the pipeline's own ``encode_prompt`` (no CFG branch), as its ``__call__`` would.

    ``max_sequence_length`` None -> the pipeline ``__call__``'s default (SD3 256, FLUX 512, SANA 300).
    SANA only: ``complex_human_instruction`` defaults to SanaPipeline.__call__'s instruction list (the real sampling
    path; encode_prompt's own default is None); pass None to encode the bare prompt.
    Returns fp32 ``prompt_embeds`` (B, L, D), plus ``pooled`` (SD3, FLUX) or ``mask`` (SANA, int64).
    """
    family = family_of(pipe)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    msl = _call_default(pipe, "max_sequence_length") if max_sequence_length is None else max_sequence_length
    if family == "sd3":
        pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                              do_classifier_free_guidance=False, max_sequence_length=msl)
        return {"prompt_embeds": pe.float().to(device), "pooled": pooled.float().to(device)}
    if family == "flux":
        pe, pooled, _text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                   max_sequence_length=msl)
        return {"prompt_embeds": pe.float().to(device), "pooled": pooled.float().to(device)}
    chi = _call_default(pipe, "complex_human_instruction") if complex_human_instruction is _PIPELINE_DEFAULT \
        else complex_human_instruction
    pe, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                        clean_caption=False, max_sequence_length=msl,
                                        complex_human_instruction=chi)
    return {"prompt_embeds": pe.float().to(device), "mask": mask.to(device)}


def encode_empty(pipe: Any, device: torch.device | str, *, max_sequence_length: int | None = None
                 ) -> dict[str, Tensor]:
    """The unconditional branch, batch 1, as the pipeline's CFG builds it.

    SD3 and SANA: the negative half of ``encode_prompt(..., do_classifier_free_guidance=True, negative_prompt="")``
    (SANA encodes negatives without the complex human instruction). FLUX.1's pipeline has no CFG unless
    ``true_cfg_scale > 1`` (then it encodes the negative prompt like a prompt): the "" encoding.
    """
    family = family_of(pipe)
    msl = _call_default(pipe, "max_sequence_length") if max_sequence_length is None else max_sequence_length
    if family == "sd3":
        _, npe, _, npooled = pipe.encode_prompt(prompt=[""], prompt_2=None, prompt_3=None, device=device,
                                                do_classifier_free_guidance=True, negative_prompt="",
                                                max_sequence_length=msl)
        return {"prompt_embeds": npe.float().to(device), "pooled": npooled.float().to(device)}
    if family == "flux":
        return encode_text(pipe, [""], device, max_sequence_length=msl)
    _, _, npe, nmask = pipe.encode_prompt([""], do_classifier_free_guidance=True, negative_prompt="", device=device,
                                          clean_caption=False, max_sequence_length=msl,
                                          complex_human_instruction=None)
    return {"prompt_embeds": npe.float().to(device), "mask": nmask.to(device)}


# ---------------------------------------------------------------------------------------------------------------------
# The network call
# ---------------------------------------------------------------------------------------------------------------------


def pack_latents(x: Tensor) -> Tensor:
    """FLUX packing (B, C, h, w) -> (B, (h/2)(w/2), 4C): ``FluxPipeline._pack_latents``."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2×2 latent patches: latent height and width must be even, got {h}×{w}")
    return FluxPipeline._pack_latents(x, b, c, h, w)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack_latents` for a latent of h×w (``FluxPipeline._unpack_latents`` takes pixel sizes)."""
    b, _, ch = tokens.shape
    x = tokens.view(b, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, h, w)


def _batch_timestep(timestep: Tensor | float, x: Tensor) -> Tensor:
    t = torch.as_tensor(timestep, device=x.device)
    if not t.is_floating_point():
        t = t.float()
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def forward(family: str, net: Any, x: Tensor, timestep: Tensor, cond: dict[str, Tensor],
            guidance: Tensor | float | None = None) -> Tensor:
    """The velocity the pipeline's denoising loop gets from ``net`` at unpacked latents ``x`` (B, C, h, w).

    ``timestep`` (B,) or scalar is σ·1000. ``guidance`` is FLUX.1-dev's guidance scale (a float or (B,) tensor),
    used only when ``net.config.guidance_embeds`` (required then; FluxPipeline passes guidance_scale unchanged and
    the transformer multiplies it by 1000 itself). SD3 / SANA CFG is the caller's: batch [uncond, cond] and combine.
    dtype: SD3 / FLUX feed ``x`` as is (their pipelines keep latents in the text-embedding dtype); SANA casts x and
    the embeddings to the transformer dtype and returns ``x.dtype``, as SanaPipeline does.
    """
    family = _check_family(family)
    config = getattr(_unwrap(net), "config", None)
    t = _batch_timestep(timestep, x)
    if guidance is not None and family != "flux":
        raise ValueError(f"{family}: guidance embedding is FLUX-only; do CFG with an unconditional batch")
    if family == "sd3":
        return net(hidden_states=x, timestep=t, encoder_hidden_states=cond["prompt_embeds"],
                   pooled_projections=cond["pooled"], return_dict=False)[0]
    if family == "flux":
        from diffusers import FluxPipeline

        b, _, h, w = x.shape
        pe = cond["prompt_embeds"]
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        txt_ids = torch.zeros(pe.shape[1], 3, device=x.device, dtype=x.dtype)
        g = None
        if (config.guidance_embeds if config is not None else guidance is not None):
            if guidance is None:
                raise ValueError("this FLUX transformer has guidance_embeds=True (FLUX.1-dev): pass guidance")
            g = torch.as_tensor(guidance, dtype=torch.float32, device=x.device)
            g = g.expand(b) if g.ndim == 0 else g
        out = net(hidden_states=pack_latents(x), timestep=t.to(x.dtype) / 1000, guidance=g,
                  pooled_projections=cond["pooled"], encoder_hidden_states=pe, txt_ids=txt_ids, img_ids=img_ids,
                  return_dict=False)[0]
        return unpack_latents(out, h, w)
    dtype = getattr(_unwrap(net), "dtype", x.dtype)
    scale = config.timestep_scale if config is not None else 1.0
    out = net(x.to(dtype), encoder_hidden_states=cond["prompt_embeds"].to(dtype),
              encoder_attention_mask=cond.get("mask"), timestep=t * scale, return_dict=False)[0]
    if config is not None and config.out_channels // 2 == config.in_channels:  # learned sigma: keep the mean
        out = out.chunk(2, dim=1)[0]
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Latents
# ---------------------------------------------------------------------------------------------------------------------


def latent_norm(vae: Any) -> tuple[float, float]:
    """(scaling, shift) with normalised latents = (z - shift) * scaling. DC-AE (SANA) has no shift_factor: 0."""
    cfg = vae.config
    scaling = cfg.get("scaling_factor", None)
    shift = cfg.get("shift_factor", None)
    return float(1.0 if scaling is None else scaling), float(0.0 if shift is None else shift)


@torch.no_grad()
def encode_images(pipe: Any, images: Tensor, *, sample: bool = True, generator: torch.Generator | None = None
                  ) -> Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> normalised fp32 latents (B, C, H/f, W/f).

    AutoencoderKL (SD3, FLUX): a sample of ``latent_dist`` (diffusers' training scripts) or its mode with
    ``sample=False``. AutoencoderDC (SANA) is deterministic: ``encode(x).latent``.
    """
    vae = pipe.vae
    out = vae.encode(images.to(device=vae.device, dtype=vae.dtype))
    if hasattr(out, "latent_dist"):
        z = out.latent_dist.sample(generator) if sample else out.latent_dist.mode()
    else:
        z = out.latent
    scaling, shift = latent_norm(vae)
    return ((z.float() - shift) * scaling)


def decode(pipe: Any, latents: Tensor, *, clamp: bool = True) -> Tensor:
    """Normalised unpacked latents -> fp32 images in [-1, 1] (clamped unless ``clamp=False``), as the pipelines
    decode: ``vae.decode(latents / scaling + shift)``. Not under no_grad (pixel-space losses may backpropagate)."""
    vae = pipe.vae
    scaling, shift = latent_norm(vae)
    z = latents / scaling + shift
    img = vae.decode(z.to(device=vae.device, dtype=vae.dtype), return_dict=False)[0].float()
    return img.clamp(-1, 1) if clamp else img


# ---------------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------------


def image_seq_len(family: str, latent_shape: tuple[int, ...] | torch.Size, patch_size: int | None = None) -> int:
    """Image tokens of an unpacked latent (..., h, w): FLUX (h/2)(w/2); SD3 (h/p)(w/p), p = 2 unless given (the
    transformer's config.patch_size; SD3.5's dynamic shifting uses it); SANA p = 1 unless given."""
    p = _DEFAULT_PATCH[_check_family(family)] if patch_size is None or family == "flux" else patch_size
    h, w = int(latent_shape[-2]), int(latent_shape[-1])
    return (h // p) * (w // p)


def dynamic_shift_mu(scheduler_config: Any, image_seq_len: int) -> float:
    """diffusers' ``calculate_shift`` with the scheduler config's base/max sequence lengths and shifts (FLUX.1)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = {k: scheduler_config.get(k, None) for k in _SHIFT_DEFAULTS}
    cfg = {k: _SHIFT_DEFAULTS[k] if v is None else v for k, v in cfg.items()}
    return float(calculate_shift(image_seq_len, cfg["base_image_seq_len"], cfg["max_image_seq_len"],
                                 cfg["base_shift"], cfg["max_shift"]))


def pipeline_timesteps(family: str, scheduler: Any, num_inference_steps: int, latent_shape: tuple[int, ...],
                       device: torch.device | str | None = None, patch_size: int | None = None
                       ) -> tuple[Tensor, Tensor]:
    """Set ``scheduler`` as the family's pipeline does for ``num_inference_steps`` and return (timesteps, sigmas):
    timesteps = σ·1000 (n,), sigmas (n + 1,) ending in 0. FLUX: sigmas linspace(1, 1/n, n) shifted with mu from
    the image sequence length; SD3: mu only if the scheduler uses dynamic shifting; SANA: plain set_timesteps."""
    from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

    family = _check_family(family)
    cfg = scheduler.config
    if family == "flux":
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if cfg.get("use_flow_sigmas", False):
            sigmas = None
        mu = dynamic_shift_mu(cfg, image_seq_len(family, latent_shape))
        retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
    elif family == "sd3" and cfg.get("use_dynamic_shifting", False):
        sd3_cfg = {"max_shift": 1.16, **{k: v for k, v in cfg.items() if k in _SHIFT_DEFAULTS and v is not None}}
        mu = dynamic_shift_mu(sd3_cfg, image_seq_len(family, latent_shape, patch_size))
        retrieve_timesteps(scheduler, num_inference_steps, device, mu=mu)
    else:
        retrieve_timesteps(scheduler, num_inference_steps, device)
    return scheduler.timesteps, scheduler.sigmas
