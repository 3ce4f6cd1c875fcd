"""The one training loop. Reads top to bottom: set-up, resume, steps, export. No callbacks.

Distributed training: every process computes its share of the global batch; gradients are averaged with one
all-reduce per role update (no DDP wrapper: a shared LoRA base runs several adapters per step, and DDP's reducer
expects one forward per backward). The same all-reduced buffer decides whether an update is finite, so every rank
skips or steps together.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import artifacts, checkpoints, memory, sharding
from .config import lr_factor, method_object, to_yaml
from .data import Samples, Source, Stream, build_source
from .errors import UserError
from .method import Batch, Method, MethodSpec, RunContext, StepRNG, TargetSpec
from .models import Models, build_models


class NonFiniteError(RuntimeError):
    pass


@dataclass
class Trainer:
    """Everything a step touches: the models, the method, its extra modules and one optimizer per role."""

    cfg: Any
    spec: MethodSpec
    models: Models
    method: Method
    extras: dict[str, nn.Module]
    accelerator: Any
    params: dict[str, list[nn.Parameter]] = field(default_factory=dict)
    optimizers: dict[str, Any] = field(default_factory=dict)
    schedulers: dict[str, Any] = field(default_factory=dict)
    clip_values: dict[str, float | None] = field(default_factory=dict)
    bad_in_row: int = 0
    skipped_total: int = 0
    sharded: bool = False  # FSDP2 (distill_diffusion.sharding): the full roles' tensors are this rank's shards


def train(cfg: Any, method_cls: type[Method]) -> Path:
    """Run a distillation described by ``cfg`` (a validated OmegaConf TrainConfig) with ``method_cls``."""
    out = Path(cfg.output_dir)
    if cfg.retain_freed_memory:
        memory.retain_freed_memory()
    rss_baseline = memory.rss_bytes()  # before any model loads: the "import baseline" of memory.json
    spec = with_student_ema(method_cls.spec(method_object(cfg), cfg.student), cfg.ema_decay)
    candidates = check_start(cfg, spec, out)
    accelerator = make_accelerator(cfg, out)
    tr = build_trainer(cfg, spec, method_cls, accelerator)
    stream = build_stream(cfg, spec, tr.models, accelerator)
    if cfg.export_initial or cfg.export_checkpoint:
        export_only(tr, out)
        return out
    build_optimizers(tr)
    start = resume(tr, candidates, out)
    if accelerator.is_main_process:
        start_run_folder(cfg, out, accelerator, trackers=cfg.report_to != "none")
    accelerator.wait_for_everyone()
    setup_peak = memory.start_step_peak()
    run_steps(tr, stream, start, out)
    if accelerator.is_main_process:
        write_memory(tr, out, rss_baseline, setup_peak)
    checkpoints.save(out, cfg.max_steps, tr)
    export_and_validate(tr, out, cfg.max_steps)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if cfg.hub_model_id and accelerator.is_main_process:  # after every rank is done: a failed push stops nobody
        url = artifacts.push_to_hub(out, cfg.hub_model_id, cfg.hub_private)
        print(f"pushed to {cfg.hub_model_id}: {url}", flush=True)
    return out


# ---- set-up -----------------------------------------------------------------------------------------------------


def check_start(cfg: Any, spec: MethodSpec, out: Path) -> list[Path]:
    """Refuse what cannot work before anything loads; the checkpoints to resume from, newest first."""
    if cfg.gradient_checkpointing and not spec.checkpointing_safe:
        raise UserError(f"gradient_checkpointing=true is not safe for {cfg.method_name}: its loss sends gradients "
                        "through another role's forward, which a checkpointed backward would re-run under the wrong "
                        "adapter; set gradient_checkpointing=false")
    extra = [r for r in spec.init_roles if r != "student"]
    if extra and not cfg.init_from:
        raise UserError(f"this {cfg.method_name} config starts the {', '.join(extra)} from an earlier run: set "
                        "init_from=<that run's folder>")
    if cfg.export_checkpoint:  # a resumed run's config.yaml names its resume: not this one's business
        named = checkpoints.named(cfg.export_checkpoint, "export_checkpoint")
        if cfg.export_average > 1:
            checkpoints.window(named, cfg.export_average)
    candidates = [] if cfg.export_checkpoint else checkpoints.candidates(cfg.resume, out)
    for cand in candidates:  # every one: resume=latest may skip a broken newest checkpoint and load an older one
        checkpoints.check_length(cand, cfg, spec)
    if not cfg.resume and (out / artifacts.SAMPLING_FILE).exists() and not cfg.allow_overwrite:
        raise UserError(f"output_dir {out} already holds a run; resume=latest continues it, or choose another "
                        "output_dir (allow_overwrite=true replaces it)")
    return candidates


def export_only(tr: Trainer, out: Path) -> None:
    """The student as initialised (``export_initial``: the baseline row every quality bar is compared with) or as a
    checkpoint holds it (``export_checkpoint``), through the same run folder, without a training step."""
    step, extra = 0, {}
    if tr.cfg.export_checkpoint:  # checked by check_start; no optimizers built: load restores the tensors only
        path, n = Path(tr.cfg.export_checkpoint), tr.cfg.export_average
        averaged = checkpoints.window(path, n) if n > 1 else None
        step = checkpoints.load(path, tr, averaged)
        if averaged:  # the card and sampling.json say the weights are an average, and of what
            extra["averaged_steps"] = [checkpoints.step_of(p) for p in averaged]
    if tr.accelerator.is_main_process:
        start_run_folder(tr.cfg, out, tr.accelerator, trackers=False)
    export_and_validate(tr, out, step, extra)
    tr.accelerator.wait_for_everyone()


def make_accelerator(cfg: Any, out: Path) -> Any:
    """accelerate's Accelerator for this process; an FSDP launch config turns on ``fsdp`` (when the config leaves it
    null) and is otherwise handled by :mod:`distill_diffusion.sharding`, not by accelerate."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    fsdp_launch = sharding.launched_with_fsdp()
    if cfg.fsdp is None:
        cfg.fsdp = fsdp_launch
    acc = Accelerator(
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if cfg.mixed_precision == "bf16" and acc.device.type == "cpu" and not cpu_has_native_bf16() \
            and acc.is_main_process:
        print("warning: mixed_precision=bf16 on a CPU without native bfloat16 (no AVX512-BF16 or AMX): it is emulated "
              "and slower than float32 here; mixed_precision=no is faster", flush=True)
    return acc


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo's flags). Without it,
    CPU bf16 autocast is emulated and slower than float32 (issue 23 measured it on an AVX2 EPYC)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


STUDENT_EMA = "student_ema"


def with_student_ema(spec: MethodSpec, decay: float | None) -> MethodSpec:
    """``spec`` plus an EMA of the student (``ema_decay``), which the run exports as its student: published
    few-step numbers are EMA numbers (SiD-LSG ships G_ema, DMD2's SD1.5 recipe keeps an EMA). The raw student stays
    in the checkpoints."""
    if decay is None:
        return spec
    return dataclasses.replace(spec, targets={**spec.targets, STUDENT_EMA: TargetSpec("student", decay)})


def export_role(cfg: Any) -> str:
    """The role a run exports as its student: the EMA when ``ema_decay`` is set."""
    return STUDENT_EMA if cfg.ema_decay is not None else "student"


def build_trainer(cfg: Any, spec: MethodSpec, method_cls: type[Method], accelerator: Any) -> Trainer:
    """Models, method and extra modules. New trainable tensors (LoRA A matrices, a method's heads) are initialised
    from the seed: the same on every rank and in every resumed process."""
    torch.manual_seed(cfg.seed)
    sharded = wants_sharding(cfg, accelerator)
    models = build_models(cfg, spec, accelerator.device, sharded=sharded)
    if cfg.init_from:
        checkpoints.init_student(models, cfg.init_from)
        models.reset_targets()  # EMA targets start from the loaded student
    torch.manual_seed(cfg.seed + 1)
    method = method_cls(method_object(cfg), RunContext(max_steps=cfg.max_steps, mixed_precision=cfg.mixed_precision),
                        models)
    extras = {r: m.to(accelerator.device) for r, m in method.extra_modules().items()}
    others = [r for r in spec.init_roles if r != "student"]
    if others:
        checkpoints.init_roles(models, extras, cfg.init_from, others)
    if cfg.gradient_checkpointing:
        models.set_gradient_checkpointing(True)
    if sharded:
        done = sharding.shard_models(models, extras, cfg.fsdp_shard_teacher, sharding.reshard_after_forward())
        if accelerator.is_main_process:
            print(f"fsdp: sharded {', '.join(done)} over {accelerator.num_processes} processes", flush=True)
    return Trainer(cfg, spec, models, method, extras, accelerator, sharded=sharded)


def wants_sharding(cfg: Any, accelerator: Any) -> bool:
    """Whether this run shards its full networks with FSDP2 (``fsdp`` on, a full student, several processes;
    :mod:`distill_diffusion.sharding`); says why not in one line when ``fsdp`` is on but it will not."""
    if not cfg.fsdp:
        return False
    main = accelerator.is_main_process
    if cfg.student != "full":
        if main:
            print("note: fsdp applies to student=full; a LoRA student keeps one replicated frozen base and small "
                  "adapters, so nothing is sharded", flush=True)
        return False
    if accelerator.num_processes == 1:
        if main:
            print("note: fsdp with one process shards nothing; training continues unsharded", flush=True)
        return False
    if cfg.mixed_precision == "fp16":
        raise UserError("fsdp with mixed_precision=fp16: sharded gradients have no loss scaler here; use "
                        "mixed_precision=bf16 (or fsdp=false)")
    return True


def build_stream(cfg: Any, spec: MethodSpec, models: Models, accelerator: Any) -> Stream:
    embedded = artifacts.is_embedded_teacher(models.teacher_path)
    source = build_source(cfg.data, models.resolution, embedded, spec.needs_images)
    # With a latent store the training process reads latents, not images (make_batch).
    load_images = spec.needs_images and models.encoders.latent_store is None
    return Stream(source, cfg.seed, cfg.batch_size, accelerator.process_index, accelerator.num_processes,
                  cfg.gradient_accumulation_steps, cfg.data.empty_prompt_prob, load_images=load_images)


def fused_adamw(params: list[nn.Parameter], sharded: bool) -> bool | None:
    """True where torch's fused AdamW applies: unsharded floating-point tensors on one device type that has the
    kernel. It updates every tensor in one call instead of torch's per-tensor loop on a CPU (a LoRA's hundreds of
    small tensors: BENCHMARKS.md's lean table); it rounds like the loop to within an ulp, not bit for bit
    (``tests/test_loop.py``). None (torch's default) for FSDP2's sharded tensors."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if sharded or not params:
        return None
    devices = {p.device.type for p in params}
    ok = len(devices) == 1 and devices <= set(_get_fused_kernels_supported_devices())
    return True if ok and all(p.is_floating_point() for p in params) else None


def build_optimizers(tr: Trainer) -> None:
    """One AdamW per role over its trainable tensors and extra modules; frozen parts never enter one."""
    cfg = tr.cfg
    for role in tr.spec.roles:
        extra = list(tr.extras[role].parameters()) if role in tr.extras else []
        tr.params[role] = tr.models.parameters(role) + extra
        s = tr.method.optimizer_settings(role)
        tr.clip_values[role] = s.max_grad_value
        opt = torch.optim.AdamW(
            tr.params[role], lr=s.learning_rate or cfg.learning_rate,
            betas=s.betas or (cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay if s.weight_decay is None else s.weight_decay,
            eps=s.eps or cfg.adam_epsilon, fused=fused_adamw(tr.params[role], tr.sharded),
        )
        tr.schedulers[role] = torch.optim.lr_scheduler.LambdaLR(
            opt, functools.partial(lr_factor, warmup=cfg.lr_warmup_steps, total=cfg.max_steps, kind=cfg.lr_schedule,
                                   decay_steps=cfg.lr_decay_steps))
        tr.optimizers[role] = tr.accelerator.prepare(opt)


def resume(tr: Trainer, candidates: list[Path], out: Path) -> int:
    """The step to start at: that of the newest checkpoint that loads (``resume=latest`` skips broken ones)."""
    main = tr.accelerator.is_main_process
    for cand in candidates:
        try:
            start = checkpoints.load(cand, tr)
        except UserError as e:
            if tr.cfg.resume != "latest":
                raise
            if main:
                print(f"skipping checkpoint {cand}: {e}", flush=True)
            continue
        if main:
            print(f"resumed from {cand} at step {start}", flush=True)
        return start
    if tr.cfg.resume and main:
        print(f"resume={tr.cfg.resume}: no usable checkpoint in {out / 'checkpoints'}; starting at step 0")
    return 0


def start_run_folder(cfg: Any, out: Path, accelerator: Any, trackers: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write(out / "config.yaml", to_yaml(cfg))
    artifacts.write_run_info(out, processes=accelerator.num_processes)
    if trackers:
        accelerator.init_trackers("distill", config=_flat(cfg))


# ---- the steps --------------------------------------------------------------------------------------------------


def run_steps(tr: Trainer, stream: Stream, start: int, out: Path) -> None:
    """Steps ``start`` .. max_steps - 1: every role's update, then logging, exports, checkpoints, validation."""
    from tqdm.auto import tqdm

    cfg, main = tr.cfg, tr.accelerator.is_main_process
    if main and start < cfg.max_steps:
        tqdm.write(f"distilling {cfg.method_name} into {out}: steps {start}..{cfg.max_steps} at batch "
                   f"{cfg.batch_size}; the export and the validation grid follow the last step")
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, disable=not main, desc="distill",
               dynamic_ncols=True)
    clock = {"t": time.perf_counter()}
    window: dict[str, float] = {}  # each key's latest value since the last logged row
    samples = stream.batches(start, cfg.max_steps, cfg.data.num_workers, cfg.data.prefetch)
    for step in bar:
        batches = [make_batch(tr, next(samples), step, stream.source) for _ in range(cfg.gradient_accumulation_steps)]
        logs: dict[str, float] = {}
        for role in tr.method.resets(step):
            restart_role(tr, role)
        roles = tr.method.updates(step)
        for role in roles:
            try:
                update_role(tr, role, batches, step, logs)
            except NonFiniteError:
                bar.close()
                raise
        step_schedulers(tr, roles, logs)
        done = step + 1
        logs["skipped_updates"] = tr.skipped_total
        window.update(logs)
        if main and log_step(tr, out, done, start, window, clock):
            window = {}
        bar.set_postfix({k.replace("/loss", ""): f"{v:.4g}" for k, v in logs.items() if k.endswith("/loss")})
        after_step(tr, out, done)


