"""Checkpoints of a run and starting a run from an earlier one (``init_from``).

A checkpoint (``checkpoints/checkpoint-<step>/``) holds every trainable tensor, target network and extra module
(``trainable.safetensors``, keyed ``<role>/<parameter name>`` and ``extra/<role>/<key>``; never the frozen base),
the optimizer and scheduler states and the torch RNG (``optim.pt``), and ``state.json``. It is written under a
temporary name and renamed when complete. Checkpoints written before tensors were keyed by name (``<role>/<i>``, the
i-th tensor of the role) still load: positions follow the same parameter order.

A sharded run (FSDP2, :mod:`distill_diffusion.sharding`) writes its networks, extra modules and optimizer states as
a ``torch.distributed.checkpoint`` folder (``sharded/``: every rank writes its own shards, nothing is gathered) and
the schedulers and RNG in ``optim.pt``; ``state.json`` says ``"sharded": true``. It resumes at any process count.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import artifacts, sharding
from .config import lr_factor
from .errors import UserError
from .method import MethodSpec
from .models import Models, resolve_teacher

if TYPE_CHECKING:
    from .loop import Trainer

PREFIX = "checkpoint-"


def step_of(p: Path) -> int:
    """The step of checkpoint folder ``p`` (``checkpoint-<step>``), from its name."""
    return int(p.name[len(PREFIX):])


def is_named(p: Path) -> bool:
    """Whether ``p`` is named as train.py names checkpoint folders (``checkpoint-<step>``)."""
    return p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()


def listed(ckdir: Path) -> list[Path]:
    """Checkpoint folders of ``ckdir`` (complete or not), oldest first."""
    if not ckdir.is_dir():
        return []
    found = [p for p in ckdir.iterdir() if p.is_dir() and is_named(p)]
    return sorted(found, key=step_of)


def candidates(resume: str | None, out: Path) -> list[Path]:
    """Checkpoints to try, newest first: the one named by ``resume``, or every one for ``latest``."""
    if not resume:
        return []
    if resume != "latest":
        return [named(resume, "resume")]
    return listed(out / "checkpoints")[::-1]


def named(path: str, key: str) -> Path:
    """Checkpoint folder ``path``, given as config key ``key``; UserError when it is none."""
    p = Path(path)
    if not (p / "state.json").is_file():
        raise UserError(f"{key}={path!r} is not a checkpoint folder (no state.json)")
    return p


def check_length(path: Path, cfg: Any, spec: MethodSpec) -> None:
    """UserError when the method's schedule is cut from ``max_steps`` (``MethodSpec.fixed_length``) and checkpoint
    ``path`` was written with another one: its phases or stages would move under the half-trained run. Not a broken
    checkpoint (``resume=latest`` must not skip it and start over), so the loop asks before anything loads.
    Checkpoints from before ``max_steps`` was recorded, and unreadable ones (:func:`load` names those), pass.
    A decaying learning rate (``lr_schedule`` cosine or linear) is cut from ``max_steps`` too, unless the checkpoint
    was written before its rate began to decay and this run's decay starts after it (``lr_decay_steps``)."""
    decays = cfg.lr_schedule != "constant"
    if not (spec.fixed_length or decays):
        return
    try:
        info = json.loads((path / "state.json").read_text())
        written, step = info.get("max_steps"), int(info["step"])
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return
    if written is None or written == cfg.max_steps:
        return
    if spec.fixed_length:
        raise UserError(f"checkpoint {path} was written with max_steps={written}, and {cfg.method_name}'s phases or "
                        f"stages are cut from max_steps: resume with max_steps={written}, or start a longer run from "
                        "this one's export with init_from")
    if not _decay_follows(path, step, cfg):
        raise UserError(f"checkpoint {path} was written with max_steps={written}, and lr_schedule={cfg.lr_schedule} "
                        f"is cut from max_steps: resume with max_steps={written}, or, if its rate had not begun to "
                        f"decay, decay only after it with lr_decay_steps={cfg.max_steps - step} or fewer")


def _decay_follows(path: Path, step: int, cfg: Any) -> bool:
    """Whether this run's learning rates agree with checkpoint ``path``'s up to its ``step``: every scheduler in it
    still at its base rate (its decay, if any, not begun) and this run's decay starting after ``step``."""
    if lr_factor(max(step - 1, 0), cfg.lr_warmup_steps, cfg.max_steps, cfg.lr_schedule, cfg.lr_decay_steps) != 1.0:
        return False
    try:  # mmap: the optimizer moments beside the schedulers' state are not read
        schedulers = torch.load(path / "optim.pt", map_location="cpu", weights_only=True, mmap=True)["schedulers"]
    except Exception:
        return False
    return all(list(s["_last_lr"]) == list(s["base_lrs"]) for s in schedulers.values())


