"""Memory planner: what a training run will hold, per role and per GPU, before anything is downloaded.

    python -m distill_diffusion.plan --method dmd2 --config configs/dmd2/sdxl_4step_lora.yaml [--student full|lora]
        [--gpus 8] [--fsdp] [--shard-teacher] [--mixed-precision no|fp16|bf16] [--json] [key=value ...]
    python -m distill_diffusion.plan --table [--gpus 8] [--out FILE]

Why: a distillation run holds a teacher, one to three trainable roles, EMA copies, heads and their optimizer states;
whether it fits a GPU should be known before a multi-gigabyte download. The planner builds the run's REAL networks
on the meta device from configuration files alone (the teacher's own folder, or for a hub id the architecture shipped
in ``assets/architectures``): the same :func:`models.build_models`, the method's own extra modules and the loop's own
optimizers (:func:`loop.build_optimizers`), whose AdamW state is then created as its first step creates it. Its
counted figures are :func:`memory.counted` on those objects, i.e. what the run's ``memory.json`` will report; the
per-GPU figures are the same function with one rank's share of each FSDP2-sharded tensor. Activations are not counted.

Python: :func:`plan` (one plan), :func:`build` + :func:`summarize` (one build, several GPU setups), :func:`render`,
:func:`table_markdown` (the README's table).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from . import memory
from .errors import UserError

ARCHITECTURES_DIR = Path(__file__).resolve().parent / "assets" / "architectures"
# Hub ids the shipped configs name -> the architecture folder shipped for them (configs only, no weights).
HUB_ARCHITECTURES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stabilityai/stable-diffusion-3.5-medium": "sd35_medium",
    "black-forest-labs/FLUX.1-dev": "flux1_dev",
    "Efficient-Large-Model/Sana_1600M_1024px_diffusers": "sana_1600m_1024px",
}
LABELS = {"sd15": "SD1.5", "sdxl": "SDXL", "sd35_medium": "SD3.5-medium", "flux1_dev": "FLUX.1-dev",
          "sana_1600m_1024px": "SANA-1600M"}
ACTIVATIONS_NOTE = ("activations are not counted (they grow with batch size and resolution); memory.json's "
                    "cuda_peak_allocated_bytes gives the measured peak where CUDA is present")
GIB = 1 << 30


# ---- the teacher, on the meta device ------------------------------------------------------------------------------


def teacher_folder(teacher: str) -> Path:
    """The diffusers folder whose config files describe ``teacher``: a shipped embedded teacher, a local folder, or
    the architecture shipped for a hub id (or named by its folder, e.g. ``sdxl``)."""
    from .models import embedded_teacher_name, embedded_teacher_path

    name = embedded_teacher_name(teacher)
    if name is not None:
        return embedded_teacher_path(name)
    local = Path(teacher).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise UserError(f"teacher {teacher!r} is not a diffusers pipeline folder (no model_index.json)")
        return local
    arch = HUB_ARCHITECTURES.get(teacher, teacher if teacher in LABELS else None)
    if arch is None:
        raise UserError(f"teacher {teacher!r}: no local folder and no shipped architecture; give a diffusers "
                        f"pipeline folder (its config files suffice) or one of: {', '.join(HUB_ARCHITECTURES)}")
    return ARCHITECTURES_DIR / arch


def meta_pipeline(folder: Path) -> Any:
    """The teacher pipeline with every network built from its config on the meta device (no weights read), as
    :func:`models.load_pipeline` would hold it: fp32, without the safety checker, tokenizers absent (not needed)."""
    import diffusers
    from diffusers.utils import logging as dlog

    from .families import FAMILIES, supported
    from .models import recorded_max_sequence_length

    index = json.loads((folder / "model_index.json").read_text())
    cls_name = index.get("_class_name")
    if cls_name not in FAMILIES:
        raise UserError(f"teacher {str(folder)!r} is a {cls_name}; supported: {supported()}")
    pipe_cls = getattr(diffusers, cls_name)
    kwargs: dict[str, Any] = {}
    for n, param in inspect.signature(pipe_cls.__init__).parameters.items():
        if n == "self" or param.kind is not param.POSITIONAL_OR_KEYWORD:
            continue
        if isinstance(index.get(n), list):
            kwargs[n] = _component(folder, n, index[n])
        elif n in index:  # a pipeline setting (force_zeros_for_empty_prompt, requires_safety_checker)
            kwargs[n] = index[n]
        elif param.default is param.empty:
            kwargs[n] = None
    dlog.set_verbosity_error()  # the pipeline's safety-checker warning: the loop drops the checker too
    pipe = pipe_cls(**kwargs)
    pipe.distill_max_sequence_length = recorded_max_sequence_length(str(folder))
    return pipe


def _component(folder: Path, name: str, entry: Any) -> Any:
    """One pipeline component from its config: a network on meta (fp32, as the loop loads it), a scheduler, or None
    (tokenizers and processors, which hold no tensors a run counts; the safety checker, which the loop drops)."""
    if name == "safety_checker" or not isinstance(entry, list) or None in entry:
        return None
    lib, cls_name = entry
    if lib not in ("diffusers", "transformers"):
        return None
    cls = getattr(importlib.import_module(lib), cls_name, None)
    sub = folder / name
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        if not (sub / "config.json").is_file():
            raise UserError(f"teacher {str(folder)!r}: {name}/config.json is missing; the planner reads each "
                            "network's config")
        return _meta_network(cls, sub, lib)
    if isinstance(cls, type) and hasattr(cls, "load_config") and (sub / "scheduler_config.json").is_file():
        return cls.from_config(cls.load_config(sub))
    return None


def _meta_network(cls: type, sub: Path, lib: str) -> nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        if lib == "diffusers":
            net = cls.from_config(cls.load_config(sub))
        else:
            from transformers import AutoConfig

            net = cls._from_config(AutoConfig.from_pretrained(sub))
    return net.float()  # load_pipeline loads in float32; the loop casts from there


# ---- the run's objects, built by the library's own code ------------------------------------------------------------


@dataclasses.dataclass
class Built:
    """What a run's ``memory.json`` counts, built on meta: models, extra modules, per-role tensors and optimizers."""

    cfg: Any
    folder: Path
    models: Any
    extras: dict[str, nn.Module]
    params: dict[str, list[nn.Parameter]]
    optimizers: dict[str, torch.optim.Optimizer]