def restart_role(tr: Trainer, role: str) -> None:
    """``role`` from the teacher again (:meth:`Models.reset_role`) with a fresh optimizer state (Adam's moments
    of the weights it had); its learning-rate schedule and extra modules go on."""
    tr.models.reset_role(role)
    tr.optimizers[role].state.clear()


def make_batch(tr: Trainer, s: Samples, step: int, source: Source) -> Batch:
    """A micro-batch of ``step`` from its samples: latents of its images (when the method reads them; from the
    latent store when there is one, which decodes an image only when it lacks it) and prompts."""
    models = tr.models
    rng = StepRNG(tr.cfg.seed, step, s.ids, tr.accelerator.device)
    latents = None
    if s.images is not None or (tr.spec.needs_images and models.encoders.latent_store is not None):
        noise = rng.randn(models.latent_shape, "vae-posterior")
        if s.images is not None:
            latents = models.encode_images(s.images, noise=noise)
        else:
            latents = models.encoders.latents(*models.encoders.stored_posterior(s.index, source.image), noise)
    return Batch(latents, models.encode_prompts(s.prompts), models.encode_uncond(len(s.prompts)), s.prompts, rng)


def update_role(tr: Trainer, role: str, batches: list[Batch], step: int, logs: dict[str, float]) -> None:
    """One update of ``role``: losses and backward over the micro-batches, all-reduce, then step or skip."""
    accum = tr.cfg.gradient_accumulation_steps
    # Only this role's extra modules (e.g. a GAN head) take gradients; stale gradients of any role are dropped, so a
    # loss that passes through another role's module never leaks into that role's update.
    for r, m in tr.extras.items():
        m.requires_grad_(r == role)
    for o in tr.optimizers.values():
        o.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for batch in batches:
        # Backward runs inside the role, so a checkpointed backward re-runs the forward under this role.
        with tr.models.trainable(role), tr.models.role(role), tr.accelerator.autocast():
            loss, role_logs = tr.method.loss(role, batch, step)
            tr.accelerator.backward(loss / accum)
        loss_sum += float(loss.detach()) / accum
        for k, v in role_logs.items():
            logs[f"{role}/{k}"] = logs.get(f"{role}/{k}", 0.0) + v / accum
    if tr.sharded:  # FSDP's backward has reduce-scattered the gradients; ranks only agree on finiteness
        finite, loss_avg = sharding.all_finite(tr.params[role], loss_sum, tr.accelerator.num_processes)
    else:
        finite, loss_avg = _all_reduce_grads(tr.params[role], loss_sum, tr.accelerator)
    if finite:
        logs[f"{role}/grad_norm"] = apply_update(tr, role)
        tr.bad_in_row = 0
    else:
        skip_update(tr, role, step)
    tr.optimizers[role].zero_grad(set_to_none=True)
    logs[f"{role}/loss"] = loss_avg


