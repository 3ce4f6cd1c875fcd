"""Train the embedded teacher: a genuine diffusers StableDiffusionPipeline on Fashion-MNIST, on a 2-core CPU.

    python -m distill_diffusion.toy.train_teacher --out distill_diffusion/assets/fmnist_teacher \
        [--minutes N] [--seed 0] [--resume] [--work runs/_teacher_work] [--vae-steps 1000] [--unet-steps 1800]

Phases, each checkpointed in --work (``--resume`` continues where a run stopped; ``--minutes`` stops this run after
N minutes with a checkpoint, to be continued with ``--resume``); progress goes to a tqdm bar and --work/log.jsonl:
1. a tiny AutoencoderKL, 32×32×3 -> 4×16×16 (one downsample), L1 + MSE reconstruction with a small KL;
   the scaling factor is measured as 1 / std of the training latents (Rombach et al. 2022, sec. 4.3.2);
2. every training image encoded once (posterior mean and std kept, sampled per step);
3. a UNet2DConditionModel and a small CLIPTextModel trained jointly on eps-prediction with Stable Diffusion's
   scaled-linear betas, 10% empty captions for classifier-free guidance.
The text encoder is the teacher's own (the evaluator's is a separate model), with the real CLIP tokenizer.
The EMA weights are exported as a StableDiffusionPipeline with a DDIMScheduler (see :func:`export`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .fmnist import CLASS_NAMES, TEMPLATES, FashionMNIST, caption
from .tokenizer import build_clip_tokenizer

MAX_TOKENS = 16  # captions are at most ~8 tokens; a short context keeps the text encoder cheap


def make_vae():
    from diffusers import AutoencoderKL

    # Small and attention-free: Fashion-MNIST needs little capacity, and the VAE runs at every encode/decode.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=16, sample_size=32, mid_block_add_attention=False)


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


def sample_latents(mean: torch.Tensor, std: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Latents (B, 4, 16, 16) drawn from the cached posteriors ``mean``/``std`` (N, 4, 16, 16) of images ``idx``."""
    return mean[idx].float() + std[idx].float() * torch.randn(len(idx), *mean.shape[1:], generator=g)


def lr_at(step: int, steps: int, base: float) -> float:
    """Cosine decay to 10% of ``base`` over the planned steps, after a 200-step linear warm-up."""
    frac = step / steps
    return base * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], step: int) -> None:
    """EMA with a warm-up (decay (1+n)/(10+n), capped at 0.999), so early averages are not dominated by init."""
    decay = min(0.999, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params: list[torch.Tensor],
                   ema: list[torch.Tensor], state: dict, base_lr: float, steps: int) -> None:
    """One update: the :func:`lr_at` schedule, backward, gradient norm clipped at 1, the step, the EMA."""
    for gr in opt.param_groups:
        gr["lr"] = lr_at(state["step"], steps, base_lr)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    ema_update(ema, params, state["step"])
    state["step"] += 1


def report_step(work: Path, phase: str, state: dict, loss: torch.Tensor, opt: torch.optim.Optimizer, bar: Any,
                t0: float, save: Any) -> None:
    """Progress bar every step, a log.jsonl row every 25 steps, a checkpoint (``save()``) every 250."""
    bar.update(1)
    if state["step"] % 25 == 0:
        state["elapsed"] = time.time() - t0
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log(work, phase=phase, step=state["step"], loss=loss.item(), lr=opt.param_groups[0]["lr"],
            elapsed=state["elapsed"])
    if state["step"] % 250 == 0:
        save()


class Deadline:
    """A wall-clock budget for this invocation (``--minutes``); ``None`` minutes means no limit."""

    def __init__(self, minutes: float | None) -> None:
        self.end = None if minutes is None else time.time() + 60.0 * minutes

    def passed(self) -> bool:
        return self.end is not None and time.time() >= self.end


