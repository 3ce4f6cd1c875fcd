"""distill_diffusion.flow_families against diffusers' own flow-matching pipelines (tiny random SD3, FLUX.1, SANA).

The sampler test is the point: a 2-step Euler loop written with encode_text / encode_empty / forward /
pipeline_timesteps must give the pipeline's own latents, so ``forward`` is exactly the pipeline's network call.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distill_diffusion import flow_families as ff

PROMPTS = ["a red square", "a small blue circle on a green field"]
MSL = 16  # max_sequence_length for the tiny teachers
FAMILY = {"sd3": "sd3", "flux": "flux", "flux_dev": "flux", "sana": "sana"}
PIXELS = {"sd3": 16, "flux": 16, "flux_dev": 16, "sana": 32}  # SanaPipeline wants multiples of 32
LATENT = {"sd3": (16, 8, 8), "flux": (16, 8, 8), "flux_dev": (16, 8, 8), "sana": (4, 8, 8)}


def _load(folder: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flow_pipes(flow_teachers):
    return {kind: _load(folder) for kind, folder in flow_teachers.items()}


def _pipe_kwargs(kind: str, **extra) -> dict:
    kw = dict(num_inference_steps=2, height=PIXELS[kind], width=PIXELS[kind], max_sequence_length=MSL,
              generator=torch.Generator().manual_seed(0))
    if kind == "sana":
        kw["use_resolution_binning"] = False
    kw.update(extra)
    return kw


def _pipe_latents(pipe, kind: str, prompts, **extra) -> torch.Tensor:
    """The pipeline's final latents, unpacked for FLUX."""
    with torch.no_grad():
        out = pipe(prompts, output_type="latent", **_pipe_kwargs(kind, **extra)).images
    if FAMILY[kind] == "flux":
        from diffusers import FluxPipeline

        c, h, w = LATENT[kind]
        ref = FluxPipeline._unpack_latents(out, PIXELS[kind], PIXELS[kind], pipe.vae_scale_factor)
        mine = ff.unpack_latents(out, h, w)
        assert torch.equal(ref, mine)
        return mine
    return out


@torch.no_grad()
def _manual_euler(pipe, kind: str, prompts, guidance: float, steps: int = 2, **enc) -> torch.Tensor:
    family = FAMILY[kind]
    net = pipe.transformer
    b = len(prompts)
    cond = ff.encode_text(pipe, prompts, "cpu", max_sequence_length=MSL, **enc)
    cfg = family in ("sd3", "sana") and guidance > 1
    if cfg:
        unc = ff.encode_empty(pipe, "cpu", max_sequence_length=MSL)
        cond = {k: torch.cat([unc[k].expand(b, *unc[k].shape[1:]), cond[k]]) for k in cond}
    x = torch.randn((b, *LATENT[kind]), generator=torch.Generator().manual_seed(0))
    sched = copy.deepcopy(pipe.scheduler)
    timesteps, sigmas = ff.pipeline_timesteps(family, sched, steps, x.shape)
    for i, t in enumerate(timesteps):
        if cfg:
            v_unc, v_cond = ff.forward(family, net, torch.cat([x, x]), t.expand(2 * b), cond).chunk(2)
            v = v_unc + guidance * (v_cond - v_unc)
        else:
            v = ff.forward(family, net, x, t.expand(b), cond, guidance=guidance if family == "flux" else None)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


@pytest.mark.parametrize("kind,guidance,chi", [
    ("sd3", 1.0, None), ("sd3", 5.0, None), ("flux", 3.5, None), ("flux_dev", 3.5, None), ("flux_dev", 6.0, None),
    ("sana", 1.0, "default"), ("sana", 4.5, "default"), ("sana", 4.5, "none"),
])
def test_manual_euler_reproduces_pipeline(flow_pipes, kind, guidance, chi):
    pipe = flow_pipes[kind]
    enc, extra = {}, {}
    if chi == "none":
        enc["complex_human_instruction"] = extra["complex_human_instruction"] = None
    ref = _pipe_latents(pipe, kind, PROMPTS, guidance_scale=guidance, **extra)
    mine = _manual_euler(pipe, kind, PROMPTS, guidance, **enc)
    assert mine.shape == (len(PROMPTS), *LATENT[kind])
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)


def test_flux_dev_guidance_and_sana_chi_matter(flow_pipes):
    """The checks above would pass vacuously if guidance / the instruction were ignored."""
    a = _manual_euler(flow_pipes["flux_dev"], "flux_dev", PROMPTS, 1.0)
    b = _manual_euler(flow_pipes["flux_dev"], "flux_dev", PROMPTS, 6.0)
    assert (a - b).abs().max() > 1e-4
    sana = flow_pipes["sana"]
    with_chi = ff.encode_text(sana, PROMPTS, "cpu", max_sequence_length=MSL)
    without = ff.encode_text(sana, PROMPTS, "cpu", max_sequence_length=MSL, complex_human_instruction=None)
    assert with_chi["prompt_embeds"].shape == without["prompt_embeds"].shape == (2, MSL, 16)
    assert with_chi["mask"].shape == (2, MSL) and with_chi["prompt_embeds"].dtype == torch.float32
    assert (with_chi["prompt_embeds"] - without["prompt_embeds"]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="guidance"):
        ff.forward("flux", flow_pipes["flux_dev"].transformer, torch.zeros(1, 16, 8, 8), torch.tensor([500.0]),
                   ff.encode_text(flow_pipes["flux_dev"], ["x"], "cpu", max_sequence_length=MSL))