def step_schedulers(tr: Trainer, updated: tuple[str, ...], logs: dict[str, float]) -> None:
    """Every role's learning-rate schedule advances once per iteration, whether or not the role updated in it:
    warm-up counts iterations, as DMD2's reference steps both its schedulers every iteration (train_sd.py), so a
    generator updated every 10th iteration warms up over ``lr_warmup_steps`` iterations, not 10 times as many."""
    import warnings

    with warnings.catch_warnings():
        # a role that has not updated yet (DMD2's generator before its first turn) still advances its schedule
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        for sched in tr.schedulers.values():
            sched.step()
    for role in updated:
        logs[f"{role}/lr"] = tr.schedulers[role].get_last_lr()[0]


def apply_update(tr: Trainer, role: str) -> float:
    """Clip, step the optimizer, move the role's EMA targets; the gradient norm before clipping."""
    if tr.sharded:
        grad_norm = sharding.clip_grad_norm_(tr.params[role], tr.cfg.max_grad_norm)
    else:
        grad_norm = tr.accelerator.clip_grad_norm_(tr.params[role], tr.cfg.max_grad_norm)
    if tr.clip_values[role] is not None:  # after the norm clip, which unscales fp16 gradients
        torch.nn.utils.clip_grad_value_(tr.params[role], tr.clip_values[role])
    tr.optimizers[role].step()
    for name, target in tr.models.targets.items():
        if target.source == role:
            tr.models.update_target(name)
    return float(grad_norm)


