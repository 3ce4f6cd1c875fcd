"""The run folder: the only bridge from training to evaluation and the app.

``output_dir/``: ``config.yaml`` (resolved), ``student/`` (a diffusers LoRA file with adapter metadata, or a full
pipeline), ``sampling.json`` (per step count: scheduler, explicit timesteps, guidance, initial-latent scale),
``metrics.jsonl``, ``README.md`` (model card), ``checkpoints/``. :func:`load_student` turns it into a ready diffusers
pipeline; validation, ``eval`` and ``app`` all sample through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .families import family_for, family_of
from .method import SamplingSpec, StepSampling
from .models import embedded_teacher_name, load_pipeline, resolve_teacher

SAMPLING_FILE = "sampling.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
PIPELINE_INDEX = "model_index.json"  # what every diffusers pipeline folder holds


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Write a folder under a temporary name and rename it into place only when complete.

    A crash mid-write leaves ``<path>.tmp-*`` (ignored and cleaned later), never a half folder under ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write, renamed onto ``path`` only when the block succeeds.

    Readers (a resumed run, the app, eval's caches) then see the old file or the new one, never half of one. The
    temporary name keeps ``path``'s suffix, since numpy's ``save``/``savez`` append one when it is missing.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write a whole file atomically (text as UTF-8): see :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def is_embedded_teacher(teacher: str | Path | None) -> bool:
    """Whether ``teacher`` (a name, a folder or a hub id) is one of the shipped Fashion-MNIST teachers.

    The one test, so "embedded", "embedded-flow", "" and the folders' own paths (relative or absolute) all count:
    the embedded teachers get their own defaults (validation prompts and guidance, Fashion-MNIST data and captions,
    the shipped evaluator) everywhere.
    """
    return embedded_teacher_name(teacher) is not None


def check_teacher(teacher: str | None) -> None:
    """Fail in one line, before anything is loaded, for a teacher that is not there.

    Hub ids (``org/name``) pass: they are checked when loading, which may need the network.
    """
    path = resolve_teacher(teacher)
    name = embedded_teacher_name(path)
    if name is not None and not (Path(path) / PIPELINE_INDEX).is_file():
        script = "train_flow_teacher" if name == "embedded-flow" else "train_teacher"
        raise UserError(f"the embedded teacher {name!r} is missing ({path}); build it with "
                        f"`python -m distill_diffusion.toy.{script}` or pass teacher=PATH_OR_HUB_ID")
    if Path(path).is_dir():
        if not (Path(path) / PIPELINE_INDEX).is_file():
            raise UserError(f"teacher {teacher!r} is not a diffusers pipeline folder (no model_index.json)")
    elif os.path.exists(path):
        raise UserError(f"teacher {path!r} is a file, not a diffusers pipeline folder")
    elif path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise UserError(f"teacher {teacher!r} does not exist; give a diffusers pipeline folder or a hub id (org/name)")


RUN_INFO_FILE = "run_info.json"


def write_run_info(out: Path, processes: int = 1) -> None:
    """``run_info.json``: the CPU, the torch threads, the number of processes and the library versions of the run
    (written when it starts, again on every resume: the last machine to train it)."""
    from . import provenance

    info = {**provenance.machine(), "processes": processes, "versions": provenance.versions()}
    atomic_write(out / RUN_INFO_FILE, json.dumps(info, indent=2))


def read_run_info(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``run_info.json``, or None for runs written before it existed."""
    p = Path(run_dir) / RUN_INFO_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def teacher_ref(path: str) -> str:
    """How a run names its teacher: "embedded" / "embedded-flow" for the shipped ones (so runs move between clones),
    else the path/id."""
    p = Path(path)
    if not p.exists():
        return path
    return embedded_teacher_name(p.resolve()) or str(p.resolve())


