"""The one training loop. Reads top to bottom: set-up, resume, steps, export. No callbacks.

Distributed training: every process computes its share of the global batch; gradients are averaged with one
all-reduce per role update (no DDP wrapper: a shared LoRA base runs several adapters per step, and DDP's reducer
expects one forward per backward). The same all-reduced buffer decides whether an update is finite, so every rank
skips or steps together.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import artifacts, memory
from .config import method_object, to_yaml
from .data import Stream, build_source
from .errors import UserError
from .method import Batch, Method, StepRNG
from .models import Models, resolve_teacher

CKPT_PREFIX = "checkpoint-"


def _dtype(mp: str) -> torch.dtype:
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]


class NonFiniteError(RuntimeError):
    pass


def train(cfg: Any, method_cls: type[Method]) -> Path:
    """Run a distillation described by ``cfg`` (a validated OmegaConf TrainConfig) with ``method_cls``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    out = Path(cfg.output_dir)
    rss_baseline = memory.rss_bytes()  # before any model loads: the "import baseline" of memory.json
    mcfg = method_object(cfg)
    if cfg.gradient_checkpointing and not method_cls.checkpointing_safe:
        raise UserError(f"gradient_checkpointing=true is not safe for {cfg.method_name}: its loss sends gradients "
                        "through another role's forward, which a checkpointed backward would re-run under the wrong "
                        "adapter; set gradient_checkpointing=false")
    candidates = _resume_candidates(cfg, out)
    if not cfg.resume and (out / artifacts.SAMPLING_FILE).exists() and not cfg.allow_overwrite:
        raise UserError(f"output_dir {out} already holds a run; resume=latest continues it, or choose another "
                        "output_dir (allow_overwrite=true replaces it)")

    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    main = accelerator.is_main_process
    device = accelerator.device

    # ---- models, method, data ------------------------------------------------------------------------------------
    # New trainable tensors (LoRA A matrices, a method's heads) are initialised from the seed: the same on every
    # rank and in every resumed process.
    torch.manual_seed(cfg.seed)
    roles = method_cls.roles_for(mcfg)
    models = Models(
        cfg.teacher, student=cfg.student, roles=roles, targets=method_cls.targets_for(mcfg, cfg.student),
        lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
        lora_targets=list(cfg.lora_targets) if cfg.lora_targets else None,
        unet_overrides=method_cls.student_unet_overrides(mcfg, cfg.student) if cfg.student == "full" else None,
        resolution=cfg.resolution, device=device, weight_dtype=_dtype(cfg.mixed_precision), seed=cfg.seed,
        headless_roles=method_cls.headless_roles_for(mcfg),
        channels_last=cfg.channels_last, compile_unets=cfg.compile,
    )
    if cfg.init_from:
        _init_from(models, cfg.init_from)
    torch.manual_seed(cfg.seed + 1)
    method = method_cls(mcfg, cfg, models)
    extras = {r: m.to(device) for r, m in method.extra_modules().items()}
    if cfg.gradient_checkpointing:
        models.set_gradient_checkpointing(True)
    embedded = artifacts.is_embedded_teacher(models.teacher_path)
    source = build_source(cfg.data, models.resolution, embedded, method_cls.needs_images)
    stream = Stream(source, cfg.seed, cfg.batch_size, accelerator.process_index, accelerator.num_processes,
                    cfg.gradient_accumulation_steps, cfg.data.empty_prompt_prob, load_images=method_cls.needs_images)

    if cfg.export_initial:
        # The untrained student through the same run folder: the baseline row every quality bar is compared with.
        if main:
            out.mkdir(parents=True, exist_ok=True)
            artifacts.atomic_write(out / "config.yaml", to_yaml(cfg))
            _export_and_validate(cfg, models, method, out, 0, accelerator)
        accelerator.wait_for_everyone()
        return out

    # ---- optimizers: one per role; frozen parts never enter one -----------------------------------------------------
    params: dict[str, list[nn.Parameter]] = {}
    clip_values: dict[str, float | None] = {}
    optimizers, schedulers = {}, {}
    for role in roles:
        params[role] = models.parameters(role) + (list(extras[role].parameters()) if role in extras else [])
        s = method.optimizer_settings(role)
        clip_values[role] = s.max_grad_value
        opt = torch.optim.AdamW(
            params[role], lr=s.learning_rate or cfg.learning_rate,
            betas=s.betas or (cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay if s.weight_decay is None else s.weight_decay,
            eps=s.eps or cfg.adam_epsilon,
        )
        warm = max(cfg.lr_warmup_steps, 1)
        schedulers[role] = torch.optim.lr_scheduler.LambdaLR(opt, lambda i, w=warm: min(1.0, (i + 1) / w))
        optimizers[role] = accelerator.prepare(opt)

    # ---- resume ---------------------------------------------------------------------------------------------------
    start = 0
    for cand in candidates:
        try:
            start = _load_checkpoint(cand, models, method, extras, optimizers, schedulers, load_file)
        except UserError as e:
            if cfg.resume != "latest":
                raise
            if main:
                print(f"skipping checkpoint {cand}: {e}", flush=True)
            continue
        if main:
            print(f"resumed from {cand} at step {start}", flush=True)
        break
    else:
        if cfg.resume and main:
            print(f"resume={cfg.resume}: no usable checkpoint in {out / 'checkpoints'}; starting at step 0")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        artifacts.atomic_write(out / "config.yaml", to_yaml(cfg))
        if cfg.report_to != "none":
            accelerator.init_trackers("distill", config=_flat(cfg))
    accelerator.wait_for_everyone()

    def make_batch(step: int, micro: int) -> Batch:
        s = stream.get(step, micro)
        rng = StepRNG(cfg.seed, step, s.ids, device)
        latents = None
        if s.images is not None:
            latents = models.encode_images(s.images, noise=rng.randn(models.latent_shape, "vae-posterior"))
        return Batch(latents, models.encode_prompts(s.prompts), models.encode_uncond(len(s.prompts)), s.prompts, rng)

    # ---- the loop -------------------------------------------------------------------------------------------------
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, disable=not main, desc="distill",
               dynamic_ncols=True)
    bad_in_row, skipped_total = 0, 0
    metrics_file = out / "metrics.jsonl"
    t_last = time.perf_counter()
    # Fault injection for the crash tests: SIGKILL this process, or raise, when step N begins.
    crash_at = int(os.environ.get("DISTILL_FAULT_AT_STEP", "-1"))
    for step in bar:
        if step == crash_at:
            if os.environ.get("DISTILL_FAULT_KIND", "kill") == "kill":
                os.kill(os.getpid(), 9)
            raise RuntimeError(f"injected fault at step {step}")
        batches = [make_batch(step, m) for m in range(cfg.gradient_accumulation_steps)]
        logs: dict[str, float] = {}
        for role in method.updates(step):
            loss_sum = 0.0
            # Only this role's extra modules (e.g. a GAN head) take gradients; stale gradients of any role are
            # dropped, so a loss that passes through another role's module never leaks into that role's update.
            for r, m in extras.items():
                m.requires_grad_(r == role)
            for o in optimizers.values():
                o.zero_grad(set_to_none=True)
            for batch in batches:
                # Backward runs inside the role, so a checkpointed backward re-runs the forward under this role.
                with models.trainable(role), models.role(role), accelerator.autocast():
                    loss, role_logs = method.loss(role, batch, step)
                    accelerator.backward(loss / cfg.gradient_accumulation_steps)
                loss_sum += float(loss.detach()) / cfg.gradient_accumulation_steps
                for k, v in role_logs.items():
                    logs[f"{role}/{k}"] = logs.get(f"{role}/{k}", 0.0) + v / cfg.gradient_accumulation_steps
            finite, loss_avg = _all_reduce_grads(params[role], loss_sum, accelerator)
            if finite:
                grad_norm = accelerator.clip_grad_norm_(params[role], cfg.max_grad_norm)
                if clip_values[role] is not None:  # after the norm clip, which unscales fp16 gradients
                    torch.nn.utils.clip_grad_value_(params[role], clip_values[role])
                optimizers[role].step()
                schedulers[role].step()
                for name, spec in models.targets.items():
                    if spec.source == role:
                        models.update_target(name)
                bad_in_row = 0
                logs[f"{role}/grad_norm"] = float(grad_norm)
            else:
                bad_in_row += 1
                skipped_total += 1
                if bad_in_row >= cfg.max_nonfinite_steps:
                    bar.close()
                    raise NonFiniteError(f"stopped at step {step}: role {role} had a non-finite loss or gradient "
                                         f"{bad_in_row} updates in a row; the last good checkpoint is kept in "
                                         f"{out / 'checkpoints'}; lower learning_rate or check the data")
            optimizers[role].zero_grad(set_to_none=True)
            logs[f"{role}/loss"] = loss_avg
            logs[f"{role}/lr"] = schedulers[role].get_last_lr()[0]
        done = step + 1
        logs["skipped_updates"] = skipped_total

        if main and (done % cfg.logging_steps == 0 or done == cfg.max_steps or done == start + 1):
            now = time.perf_counter()
            logs["sec_per_step"] = (now - t_last) / max(1, done - max(start, done - cfg.logging_steps))
            t_last = now
            with metrics_file.open("a") as fh:
                fh.write(json.dumps({"step": done, **logs}) + "\n")
            if cfg.report_to != "none":
                accelerator.log(logs, step=done)
        bar.set_postfix({k.replace("/loss", ""): f"{v:.4g}" for k, v in logs.items() if k.endswith("/loss")})

        for name, spec in method.exports(done).items():
            if main:
                artifacts.save_run(models, cfg.method_name, spec, out, folder_name=name,
                                   extra={"step": done})
        if done % cfg.checkpointing_steps == 0 and done < cfg.max_steps:
            accelerator.wait_for_everyone()
            if main:
                _save_checkpoint(out, done, models, method, extras, optimizers, schedulers, cfg, save_file)
        if cfg.validation_steps and done % cfg.validation_steps == 0 and done < cfg.max_steps and main:
            _export_and_validate(cfg, models, method, out, done, accelerator)
        accelerator.wait_for_everyone()

    # ---- export ---------------------------------------------------------------------------------------------------
    if main:
        mem = {**memory.counted(models, extras, params, optimizers),
               "peak_rss_above_baseline_bytes": memory.peak_rss_bytes() - rss_baseline,
               "student": cfg.student, "method": cfg.method_name}
        if torch.cuda.is_available():
            mem["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        artifacts.atomic_write(out / "memory.json", json.dumps(mem, indent=1))
        _save_checkpoint(out, cfg.max_steps, models, method, extras, optimizers, schedulers, cfg, save_file)
        _export_and_validate(cfg, models, method, out, cfg.max_steps, accelerator)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


# ---- pieces of the loop -----------------------------------------------------------------------------------------


def _all_reduce_grads(params: list[nn.Parameter], loss: float, accelerator: Any) -> tuple[bool, float]:
    """Average gradients (and the loss) over processes in one flat buffer; True when all of it is finite."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss], device=grads[0].device)])
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(flat)
        flat /= accelerator.num_processes
        i = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[i:i + n].view_as(g).to(p.dtype)
            i += n
    return bool(torch.isfinite(flat).all()), float(flat[-1])


def _export_and_validate(cfg: Any, models: Models, method: Method, out: Path, step: int, accelerator: Any) -> None:
    """Write the run folder (student, sampling.json, model card) and a validation grid sampled through it."""
    spec = method.sampling()
    artifacts.save_run(models, cfg.method_name, spec, out, cfg_yaml=to_yaml(cfg), extra={"step": step})
    prompts = list(cfg.validation_prompts or _default_prompts(models))
    try:
        grid = _validation_grid(out, prompts, cfg.validation_seeds, models)
    except UserError:
        raise
    path = out / "validation" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")


def _default_prompts(models: Models) -> list[str]:
    if artifacts.is_embedded_teacher(models.teacher_path):
        return ["a photo of a sneaker", "a trouser", "a product photo of a bag", "a photo of a dress"]
    return ["a photo of a cat", "a red car on a street", "a bowl of fruit", "a mountain landscape"]


def _validation_grid(out: Path, prompts: list[str], n_seeds: int, models: Models) -> Any:
    """Rows: the teacher (25 DDIM steps, its guidance) then the student at each step count; columns: prompt × seed."""
    from PIL import Image

    # The teacher's weights come from memory (the frozen parts the run already holds), not from disk again.
    base = models.teacher_pipeline() if models.student_kind == "lora" else None
    pipe = artifacts.load_student(out, device=models.device, base=base)
    rows = []
    ps = [p for p in prompts for _ in range(n_seeds)]
    seeds = [i for _ in prompts for i in range(n_seeds)]
    for k in sorted(pipe.distill.steps):
        imgs, _ = artifacts.sample(pipe, ps, steps=k, seeds=seeds)
        rows.append(imgs)
    teacher_cache = out / "validation" / "teacher.png"
    grid_rows = [_row(r) for r in rows]
    if not teacher_cache.exists():
        t = artifacts.load_teacher(str(models.teacher_path), device=models.device, base=models.teacher_pipeline())
        timgs, _ = artifacts.sample(t, ps, steps=25, seeds=seeds, guidance_scale=_teacher_guidance(models))
        teacher_cache.parent.mkdir(parents=True, exist_ok=True)
        _row(timgs).save(teacher_cache)
    grid_rows.insert(0, Image.open(teacher_cache).convert("RGB"))
    w = max(r.width for r in grid_rows)
    grid = Image.new("RGB", (w, sum(r.height for r in grid_rows)))
    y = 0
    for r in grid_rows:
        grid.paste(r, (0, y))
        y += r.height
    return grid


def _teacher_guidance(models: Models) -> float:
    return 3.0 if artifacts.is_embedded_teacher(models.teacher_path) else 7.5


def _row(images: list[Any]) -> Any:
    from PIL import Image

    w, h = images[0].size
    row = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        row.paste(im, (i * w, 0))
    return row


def _flat(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    out: dict[str, Any] = {}

    def rec(prefix: str, node: Any) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                rec(f"{prefix}{k}.", v)
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)

    rec("", OmegaConf.to_container(cfg))
    return out


# ---- checkpoints ------------------------------------------------------------------------------------------------


def _named_state(models: Models, extras: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every trainable tensor and target network, never the frozen base."""
    state: dict[str, torch.Tensor] = {}
    names = list(models.roles) + [n for n, s in models.targets.items() if s.decay is not None]
    for role in names:
        for i, p in enumerate(models.parameters(role)):
            state[f"{role}/{i}"] = p.detach().to("cpu").contiguous()
    for role, m in extras.items():
        for k, v in m.state_dict().items():
            state[f"extra/{role}/{k}"] = v.detach().to("cpu").contiguous()
    return state


def _save_checkpoint(out: Path, step: int, models: Models, method: Method, extras: dict[str, nn.Module],
                     optimizers: dict[str, Any], schedulers: dict[str, Any], cfg: Any, save_file: Any) -> None:
    ckdir = out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    with artifacts.atomic_dir(ckdir / f"{CKPT_PREFIX}{step}") as tmp:
        save_file(_named_state(models, extras), str(tmp / "trainable.safetensors"))
        torch.save({"optimizers": {r: o.state_dict() for r, o in optimizers.items()},
                    "schedulers": {r: s.state_dict() for r, s in schedulers.items()},
                    "method": method.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "method": cfg.method_name,
                                                    "student": cfg.student}))
    # Old checkpoints go only after the new one is complete.
    if cfg.checkpoints_total_limit:
        done = sorted(_checkpoints(ckdir), key=lambda p: int(p.name[len(CKPT_PREFIX):]))
        for old in done[: max(0, len(done) - cfg.checkpoints_total_limit)]:
            shutil.rmtree(old, ignore_errors=True)