def skip_update(tr: Trainer, role: str, step: int) -> None:
    """Count a non-finite update; too many in a row stop the run (the checkpoints stay).

    With an fp16 loss scaler the update goes through the accelerate optimizer all the same: GradScaler's step finds
    the infinite gradients, skips the parameter update and lowers the scale, so an overflow caused by a too-high
    scale heals itself. Only non-finite updates at or below ``min_loss_scale`` (the scale can fall no further
    usefully) count toward ``max_nonfinite_steps``; without a scaler (fp32, bf16) every one counts."""
    tr.skipped_total += 1
    scaler = tr.accelerator.scaler
    if scaler is not None:
        at_floor = scaler.get_scale() <= tr.cfg.min_loss_scale
        tr.optimizers[role].step()  # skipped by the scaler, which halves its scale
        if not at_floor:
            return
    tr.bad_in_row += 1
    if tr.bad_in_row >= tr.cfg.max_nonfinite_steps:
        raise NonFiniteError(f"stopped at step {step}: role {role} had a non-finite loss or gradient "
                             f"{tr.bad_in_row} updates in a row; the last good checkpoint is kept in "
                             f"{Path(tr.cfg.output_dir) / 'checkpoints'}; lower learning_rate or check the data")


def log_step(tr: Trainer, out: Path, done: int, start: int, logs: dict[str, float], clock: dict[str, float]) -> bool:
    """metrics.jsonl and the trackers, every ``logging_steps``, after the first step and at the last; True when a row
    was written. ``logs`` holds each key's latest value since the last row, so a role that updates on other steps
    than the logged ones (TSCD's adversarial heads on alternate steps, DMD2's generator every k-th) still shows."""
    cfg = tr.cfg
    if not (done % cfg.logging_steps == 0 or done == cfg.max_steps or done == start + 1):
        return False
    now = time.perf_counter()
    logs["sec_per_step"] = (now - clock["t"]) / max(1, done - max(start, done - cfg.logging_steps))
    clock["t"] = now
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": done, **logs}) + "\n")
    if cfg.report_to != "none":
        tr.accelerator.log(logs, step=done)
    return True