def weights_hash(folder: str | Path) -> str:
    """A short hash of a pipeline folder's weight files (names, sizes and the first/last MiB), for cache keys."""
    folder = Path(resolve_teacher(str(folder)))
    if not folder.is_dir():
        return hashlib.sha1(str(folder).encode()).hexdigest()[:16]
    h = hashlib.sha1()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"):
            h.update(str(f.relative_to(folder)).encode())
            h.update(str(f.stat().st_size).encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
                if f.stat().st_size > 2 << 20:
                    fh.seek(-(1 << 20), 2)
                    h.update(fh.read())
    return h.hexdigest()[:16]


def spec_to_json(spec: SamplingSpec) -> dict[str, Any]:
    return {"default_steps": spec.default_steps,
            "steps": {str(k): dataclasses.asdict(v) for k, v in sorted(spec.steps.items())}}


def adapter_metadata(peft_config: Any) -> dict[str, Any]:
    """peft's adapter config as the LoRA file's metadata, with set-valued fields (``target_modules``) as sorted lists:
    peft keeps them as sets, whose order follows the process's string hashing, so the same tensors would otherwise
    be written as different bytes by every run."""
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in peft_config.to_dict().items()}


def save_student(models: Any, folder: Path, spec: SamplingSpec, role: str = "student") -> None:
    """Write the student alone: LoRA safetensors (with adapter metadata so ``lora_alpha`` survives
    ``load_lora_weights``) or a full pipeline whose scheduler is the default step count's."""
    pipe = models.pipe
    if models.student_kind == "lora":
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(models.denoiser, adapter_name=role)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        meta = adapter_metadata(models.denoiser.peft_config[role])
        type(pipe).save_lora_weights(folder, **models.family.lora_save_kwargs(state, meta), weight_name=LORA_FILE)
    else:
        net = models.net(role)
        comps = {**pipe.components, models.family.denoiser: net,
                 "scheduler": make_scheduler(pipe.scheduler.config, spec.steps[spec.default_steps])}
        full = type(pipe)(**comps)
        cl = getattr(models, "channels_last", False)
        if cl:  # safetensors writes contiguous tensors only; the weights go back to channels-last afterwards
            net.to(memory_format=torch.contiguous_format)
        try:
            full.save_pretrained(folder, safe_serialization=True)
        finally:
            if cl:
                net.to(memory_format=torch.channels_last)


def save_run(models: Any, method_name: str, spec: SamplingSpec, out: str | Path, cfg_yaml: str | None = None,
             folder_name: str = "student", role: str = "student", extra: dict[str, Any] | None = None) -> Path:
    """Export the student and ``sampling.json`` (and the resolved config) into a run folder; returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = models.exported_spec(spec)
    with atomic_dir(out / folder_name) as tmp:
        save_student(models, tmp, spec, role)
    info = {
        "format": 1,
        "method": method_name,
        "pipeline": type(models.pipe).__name__,
        "family": models.family.name,
        "teacher": teacher_ref(models.teacher_path),
        "teacher_hash": weights_hash(models.teacher_path),
        "student": models.student_kind,
        "student_dir": folder_name,
        "lora": models.lora_config or None,
        "resolution": models.resolution,
        "prediction_type": models.prediction_type,
        "schedule": models.schedule.kind,
        # the text length the student was trained with (a vanilla pipeline call needs it); None = pipeline default
        "max_sequence_length": getattr(models.pipe, "distill_max_sequence_length", None),
        **spec_to_json(spec),
        **(extra or {}),
    }
    name = SAMPLING_FILE if folder_name == "student" else f"sampling_{folder_name}.json"
    atomic_write(out / name, json.dumps(info, indent=2))
    if cfg_yaml is not None:
        atomic_write(out / "config.yaml", cfg_yaml)
    if folder_name == "student":
        write_card(out)
    return out


EVAL_SUMMARY = "eval.md"  # a run's rows of its last ``python -m eval --update-cards`` report; the card shows it


def write_card(run_dir: str | Path) -> None:
    """(Re)write a run's README.md from its sampling.json, its last validation grid and its eval summary."""
    run_dir = Path(run_dir)
    text = model_card(json.loads((run_dir / SAMPLING_FILE).read_text()), run_dir)
    summary = run_dir / EVAL_SUMMARY
    if summary.is_file():
        text += "\n## Evaluation\n\n" + summary.read_text()
    atomic_write(run_dir / "README.md", text)


