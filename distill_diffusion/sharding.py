"""FSDP2 for full students: every trainable network copy (student, critic), its EMA targets and the roles' extra
modules are sharded with ``torch.distributed.fsdp.fully_shard`` across the processes; the frozen teacher network
optionally too (``fsdp_shard_teacher``).

Why here and not through ``accelerator.prepare(model)``: a step runs several roles' networks (a critic's forward
inside the student's loss, two forwards before one backward), each with its own optimizer, and a LoRA run keeps one
shared base; accelerate's FSDP preparation expects one model and its optimizer. The loop therefore calls
``fully_shard`` itself behind accelerate's own launch keys (``distributed_type: FSDP`` in the accelerate config turns
it on) and keeps accelerate for launching, autocast and logging.

LoRA students are not sharded: their base is frozen and shared by every role, and their trainable tensors are a few
MB, so replicating them costs less than the all-gathers sharding would add (README, "Scaling").

Parameters of a sharded network are DTensors holding this rank's rows (dim 0, padded by FSDP). Gradients arrive
reduce-scattered and averaged by FSDP's backward hooks, so the loop only has to agree on finiteness across ranks;
the gradient norm is the global one (:func:`clip_grad_norm_`). Writing the student (export, validation) gathers
full copies on the main process (:func:`gathered`); checkpoints are sharded (:func:`save_sharded`), written by every
rank with ``torch.distributed.checkpoint`` and readable at another world size.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

SHARDED_DIR = "sharded"  # a checkpoint's torch.distributed.checkpoint folder


def launched_with_fsdp() -> bool:
    """Whether ``accelerate launch`` ran with a config that says ``distributed_type: FSDP`` (accelerate passes
    ``ACCELERATE_USE_FSDP``; its ``FSDP_*`` keys are read where they matter, :func:`reshard_after_forward`). The
    variable is removed, so the Accelerator built next stays a plain multi-process one: this module shards,
    accelerate does not."""
    return os.environ.pop("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_sharded(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t`` (``t`` itself when it is not sharded)."""
    return t.to_local() if is_sharded(t) else t


def _blocks(net: nn.Module) -> list[nn.Module]:
    """The units sharded one by one before the whole network: every entry of a ``*blocks`` ModuleList (UNet down /
    up blocks, transformer blocks) and a UNet's mid block. Each unit is all-gathered just before its forward and
    freed after it, so the peak holds one unit's full weights, not the network's."""
    units: list[nn.Module] = []
    for name, child in net.named_children():
        if isinstance(child, nn.ModuleList) and name.endswith("blocks"):
            units += list(child)
        elif name == "mid_block" and child is not None:
            units.append(child)
    return units


def shard_module(module: nn.Module, reshard_after_forward: bool = True) -> None:
    """``fully_shard`` every block of ``module`` then the module itself (its remaining parameters: embeddings,
    norms, the output projection)."""
    from torch.distributed.fsdp import fully_shard

    for unit in _blocks(module):
        fully_shard(unit, reshard_after_forward=reshard_after_forward)
    fully_shard(module, reshard_after_forward=reshard_after_forward)


def reshard_after_forward() -> bool:
    """accelerate's ``fsdp_reshard_after_forward`` (FSDP2) or FSDP1 sharding strategy from the launch: False keeps
    the gathered weights from forward to backward (ZeRO-2: more memory, fewer all-gathers)."""
    value = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    return value not in ("false", "shard_grad_op", "no_shard", "2", "3")


def shard_models(models: Any, extras: dict[str, nn.Module], shard_teacher: bool,
                 reshard_after_forward: bool = True) -> list[str]:
    """Shard a full run's networks in place: every role's copy and EMA target, every extra module, and the teacher
    network with ``shard_teacher``. Returns what was sharded (names), for the start line."""
    done = []
    for name, net in models._nets.items():
        models.unsharded_class.setdefault(name, type(net))
        shard_module(net, reshard_after_forward)
        done.append(name)
    for role, m in extras.items():
        if next(m.parameters(), None) is not None:
            shard_module(m, reshard_after_forward)
            done.append(f"{role} extra modules")
    if shard_teacher:
        models.unsharded_class.setdefault("teacher", type(models.denoiser))
        shard_module(models.denoiser, reshard_after_forward)
        done.append("teacher")
    return done