def after_step(tr: Trainer, out: Path, done: int) -> None:
    """The method's exports, a checkpoint every ``checkpointing_steps`` and validation every ``validation_steps``."""
    cfg, acc = tr.cfg, tr.accelerator
    exports = tr.method.exports(done)
    if exports:
        with sharding.gathered(tr.models, acc.is_main_process, {export_role(cfg)}):
            for name, spec in exports.items():
                if acc.is_main_process:
                    artifacts.save_run(tr.models, cfg.method_name, spec, out, folder_name=name,
                                       role=export_role(cfg), extra={"step": done})
    if done % cfg.checkpointing_steps == 0 and done < cfg.max_steps:
        acc.wait_for_everyone()
        checkpoints.save(out, done, tr)
    if cfg.validation_steps and done % cfg.validation_steps == 0 and done < cfg.max_steps:
        export_and_validate(tr, out, done)
    acc.wait_for_everyone()


GRAD_BUCKET_BYTES = 25 << 20  # DDP's default bucket size


def _all_reduce_grads(params: list[nn.Parameter], loss: float, accelerator: Any) -> tuple[bool, float]:
    """Average gradients (and the loss) over processes, one all-reduce per bucket of about
    :data:`GRAD_BUCKET_BYTES` (DDP's scheme: one bucket's copy at a time, never a flat copy of every gradient);
    True when every averaged value is finite, the same answer on every rank, so all step or skip together.
    One process reduces nothing and copies nothing."""
    if accelerator.num_processes == 1:
        grads = [p.grad.reshape(-1) for p in params if p.grad is not None]
        # one check over a flat copy: a call per tensor costs more than the copy for a LoRA's hundreds of tensors
        finite = not grads or bool(torch.isfinite(torch.cat(grads)).all())
        loss = float(torch.tensor(loss, dtype=torch.float32))  # the float32 value the logs have always shown
        return finite and math.isfinite(loss), loss
    for p in params:  # every rank reduces the same tensors, whether or not its loss reached them
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    finite, world = True, accelerator.num_processes
    buckets = _buckets(params)
    for i, bucket in enumerate(buckets):
        extra = [torch.tensor([loss], device=bucket[0].grad.device)] if i == len(buckets) - 1 else []
        flat = torch.cat([p.grad.reshape(-1).float() for p in bucket] + extra)
        torch.distributed.all_reduce(flat)
        flat /= world
        finite = finite and bool(torch.isfinite(flat).all())
        at = 0
        for p in bucket:
            n = p.grad.numel()
            p.grad.copy_(flat[at:at + n].view_as(p.grad))
            at += n
        if extra:
            loss = float(flat[-1])
    return finite, loss