def attach_eval(run_dir: str | Path, text: str) -> None:
    """Keep ``text`` (markdown: an eval report's rows for this run) as the run's eval summary, shown in its card."""
    atomic_write(Path(run_dir) / EVAL_SUMMARY, text)
    write_card(run_dir)


HUB_FILES = ["README.md", SAMPLING_FILE, "config.yaml", "run_info.json", EVAL_SUMMARY, "student/**/*",
             "student_*/**/*", "sampling_*.json", "export/kohya/*.safetensors"]


def hub_files(run_dir: str | Path) -> list[str]:
    """The files of a run folder that ``push_to_hub`` uploads (relative paths): the card, the student(s), their
    sampling settings, the config, the last validation grid and a kohya / ComfyUI file when one was exported;
    never checkpoints, logs or earlier grids."""
    run_dir = Path(run_dir)
    files = sorted({str(p.relative_to(run_dir)) for pat in HUB_FILES for p in run_dir.glob(pat) if p.is_file()})
    grids = sorted((run_dir / "validation").glob("step_*.png"))
    return files + ([str(grids[-1].relative_to(run_dir))] if grids else [])


def push_to_hub(run_dir: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload :func:`hub_files` of a run to the Hub model repo ``repo_id`` (created if missing) in one commit;
    returns the commit URL. Needs a token (``huggingface-cli login`` or HF_TOKEN) and network."""
    from huggingface_hub import HfApi

    check_run(run_dir)
    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(run_dir), allow_patterns=hub_files(run_dir),
                                 commit_message=f"distill-diffusion: {Path(run_dir).name}")
    except Exception as e:  # network, token, permission: the run folder is complete either way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"push to {repo_id} failed ({first[:200]}); the run is complete, push it later with "
                        f"python -m distill_diffusion.export {run_dir} --push-to-hub {repo_id}") from None
    return str(getattr(info, "commit_url", info))


def _teacher_license(teacher: str) -> str | None:
    """The teacher's license where known: the shipped teachers are this project's (Apache-2.0); a local pipeline
    folder's model card may declare one in its front matter. None when unknown (a hub id read offline)."""
    if is_embedded_teacher(teacher):
        return "apache-2.0"
    card = Path(resolve_teacher(teacher)) / "README.md"
    if card.is_file():
        from huggingface_hub import ModelCard

        try:
            return ModelCard(card.read_text()).data.to_dict().get("license")
        except Exception:  # a card without (valid) front matter: the license stays unknown
            return None
    return None


def _project_link() -> str:
    """"distill-diffusion", linked to the package's Homepage / Repository URL when its metadata declares one."""
    from importlib import metadata

    try:
        urls = metadata.metadata("distill-diffusion").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        urls = []
    url = next((u.split(",", 1)[1].strip() for u in urls if u.split(",", 1)[0].strip().lower() in
                ("homepage", "repository", "source")), None)
    return f"[distill-diffusion]({url})" if url else "distill-diffusion"


def card_metadata(info: dict[str, Any]) -> dict[str, Any]:
    """The Hub's model-card metadata of a run: base_model (a hub id teacher only; a local path is not one), its
    relation (a LoRA is an adapter of it, a full or merged student a fine-tune), library, pipeline tag, tags and
    the teacher's license where known."""
    teacher = str(info["teacher"])
    hub_id = not is_embedded_teacher(teacher) and not Path(teacher).exists() and teacher.count("/") == 1
    meta: dict[str, Any] = {"library_name": "diffusers", "pipeline_tag": "text-to-image"}
    if hub_id:
        meta["base_model"] = teacher
        meta["base_model_relation"] = "adapter" if info["student"] == "lora" else "finetune"
    lic = _teacher_license(teacher)
    if lic:
        meta["license"] = lic
    meta["tags"] = ["distill-diffusion", info["method"], "step-distillation", info.get("family", "diffusion"),
                    "lora" if info["student"] == "lora" else "full-student", "text-to-image"]
    return meta


def model_card(info: dict[str, Any], out: Path) -> str:
    """README.md of a run: Hub metadata (YAML front matter), how to sample it with plain diffusers, the last
    validation grid."""
    import yaml

    steps = ", ".join(info["steps"])
    d = info["steps"][str(info["default_steps"])]
    if d.get("sigmas") is not None:  # flow schedules: the exact sigmas; flow pipelines never scale the start noise
        run = f"sigmas={d['sigmas']}"
        scale = ""
    else:
        run = f"timesteps={d['timesteps']}" + ("" if d.get("eta") is None else f", eta={d['eta']}")
        scale = f"pipe.scheduler.init_noise_sigma = {d['init_noise_scale']}  # the initial latent's scale\n"
    load = (
        f"pipe = {info['pipeline']}.from_pretrained(TEACHER)\n"
        f"pipe.load_lora_weights(\"{out}/student\")\n" if info["student"] == "lora"
        else f"pipe = {info['pipeline']}.from_pretrained(\"{out}/{info.get('student_dir', 'student')}\")\n"
    )
    grids = sorted((out / "validation").glob("step_*.png"))
    grid = (f"\n## Validation grid\n![validation grid at the last step](validation/{grids[-1].name})\n"
            "Rows: the teacher, then the student at each step count.\n" if grids else "")
    front = yaml.safe_dump(card_metadata(info), sort_keys=False)
    averaged = averaged_weights(info)
    weights = f"\nWeights: {averaged} (`export_average={len(info['averaged_steps'])}`)." if averaged else ""
    return f"""---
{front}---
# {info['method']} student of `{info['teacher']}`

Distilled with {_project_link()} (`train.py --method {info['method']}`); student: {info['student']}.{weights}
Supported step counts: {steps} (default {info['default_steps']}). Sampling settings per step count are in
`sampling.json`: the student needs them (its scheduler, timesteps and guidance), not the teacher's.

## Use with plain diffusers
```python
import torch
from diffusers import {info['pipeline']}, {d['scheduler']}
{load}pipe.scheduler = {d['scheduler']}.from_config(pipe.scheduler.config, **{d['scheduler_kwargs']!r})
{scale}image = pipe("a photo of a sneaker", {run}, guidance_scale={d['guidance_scale']}).images[0]
```
Or, with distill-diffusion installed: `pipe = distill_diffusion.load_student("{out}")`. ComfyUI / A1111 files:
`python -m distill_diffusion.export {out} --format kohya` (or `merged`).
{grid}"""


# ---- loading ---------------------------------------------------------------------------------------------------


def averaged_weights(info: dict[str, Any]) -> str | None:
    """What an ``export_average`` student's weights are ("the uniform average of the checkpoints at steps 4, 5"), from
    its sampling.json's ``averaged_steps``; None for a plain export. The model card and eval's report say it so."""
    steps = info.get("averaged_steps")
    return f"the uniform average of the checkpoints at steps {', '.join(map(str, steps))}" if steps else None


def read_sampling(run_dir: str | Path, name: str = SAMPLING_FILE) -> dict[str, Any]:
    p = Path(run_dir) / name
    if not Path(run_dir).is_dir():
        raise UserError(f"run folder {str(run_dir)!r} does not exist")
    if not p.is_file():
        raise UserError(f"{run_dir} has no {name}: not a finished distill-diffusion run (train.py writes it at the "
                        "end and at each validation)")
    try:
        info = json.loads(p.read_text())
        info["steps"] = {int(k): StepSampling(**v) for k, v in info["steps"].items()}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{p} is not a valid sampling file ({type(e).__name__}: {e})") from None
    return info


def _export_marker(folder: Path, kind: str | None) -> Path:
    """The file an exported student folder holds when its export finished: the LoRA file or the pipeline index."""
    return folder / (LORA_FILE if kind == "lora" else PIPELINE_INDEX)


def is_export_dir(folder: str | Path) -> bool:
    """Whether ``folder`` holds an exported student (LoRA or full pipeline) rather than runs: searches skip it."""
    return any(_export_marker(Path(folder), kind).is_file() for kind in ("lora", "full"))


def check_run(run_dir: str | Path, sampling_file: str = SAMPLING_FILE) -> dict[str, Any]:
    """A finished run's sampling settings (:func:`read_sampling`), once its student's export is known complete.

    Called before any model loads, so a half-exported run fails in one line before eval pays for teacher rows.
    """
    info = read_sampling(run_dir, sampling_file)
    need = _export_marker(Path(run_dir) / info.get("student_dir", "student"), info.get("student"))
    if not need.is_file():
        raise UserError(f"{run_dir}: missing {need.relative_to(run_dir)}; the run did not finish exporting")
    return info


def list_students(run_dir: str | Path) -> list[str]:
    """The sampling files of the students a run folder holds, by name: ``sampling.json`` (the final student) first
    when present, then one ``sampling_<name>.json`` per student exported on the way (TSCD's stage students).

    Each name goes to :func:`load_student`'s ``sampling_file``.
    """
    files = Path(run_dir).glob("sampling*.json")
    return sorted(f.name for f in files if f.name == SAMPLING_FILE or f.name.startswith("sampling_"))


_SEEDED: dict[type, type] = {}


def _seeded(cls: type) -> type:
    """``cls`` whose ``step`` draws its fresh noise from ``self.generator`` (one generator per image) when the
    pipeline passes none: SD3's and FLUX's pipelines call ``scheduler.step`` without their generator, so a
    re-noising scheduler (FlowMatchLCMScheduler) would draw from torch's global RNG and an image would depend on its
    batch. Same class name and config, so a saved pipeline reloads as the plain class."""
    if cls not in _SEEDED:
        @functools.wraps(cls.step)  # the same signature: pipelines inspect it to decide whether to pass a generator
        def step(self: Any, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("generator") is None and getattr(self, "generator", None) is not None:
                kwargs["generator"] = self.generator
            return cls.step(self, *args, **kwargs)

        _SEEDED[cls] = type(cls.__name__, (cls,), {"step": step, "generator": None, "__module__": cls.__module__})
    return _SEEDED[cls]


def make_scheduler(base_config: Any, s: StepSampling) -> Any:
    """The diffusers scheduler of a step count, built from the teacher's schedule config."""
    import diffusers

    cls = getattr(diffusers, s.scheduler, None)
    if cls is None:
        raise UserError(f"unknown scheduler {s.scheduler!r} in sampling.json")
    sched = _seeded(cls).from_config(base_config, **s.scheduler_kwargs)
    # The pipelines multiply the initial latent by init_noise_sigma: a method that starts from scaled noise
    # (SiD's sqrt(1 - ᾱ(t_init)) z) records that scale here.
    sched.init_noise_sigma = s.init_noise_scale
    return sched


class RunSampling:
    """The sampling settings of a run, attached to a loaded pipeline as ``pipe.distill``."""

    def __init__(self, info: dict[str, Any], run_dir: str | Path) -> None:
        self.info, self.run_dir = info, Path(run_dir)
        self.steps: dict[int, StepSampling] = info["steps"]
        self.default_steps: int = info["default_steps"]
        self.method: str = info.get("method", "?")

    def get(self, steps: int | None) -> StepSampling:
        k = self.default_steps if steps is None else steps
        if k not in self.steps:
            raise UserError(f"{self.run_dir} supports {sorted(self.steps)} steps, not {k}")
        return self.steps[k]


def load_student(run_dir: str | Path, steps: int | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, sampling_file: str = SAMPLING_FILE, fuse: bool = True,
                 base: Any = None) -> Any:
    """A ready diffusers pipeline for a run: the teacher + the LoRA (or the full student), and the run's scheduler.

    ``pipe.distill`` holds the per-step-count settings; :func:`sample` applies them. ``steps`` picks the scheduler
    configured on return (default: the run's default step count). ``fuse`` merges a LoRA into the UNet's weights
    and drops the adapter layers (diffusers' fuse_lora + unload_lora_weights): an unfused LoRA cost 45% more UNet
    time per image on the embedded teacher (BENCHMARKS.md); ``fuse=False`` keeps the adapter switchable.
    ``base``: a fresh pipeline of the run's teacher already in memory (``Models.teacher_pipeline``, used by the
    training loop's validation), taken instead of loading the teacher from disk; it is modified (the LoRA goes in).
    """
    info = check_run(run_dir, sampling_file)
    folder = Path(run_dir) / info.get("student_dir", "student")
    if info.get("student") == "lora":
        pipe = load_pipeline(info["teacher"], dtype) if base is None else base
        _check_safetensors(folder / LORA_FILE)
        pipe.load_lora_weights(str(folder), weight_name=LORA_FILE, adapter_name="student")
        if fuse:
            pipe.fuse_lora(adapter_names=["student"])
            pipe.unload_lora_weights()
    else:
        pipe = load_pipeline(str(folder), dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if info.get("max_sequence_length") is not None:
        pipe.distill_max_sequence_length = int(info["max_sequence_length"])
    pipe.distill = RunSampling(info, run_dir)
    configure(pipe, steps)
    return pipe


def _check_safetensors(f: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                fh.get_slice(k)
    except Exception as e:
        raise UserError(f"{f} is not a readable safetensors file ({type(e).__name__}); re-export the run") from None


def configure(pipe: Any, steps: int | None = None) -> StepSampling:
    """Set the pipeline's scheduler for a step count of its run (or the teacher's own, for plain pipelines)."""
    s = pipe.distill.get(steps)
    pipe.scheduler = make_scheduler(pipe.scheduler.config, s)
    return s


# DDIM's timestep spacing for the reference rows of VP teachers (``families.StableDiffusion.pipe_teacher_scheduler``
# says why); flow teachers keep their own FlowMatchEulerDiscreteScheduler.
TEACHER_SPACING = "trailing"


def load_teacher(teacher: str = "embedded", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, base: Any = None, resolution: int | None = None) -> Any:
    """The teacher pipeline with its family's reference scheduler (VP: DDIM eta 0, :data:`TEACHER_SPACING`; flow:
    its own flow scheduler), for reference rows. ``resolution``: the image side its rows use (a run's training
    resolution; default the pipeline's own).

    ``base``: the teacher already in memory (see :func:`load_student`), used instead of loading it from disk."""
    pipe = load_pipeline(teacher, dtype) if base is None else base
    pipe.scheduler = family_of(pipe).pipe_teacher_scheduler(pipe)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.distill_resolution = resolution
    return pipe


def teacher_facts(folder: str | Path) -> tuple[str | None, int | None]:
    """(schedule kind "vp" / "flow", native image side) of a local teacher folder from its configs alone, without
    loading it; (None, None) for a hub id, and a None side where the pipeline fixes it in code (FLUX.1). An embedded
    teacher's name ("embedded-flow") reads its shipped folder."""
    folder = Path(resolve_teacher(str(folder)))
    try:
        index = json.loads((folder / "model_index.json").read_text())
        fam = family_for(index["_class_name"])
    except (OSError, ValueError, KeyError, UserError):
        return None, None
    try:
        net = json.loads((folder / fam.denoiser / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        side = int(net["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        side = None
    return fam.schedule_kind, (None if fam.name == "flux" else side)


def pipe_resolution(pipe: Any) -> int:
    """The image side a pipeline samples at: a student's training resolution, a teacher's requested one, or the
    pipeline's own default."""
    run = getattr(pipe, "distill", None)
    res = run.info.get("resolution") if run is not None else getattr(pipe, "distill_resolution", None)
    return int(res or family_of(pipe).pipe_resolution(pipe))


@torch.no_grad()
def sample(pipe: Any, prompts: list[str], steps: int | None = None, seeds: list[int] | None = None,
           guidance_scale: float | None = None, negative_prompt: str | None = None,
           output_type: str = "pil", **kwargs: Any) -> tuple[Any, float]:
    """Generate one image per prompt with per-image seeds; students use their run's settings for ``steps``.

    Returns (images, seconds). A pipeline without ``pipe.distill`` is a teacher: its reference scheduler with
    ``steps`` steps.
    """
    seeds = list(range(len(prompts))) if seeds is None else seeds
    gens = [torch.Generator("cpu").manual_seed(int(sd)) for sd in seeds]
    res = kwargs.pop("height", None) or pipe_resolution(pipe)
    call: dict[str, Any] = {"height": res, "width": res, "generator": gens, "output_type": output_type}
    s, n, g = _plan(pipe, steps, guidance_scale)
    if s is not None:
        pipe.scheduler = make_scheduler(pipe.scheduler.config, s)
        pipe.scheduler.generator = gens  # per-image fresh noise, whether or not the pipeline passes its generator
        call.update(s.call_kwargs())
    else:
        call.update(num_inference_steps=n)
    neg = None if negative_prompt is None else [negative_prompt] * len(prompts)
    call.update(family_of(pipe).pipe_call_kwargs(pipe, g, neg))
    call.update(family_of(pipe).pipe_text_kwargs(pipe))
    t0 = time.perf_counter()
    out = pipe(prompt=list(prompts), **call, **kwargs)
    return out.images, time.perf_counter() - t0


def _plan(pipe: Any, steps: int | None, guidance: float | None) -> tuple[StepSampling | None, int, float]:
    """What :func:`sample` runs for (``steps``, ``guidance``): the student's settings (None for a teacher), the
    number of denoising steps and the guidance scale. Shared with :func:`nfe` so the count cannot drift from it."""
    if getattr(pipe, "distill", None) is not None:
        s = pipe.distill.get(steps)
        return s, len(s.timesteps), s.guidance_scale if guidance is None else guidance
    return None, steps or 25, guidance or 1.0


def uses_cfg(pipe: Any, guidance: float) -> bool:
    """Whether the pipeline runs classifier-free guidance (a second, unconditional pass) at ``guidance`` (diffusers
    convention). A network with a guidance embedding (a full LCM student's ``time_cond_proj_dim``, FLUX.1-dev's
    ``guidance_embeds``) takes the scale as an input instead, so it runs no CFG; nor does guidance <= 1. Then a
    negative prompt has no effect either.
    """
    return family_of(pipe).pipe_uses_cfg(pipe, guidance)


def nfe(pipe: Any, steps: int | None = None, guidance: float | None = None) -> int:
    """Network evaluations per image of ``sample(pipe, prompts, steps, guidance_scale=guidance)``.

    One per step, two with CFG (diffusers' batched cond/uncond pass processes each image twice). The app reports it
    and eval checks it against what its hooks count, so both state the cost the same way.
    """
    _, n, g = _plan(pipe, steps, guidance)
    return n * (2 if uses_cfg(pipe, g) else 1)


def hybrid_nfe(teacher: Any, student: Any, steps: int, teacher_guidance: float) -> int:
    """Network evaluations per image of :func:`distill_diffusion.hybrid.hybrid_sample`: the teacher's first step at
    ``teacher_guidance``, then the student's remaining steps with its own guidance."""
    _, n, g = _plan(student, steps, None)
    return nfe(teacher, 1, teacher_guidance) + (n - 1) * (2 if uses_cfg(student, g) else 1)