def _full_copy(net: nn.Module, cls: type, main: bool, device: torch.device) -> nn.Module | None:
    """An unsharded copy of sharded ``net`` on ``device`` in the main process (None elsewhere). Every rank must
    call it: the full state dict is gathered with collectives (through the CPU; only the main process keeps it)."""
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return None
    with init_empty_weights():
        plain = cls.from_config(net.config)
    plain.load_state_dict(state, assign=True)
    if hasattr(net, "attn_processors"):
        plain.set_attn_processor(dict(net.attn_processors))
    return plain.to(device).requires_grad_(False).eval()


@contextlib.contextmanager
def gathered(models: Any, main: bool, roles: set[str]) -> Iterator[None]:
    """Inside: the main process's ``models`` hold unsharded copies of the sharded networks of ``roles`` (the
    exported one) and of the teacher when it is sharded, so exports and validation sample them like any full run.
    Every rank must enter it (the copies are gathered with collectives); outside it nothing has changed. Without
    sharding it does nothing."""
    sharded = {n: net for n, net in models._nets.items() if n in models.unsharded_class and n in roles}
    teacher = "teacher" in models.unsharded_class
    if not sharded and not teacher:
        yield
        return
    full = {n: _full_copy(net, models.unsharded_class[n], main, models.device) for n, net in sharded.items()}
    full_teacher = (_full_copy(models.denoiser, models.unsharded_class["teacher"], main, models.device)
                    if teacher else None)
    if not main:
        yield
        return
    saved_nets, saved_teacher = dict(models._nets), models.denoiser
    models._nets.update(full)
    if teacher:
        models.denoiser = full_teacher
    try:
        yield
    finally:
        models._nets.clear()
        models._nets.update(saved_nets)
        models.denoiser = saved_teacher


def all_finite(params: list[nn.Parameter], loss: float, world: int) -> tuple[bool, float]:
    """Whether every rank's gradient shards of ``params`` and every rank's loss are finite (the same answer on
    every rank, so all step or skip together), and the loss averaged over ranks. FSDP's backward has already
    reduce-scattered and averaged the gradients; only these two numbers cross ranks."""
    bad = sum(int(not bool(torch.isfinite(local(p.grad)).all())) for p in params if p.grad is not None)
    device = next((local(p).device for p in params), torch.device("cpu"))
    status = torch.tensor([loss, float(bad)], dtype=torch.float32, device=device)
    torch.distributed.all_reduce(status)
    loss_avg = float(status[0] / world)
    return bool(status[1] == 0) and torch.isfinite(status[0]).item(), loss_avg


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """Clip the gradients of sharded ``params`` to a global L2 norm of ``max_norm``; the norm before clipping.

    The norm of DTensor gradients is a partial value per rank; ``full_tensor`` reduces it, so every rank scales by
    the same factor, the one a single process holding all gradients would use."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if is_sharded(total):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _container(models: Any, extras: dict[str, nn.Module]) -> nn.ModuleDict:
    """Every sharded network and extra module under one module, so a checkpoint names its tensors
    ``<role>.<parameter>`` and ``extra_<role>.<key>``."""
    mods: dict[str, nn.Module] = dict(models._nets)
    mods.update({f"extra_{r}": m for r, m in extras.items()})
    return nn.ModuleDict(mods)


def _states(models: Any, extras: dict[str, nn.Module], optimizers: dict[str, Any]) -> tuple[nn.Module, list, dict]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = _container(models, extras)
    opts = [getattr(o, "optimizer", o) for o in optimizers.values()]
    msd, osd = get_state_dict(model, opts)
    return model, opts, {"model": msd, "optim": osd}


def save_sharded(folder: Path, models: Any, extras: dict[str, nn.Module], optimizers: dict[str, Any]) -> None:
    """Every rank writes its shards of the networks, extra modules and optimizer states into ``folder`` (a
    torch.distributed.checkpoint folder: one file per rank and a metadata file)."""
    import torch.distributed.checkpoint as dcp

    _, _, state = _states(models, extras, optimizers)
    dcp.save(state, checkpoint_id=str(folder))


def load_sharded(folder: Path, models: Any, extras: dict[str, nn.Module], optimizers: dict[str, Any]) -> None:
    """Load :func:`save_sharded`'s folder into this run's shards (any world size: it reshards on load)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model, opts, state = _states(models, extras, optimizers)
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, opts, model_state_dict=state["model"], optim_state_dict=state["optim"])