class _ShapeEncoders:
    """Stands in for the text encoders where a method measures feature shapes (DMD2's GAN head, TSCD's heads): a
    meta conditioning of the shape the network takes (tokenizers are not shipped, and shapes need no values)."""

    def __init__(self, cond: Any) -> None:
        self.cond = cond

    def encode_uncond(self, b: int) -> Any:
        return self.cond


def _cpu_schedule(models: Any) -> None:
    """The schedule on the CPU: methods read its values while they build (sCM's trig range), which meta tensors do
    not have. The networks stay on meta."""
    fam = models.family
    fam.device = torch.device("cpu")
    try:
        models.schedule = fam.make_schedule()
    finally:
        fam.device = models.device


def build(cfg: Any, method_cls: type) -> Built:
    """Models, method, extra modules and optimizers of the run ``cfg`` describes, on the meta device, through the
    loop's own functions; each optimizer stepped once so it holds its steady-state tensors."""
    from accelerate import init_empty_weights

    from .config import method_object
    from .loop import Trainer, build_optimizers, with_student_ema
    from .method import RunContext
    from .models import build_models

    folder = teacher_folder(cfg.teacher)
    spec = with_student_ema(method_cls.spec(method_object(cfg), cfg.student), cfg.ema_decay)
    with init_empty_weights():
        models = build_models(cfg, spec, "meta", pipe=meta_pipeline(folder))
        models.encoders = _ShapeEncoders(models.family.shape_cond())
        _cpu_schedule(models)
        method = method_cls(method_object(cfg), RunContext(max_steps=cfg.max_steps,
                                                           mixed_precision=cfg.mixed_precision), models)
        extras = {r: m.to("meta") for r, m in method.extra_modules().items()}
    tr = Trainer(cfg, spec, models, method, extras, SimpleNamespace(prepare=lambda o: o))
    build_optimizers(tr)
    for role, opt in tr.optimizers.items():
        _one_step(opt, tr.params[role])
    return Built(cfg, folder, models, extras, tr.params, tr.optimizers)


