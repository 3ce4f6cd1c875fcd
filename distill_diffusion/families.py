"""Model families: everything that differs between teacher pipelines, behind one interface.

A family knows how its pipeline encodes prompts (through the pipeline's own ``encode_prompt``), which network it
calls and with which arguments, its latent normalisation, its noise schedule (:mod:`distill_diffusion.schedule`),
where a method may tap inner features, its default LoRA targets, and how an exported student is saved. Methods never
see any of it: they call ``Models`` (roles) and the schedule. Adding a family (e.g. Qwen-Image) is one class here,
one entry in :data:`FAMILIES` and a config; nothing in ``methods/``.

Latents: every family shows methods the unpacked latent (B, C, h, w) in the normalised space
``(z − shift_factor) · scaling_factor``; FLUX's 2×2 packing happens inside :meth:`Family.forward`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from . import flow_families
from . import schedule as sched
from .errors import UserError
from .features import tap
from .method import Cond

# LoRA targets of diffusers' LCM-LoRA reference (attention, feed-forward, resnets, resamplers, time projections).
UNET_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]


class Family:
    """One teacher family. Subclasses set the class attributes and implement the text/network/VAE calls.

    Attributes: ``name``, ``pipeline_class`` (diffusers class name), ``denoiser`` (the pipeline's network
    attribute), ``lora_targets`` (default LoRA target modules), ``schedule_kind`` ("vp" or "flow").
    """

    name = ""
    pipeline_class = ""
    denoiser = "unet"
    lora_targets: list[str] = UNET_LORA_TARGETS
    schedule_kind = "vp"
    text_modules: tuple[str, ...] = ("text_encoder",)
    takes_max_sequence_length = False  # a T5 / Gemma slot whose length the pipeline call sets

    def __init__(self, pipe: Any, resolution: int | None, device: torch.device) -> None:
        self.pipe, self.device = pipe, device
        self.vae_scale_factor = self._vae_scale_factor()
        self.resolution = resolution or self.default_resolution()
        h = self.resolution // self.vae_scale_factor
        self.latent_shape = (self.latent_channels(), h, h)
        vcfg = pipe.vae.config
        self.vae_scaling = float(vcfg.scaling_factor)
        self.vae_shift = float(getattr(vcfg, "shift_factor", None) or 0.0)

    # ---- facts ---------------------------------------------------------------------------------------------------
    @property
    def net(self) -> nn.Module:
        return getattr(self.pipe, self.denoiser)

    def _vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def latent_channels(self) -> int:
        return int(self.net.config.in_channels)

    def default_resolution(self) -> int:
        return int(self.net.config.sample_size) * self.vae_scale_factor

    def make_schedule(self) -> sched.Schedule:
        raise NotImplementedError

    def guidance_embedded(self, net: nn.Module) -> bool:
        """True when ``net`` takes the guidance scale as an input (FLUX.1-dev) instead of a second, unconditional
        pass: its CFG is one forward, and NFE counts it once."""
        return False

    def default_guidance(self) -> float:
        """The guidance fed to a guidance-embedded network when a caller gives none (its pipeline's default)."""
        return 1.0

    # ---- text and images -----------------------------------------------------------------------------------------
    def encode_text(self, prompts: list[str]) -> Cond:
        """The conditioning of ``prompts`` in fp32, one row per prompt (time ids excluded: :meth:`extras`)."""
        raise NotImplementedError

    def encode_empty(self) -> Cond:
        """The unconditional branch as the pipeline's CFG builds it, one row."""
        return self.encode_text([""])

    def extras(self, cond: Cond) -> Cond:
        """Per-batch additions that do not depend on the prompt (SDXL's micro-conditioning)."""
        return cond

    def shape_cond(self, tokens: int = 8) -> Cond:
        """A zero conditioning of one row and ``tokens`` text tokens in the shapes the network's config declares,
        with no text encoder run: where only shapes matter (the memory planner measures feature shapes on meta)."""
        return Cond(self._zeros(1, tokens, self.net.config.cross_attention_dim))

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(*shape, device=self.device)

    def vae_posterior(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Images (B, 3, H, W) in [-1, 1] -> the VAE posterior's raw (mean, std) before normalisation."""
        dist = self.pipe.vae.encode(images).latent_dist
        return dist.mean, dist.std

    def vae_decode(self, z: Tensor) -> Tensor:
        return self.pipe.vae.decode(z, return_dict=False)[0]

    # ---- the network ---------------------------------------------------------------------------------------------
    def forward(self, net: nn.Module, x: Tensor, t_net: Tensor, cond: Cond, guidance: Tensor | None = None,
                timestep_cond: Tensor | None = None) -> Tensor:
        """The raw network output at latents x (B, C, h, w) and the schedule's network timestep ``t_net`` (B,), as
        the pipeline calls it; (B, C, h, w)."""
        raise NotImplementedError

    def feature_blocks(self, net: nn.Module, all_levels: bool = True) -> list[str]:
        """Names of the blocks whose outputs are a method's features, in forward order."""
        raise NotImplementedError

    def bottleneck_block(self, net: nn.Module) -> str:
        raise NotImplementedError

    def norm_groups(self, net: nn.Module) -> int:
        return 32

    def _as_map(self, h: Any, x: Tensor) -> Tensor:
        """A block's output as a (B, C, h', w') feature map."""
        return h[0] if isinstance(h, tuple) else h

    def features(self, net: nn.Module, x: Tensor, t_net: Tensor, cond: Cond, names: list[str],
                 stop: bool) -> list[Tensor]:
        """The outputs of blocks ``names`` during one ordinary forward (:func:`features.tap`), each a feature map
        (B, C_l, h_l, w_l); ``stop`` cuts the forward after the last of them."""
        with tap(net, names, stop_after_last=stop, pick=lambda out: out) as feats:
            self.forward(net, x, t_net, cond)
        return [self._as_map(feats[n], x) for n in names]

    def feature_shapes(self, net: nn.Module, names: list[str], cond: Cond) -> list[tuple[int, int]]:
        """(channels, spatial side) of each feature in ``names`` at the training resolution, measured with one
        no-gradient forward of batch 1."""
        x = torch.zeros(1, *self.latent_shape, device=self.device, dtype=next(net.parameters()).dtype)
        t = torch.zeros(1, device=self.device)
        with torch.no_grad():
            maps = self.features(net, x, t, cond.index(slice(0, 1)).to(x.dtype), names, stop=True)
        return [(int(f.shape[1]), int(f.shape[-1])) for f in maps]

    # ---- students ------------------------------------------------------------------------------------------------
    def full_copy(self, net: nn.Module, guidance_embedding_dim: int | None) -> tuple[nn.Module, bool]:
        """A trainable copy of the teacher's network; with ``guidance_embedding_dim`` the copy also embeds a
        guidance scale when the architecture can (returns (copy, whether it does))."""
        return copy.deepcopy(net), False

    def lora_save_kwargs(self, state: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of the pipeline class's ``save_lora_weights`` for the denoiser's LoRA."""
        return {f"{self.denoiser}_lora_layers": state, f"{self.denoiser}_lora_adapter_metadata": meta}

    def sample_kwargs(self, resolution: int) -> dict[str, Any]:
        return {"height": resolution, "width": resolution}

    # ---- a loaded pipeline of this family (eval, app, hybrid sampling) --------------------------------------------
    @classmethod
    def pipe_net(cls, pipe: Any) -> nn.Module:
        return getattr(pipe, cls.denoiser)

    @classmethod
    def pipe_resolution(cls, pipe: Any) -> int:
        """The pipeline's own default image side in pixels."""
        return int(cls.pipe_net(pipe).config.sample_size) * int(pipe.vae_scale_factor)

    @classmethod
    def pipe_uses_cfg(cls, pipe: Any, guidance: float) -> bool:
        """Whether the pipeline runs a second (unconditional) pass per step at ``guidance`` (diffusers convention)."""
        return guidance > 1

    @classmethod
    def pipe_call_kwargs(cls, pipe: Any, guidance: float, negative: list[str] | None) -> dict[str, Any]:
        """The pipeline call's guidance arguments for ``guidance`` (and a negative prompt, used only with CFG)."""
        kw: dict[str, Any] = {"guidance_scale": guidance}
        if negative is not None and cls.pipe_uses_cfg(pipe, guidance):
            kw["negative_prompt"] = negative
        return kw

    @classmethod
    def pipe_text_kwargs(cls, pipe: Any) -> dict[str, Any]:
        """The pipeline call's text-length argument when a run or teacher folder fixed one (flow families only)."""
        msl = getattr(pipe, "distill_max_sequence_length", None)
        return {"max_sequence_length": msl} if cls.takes_max_sequence_length and msl is not None else {}

    @classmethod
    def pipe_teacher_scheduler(cls, pipe: Any) -> Any:
        """The scheduler of the teacher's reference rows in eval and the app."""
        return type(pipe.scheduler).from_config(pipe.scheduler.config)


# ---- SD1.x / SD2.x / SDXL ---------------------------------------------------------------------------------------


class StableDiffusion(Family):
    """SD1.x (epsilon) and SD2.x (epsilon or v): a UNet2DConditionModel on a discrete VP schedule, one CLIP."""

    name = "sd"
    pipeline_class = "StableDiffusionPipeline"

    def make_schedule(self) -> sched.VPSchedule:
        from diffusers import DDPMScheduler

        s = DDPMScheduler.from_config(self.pipe.scheduler.config)
        return sched.VPSchedule(s.alphas_cumprod.to(self.device, torch.float32), s.config.prediction_type)

    def encode_text(self, prompts: list[str]) -> Cond:
        pe, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return Cond(pe.float())

    def forward(self, net: nn.Module, x: Tensor, t_net: Tensor, cond: Cond, guidance: Tensor | None = None,
                timestep_cond: Tensor | None = None) -> Tensor:
        kw: dict[str, Any] = {"encoder_hidden_states": cond.prompt_embeds}
        if cond.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        return net(x, t_net, timestep_cond=timestep_cond, **kw).sample

    def feature_blocks(self, net: nn.Module, all_levels: bool = True) -> list[str]:
        """Every down block, the mid block (when there is one) and, with ``all_levels``, every up block."""
        names = [f"down_blocks.{i}" for i in range(len(net.down_blocks))]
        names += ["mid_block"] if net.mid_block is not None else []
        return names + ([f"up_blocks.{i}" for i in range(len(net.up_blocks))] if all_levels else [])

    def bottleneck_block(self, net: nn.Module) -> str:
        if net.config.addition_embed_type == "image_hint":
            raise UserError("DMD2's GAN head does not support UNets with image_hint conditioning; set method.gan=false")
        return "mid_block"

    def norm_groups(self, net: nn.Module) -> int:
        return int(net.config.norm_num_groups or 32)

    def full_copy(self, net: nn.Module, guidance_embedding_dim: int | None) -> tuple[nn.Module, bool]:
        """LCM's guidance embedding is the UNet's ``time_cond_proj_dim`` (new, zero-free random projection)."""
        if not guidance_embedding_dim:
            return copy.deepcopy(net), False
        from diffusers import UNet2DConditionModel

        copy_ = UNet2DConditionModel.from_config({**dict(net.config), "time_cond_proj_dim": guidance_embedding_dim})
        _, unexpected = copy_.load_state_dict(net.state_dict(), strict=False)
        assert not unexpected, unexpected
        return copy_, True

    @classmethod
    def pipe_uses_cfg(cls, pipe: Any, guidance: float) -> bool:
        """A UNet with a guidance embedding (``time_cond_proj_dim``: a full LCM student) takes the scale as an input
        instead, so it runs no CFG; nor does guidance <= 1."""
        return guidance > 1 and getattr(cls.pipe_net(pipe).config, "time_cond_proj_dim", None) is None

    @classmethod
    def pipe_teacher_scheduler(cls, pipe: Any) -> Any:
        """DDIM (eta 0) with "trailing" spacing. SD-style configs say "leading", which starts 1 step at t = 1 and 4
        steps at t = 751, never at the last timestep: a few-step teacher baseline would be broken by construction.
        "trailing" starts at T − 1 (999, 749, 499, 249 for 4 steps; Lin et al. 2024, "Common Diffusion Noise
        Schedules and Sample Steps are Flawed", table 2), the fair baseline at every step count."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")


class StableDiffusionXL(StableDiffusion):
    """SDXL: two CLIP encoders (pooled text embedding), micro-conditioning time ids, zeros for the empty prompt."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_modules = ("text_encoder", "text_encoder_2")

    def encode_text(self, prompts: list[str]) -> Cond:
        pe, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
        return Cond(pe.float(), pooled.float())

    def shape_cond(self, tokens: int = 8) -> Cond:
        c = self.net.config
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim  # minus the 6 time ids
        return self.extras(Cond(self._zeros(1, tokens, c.cross_attention_dim), self._zeros(1, pooled)))

    def encode_empty(self) -> Cond:
        c = self.encode_text([""])
        if self.pipe.config.get("force_zeros_for_empty_prompt", True):
            return Cond(torch.zeros_like(c.prompt_embeds), torch.zeros_like(c.pooled))
        return c

    def extras(self, cond: Cond) -> Cond:
        r = self.resolution
        # (original size, crop top-left, target size): SDXL's micro-conditioning for an uncropped square image.
        ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32, device=self.device).repeat(len(cond), 1)
        return Cond(cond.prompt_embeds, cond.pooled, ids, cond.mask)


# ---- flow-matching transformers: SD3 / SD3.5, FLUX.1, SANA --------------------------------------------------------


class FlowTransformer(Family):
    """A flow-matching transformer teacher (``distill_diffusion.flow_families`` holds the calls, each checked
    against the pipeline's own sampling loop): rectified-flow schedule from the pipeline's
    ``FlowMatchEulerDiscreteScheduler``, features from its transformer blocks as (B, D, h/p, w/p) maps."""

    denoiser = "transformer"
    schedule_kind = "flow"
    flow_name = ""
    takes_max_sequence_length = True

    def __init__(self, pipe: Any, resolution: int | None, device: torch.device) -> None:
        super().__init__(pipe, resolution, device)
        self.vae_scaling, self.vae_shift = flow_families.latent_norm(pipe.vae)

    def shape_cond(self, tokens: int = 8) -> Cond:  # SD3 and FLUX: joint text tokens and a pooled embedding
        c = self.net.config
        return Cond(self._zeros(1, tokens, c.joint_attention_dim), self._zeros(1, c.pooled_projection_dim))

    def _vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def lora_targets(self) -> list[str]:  # type: ignore[override]
        return flow_families.default_lora_targets(self.flow_name)

    def image_seq_len(self) -> int:
        return flow_families.image_seq_len(self.flow_name, self.latent_shape,
                                           getattr(self.net.config, "patch_size", None))

    def make_schedule(self) -> sched.FlowSchedule:
        """The teacher's training sigmas at this resolution (FLUX's dynamic shift from its image sequence length)."""
        cfg = self.pipe.scheduler.config
        mu = flow_families.dynamic_shift_mu(cfg, self.image_seq_len()) if cfg.get("use_dynamic_shifting") else None
        return sched.FlowSchedule.from_scheduler_config(cfg, mu=mu).to(self.device)

    def encode_text(self, prompts: list[str]) -> Cond:
        return Cond(**flow_families.encode_text(self.pipe, prompts, self.device, **self.pipe_text_kwargs(self.pipe)))

    def encode_empty(self) -> Cond:
        return Cond(**flow_families.encode_empty(self.pipe, self.device, **self.pipe_text_kwargs(self.pipe)))

    def forward(self, net: nn.Module, x: Tensor, t_net: Tensor, cond: Cond, guidance: Tensor | None = None,
                timestep_cond: Tensor | None = None) -> Tensor:
        c = {k: v for k, v in (("prompt_embeds", cond.prompt_embeds), ("pooled", cond.pooled), ("mask", cond.mask))
             if v is not None}
        return flow_families.forward(self.flow_name, net, x, t_net, c, guidance)

    def _blocks(self, net: nn.Module) -> list[str]:
        return [f"transformer_blocks.{i}" for i in range(len(net.transformer_blocks))]

    def feature_blocks(self, net: nn.Module, all_levels: bool = True) -> list[str]:
        """Every transformer block's output; without ``all_levels`` the first half up to the middle block (the
        counterpart of a UNet's down and mid blocks)."""
        names = self._blocks(net)
        return names if all_levels else names[: len(names) // 2 + 1]

    def bottleneck_block(self, net: nn.Module) -> str:
        names = self._blocks(net)
        return names[len(names) // 2]

    def _as_map(self, h: Any, x: Tensor) -> Tensor:
        """Image tokens (B, N, D) of a block as a square map (B, D, √N, √N). Joint blocks return
        (encoder_hidden_states, hidden_states); the image stream is the second."""
        tokens = h[1] if isinstance(h, tuple) else h
        b, n, d = tokens.shape
        side = int(round(n**0.5))
        return tokens.transpose(1, 2).reshape(b, d, side, side)

    @classmethod
    def pipe_resolution(cls, pipe: Any) -> int:
        return int(cls.pipe_net(pipe).config.sample_size) * int(pipe.vae_scale_factor)


class StableDiffusion3(FlowTransformer):
    """SD3 / SD3.5: MMDiT with CLIP-L, CLIP-G and T5 (``pooled_projections``), 16-channel latents with shift."""

    name, flow_name, pipeline_class = "sd3", "sd3", "StableDiffusion3Pipeline"


class Flux(FlowTransformer):
    """FLUX.1: packed 2×2 latents with position ids, resolution-dependent shift; FLUX.1-dev embeds the guidance
    scale (``guidance_embeds``): its "CFG" is one pass with guidance as an input."""

    name, flow_name, pipeline_class = "flux", "flux", "FluxPipeline"

    def latent_channels(self) -> int:
        return int(self.net.config.in_channels) // 4  # packed 2×2 patches

    def default_resolution(self) -> int:
        return int(self.pipe.default_sample_size) * self.vae_scale_factor

    def guidance_embedded(self, net: nn.Module) -> bool:
        return bool(getattr(getattr(net, "config", None), "guidance_embeds", False))

    def default_guidance(self) -> float:
        return 3.5  # FluxPipeline's default guidance_scale

    def forward(self, net: nn.Module, x: Tensor, t_net: Tensor, cond: Cond, guidance: Tensor | None = None,
                timestep_cond: Tensor | None = None) -> Tensor:
        """FLUX.1-dev's network always takes a guidance input: the pipeline's default when a caller gives none
        (feature taps, for instance)."""
        if guidance is None and self.guidance_embedded(net):
            guidance = torch.full((x.shape[0],), self.default_guidance(), device=x.device)
        return super().forward(net, x, t_net, cond, guidance, timestep_cond)

    def _blocks(self, net: nn.Module) -> list[str]:
        return [f"transformer_blocks.{i}" for i in range(len(net.transformer_blocks))] + [
            f"single_transformer_blocks.{i}" for i in range(len(net.single_transformer_blocks))]

    @classmethod
    def pipe_resolution(cls, pipe: Any) -> int:
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    @classmethod
    def pipe_uses_cfg(cls, pipe: Any, guidance: float) -> bool:
        """FLUX.1-dev feeds guidance to its network (one pass); other FLUX.1 models get true CFG above 1."""
        return guidance > 1 and not getattr(cls.pipe_net(pipe).config, "guidance_embeds", False)

    @classmethod
    def pipe_call_kwargs(cls, pipe: Any, guidance: float, negative: list[str] | None) -> dict[str, Any]:
        if getattr(cls.pipe_net(pipe).config, "guidance_embeds", False):
            return {"guidance_scale": guidance}
        if guidance > 1:  # FluxPipeline's true CFG needs a negative prompt; the empty one is our uncond branch
            return {"true_cfg_scale": guidance, "negative_prompt": negative if negative is not None else ""}
        return {}


class Sana(FlowTransformer):
    """SANA: linear-attention DiT on a Gemma text encoder (attention mask) and a DC-AE (scaling, no shift)."""

    name, flow_name, pipeline_class = "sana", "sana", "SanaPipeline"

    def shape_cond(self, tokens: int = 8) -> Cond:  # Gemma tokens with their attention mask, no pooled embedding
        mask = torch.ones(1, tokens, dtype=torch.long, device=self.device)
        return Cond(self._zeros(1, tokens, self.net.config.caption_channels), mask=mask)

    def vae_posterior(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.pipe.vae.encode(images).latent, None  # DC-AE: deterministic, no posterior to sample

    def vae_decode(self, z: Tensor) -> Tensor:
        return self.pipe.vae.decode(z, return_dict=False)[0]

    @classmethod
    def pipe_call_kwargs(cls, pipe: Any, guidance: float, negative: list[str] | None) -> dict[str, Any]:
        # Resolution binning would snap our size to its 512-1024 px bins; sizes must be multiples of 32.
        return {**super().pipe_call_kwargs(pipe, guidance, negative), "use_resolution_binning": False}


FAMILIES: dict[str, type[Family]] = {f.pipeline_class: f for f in (
    StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux, Sana)}


def family_of(pipe: Any) -> type[Family]:
    """The family of a loaded pipeline (a teacher, or a student loaded into its teacher's pipeline class)."""
    return family_for(type(pipe).__name__)


def family_for(pipe_class_name: str) -> type[Family]:
    if pipe_class_name not in FAMILIES:
        raise UserError(f"teacher is a {pipe_class_name}; supported: {supported()}")
    return FAMILIES[pipe_class_name]


def supported() -> str:
    return ", ".join(f"{cls.pipeline_class} ({cls.name})" for cls in FAMILIES.values())