def role_tensors(models: Models) -> dict[str, nn.Parameter]:
    """Every role's and EMA target's tensors by ``<role>/<parameter name>``."""
    names = list(models.roles) + [n for n, s in models.targets.items() if s.decay is not None]
    return {f"{role}/{n}": p for role in names for n, p in models.named_parameters(role)}


def _state(tr: Trainer) -> dict[str, torch.Tensor]:
    state = {k: p.detach().to("cpu").contiguous() for k, p in role_tensors(tr.models).items()}
    for role, m in tr.extras.items():
        for k, v in m.state_dict().items():
            state[f"extra/{role}/{k}"] = v.detach().to("cpu").contiguous()
    return state


def save(out: Path, step: int, tr: Trainer) -> None:
    """Write checkpoint ``step``; old ones go (``checkpoints_total_limit``) only after it is complete. Every process
    calls it; only the main one writes, except the shards of a sharded run, which every process writes."""
    if tr.sharded:
        _save_sharded(out, step, tr)
        return
    if not tr.accelerator.is_main_process:
        return
    from safetensors.torch import save_file

    ckdir = out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    with artifacts.atomic_dir(ckdir / f"{PREFIX}{step}") as tmp:
        save_file(_state(tr), str(tmp / "trainable.safetensors"))
        torch.save({"optimizers": {r: o.state_dict() for r, o in tr.optimizers.items()}, **_loop_state(tr)},
                   tmp / "optim.pt")
        _write_state(tmp, step, tr)
    _drop_old(ckdir, tr.cfg.checkpoints_total_limit)


def _loop_state(tr: Trainer) -> dict:
    return {"schedulers": {r: s.state_dict() for r, s in tr.schedulers.items()}, "torch_rng": torch.get_rng_state()}


def _write_state(folder: Path, step: int, tr: Trainer) -> None:
    info = {"step": step, "method": tr.cfg.method_name, "student": tr.cfg.student, "max_steps": tr.cfg.max_steps}
    if tr.sharded:
        info["sharded"] = True
    (folder / "state.json").write_text(json.dumps(info))


def _save_sharded(out: Path, step: int, tr: Trainer) -> None:
    """Every rank writes its shards into one temporary folder (a name all ranks know), which the main process
    renames into place once all are done: a crash mid-write leaves no checkpoint-<step> folder."""
    acc = tr.accelerator
    ckdir = out / "checkpoints"
    final = ckdir / f"{PREFIX}{step}"
    tmp = ckdir / f".{final.name}.tmp-sharded"
    if acc.is_main_process:
        for stale in ckdir.glob(".*.tmp-sharded"):  # left by a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    sharding.save_sharded(tmp / sharding.SHARDED_DIR, tr.models, tr.extras, tr.optimizers)
    acc.wait_for_everyone()
    if acc.is_main_process:
        torch.save(_loop_state(tr), tmp / "optim.pt")
        _write_state(tmp, step, tr)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _drop_old(ckdir, tr.cfg.checkpoints_total_limit)
    acc.wait_for_everyone()


def _drop_old(ckdir: Path, limit: int | None) -> None:
    if limit:
        done = listed(ckdir)
        for old in done[: max(0, len(done) - limit)]:
            shutil.rmtree(old, ignore_errors=True)


def _by_name(saved: dict[str, torch.Tensor], current: dict[str, nn.Parameter], role: str) -> dict[str, torch.Tensor]:
    """``saved``'s tensors of ``role`` keyed as ``current`` names them; positional keys (older checkpoints) are
    matched by order. Missing or extra tensors leave the result incomplete, for the caller to refuse."""
    mine = [k for k in current if k.startswith(f"{role}/")]
    theirs = {k: v for k, v in saved.items() if k.startswith(f"{role}/")}
    positional = [f"{role}/{i}" for i in range(len(theirs))]
    if theirs and set(theirs) == set(positional):
        return {k: theirs[old] for k, old in zip(mine, positional)} if len(mine) == len(theirs) else {}
    return theirs


def _copy_roles(saved: dict[str, torch.Tensor], current: dict[str, nn.Parameter], roles: list[str]) -> bool:
    """Copy ``roles``' tensors from ``saved`` into the models; False (nothing copied) when they do not fit."""
    matched: dict[str, torch.Tensor] = {}
    for role in roles:
        matched.update(_by_name(saved, current, role))
    wanted = {k for k in current if k.split("/", 1)[0] in roles}
    if set(matched) != wanted or any(matched[k].shape != current[k].shape for k in wanted):
        return False
    with torch.no_grad():
        for k in wanted:
            current[k].copy_(matched[k])
    return True