def _one_step(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """AdamW creates its state at its first step, in ``_init_group``, before any maths: run exactly that on meta
    gradients (a whole meta step creates the same tensors, but its meta maths takes seconds per thousand tensors),
    falling back to a real step where this torch's ``_init_group`` differs."""
    for p in params:
        p.grad = torch.empty_like(p)
    try:
        n = len(inspect.signature(opt._init_group).parameters) - 1  # type: ignore[attr-defined]
        for group in opt.param_groups:
            opt._init_group(group, *([] for _ in range(n)))  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        opt.step()
    for p in params:
        p.grad = None


def run_config(method: str, config: str | None = None, overrides: Sequence[str] = (), student: str | None = None,
               mixed_precision: str | None = None) -> tuple[Any, type]:
    """The validated training config the planner plans for (train.py's parser; ``student`` / ``mixed_precision``
    as overrides), with the settings that change no byte turned off (compilation, channels-last, prompt and latent
    stores, which would read the teacher's weights to fingerprint them)."""
    from methods import METHODS

    from .config import parse_config

    argv = ["--method", method] + (["--config", config] if config else []) + list(overrides)
    argv += [f"student={student}"] if student else []
    argv += [f"mixed_precision={mixed_precision}"] if mixed_precision else []
    cfg, _ = parse_config(argv, METHODS)
    cfg.compile, cfg.channels_last = False, False
    cfg.data.text_cache_dir, cfg.data.latent_cache_dir = None, None
    return cfg, METHODS[cfg.method_name]


# ---- counting: the whole run, and one GPU's share -------------------------------------------------------------------


def shard_bytes(t: torch.Tensor, gpus: int) -> int:
    """One rank's bytes of a tensor FSDP2 shards over ``gpus`` ranks: ceil(dim0 / gpus) rows (dim 0 padded)."""
    if t.ndim == 0:
        return t.element_size()
    return math.ceil(t.shape[0] / gpus) * math.prod(t.shape[1:]) * t.element_size()


def sharded_modules(b: Built, fsdp: bool, shard_teacher: bool) -> dict[str, nn.Module]:
    """The modules FSDP2 shards, by label: with a full student, every full-copy network (trainable roles, EMA
    targets) and the roles' extra modules, plus the frozen teacher with ``shard_teacher``. A LoRA run shards nothing
    (one replicated base); text encoders and VAE are always replicated."""
    if not fsdp or b.models.student_kind != "full":
        return {}
    mods = {name: net for name, net in b.models._nets.items()}
    mods |= {f"{role} extra modules": m for role, m in b.extras.items()}
    if shard_teacher:
        mods["teacher"] = b.models.denoiser
    return mods


def _sharded_ids(b: Built, mods: dict[str, nn.Module]) -> set[int]:
    """Ids of the sharded parameters and of their optimizer moments (same shape, so sharded alike); buffers and
    AdamW's scalar ``step`` stay whole."""
    ids = {id(p) for m in mods.values() for p in m.parameters()}
    for opt in b.optimizers.values():
        for p, st in opt.state.items():
            if id(p) in ids:
                ids |= {id(v) for v in st.values() if torch.is_tensor(v) and v.shape == p.shape}
    return ids


def per_gpu(b: Built, gpus: int, fsdp: bool, shard_teacher: bool) -> dict[str, Any]:
    """:func:`memory.counted` with one rank's bytes of every FSDP-sharded tensor (everything else replicated)."""
    ids = _sharded_ids(b, sharded_modules(b, fsdp, shard_teacher))

    def nbytes(t: torch.Tensor) -> int:
        return shard_bytes(t, gpus) if id(t) in ids else t.numel() * t.element_size()

    return memory.counted(b.models, b.extras, b.params, b.optimizers, nbytes)


# ---- the plan: figures per role and per frozen part ----------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """A run's counted memory (``counted``: what its memory.json reports) and one GPU's share (``per_gpu``), with
    the rows behind them (roles, frozen parts) and notes."""

    method: str
    teacher: str
    architecture: str
    pipeline: str
    student: str
    lora_rank: int | None
    mixed_precision: str
    gpus: int
    fsdp: bool
    shard_teacher: bool
    counted: dict[str, Any]
    per_gpu: dict[str, Any]
    roles: list[dict[str, Any]]
    frozen: list[dict[str, Any]]
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_setup(gpus: int, fsdp: bool, shard_teacher: bool) -> None:
    """Refuse a GPU setup that means nothing, before anything is built."""
    if gpus < 1:
        raise UserError(f"--gpus {gpus}: must be at least 1")
    if shard_teacher and not fsdp:
        raise UserError("--shard-teacher shards the teacher with FSDP: add --fsdp")


def summarize(b: Built, gpus: int = 1, fsdp: bool = False, shard_teacher: bool = False) -> Plan:
    """The plan of a built run on ``gpus`` GPUs (FSDP2 with ``fsdp``; DDP-style replication otherwise)."""
    check_setup(gpus, fsdp, shard_teacher)
    cfg, models = b.cfg, b.models
    mods = sharded_modules(b, fsdp, shard_teacher)
    ids = _sharded_ids(b, mods)
    counted, gpu = memory.counted(models, b.extras, b.params, b.optimizers), per_gpu(b, gpus, fsdp, shard_teacher)
    shipped = b.folder.resolve().parent in (ARCHITECTURES_DIR, ARCHITECTURES_DIR.parent)
    arch = b.folder.name if shipped else str(b.folder)
    return Plan(cfg.method_name, str(cfg.teacher), arch, type(models.pipe).__name__, cfg.student,
                cfg.lora_rank if cfg.student == "lora" else None, cfg.mixed_precision, gpus, fsdp, shard_teacher,
                counted, gpu, _role_rows(b, ids, counted, gpu), _frozen_rows(b, ids, gpus),
                _notes(b, gpus, fsdp, mods))


def _role_rows(b: Built, ids: set[int], counted: dict[str, Any], gpu: dict[str, Any]) -> list[dict[str, Any]]:
    models, rows = b.models, []
    for role in b.params:
        kind = "heads only" if role in models.headless else (
            f"LoRA r={b.cfg.lora_rank}" if models.student_kind == "lora" else "full copy")
        if role in b.extras and role not in models.headless:
            kind += f" + {type(b.extras[role]).__name__}"
        rows.append({"role": role, "kind": kind, "dtype": _dtypes(b.params[role]),
                     "sharded": any(id(p) in ids for p in b.params[role]),
                     "trainable_bytes": counted["trainable_bytes"][role],
                     "optimizer_state_bytes": counted["optimizer_state_bytes"][role],
                     "trainable_bytes_per_gpu": gpu["trainable_bytes"][role],
                     "optimizer_state_bytes_per_gpu": gpu["optimizer_state_bytes"][role]})
    return rows


def _parts(b: Built) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """(label, tensors) in :func:`memory.counted`'s order: pipeline components (the denoiser split into the teacher
    and any frozen LoRA adapters), full copies, extra modules."""
    models = b.models
    name = models.family.denoiser
    for comp, m in models.pipe.components.items():
        if not isinstance(m, nn.Module):
            continue
        if comp != name:
            yield comp, list(m.parameters()) + list(m.buffers())
            continue
        named = list(m.named_parameters()) + list(m.named_buffers())
        yield f"{comp} (teacher)", [t for n, t in named if "lora_" not in n]
        for a in models.targets:
            yield f"{a}: LoRA adapter, EMA of {models.targets[a].source}", [
                t for n, t in named if "lora_" in n and f".{a}." in n + "."]
    for role, net in models._nets.items():
        target = models.targets.get(role)
        label = f"{role}: full copy, EMA of {target.source}" if target else f"{role}: buffers"
        yield label, list(net.parameters()) + list(net.buffers())
    for role, m in b.extras.items():
        yield f"{role} extra modules ({type(m).__name__}): buffers", list(m.parameters()) + list(m.buffers())


def _frozen_rows(b: Built, ids: set[int], gpus: int) -> list[dict[str, Any]]:
    """The frozen bytes of :func:`memory.counted`, part by part (each tensor under the first part that holds it)."""
    trainable = {id(p) for ps in b.params.values() for p in ps}
    seen, rows = set(trainable), []
    for label, tensors in _parts(b):
        mine = [t for t in tensors if id(t) not in seen]
        seen |= {id(t) for t in mine}
        if not mine:
            continue
        rows.append({"part": label, "dtype": _dtypes(mine), "sharded": any(id(t) in ids for t in mine),
                     "bytes": sum(t.numel() * t.element_size() for t in mine),
                     "bytes_per_gpu": sum(shard_bytes(t, gpus) if id(t) in ids else t.numel() * t.element_size()
                                          for t in mine)})
    return rows


def _dtypes(tensors: Sequence[torch.Tensor]) -> str:
    names = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.int64": "int64"}
    return "/".join(sorted({names.get(str(t.dtype), str(t.dtype)) for t in tensors if t.is_floating_point()}))


def _notes(b: Built, gpus: int, fsdp: bool, mods: dict[str, nn.Module]) -> list[str]:
    notes = ["gradients: the largest role's trainable bytes (the loop frees a role's gradients after its update); "
             "optimizer states: AdamW's exp_avg and exp_avg_sq per tensor plus its scalar step"]
    if fsdp and b.models.student_kind == "lora":
        notes.append("--fsdp with a LoRA student: nothing is sharded (one replicated base, small LoRA tensors); "
                     "counted replicated")
    elif fsdp:
        notes.append(f"FSDP2 shards {', '.join(mods)} over {gpus} ranks (ceil(dim0 / {gpus}) rows of each "
                     "parameter); text encoders and VAE are replicated; the parameters FSDP gathers for a forward "
                     "are not counted")
    elif gpus > 1:
        notes.append(f"without --fsdp every GPU holds all of it (DDP-style replication over {gpus} GPUs)")
    if b.cfg.init_from:
        notes.append(f"init_from={b.cfg.init_from} is not read: it changes values, not sizes")
    return notes + [ACTIVATIONS_NOTE]


def plan(method: str, config: str | None = None, overrides: Sequence[str] = (), student: str | None = None,
         gpus: int = 1, fsdp: bool = False, shard_teacher: bool = False,
         mixed_precision: str | None = None) -> Plan:
    """The memory plan of ``train.py --method METHOD [--config CONFIG] [overrides]`` on ``gpus`` GPUs."""
    check_setup(gpus, fsdp, shard_teacher)
    cfg, method_cls = run_config(method, config, overrides, student, mixed_precision)
    return summarize(build(cfg, method_cls), gpus, fsdp, shard_teacher)


# ---- text ----------------------------------------------------------------------------------------------------------


def fmt_bytes(n: int) -> str:
    """Bytes in GiB, MiB or KiB (whichever keeps 1-4 digits before the point)."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def render(p: Plan) -> str:
    """The plan as the command prints it: roles, frozen parts, totals (counted and per GPU), notes."""
    setup = (f"{p.gpus} GPU{'s' if p.gpus > 1 else ''}, " + ("FSDP2" + (" + sharded teacher" if p.shard_teacher
                                                                        else "") if p.fsdp else "replicated"))
    lines = [f"memory plan: {p.method} on {p.teacher} ({p.pipeline}, config files of {p.architecture})",
             f"student {p.student}" + (f" (LoRA rank {p.lora_rank})" if p.lora_rank else "")
             + f", mixed_precision {p.mixed_precision}, {setup}", "",
             f"{'trainable role':<34}{'dtype':<7}{'sharded':<9}{'weights':>12}{'optimizer':>12}"
             f"{'weights/GPU':>13}{'optim./GPU':>13}"]
    for r in p.roles:
        lines.append(f"  {r['role'] + ' (' + r['kind'] + ')':<32}{r['dtype']:<7}{'yes' if r['sharded'] else 'no':<9}"
                     f"{fmt_bytes(r['trainable_bytes']):>12}{fmt_bytes(r['optimizer_state_bytes']):>12}"
                     f"{fmt_bytes(r['trainable_bytes_per_gpu']):>13}"
                     f"{fmt_bytes(r['optimizer_state_bytes_per_gpu']):>13}")
    lines += ["", f"{'frozen part (each tensor once)':<50}{'dtype':<7}{'sharded':<9}{'bytes':>12}{'per GPU':>13}"]
    for f in p.frozen:
        lines.append(f"  {f['part']:<48}{f['dtype']:<7}{'yes' if f['sharded'] else 'no':<9}"
                     f"{fmt_bytes(f['bytes']):>12}{fmt_bytes(f['bytes_per_gpu']):>13}")
    lines += ["", f"{'':<34}{'counted (memory.json)':>22}{'per GPU':>14}"]
    for label, key in (("trainable weights", "trainable_bytes"), ("frozen weights", "frozen_bytes"),
                       ("gradients (peak)", "gradient_bytes_peak"), ("optimizer states", "optimizer_state_bytes"),
                       ("total", "total_counted_bytes")):
        a, g = p.counted[key], p.per_gpu[key]
        a, g = (sum(a.values()), sum(g.values())) if isinstance(a, dict) else (a, g)
        lines.append(f"  {label:<32}{fmt_bytes(a):>22}{fmt_bytes(g):>14}")
    return "\n".join(lines + [""] + [f"note: {n}" for n in p.notes])