def train_vae(data: torch.Tensor, work: Path, steps: int, seed: int, deadline: Deadline, batch: int = 32) -> bool:
    """Train the VAE on ``data`` (N, 3, 32, 32) in [-1, 1] up to ``steps``; True when done, False at the deadline."""
    ck = work / "vae.pt"
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    state = {"step": 0, "elapsed": 0.0}
    if ck.exists():
        s = torch.load(ck, weights_only=True)
        vae.load_state_dict(s["model"])
        opt.load_state_dict(s["opt"])
        state = s["state"]
    if state["step"] >= steps:
        return True
    g = torch.Generator()
    t0 = time.time() - state["elapsed"]
    bar = tqdm(desc="vae", total=steps, initial=state["step"])
    while state["step"] < steps and not deadline.passed():
        # the generator is re-seeded from the step, so a resumed run draws what an uninterrupted one would
        g.manual_seed(seed * 1_000_003 + state["step"])
        idx = torch.randint(0, len(data), (batch,), generator=g)
        x = data[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        # a weak KL (per pixel) only keeps the latent scale bounded; the diffusion model sees scaled latents anyway
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["step"] += 1
        bar.update(1)
        if state["step"] % 50 == 0:
            state["elapsed"] = time.time() - t0
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log(work, phase="vae", step=state["step"], loss=loss.item(), elapsed=state["elapsed"])
            if state["step"] % 250 == 0:
                torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "state": state}, ck)
    state["elapsed"] = time.time() - t0
    torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "state": state}, ck)
    bar.close()
    return state["step"] >= steps