def _load_extras(saved: dict[str, torch.Tensor], extras: dict[str, nn.Module], roles: list[str]) -> None:
    for role in roles:
        prefix = f"extra/{role}/"
        state = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
        if role in extras and state:
            extras[role].load_state_dict(state)


def load(path: Path, tr: Trainer, averaged: list[Path] | None = None) -> int:
    """Load checkpoint ``path`` into the trainer; its step. With ``averaged`` (:func:`window`'s checkpoints ending at
    ``path``, more than one) the tensors are their uniform average. UserError when it is incomplete,
    unreadable or was written by another configuration (then nothing is changed)."""
    from safetensors.torch import load_file

    sharded = (path / sharding.SHARDED_DIR).is_dir()
    if sharded != tr.sharded:
        raise UserError(f"checkpoint {path} was written {'with' if sharded else 'without'} fsdp; resume it with "
                        f"fsdp={'true' if sharded else 'false'} (and student=full)")
    if sharded and averaged:
        raise UserError(f"export_average={len(averaged)}: sharded (fsdp) checkpoints are not averaged; export one with "
                        "export_average=1")
    if sharded:
        return _load_sharded(path, tr)
    if not all((path / f).is_file() for f in ("state.json", "trainable.safetensors", "optim.pt")):
        raise UserError(f"checkpoint {path} is incomplete")
    try:
        saved = load_file(str(path / "trainable.safetensors"))
        other = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        step = int(json.loads((path / "state.json").read_text())["step"])
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}); delete it to resume from an "
                        "earlier one") from None
    if averaged:
        saved = _average(averaged, saved)
    current = role_tensors(tr.models)
    fresh = _new_ema_targets(saved, tr)
    current = {k: v for k, v in current.items() if k.split("/", 1)[0] not in fresh}
    roles = sorted({k.split("/", 1)[0] for k in current})
    want_extra = {f"extra/{r}/{k}": v.shape for r, m in tr.extras.items() for k, v in m.state_dict().items()}
    got_extra = {k: v.shape for k, v in saved.items() if k.startswith("extra/")}
    if got_extra != want_extra or len(saved) - len(got_extra) != len(current) \
            or not _copy_roles(saved, current, roles):
        raise UserError(f"checkpoint {path} was written by a different configuration (student, roles or LoRA "
                        "rank differ); resume with the config it was written with")
    _load_extras(saved, tr.extras, list(tr.extras))
    if fresh:
        tr.models.reset_targets()
        if tr.accelerator.is_main_process:
            print(f"resume: checkpoint {path} has no EMA of the student; {', '.join(fresh)} starts from its "
                  f"student (ema_decay={tr.cfg.ema_decay})", flush=True)
    for r, o in tr.optimizers.items():
        o.load_state_dict(other["optimizers"][r])
    _load_loop_state(other, tr)
    return step


def window(path: Path, n: int) -> list[Path]:
    """The ``n`` checkpoints of ``path``'s folder ending at ``path``, oldest first; UserError when it holds fewer."""
    if not is_named(path):
        raise UserError(f"export_average={n}: {path} is not named {PREFIX}<step> in a run's checkpoints folder")
    upto = [p for p in listed(path.parent) if step_of(p) <= step_of(path)]
    if len(upto) < n:
        raise UserError(f"export_average={n}: {path.parent} holds {len(upto)} checkpoint(s) up to {path.name}; "
                        f"set export_average to at most {len(upto)}")
    return upto[-n:]


def _average(paths: list[Path], last: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The uniform average of checkpoints ``paths``' trainable tensors (``last``: the newest's, already read):
    stochastic weight averaging's w_SWA = (1/n) sum_i w_i (Izmailov et al. 2018, "Averaging Weights Leads to Wider
    Optima and Better Generalization", Algorithm 1 with a running mean). A LoRA's two factors are averaged each, as
    an EMA of them is; the product of the averages is close to the average of the products when the checkpoints
    are near one another on one run. Sums in float64, results in each tensor's dtype."""
    from safetensors.torch import load_file

    total = {k: v.double() for k, v in last.items() if v.is_floating_point()}
    for p in paths[:-1]:
        try:
            other = load_file(str(p / "trainable.safetensors"))
        except Exception as e:
            raise UserError(f"checkpoint {p} cannot be read ({type(e).__name__}); average fewer checkpoints "
                            "(export_average)") from None
        if other.keys() != last.keys() or any(other[k].shape != v.shape for k, v in last.items()):
            raise UserError(f"checkpoint {p} holds other tensors than {paths[-1]}: written by another "
                            "configuration; average fewer checkpoints (export_average)")
        for k in total:
            total[k] += other[k].double()
    return {k: (total[k] / len(paths)).to(v.dtype) if k in total else v for k, v in last.items()}