# ---- the README table --------------------------------------------------------------------------------------------


def table_config(method: str, arch: str, student: str) -> str | None:
    """The shipped recipe ``configs/<method>/*.yaml`` for this teacher (preferring one written for ``student``; none
    that needs ``init_from``), or None: the method's defaults with ``teacher=`` apply."""
    import yaml

    from .config import CONFIG_DIR

    hub = [h for h, a in HUB_ARCHITECTURES.items() if a == arch]
    found = []
    for f in sorted((CONFIG_DIR / method).glob("*.yaml")):
        keys = yaml.safe_load(f.read_text()) or {}
        if keys.get("teacher") in hub and not keys.get("init_from"):
            found.append((keys.get("student") != student, str(f)))
    return min(found)[1] if found else None


def _table_rows(archs: Sequence[str], methods: Sequence[str], gpus: int) -> list[dict[str, Any]]:
    """Per architecture, method and student: total counted GiB on one GPU and per GPU over ``gpus`` (FSDP2 for
    full students; LoRA runs are replicated), bf16."""
    rows = []
    for arch in archs:
        hub = next(h for h, a in HUB_ARCHITECTURES.items() if a == arch)
        for method in methods:
            for student in ("lora", "full"):
                config = table_config(method, arch, student)
                over = [] if config else [f"teacher={hub}"]
                cfg, method_cls = run_config(method, config, over, student, "bf16")
                b = build(cfg, method_cls)
                one = summarize(b).per_gpu["total_counted_bytes"]
                many = summarize(b, gpus, fsdp=student == "full").per_gpu["total_counted_bytes"]
                net = sum(p.numel() for n, p in b.models.denoiser.named_parameters() if "lora_" not in n)
                rows.append({"arch": arch, "method": method, "student": student, "config": config, "one": one,
                             "many": many, "net": net})
    return rows


