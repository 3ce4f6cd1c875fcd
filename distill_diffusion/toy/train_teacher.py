"""Train the embedded teacher: a genuine diffusers StableDiffusionPipeline on Fashion-MNIST, on a 2-core CPU.

    python -m distill_diffusion.toy.train_teacher --out distill_diffusion/assets/fmnist_teacher \
        [--vae-minutes 6] [--unet-minutes 30] [--seed 0] [--work runs/_teacher_work]

Phases (each resumable from its checkpoint in --work; rerunning continues where it stopped):
1. a tiny AutoencoderKL, 32×32×3 -> 4×16×16 (one downsample), L1 + MSE reconstruction with a small KL;
   the scaling factor is measured as 1 / std of the training latents (Rombach et al. 2022, sec. 4.3.2);
2. every training image encoded once (posterior mean and std kept, sampled per step);
3. a UNet2DConditionModel and a small CLIPTextModel trained jointly on eps-prediction with Stable Diffusion's
   scaled-linear betas, 10% empty captions for classifier-free guidance.
The text encoder is the teacher's own (the evaluator's is a separate model), with the real CLIP tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .fmnist import CLASS_NAMES, FashionMNIST, TEMPLATES, caption
from .tokenizer import build_clip_tokenizer

MAX_TOKENS = 16  # captions are at most ~8 tokens; a short context keeps the text encoder cheap


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=16, sample_size=32)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        # 4.1M parameters; attention only at 8×8 and 4×4, where it is cheap (2 ms per image per evaluation on 2 cores)
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407, projection_dim=64)
    return CLIPTextModel(cfg)


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def all_captions() -> list[str]:
    return [""] + [caption(c, k) for c in range(len(CLASS_NAMES)) for k in range(len(TEMPLATES))]


def log(work: Path, **kw) -> None:
    with (work / "log.jsonl").open("a") as f:
        f.write(json.dumps({"time": time.time(), **kw}) + "\n")


def train_vae(data: torch.Tensor, work: Path, minutes: float, seed: int) -> None:
    ck = work / "vae.pt"
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    state = {"step": 0, "elapsed": 0.0}
    if ck.exists():
        s = torch.load(ck, weights_only=True)
        vae.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])
        state = s["state"]
    if state["elapsed"] >= minutes * 60:
        return
    g = torch.Generator().manual_seed(seed)
    t0 = time.time() - state["elapsed"]
    bar = tqdm(desc="vae", total=int(minutes * 60), initial=int(state["elapsed"]), unit="s")
    while time.time() - t0 < minutes * 60:
        g.manual_seed(seed * 1_000_003 + state["step"])
        idx = torch.randint(0, len(data), (64,), generator=g)
        x = data[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["step"] += 1
        if state["step"] % 50 == 0:
            state["elapsed"] = time.time() - t0
            bar.n = int(state["elapsed"])
            bar.set_postfix(loss=f"{loss.item():.4f}", step=state["step"])
            log(work, phase="vae", step=state["step"], loss=loss.item())
            if state["step"] % 500 == 0:
                torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "state": state}, ck)
    state["elapsed"] = minutes * 60
    torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "state": state}, ck)
    bar.close()


@torch.no_grad()
def encode_all(data: torch.Tensor, work: Path) -> tuple[torch.Tensor, torch.Tensor, float]:
    ck = work / "latents.pt"
    if ck.exists():
        s = torch.load(ck, weights_only=True)
        return s["mean"], s["std"], s["scale"]
    vae = make_vae()
    vae.load_state_dict(torch.load(work / "vae.pt", weights_only=True)["model"])
    vae.eval()
    means, stds = [], []
    for i in tqdm(range(0, len(data), 500), desc="encode"):
        post = vae.encode(data[i : i + 500]).latent_dist
        means.append(post.mean.half())
        stds.append(post.std.half())
    mean, std = torch.cat(means), torch.cat(stds)
    z = mean[:5000].float() + std[:5000].float() * torch.randn(5000, *mean.shape[1:])
    scale = float(1.0 / z.std())
    torch.save({"mean": mean, "std": std, "scale": scale}, ck)
    log(work, phase="encode", scale=scale)
    return mean, std, scale


def train_unet(mean: torch.Tensor, std: torch.Tensor, scale: float, labels: torch.Tensor, work: Path,
               minutes: float, seed: int, batch: int) -> None:
    ck = work / "unet.pt"
    unet, te = make_unet(), make_text_encoder()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=4e-4, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    state = {"step": 0, "elapsed": 0.0}
    if ck.exists():
        s = torch.load(ck, weights_only=True)
        unet.load_state_dict(s["unet"])
        te.load_state_dict(s["te"])
        opt.load_state_dict(s["opt"])
        ema = s["ema"]
        state = s["state"]
    if state["elapsed"] >= minutes * 60:
        return
    tok = build_clip_tokenizer(MAX_TOKENS)
    caps = all_captions()
    ids = tok(caps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    sched = make_scheduler()
    ac = sched.alphas_cumprod
    n_t = len(TEMPLATES)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time() - state["elapsed"]
    bar = tqdm(desc="unet", total=int(minutes * 60), initial=int(state["elapsed"]), unit="s")
    total = minutes * 60
    while time.time() - t0 < total:
        g.manual_seed(seed * 1_000_003 + state["step"] + 7)
        idx = torch.randint(0, len(mean), (batch,), generator=g)
        z = (mean[idx].float() + std[idx].float() * torch.randn(batch, *mean.shape[1:], generator=g)) * scale
        # caption index: 0 = "" (10% of samples, for classifier-free guidance), else class × template
        cap = 1 + labels[idx] * n_t + torch.randint(0, n_t, (batch,), generator=g)
        cap = torch.where(torch.rand(batch, generator=g) < 0.1, torch.zeros_like(cap), cap)
        uniq, inv = torch.unique(cap, return_inverse=True)
        emb = te(ids[uniq]).last_hidden_state[inv]
        t = torch.randint(0, 1000, (batch,), generator=g)
        eps = torch.randn(z.shape, generator=g)
        a = ac[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
        pred = unet(a * z + s * eps, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred, eps)
        # cosine decay of the learning rate over the time budget, after a short warm-up
        frac = min(1.0, (time.time() - t0) / total)
        for gr in opt.param_groups:
            gr["lr"] = 4e-4 * min(1.0, (state["step"] + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + state["step"]) / (10 + state["step"]))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        state["step"] += 1
        if state["step"] % 25 == 0:
            state["elapsed"] = time.time() - t0
            bar.n = int(state["elapsed"])
            bar.set_postfix(loss=f"{loss.item():.4f}", step=state["step"])
            log(work, phase="unet", step=state["step"], loss=loss.item(), lr=opt.param_groups[0]["lr"])
        if state["step"] % 500 == 0:
            torch.save({"unet": unet.state_dict(), "te": te.state_dict(), "opt": opt.state_dict(), "ema": ema,
                        "state": state}, ck)
    state["elapsed"] = total
    torch.save({"unet": unet.state_dict(), "te": te.state_dict(), "opt": opt.state_dict(), "ema": ema,
                "state": state}, ck)
    bar.close()


def export(work: Path, out: Path, scale: float) -> None:
    from diffusers import StableDiffusionPipeline

    vae = make_vae()
    vae.load_state_dict(torch.load(work / "vae.pt", weights_only=True)["model"])
    vae.register_to_config(scaling_factor=scale)
    s = torch.load(work / "unet.pt", weights_only=True)
    unet, te = make_unet(), make_text_encoder()
    n_unet = len(list(unet.parameters()))
    with torch.no_grad():  # the EMA weights are the teacher
        for p, e in zip(list(unet.parameters()) + list(te.parameters()), s["ema"]):
            p.copy_(e)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=build_clip_tokenizer(MAX_TOKENS), unet=unet,
                                   scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(work, phase="export", out=str(out), bytes=size, unet_params=sum(p.numel() for p in unet.parameters()),
        unet_tensors=n_unet)
    print(f"teacher written to {out} ({size / 2**20:.1f} MiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="distill_diffusion/assets/fmnist_teacher")
    ap.add_argument("--work", default="runs/_teacher_work")
    ap.add_argument("--data", default=None, help="Fashion-MNIST folder (default: Debian's or torchvision's)")
    ap.add_argument("--vae-minutes", type=float, default=5.0)
    ap.add_argument("--unet-minutes", type=float, default=25.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ds = FashionMNIST(args.data, "train")
    data = ds.all_images()
    train_vae(data, work, args.vae_minutes, args.seed)
    mean, std, scale = encode_all(data, work)
    train_unet(mean, std, scale, ds.labels, work, args.unet_minutes, args.seed, args.batch_size)
    export(work, Path(args.out), scale)


if __name__ == "__main__":
    main()