def _checkpoints(ckdir: Path) -> list[Path]:
    if not ckdir.is_dir():
        return []
    return [p for p in ckdir.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
            and p.name[len(CKPT_PREFIX):].isdigit()]


def _resume_candidates(cfg: Any, out: Path) -> list[Path]:
    """Checkpoints to try, newest first: the one named by ``resume``, or every complete one for ``latest``."""
    if not cfg.resume:
        return []
    if cfg.resume != "latest":
        p = Path(cfg.resume)
        if not (p / "state.json").is_file():
            raise UserError(f"resume={cfg.resume!r} is not a checkpoint folder (no state.json)")
        return [p]
    return sorted(_checkpoints(out / "checkpoints"), key=lambda p: -int(p.name[len(CKPT_PREFIX):]))


def _load_checkpoint(path: Path, models: Models, method: Method, extras: dict[str, nn.Module],
                     optimizers: dict[str, Any], schedulers: dict[str, Any], load_file: Any) -> int:
    if not all((path / f).is_file() for f in ("state.json", "trainable.safetensors", "optim.pt")):
        raise UserError(f"checkpoint {path} is incomplete")
    try:
        state = load_file(str(path / "trainable.safetensors"))
        other = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        step = int(json.loads((path / "state.json").read_text())["step"])
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}); delete it to resume from an "
                        "earlier one") from None
    current = _named_state(models, extras)
    if set(state) != set(current) or any(state[k].shape != current[k].shape for k in state):
        raise UserError(f"checkpoint {path} was written by a different configuration (student, roles or LoRA "
                        "rank differ); resume with the config it was written with")
    with torch.no_grad():
        names = list(models.roles) + [n for n, s in models.targets.items() if s.decay is not None]
        for role in names:
            for i, p in enumerate(models.parameters(role)):
                p.copy_(state[f"{role}/{i}"])
        for role, m in extras.items():
            prefix = f"extra/{role}/"
            m.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    for r, o in optimizers.items():
        o.load_state_dict(other["optimizers"][r])
    for r, s in schedulers.items():
        s.load_state_dict(other["schedulers"][r])
    method.load_state_dict(other.get("method", {}))
    torch.set_rng_state(other["torch_rng"])
    return step