@torch.no_grad()
def encode_posteriors(vae, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (N, 4, 16, 16) in fp16 of ``data`` (N, 3, 32, 32), 500 images at a time."""
    means, stds = [], []
    for i in tqdm(range(0, len(data), 500), desc="encode"):
        post = vae.encode(data[i : i + 500]).latent_dist
        means.append(post.mean.half())
        stds.append(post.std.half())
    return torch.cat(means), torch.cat(stds)


def measurement_latents(mean: torch.Tensor, std: torch.Tensor, seed: int, n: int = 5000) -> torch.Tensor:
    """Sampled latents of the first ``n`` images, seeded: what the latent normalisation is measured on."""
    g, n = torch.Generator().manual_seed(seed), min(n, len(mean))
    return mean[:n].float() + std[:n].float() * torch.randn(n, *mean.shape[1:], generator=g)


@torch.no_grad()
def encode_all(data: torch.Tensor, work: Path, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Encode ``data`` (N, 3, 32, 32) once: posterior mean and std (N, 4, 16, 16) in fp16, and the scaling factor
    1 / std of sampled latents (measured on 5000 images), cached in ``work``/latents.pt."""
    ck = work / "latents.pt"
    if ck.exists():
        s = torch.load(ck, weights_only=True)
        return s["mean"], s["std"], s["scale"]
    vae = make_vae()
    vae.load_state_dict(torch.load(work / "vae.pt", weights_only=True)["model"])
    mean, std = encode_posteriors(vae.eval(), data)
    scale = float(1.0 / measurement_latents(mean, std, seed).std())
    torch.save({"mean": mean, "std": std, "scale": scale}, ck)
    log(work, phase="encode", scale=scale)
    return mean, std, scale


def train_unet(mean: torch.Tensor, std: torch.Tensor, scale: float, labels: torch.Tensor, work: Path,
               steps: int, seed: int, batch: int, deadline: Deadline) -> bool:
    """Train UNet + text encoder on eps-prediction from cached latent posteriors ``mean``/``std`` (N, 4, 16, 16) and
    class ``labels`` (N,); keeps an EMA of both. True when ``steps`` are done, False at the deadline."""
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
    if state["step"] >= steps:
        return True
    tok = build_clip_tokenizer(MAX_TOKENS)
    caps = all_captions()
    ids = tok(caps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    ac = make_scheduler().alphas_cumprod
    n_t = len(TEMPLATES)
    g = torch.Generator()
    t0 = time.time() - state["elapsed"]

    def save() -> None:
        torch.save({"unet": unet.state_dict(), "te": te.state_dict(), "opt": opt.state_dict(), "ema": ema,
                    "state": state}, ck)

    bar = tqdm(desc="unet", total=steps, initial=state["step"])
    while state["step"] < steps and not deadline.passed():
        g.manual_seed(seed * 1_000_003 + state["step"] + 7)
        idx = torch.randint(0, len(mean), (batch,), generator=g)
        z = sample_latents(mean, std, idx, g) * scale
        # caption index: 0 = "" (10% of samples, for classifier-free guidance), else class × template
        cap = 1 + labels[idx] * n_t + torch.randint(0, n_t, (batch,), generator=g)
        cap = torch.where(torch.rand(batch, generator=g) < 0.1, torch.zeros_like(cap), cap)
        # encode each distinct caption once per batch (at most 31), then scatter to the samples
        uniq, inv = torch.unique(cap, return_inverse=True)
        emb = te(ids[uniq]).last_hidden_state[inv]
        t = torch.randint(0, 1000, (batch,), generator=g)
        eps = torch.randn(z.shape, generator=g)
        a = ac[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
        pred = unet(a * z + s * eps, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred, eps)
        optimizer_step(loss, opt, params, ema, state, 4e-4, steps)
        report_step(work, "unet", state, loss, opt, bar, t0, save)
    state["elapsed"] = time.time() - t0
    save()
    bar.close()
    return state["step"] >= steps


def build_pipeline(work: Path, scale: float):
    """The StableDiffusionPipeline of the trained VAE and the EMA UNet/text encoder (float32)."""
    from diffusers import StableDiffusionPipeline

    vae = make_vae()
    vae.load_state_dict(torch.load(work / "vae.pt", weights_only=True)["model"])
    vae.register_to_config(scaling_factor=scale)
    s = torch.load(work / "unet.pt", weights_only=True)
    unet, te = make_unet(), make_text_encoder()
    with torch.no_grad():  # the EMA weights are the teacher
        for p, e in zip(list(unet.parameters()) + list(te.parameters()), s["ema"], strict=True):
            p.copy_(e)
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=build_clip_tokenizer(MAX_TOKENS), unet=unet,
                                   scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_fp16(pipe, out: Path, summary: dict, work: Path) -> int:
    """Save ``pipe`` to ``out`` with its weights in fp16, plus ``summary`` as training.json; returns the size in bytes.

    fp16 keeps the package small (the UNet teacher: about 19 MB instead of 34 MB). diffusers loads its models in
    float32 unless told otherwise, but transformers' default dtype "auto" reads a text encoder's config, so those
    configs record float32: a plain ``from_pretrained(out)`` is then float32 throughout.
    """
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # casting with .to() warns about fp32-only modules; these models have none
    text_encoders = [name for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
                     if getattr(pipe, name, None) is not None]
    for name in ["unet", "transformer", "vae", *text_encoders]:
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(torch.float16)
    diffusers_logging.set_verbosity(level)
    pipe.save_pretrained(out, safe_serialization=True)
    for name in text_encoders:
        cfg_f = out / name / "config.json"
        cfg = json.loads(cfg_f.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = "float32"
        cfg_f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    net = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    log(work, phase="export", out=str(out), bytes=size, network_params=sum(p.numel() for p in net.parameters()))
    print(f"teacher written to {out} ({size / 2**20:.1f} MiB)")
    return size


def export(work: Path, out: Path, scale: float, summary: dict) -> int:
    """Save the UNet teacher's pipeline to ``out`` in fp16 (:func:`save_fp16`); returns its size in bytes."""
    return save_fp16(build_pipeline(work, scale), out, summary, work)


def _summary(work: Path, args: argparse.Namespace, scale: float) -> dict:
    """Provenance for the exported folder: arguments, measured scale, and the losses and times from the log up to
    the exported checkpoint (the log runs ahead of the last checkpoint when a run is exported mid-way)."""
    step = torch.load(work / "unet.pt", weights_only=True, map_location="cpu")["state"]["step"]
    rows = [r for r in log_rows(work) if r.get("phase") == "vae" or (r.get("phase") == "unet" and r["step"] <= step)]

    return {"args": run_args(args), "exported_unet_step": step, "scaling_factor": scale,
            "vae": phase_summary(rows, "vae"), "unet": phase_summary(rows, "unet")}


def log_rows(work: Path) -> list[dict]:
    return [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines() if line.strip()]


def phase_summary(rows: list[dict], name: str, n: int = 8) -> dict:
    """Steps, seconds and the mean loss of the last ``n`` log rows of one phase, for training.json."""
    rs = [r for r in rows if r["phase"] == name]
    losses = [r["loss"] for r in rs[-n:]]
    return {"steps": rs[-1]["step"] if rs else None, "seconds": round(rs[-1].get("elapsed", 0)) if rs else None,
            "loss_mean_of_last_8_logs": round(sum(losses) / len(losses), 5) if losses else None}


def run_args(args: argparse.Namespace) -> dict:
    """The command's arguments as training.json records them (paths and the export switch left out)."""
    return {k: v for k, v in vars(args).items() if k not in ("out", "work", "export_only")}


def teacher_parser(doc: str, out: str, work: str) -> argparse.ArgumentParser:
    """The options both teacher scripts take (output, work folder, data, time budget, resume, export, batch, seed,
    threads)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", default=out)
    ap.add_argument("--work", default=work, help="checkpoints and log.jsonl")
    ap.add_argument("--data", default=None, help="Fashion-MNIST folder (default: Debian's or torchvision's)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop this run after N minutes with a checkpoint (continue with --resume)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work")
    ap.add_argument("--export-only", action="store_true",
                    help="export the EMA weights of the latest checkpoint in --work as they are, without training")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def start(args: argparse.Namespace) -> Path:
    """Threads and the seed of model initialisation; returns the work folder."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return Path(args.work)


def open_work(work: Path, resume: bool) -> None:
    """Refuse to start over a work folder of an earlier run unless resuming; create it."""
    if not resume and any(work.glob("*.pt")):
        raise SystemExit(f"{work} holds checkpoints of an earlier run: pass --resume to continue it, "
                         "or another --work to start over")
    work.mkdir(parents=True, exist_ok=True)


def main() -> None:
    ap = teacher_parser(__doc__, "distill_diffusion/assets/fmnist_teacher", "runs/_teacher_work")
    ap.add_argument("--vae-steps", type=int, default=1000)  # batch 32
    ap.add_argument("--unet-steps", type=int, default=1800)
    args = ap.parse_args()
    work = start(args)
    if args.export_only:
        if not all((work / f).is_file() for f in ("vae.pt", "latents.pt", "unet.pt")):
            raise SystemExit(f"{work} has no complete checkpoint (vae.pt, latents.pt, unet.pt) to export")
        scale = torch.load(work / "latents.pt", weights_only=True)["scale"]
        export(work, Path(args.out), scale, _summary(work, args, scale))
        return
    open_work(work, args.resume)
    deadline = Deadline(args.minutes)
    ds = FashionMNIST(args.data, "train")
    data = ds.all_images()
    if not train_vae(data, work, args.vae_steps, args.seed, deadline):
        raise SystemExit(f"time budget used up during the VAE phase; continue with --resume --work {work}")
    mean, std, scale = encode_all(data, work, args.seed)
    if not train_unet(mean, std, scale, ds.labels, work, args.unet_steps, args.seed, args.batch_size, deadline):
        raise SystemExit(f"time budget used up during the UNet phase; continue with --resume --work {work}")
    export(work, Path(args.out), scale, _summary(work, args, scale))


if __name__ == "__main__":
    main()