def _buckets(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """Consecutive runs of ``params`` of at most :data:`GRAD_BUCKET_BYTES` (as float32) each; a larger tensor alone."""
    out: list[list[nn.Parameter]] = [[]]
    size = 0
    for p in params:
        n = p.numel() * 4
        if out[-1] and size + n > GRAD_BUCKET_BYTES:
            out.append([])
            size = 0
        out[-1].append(p)
        size += n
    return out


# ---- the end: memory, export, validation ------------------------------------------------------------------------


def write_memory(tr: Trainer, out: Path, rss_baseline: int, setup_peak: int) -> None:
    """memory.json: the counted bytes, the process's peak resident set above its pre-model baseline (set-up
    included) and the peak during the training steps alone (absolute)."""
    steps_peak = memory.step_peak_rss_bytes()
    mem = {**memory.counted(tr.models, tr.extras, tr.params, tr.optimizers),
           "peak_rss_above_baseline_bytes": max(setup_peak, memory.peak_rss_bytes()) - rss_baseline,
           "steps_peak_rss_bytes": steps_peak,
           "student": tr.cfg.student, "method": tr.cfg.method_name}
    if torch.cuda.is_available():
        mem["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    artifacts.atomic_write(out / "memory.json", json.dumps(mem, indent=1))


def export_and_validate(tr: Trainer, out: Path, step: int, extra: dict[str, Any] | None = None) -> None:
    """Write the run folder (student, sampling.json, model card) and a validation grid sampled through it, on the
    main process; ``extra``: more sampling.json keys. Every process calls it: a sharded run gathers its networks
    first."""
    main = tr.accelerator.is_main_process
    with sharding.gathered(tr.models, main, {export_role(tr.cfg)}):
        if main:
            _export_and_validate(tr, out, step, extra)


def _export_and_validate(tr: Trainer, out: Path, step: int, extra: dict[str, Any] | None) -> None:
    cfg = tr.cfg
    artifacts.save_run(tr.models, cfg.method_name, tr.method.sampling(), out, cfg_yaml=to_yaml(cfg),
                       role=export_role(cfg), extra={"step": step, **(extra or {})})
    if cfg.validation_seeds == 0:
        return
    grid = _validation_grid(out, list(cfg.validation_prompts), cfg.validation_seeds, cfg.validation_guidance,
                            tr.models)
    path = out / "validation" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    artifacts.write_card(out)  # the card shows this grid
    for tracker in tr.accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")


def _validation_grid(out: Path, prompts: list[str], n_seeds: int, guidance: float, models: Models) -> Any:
    """Rows: the teacher (25 DDIM steps, ``guidance``) then the student at each step count; columns: prompt × seed."""
    from PIL import Image

    # The teacher's weights come from memory (the frozen parts the run already holds), not from disk again.
    base = models.teacher_pipeline() if models.student_kind == "lora" else None
    pipe = artifacts.load_student(out, device=models.device, base=base)
    ps = [p for p in prompts for _ in range(n_seeds)]
    seeds = [i for _ in prompts for i in range(n_seeds)]
    grid_rows = [_row(artifacts.sample(pipe, ps, steps=k, seeds=seeds)[0]) for k in sorted(pipe.distill.steps)]
    teacher_cache = out / "validation" / "teacher.png"
    if not teacher_cache.exists():
        t = artifacts.load_teacher(str(models.teacher_path), device=models.device, base=models.teacher_pipeline())
        timgs, _ = artifacts.sample(t, ps, steps=25, seeds=seeds, guidance_scale=guidance)
        teacher_cache.parent.mkdir(parents=True, exist_ok=True)
        _row(timgs).save(teacher_cache)
    grid_rows.insert(0, Image.open(teacher_cache).convert("RGB"))
    grid = Image.new("RGB", (max(r.width for r in grid_rows), sum(r.height for r in grid_rows)))
    y = 0
    for r in grid_rows:
        grid.paste(r, (0, y))
        y += r.height
    return grid


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


# ---- the command line -------------------------------------------------------------------------------------------


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
        close_process_group()
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


def close_process_group() -> None:
    """Destroy the process group after a finished run, on every rank. Without it gloo's worker threads outlive the
    interpreter and a rank can die with SIGABRT ("terminate called without an active exception") after the run is
    written, which the launcher reports as a failed run (pytorch/pytorch#190489). Only on success: a rank that failed
    mid-collective must not wait here for the others."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End train.py's process with ``code``. A rank of a multi-process run (``WORLD_SIZE`` > 1) flushes its output
    and ends with ``os._exit``: :func:`close_process_group` drops torch's references to the process group, but objects
    that still hold its gloo backend (FSDP2's device mesh, accelerate's state) keep gloo's worker threads alive into
    interpreter finalisation, where a rank can still die with SIGABRT after the run is written (seen in CI on
    ``tests/test_fsdp.py::test_fsdp_sigkill_then_resume`` after the destroy was added; an upstream atexit destroy,
    pytorch/pytorch#179291, was abandoned). Everything a run writes is closed by then (``train`` ends the trackers)."""
    import sys

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