def _init_from(models: Models, run: str) -> None:
    """Start the student from an earlier run's exported student (same base model)."""
    from safetensors.torch import load_file

    info = artifacts.read_sampling(run)
    mine = artifacts.weights_hash(models.teacher_path)
    if info.get("teacher_hash") != mine:
        raise UserError(f"init_from={run!r} was distilled from teacher {info.get('teacher')!r}, not "
                        f"{resolve_teacher(models.teacher_path)!r}; use a run of the same base model")
    if info["student"] != models.student_kind:
        raise UserError(f"init_from={run!r} has a {info['student']} student; this run has student="
                        f"{models.student_kind}")
    folder = Path(run) / info.get("student_dir", "student")
    with torch.no_grad():
        if models.student_kind == "lora":
            from peft.utils import set_peft_model_state_dict

            sd = load_file(str(folder / artifacts.LORA_FILE))
            sd = {k.removeprefix("unet."): v for k, v in sd.items()}
            res = set_peft_model_state_dict(models.unet, sd, adapter_name="student")
            if getattr(res, "unexpected_keys", None):
                raise UserError(f"init_from={run!r}: its LoRA does not fit this config's lora_targets/rank")
        else:
            f = folder / "unet" / "diffusion_pytorch_model.safetensors"
            sd = load_file(str(f))
            try:
                models.net("student").load_state_dict(sd)
            except RuntimeError:
                raise UserError(f"init_from={run!r}: its UNet does not match this student's architecture") from None


def run_main(argv: list[str], registry: dict[str, type[Method]]) -> int:
    """The CLI edge: parse, train, and turn user errors into one line and exit code 2."""
    import sys

    from .config import parse_config

    try:
        cfg, print_only = parse_config(argv, registry)
        if print_only:
            print(to_yaml(cfg), end="")
            return 0
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        out = train(cfg, registry[cfg.method_name])
    except UserError as e:
        if _is_main():  # every rank finds the same problem; one line, from rank 0
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    except KeyboardInterrupt:
        print("interrupted; resume with resume=latest", file=sys.stderr)
        return 130
    if _is_main():
        o = out.resolve()
        print(f"\nrun written to {o}\n  evaluate: python -m eval --runs {out}\n  compare:  python -m app --runs "
              f"{out.parent}\n  load:     distill_diffusion.load_student({str(out)!r})")
    return 0


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0