def table_markdown(gpus: int = 8, archs: Sequence[str] | None = None, methods: Sequence[str] | None = None) -> str:
    """The README's memory table (total counted GiB per GPU, bf16) and the largest teacher each setup fits in 24, 48
    and 80 GiB per GPU, from the planner (counted parts only: activations need room on top)."""
    from methods import METHODS

    archs = list(archs or LABELS)
    methods = list(methods or METHODS)
    rows = _table_rows(archs, methods, gpus)
    g = f"{gpus} GPUs"
    out = ["Counted memory per GPU in GiB (trainable and frozen weights, the gradient peak, AdamW states; frozen "
           "parts in bf16, VAE in fp32, trainable tensors in fp32; activations not counted), from "
           "`python -m distill_diffusion.plan --table`. Each row is the shipped recipe for that teacher (`recipe`) "
           "with `student=` and `mixed_precision=bf16` set, or the method's defaults where none ships. LoRA runs "
           f"hold everything on every GPU; full students on {g} use FSDP2 (`--fsdp`: student, critic, EMA copies "
           "and extra modules sharded, the teacher and encoders replicated).", "",
           f"| teacher | method | LoRA, 1 GPU | LoRA, {g} | full, 1 GPU | full, {g} FSDP | recipe (LoRA / full) |",
           "|---|---|---:|---:|---:|---:|---|"]
    for arch in archs:
        for method in methods:
            lo, fu = (next(r for r in rows if r["arch"] == arch and r["method"] == method and r["student"] == s)
                      for s in ("lora", "full"))
            recipe = " / ".join(Path(r["config"]).name if r["config"] else "defaults" for r in (lo, fu))
            out.append(f"| {LABELS[arch]} | {method} | {lo['one'] / GIB:.1f} | {lo['many'] / GIB:.1f} | "
                       f"{fu['one'] / GIB:.1f} | {fu['many'] / GIB:.1f} | {recipe} |")
    return "\n".join(out + ["", *_fits_table(rows, methods, gpus)]) + "\n"