def test_reloaded_teachers_sample_with_pipeline_defaults(flow_pipes):
    """Each saved folder reloads offline and samples with the pipeline's own defaults (SD3 / FLUX at 16 px; SANA at
    32 px without resolution binning, with its default complex human instruction and 300 tokens)."""
    for kind, pipe in flow_pipes.items():
        extra = dict(height=32, width=32, use_resolution_binning=False) if kind == "sana" else dict(height=16, width=16)
        img = pipe("a red square", num_inference_steps=2, output_type="np", **extra).images
        assert img.shape == (1, extra["height"], extra["width"], 3) and img.std() > 0, kind


def test_text_shapes(flow_pipes):
    for kind in ("sd3", "flux"):
        c = ff.encode_text(flow_pipes[kind], PROMPTS, "cpu", max_sequence_length=MSL)
        e = ff.encode_empty(flow_pipes[kind], "cpu", max_sequence_length=MSL)
        length = 2 * MSL if kind == "sd3" else MSL  # SD3: 16 CLIP tokens (tokenizer max) then the T5 ones
        assert c["prompt_embeds"].shape == (2, length, 32) and e["prompt_embeds"].shape == (1, length, 32)
        assert c["pooled"].shape == (2, 32 if kind == "sd3" else 16) and "mask" not in c
    assert ff.family_of(flow_pipes["sd3"]) == "sd3" and ff.family_of(flow_pipes["sana"].transformer) == "sana"


def test_schedule_helpers(flow_pipes):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = flow_pipes["flux"].scheduler.config
    assert ff.image_seq_len("flux", (2, 16, 8, 8)) == 16
    assert ff.image_seq_len("sd3", (16, 8, 8)) == 16 and ff.image_seq_len("sana", (4, 8, 8)) == 64
    assert ff.dynamic_shift_mu(cfg, 16) == pytest.approx(calculate_shift(16, 256, 4096, 0.5, 1.15))
    assert ff.dynamic_shift_mu(cfg, 4096) == pytest.approx(1.15)
    ts, sig = ff.pipeline_timesteps("sd3", copy.deepcopy(flow_pipes["sd3"].scheduler), 2, (1, 16, 8, 8))
    torch.testing.assert_close(ts, sig[:-1] * 1000)
    # 2 steps run from σ_max = 1 to the training σ_min, which diffusers shifts twice (init and set_timesteps)
    s_min = 3 * 0.001 / (1 + 2 * 0.001)
    assert sig[0] == 1 and sig[-1] == 0 and sig[1].item() == pytest.approx(3 * s_min / (1 + 2 * s_min), rel=1e-5)


@pytest.mark.parametrize("kind", ["sd3", "flux", "sana"])
def test_encode_decode_normalisation(flow_pipes, kind):
    pipe = flow_pipes[kind]
    vae = pipe.vae
    scaling, shift = ff.latent_norm(vae)
    assert (scaling, shift) == {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159), "sana": (0.41407, 0.0)}[kind]
    px = PIXELS[kind]
    images = torch.rand(2, 3, px, px, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = ff.encode_images(pipe, images, sample=False)
    assert z.shape == (2, *LATENT[kind]) and z.dtype == torch.float32
    with torch.no_grad():
        out = vae.encode(images)
        raw = out.latent_dist.mode() if kind != "sana" else out.latent
        torch.testing.assert_close(z, (raw - shift) * scaling)
        torch.testing.assert_close(ff.decode(pipe, z), vae.decode(raw).sample.clamp(-1, 1), atol=1e-5, rtol=1e-5)
        sampled = ff.encode_images(pipe, images, generator=torch.Generator().manual_seed(0))
        assert sampled.shape == z.shape
        # the pipeline's own decode of its latents == decode() mapped to [0, 1]
        lat = pipe(PROMPTS[:1], output_type="latent", **_pipe_kwargs(kind)).images
        img = pipe(PROMPTS[:1], output_type="pt", **_pipe_kwargs(kind)).images
    if kind == "flux":
        lat = ff.unpack_latents(lat, 8, 8)
    torch.testing.assert_close((ff.decode(pipe, lat) + 1) / 2, img, atol=1e-5, rtol=1e-5)


def _matching_linears(net: nn.Module, target: str) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and (n == target or n.endswith("." + target))]


@pytest.mark.parametrize("kind", ["sd3", "flux", "sana"])
def test_lora_save_and_load(flow_teachers, kind, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    family = FAMILY[kind]
    pipe = _load(flow_teachers[kind])
    targets = ff.default_lora_targets(family)
    for t in targets:
        assert _matching_linears(pipe.transformer, t), f"{family}: LoRA target {t!r} matches no Linear"
    base = _pipe_latents(pipe, kind, PROMPTS[:1])
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    adapted = _pipe_latents(pipe, kind, PROMPTS[:1])
    type(pipe).save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))

    fresh = _load(flow_teachers[kind])
    torch.testing.assert_close(_pipe_latents(fresh, kind, PROMPTS[:1]), base)
    fresh.load_lora_weights(tmp_path)
    loaded = _pipe_latents(fresh, kind, PROMPTS[:1])
    assert (loaded - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, adapted, atol=1e-5, rtol=1e-5)