def _new_ema_targets(saved: dict[str, torch.Tensor], tr: Trainer) -> list[str]:
    """The run's EMA targets when the checkpoint holds none of them (it was written without ``ema_decay``): the
    resumed run starts them from the loaded student, as ``init_from`` does, so an EMA can be switched on for the rest
    of a run. A checkpoint holding some but not all of them is a different configuration (``load`` refuses it)."""
    ema = [n for n, s in tr.models.targets.items() if s.decay is not None]
    missing = [n for n in ema if not any(k.startswith(f"{n}/") for k in saved)]
    return missing if missing == ema else []


def _load_loop_state(other: dict, tr: Trainer) -> None:
    """The schedulers' step counts and the torch RNG from a checkpoint. The learning rates stay the run's own: a
    scheduler's state carries the base rate it was built with, and loading it alone would keep the checkpoint's rate
    whatever ``learning_rate`` the resumed run sets (the optimizers' moments are kept either way)."""
    for r, s in tr.schedulers.items():
        configured = list(s.base_lrs)
        s.load_state_dict(other["schedulers"][r])
        if s.base_lrs != configured and tr.accelerator.is_main_process:
            print(f"resume: {r}'s learning rate {s.base_lrs[0]:g} in the checkpoint, {configured[0]:g} from "
                  "now on (this run's setting)", flush=True)
        s.base_lrs = configured
        # this run's schedule (another lr_decay_steps or max_steps may bend it from here on) from the next iteration
        for g, base, factor in zip(s.optimizer.param_groups, configured, s.lr_lambdas):
            g["initial_lr"], g["lr"] = base, base * factor(s.last_epoch)
        s._last_lr = [g["lr"] for g in s.optimizer.param_groups]  # what get_last_lr() reports (the logs)
    torch.set_rng_state(other["torch_rng"])


def _load_sharded(path: Path, tr: Trainer) -> int:
    if not all((path / f).is_file() for f in ("state.json", "optim.pt")):
        raise UserError(f"checkpoint {path} is incomplete")
    try:
        other = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
        step = int(json.loads((path / "state.json").read_text())["step"])
        sharding.load_sharded(path / sharding.SHARDED_DIR, tr.models, tr.extras, tr.optimizers)
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be read or was written by a different configuration "
                        f"({type(e).__name__}); delete it to resume from an earlier one") from None
    _load_loop_state(other, tr)
    return step


# ---- init_from: starting from an earlier run -----------------------------------------------------------------------


def init_student(models: Models, run: str) -> None:
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
            prefix = f"{models.family.denoiser}."
            sd = {k.removeprefix(prefix): v for k, v in sd.items()}
            res = set_peft_model_state_dict(models.denoiser, sd, adapter_name="student")
            if getattr(res, "unexpected_keys", None):
                raise UserError(f"init_from={run!r}: its LoRA does not fit this config's lora_targets/rank")
        else:
            f = folder / models.family.denoiser / "diffusion_pytorch_model.safetensors"
            try:
                models.net("student").load_state_dict(load_file(str(f)))
            except RuntimeError:
                raise UserError(f"init_from={run!r}: its {models.family.denoiser} does not match this student's "
                                "architecture") from None


def init_roles(models: Models, extras: dict[str, nn.Module], run: str, roles: list[str]) -> None:
    """Start ``roles`` (not the student: :func:`init_student`) and their extra modules from ``run``'s last
    checkpoint, as a second training stage resumes networks of the first (DMD2's critic)."""
    from safetensors.torch import load_file

    ckdir = Path(run) / "checkpoints"
    done = [p for p in listed(ckdir) if (p / "trainable.safetensors").is_file()]
    what = ", ".join(roles)
    if not done:
        raise UserError(f"init_from={run!r}: {ckdir} holds no checkpoint with the {what}")
    saved = load_file(str(done[-1] / "trainable.safetensors"))
    if not _copy_roles(saved, role_tensors(models), roles):
        raise UserError(f"init_from={run!r}: {done[-1]} has a different {what} (student kind or LoRA rank/targets "
                        "differ); use the earlier run's settings")
    _load_extras(saved, extras, roles)