def _fits_table(rows: list[dict[str, Any]], methods: Sequence[str], gpus: int) -> list[str]:
    """Per method and setup, the largest teacher (by denoiser parameters) whose counted total fits each budget."""
    budgets = (24, 48, 80)
    setups = (("LoRA, 1 GPU", "lora", "one"), ("full, 1 GPU", "full", "one"), (f"full, {gpus} GPUs FSDP", "full",
                                                                               "many"))
    sizes = sorted({(r["net"], r["arch"]) for r in rows})
    order = " < ".join(f"{LABELS[a]} {n / 1e9:.2f}B" for n, a in sizes)
    out = ["Largest teacher each setup fits per GPU by the planner's counted total (GiB in brackets; counted parts "
           f"only, so leave room for activations). Largest = most denoiser parameters: {order}.", "",
           "| method | setup | " + " | ".join(f"{b} GiB" for b in budgets) + " |", "|---|---|" + "---|" * len(budgets)]
    for method in methods:
        for label, student, col in setups:
            cand = sorted((r for r in rows if r["method"] == method and r["student"] == student),
                          key=lambda r: r["net"])
            cells = []
            for budget in budgets:
                fit = [r for r in cand if r[col] <= budget * GIB]
                cells.append(f"{LABELS[fit[-1]['arch']]} ({fit[-1][col] / GIB:.1f})" if fit else "none")
            out.append(f"| {method} | {label} | " + " | ".join(cells) + " |")
    return out


# ---- the command line --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)


def _arguments(argv: Sequence[str]) -> argparse.Namespace:
    ap = _Parser(prog="python -m distill_diffusion.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", help="one of the registered methods (train.py's --method)")
    ap.add_argument("--config", help="a YAML file of values (configs/<method>/<name>.yaml)")
    ap.add_argument("--student", choices=("lora", "full"), help="override the config's student")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) the run uses")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2: shard full-copy roles, EMA copies, extra modules")
    ap.add_argument("--shard-teacher", action="store_true", help="with --fsdp, shard the frozen teacher too")
    ap.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), help="override the config's")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--table", action="store_true", help="print the README's memory table (markdown)")
    ap.add_argument("--out", help="with --table: write the markdown to this file")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, as train.py takes them")
    a, unknown = ap.parse_known_args(list(argv))
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r}; see --help")
    if not a.table and not a.method:
        raise UserError("give --method (and usually --config), or --table")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI edge: bad input is one ``error:`` line and exit code 2."""
    try:
        a = _arguments(sys.argv[1:] if argv is None else argv)
        if a.table:
            text = table_markdown(a.gpus if a.gpus > 1 else 8)
            if a.out:
                Path(a.out).write_text(text)
            print(text, end="")
            return 0
        p = plan(a.method, a.config, a.overrides, a.student, a.gpus, a.fsdp, a.shard_teacher, a.mixed_precision)
    except UserError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(p.to_json(), indent=1) if a.json else render(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
