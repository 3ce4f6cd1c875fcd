"""Load a teacher pipeline and build the trainable roles around it.

Roles: ``student`` and optionally ``critic`` (trainable), ``teacher`` (frozen), plus target networks (no gradient).
The network is the teacher family's denoiser (a UNet or a transformer; :mod:`distill_diffusion.families` knows how
to call it) and the schedule is the family's (:mod:`distill_diffusion.schedule`). With ``student=lora`` every
trainable role is a peft LoRA adapter on the one shared base network and the teacher is that network's base
weights: one copy of them. With ``student=full`` each trainable role is a full copy.
Roles are switched only through :meth:`Models.role`, which sets the active adapter on every LoRA layer directly and
restores it on exit; it never touches ``requires_grad`` (peft's ``set_adapter`` / ``enable_adapters`` would rewrite
it on every switch), which belongs to :meth:`Models.trainable` alone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import schedule
from .encoders import Encoders, PromptStore
from .errors import UserError
from .families import FAMILIES, family_for, supported
from .lora_merge import MergedLora
from .method import Cond, MethodSpec, TargetSpec

# The small Fashion-MNIST teachers shipped inside the package, by the name ``teacher=`` takes: a UNet
# StableDiffusionPipeline (the default) and an MMDiT StableDiffusion3Pipeline (rectified flow).
EMBEDDED_TEACHERS = {"embedded": "fmnist_teacher", "embedded-flow": "fmnist_flow_teacher"}


def embedded_teacher_path(name: str = "embedded") -> Path:
    """The folder of a shipped Fashion-MNIST teacher (``"embedded"`` or ``"embedded-flow"``)."""
    return Path(__file__).parent / "assets" / EMBEDDED_TEACHERS[name]


def embedded_teacher_name(teacher: str | Path | None) -> str | None:
    """``"embedded"`` / ``"embedded-flow"`` when ``teacher`` (a name or a folder path) is a shipped teacher, else
    None."""
    if teacher in EMBEDDED_TEACHERS or teacher in ("", None):
        return str(teacher or "embedded")
    try:
        p = Path(str(teacher)).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    return next((n for n in EMBEDDED_TEACHERS if p == embedded_teacher_path(n).resolve()), None)


def resolve_teacher(teacher: str) -> str:
    """A shipped teacher's name (``"embedded"``, ``"embedded-flow"``) -> its folder; otherwise a local folder or
    hub id, unchanged."""
    if teacher in ("", None):
        teacher = "embedded"
    return str(embedded_teacher_path(teacher)) if teacher in EMBEDDED_TEACHERS else teacher


def load_pipeline(teacher: str, dtype: torch.dtype = torch.float32) -> Any:
    """Load a diffusers pipeline of a supported family from a folder or hub id; UserError with what to do when that
    fails, naming the supported families for any other class."""
    from diffusers import DiffusionPipeline

    path = resolve_teacher(teacher)
    if os.path.isdir(path):
        if not (Path(path) / "model_index.json").is_file():
            raise UserError(f"teacher {path!r} is not a diffusers pipeline folder (no model_index.json); "
                            "give a folder written by save_pretrained or a hub id")
        cls_name = json.loads((Path(path) / "model_index.json").read_text()).get("_class_name")
        if cls_name not in FAMILIES:
            raise UserError(f"teacher {path!r} is a {cls_name}; supported: {supported()}")
    elif os.path.exists(path):
        raise UserError(f"teacher {path!r} is a file, not a diffusers pipeline folder")
    elif path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise UserError(f"teacher {path!r} does not exist; give a diffusers pipeline folder or a hub id (org/name)")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    try:
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, **absent_components(path))
    except OSError as e:  # hub id while offline, missing files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load teacher {path!r} ({first[:200]}); offline machines need a local folder "
                        "(set HF_HUB_OFFLINE=1 and use a downloaded pipeline)") from None
    if type(pipe).__name__ not in FAMILIES:
        raise UserError(f"teacher {path!r} is a {type(pipe).__name__}; supported: {supported()}")
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    pipe.distill_max_sequence_length = recorded_max_sequence_length(path)
    return pipe


def absent_components(folder: str) -> dict[str, None]:
    """Components a pipeline folder records as absent (``[null, null]`` in model_index.json, e.g. SD3 saved
    without T5), to pass as None: ``from_pretrained`` refuses such a folder otherwise (diffusers' documented way
    to drop SD3's T5 is ``from_pretrained(..., text_encoder_3=None, tokenizer_3=None)``)."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return {}
    entries = json.loads(index.read_text())
    return {k: None for k, v in entries.items()
            if not k.startswith("_") and isinstance(v, list) and v == [None, None]
            and k not in ("safety_checker", "feature_extractor", "image_encoder")}


def recorded_max_sequence_length(folder: str) -> int | None:
    """The text length a teacher folder says it was trained and is sampled with (``max_sequence_length`` in its
    ``training.json``: the embedded flow teacher's 0, SD3 without T5 padding), else None (the pipeline's default)."""
    f = Path(folder) / "training.json"
    if not f.is_file():
        return None
    try:
        value = json.loads(f.read_text()).get("max_sequence_length")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) else None


def tied_plain_net(wrapped: nn.Module) -> nn.Module:
    """A plain copy of a LoRA-wrapped network's architecture whose parameters and buffers ARE the wrapped model's base
    tensors (the same objects: no extra memory, and an in-place change of one is a change of the other).

    The teacher's forwards of a LoRA run go through it instead of peft's wrappers with adapters disabled: the same
    operations on the same tensors (bit-identical outputs, ``tests/test_models.py``), without a Python detour per
    wrapped layer. Built on the meta device, so the architecture costs no weight memory even for SDXL.
    """
    from accelerate import init_empty_weights

    with init_empty_weights():
        plain = type(wrapped).from_config(wrapped.config)
    base = {n.replace(".base_layer", ""): t for n, t in wrapped.named_parameters() if "lora_" not in n}
    buffers = {n.replace(".base_layer", ""): t for n, t in wrapped.named_buffers() if "lora_" not in n}
    tied: set[int] = set()
    for mod_name, module in plain.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for key in list(module._parameters):
            if module._parameters[key] is not None:
                module._parameters[key] = base[prefix + key]
                tied.add(id(module._parameters[key]))
        for key in list(module._buffers):
            if module._buffers[key] is not None:
                module._buffers[key] = buffers[prefix + key]
                tied.add(id(module._buffers[key]))
    if hasattr(wrapped, "attn_processors"):  # the teacher's own attention kernels, not the class defaults
        plain.set_attn_processor(dict(wrapped.attn_processors))
    # By identity, not by ``is_meta``: a network built on the meta device (the memory planner) ties meta tensors.
    left = [n for n, t in list(plain.named_parameters()) + list(plain.named_buffers()) if id(t) not in tied]
    if left:
        raise RuntimeError(f"tied_plain_net: no base tensor for {left[:3]}")
    return plain.eval()


def _tuner_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


class Models:
    """The teacher pipeline's frozen parts, and the roles built from its denoising network.

    Attributes: ``pipe`` (the teacher pipeline; its network ``denoiser`` is the shared base), ``family``
    (:class:`distill_diffusion.families.Family`), ``schedule`` (VP or flow), ``prediction_type``,
    ``num_train_timesteps``, ``latent_shape`` (C, h, w), ``resolution`` (pixels), ``student_kind`` ("lora" or
    "full"), ``student_w_embedding`` (a full student that embeds the guidance scale, LCM's w-conditioning).
    """

    def __init__(
        self,
        teacher: str,
        student: str = "lora",
        roles: tuple[str, ...] = ("student",),
        targets: dict[str, TargetSpec] | None = None,
        lora_rank: int = 16,
        lora_alpha: float = 16,
        lora_targets: list[str] | None = None,
        guidance_embedding_dim: int | None = None,
        resolution: int | None = None,
        device: torch.device | str = "cpu",
        weight_dtype: torch.dtype = torch.float32,
        headless_roles: tuple[str, ...] = (),
        channels_last: bool = False,
        compile_nets: bool = False,
        max_sequence_length: int | None = None,
        full_copies_on_cpu: bool = False,
        pipe: Any | None = None,
        lora_merge: str = "auto",
    ) -> None:
        self.device, self.weight_dtype = torch.device(device), weight_dtype
        self.teacher_path = resolve_teacher(teacher)
        # ``pipe``: the teacher pipeline already built, e.g. on the meta device by the memory planner
        # (:mod:`distill_diffusion.plan`), which then counts the very tensors a run would hold; None loads ``teacher``.
        self.pipe = load_pipeline(teacher) if pipe is None else pipe
        if max_sequence_length is not None:
            if not family_for(type(self.pipe).__name__).takes_max_sequence_length:
                raise UserError(f"max_sequence_length={max_sequence_length}: only flow-transformer teachers (SD3, "
                                f"FLUX, SANA) have a T5 / Gemma text length; {type(self.pipe).__name__} has none")
            self.pipe.distill_max_sequence_length = max_sequence_length
        self._read_teacher(resolution)
        # A run that shards its full copies (FSDP2) builds them on the CPU from the teacher's float32 weights before
        # anything moves to the accelerator; fully_shard then moves them there block by block, so no GPU ever holds
        # a whole trainable copy.
        full_copies_on_cpu = full_copies_on_cpu and student == "full"
        self._full_copies_device = torch.device("cpu") if full_copies_on_cpu else self.device
        if not full_copies_on_cpu:
            self._freeze_teacher()
        self.student_kind = student
        self.roles = tuple(roles)
        # Headless roles own no network: no adapter or copy; their trainable tensors are the method's extra modules.
        self.headless = frozenset(headless_roles)
        self.targets = dict(targets or {})
        self.lora_config: dict[str, Any] = {}
        self._nets: dict[str, nn.Module] = {}  # full mode: role -> module
        # Networks sharded with FSDP2 (distill_diffusion.sharding): name ("teacher" or a _nets key) -> the class to
        # rebuild an unsharded copy with (fully_shard swaps the module's class for a subclass)
        self.unsharded_class: dict[str, type] = {}
        self._lora_lists: dict[str, list[nn.Parameter]] = {}  # LoRA mode: adapter -> its tensors
        self.denoiser = self.family.net
        self.student_w_embedding = False
        self._teacher_net: nn.Module | None = None  # LoRA students: the base's weights without the LoRA wrappers
        self._merged: MergedLora | None = None  # LoRA students: adapters run on merged weights (lora_merge)
        # auto: on a CPU the wrappers, not the arithmetic, dominate a small network's LoRA forward, with gradient too;
        # on an accelerator merged forwards with gradient are unmeasured, so only forwards without one merge there.
        self._merge_asked = lora_merge
        self.lora_merge = ("always" if self.device.type == "cpu" else "no_grad") if lora_merge == "auto" else lora_merge
        if student == "lora":
            self._build_lora(lora_rank, lora_alpha, lora_targets)
        elif student == "full":
            self._build_full(guidance_embedding_dim)
        else:
            raise UserError(f"student={student!r}: choose 'lora' or 'full'")
        if full_copies_on_cpu:
            self._freeze_teacher()
        self.encoders = Encoders(self.family)
        self._speed_flags(channels_last, compile_nets)

    # ---- building ------------------------------------------------------------------------------------------------
    def _read_teacher(self, resolution: int | None) -> None:
        """The teacher's family (how to call it), its schedule and its latent shape (C, h, w)."""
        self.family = family_for(type(self.pipe).__name__)(self.pipe, resolution, self.device)
        self.schedule = self.family.make_schedule()
        self.prediction_type = self.schedule.prediction_type
        self.num_train_timesteps = self.schedule.num_train_timesteps
        self.resolution, self.latent_shape = self.family.resolution, self.family.latent_shape

    def _freeze_teacher(self) -> None:
        """Frozen parts: never in an optimizer. SDXL's VAE overflows in fp16, so VAEs stay fp32."""
        for name, m in self.pipe.components.items():
            if isinstance(m, nn.Module):
                m.requires_grad_(False).eval()
                want = torch.float32 if name == "vae" else self.weight_dtype
                m.to(self.device) if m.dtype == want else m.to(self.device, want)

    def _networked(self) -> list[str]:
        return [r for r in self.roles if r not in self.headless]

    def _build_lora(self, rank: int, alpha: float, lora_targets: list[str] | None) -> None:
        """One adapter per networked role and per EMA target on the shared base. LoRA students keep the teacher's
        architecture (LCM-LoRA has no guidance embedding), so student overrides do not apply."""
        from peft import LoraConfig

        net, networked = self.denoiser, self._networked()
        targets_list = list(lora_targets or self.family.lora_targets)
        self.lora_config = {"r": rank, "lora_alpha": alpha, "target_modules": targets_list}
        adapters = networked + [n for n, s in self.targets.items() if s.decay is not None]
        with warnings.catch_warnings():
            # Several adapters on one base is the design (one per role); peft warns about it on every add.
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            for name in adapters:
                # init_lora_weights=True: B = 0, so every adapter starts exactly at the teacher.
                net.add_adapter(LoraConfig(init_lora_weights=True, **self.lora_config), adapter_name=name)
        self._tuners = _tuner_layers(net)
        if not self._tuners:
            raise UserError(f"lora_targets {targets_list} match no module of the teacher's {type(net).__name__}; "
                            "name Linear/Conv2d modules such as to_q, to_k, to_v, to_out.0")
        # LoRA tensors train in fp32 even when the frozen base is in half precision.
        for n, p in net.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
        net.set_adapter(networked[0])
        self._base_active, self._base_disabled = networked[0], False
        for name, spec in self.targets.items():
            if spec.decay is not None:
                self._copy_adapter(spec.source, name)
        self._teacher_net = tied_plain_net(net)
        if self.lora_merge != "off":  # its own tied view: the teacher's must never see an adapter's merged weights
            merged = MergedLora(net, tied_plain_net(net))
            reason = next((r for r in map(merged.unsupported, adapters) if r is not None), None)
            if reason is None:
                self._merged = merged
            elif self._merge_asked in ("always", "no_grad"):
                print(f"note: lora_merge={self._merge_asked}: adapters run through peft here ({reason} cannot run "
                      "merged)", file=sys.stderr)
        # Each adapter's LoRA tensors, listed once (the Parameter objects never change; loads copy into them).
        for n, p in net.named_parameters():
            for a in [a for a in networked + list(self.targets) if "lora_" in n and f".{a}." in n + "."]:
                self._lora_lists.setdefault(a, []).append(p)

    def _build_full(self, guidance_embedding_dim: int | None) -> None:
        """A trainable copy per networked role (the student's with a guidance embedding when asked and the family
        can), a frozen copy per EMA target."""
        for role in self._networked():
            dim = guidance_embedding_dim if role == "student" else None
            net, embeds = self.family.full_copy(self.denoiser, dim)
            self._nets[role] = net.to(self._full_copies_device, torch.float32).requires_grad_(True).train()
            self.student_w_embedding |= embeds
        for name, spec in self.targets.items():
            if spec.decay is not None:
                self._nets[name] = copy.deepcopy(self._nets[spec.source]).requires_grad_(False)

    def _speed_flags(self, channels_last: bool, compile_nets: bool) -> None:
        if channels_last and self.family.denoiser != "unet":
            # A transformer's inputs are token sequences (FLUX packs latents with views): nothing to gain.
            print(f"note: channels_last=true applies to UNets; the {self.family.name} transformer runs without it",
                  file=sys.stderr)
            channels_last = False
        self.channels_last = channels_last
        if channels_last:
            for net in self.denoisers():
                net.to(memory_format=torch.channels_last)
        self._compiled = False
        if compile_nets:
            self._merged = None  # the compiled graphs are peft's: merged forwards would run eagerly beside them
            for net in self.denoisers():
                net.compile()
            self._compiled = True

    def _lora_state(self, adapter: str) -> dict[str, Tensor]:
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.denoiser, adapter_name=adapter)

    @torch.no_grad()
    def reset_targets(self) -> None:
        """Copy every EMA target from its source's current weights: after ``init_from`` loaded the student, its
        targets start from it, not from the untrained weights they were copied from at build time."""
        for name, spec in self.targets.items():
            if spec.decay is None:
                continue
            if self.student_kind == "lora":
                self._copy_adapter(spec.source, name)
            else:
                self._nets[name].load_state_dict(self._nets[spec.source].state_dict())

    @torch.no_grad()
    def reset_role(self, role: str) -> None:
        """Start ``role`` over from the teacher: a LoRA adapter's B factors to zero (its output is then the base's,
        whatever A holds), a full copy to the teacher's weights. For methods that restart a critic (Phased DMD's
        phase starts); the loop also drops the role's optimizer state (``Method.resets``)."""
        if role in self.unsharded_class:
            raise UserError(f"restarting the {role} from the teacher is not supported with fsdp=true; set fsdp=false")
        if self.student_kind == "lora":
            for name, p in self.named_parameters(role):
                if "lora_B" in name:
                    p.zero_()
        else:
            self._nets[role].load_state_dict(self._teacher_state())

    def _teacher_state(self) -> dict[str, Tensor]:
        """The teacher network's state dict under plain module names (LoRA wrappers and adapters stripped)."""
        return {k.replace(".base_layer", ""): v for k, v in self.denoiser.state_dict().items() if "lora_" not in k}

    def _copy_adapter(self, src: str, dst: str) -> None:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(self.denoiser, {k: v.clone() for k, v in self._lora_state(src).items()},
                                  adapter_name=dst)

    # ---- roles ---------------------------------------------------------------------------------------------------
    def _lora_params(self, adapter: str) -> list[nn.Parameter]:
        return list(self._lora_lists.get(adapter, ()))

    def denoisers(self) -> list[nn.Module]:
        """Every network a training step can run: the shared base (LoRA roles), the teacher's plain view of it (LoRA
        students) and full copies."""
        tied = [self._teacher_net] if self._teacher_net is not None else []
        return [self.denoiser] + tied + [n for n in self._nets.values() if n is not self.denoiser]

    def named_parameters(self, role: str) -> list[tuple[str, nn.Parameter]]:
        """:meth:`parameters` with their names in the network (a LoRA tensor's name includes its adapter)."""
        if role in self.headless:
            return []
        if self.student_kind == "lora":
            mine = {id(p) for p in self._lora_params(role)}
            return [(n, p) for n, p in self.denoiser.named_parameters() if id(p) in mine]
        return list(self._nets[role].named_parameters())

    def parameters(self, role: str) -> list[nn.Parameter]:
        """The trainable tensors of a role (LoRA tensors, or all of a full copy; none for a headless role)."""
        if role in self.headless:
            return []
        if self.student_kind == "lora":
            return self._lora_params(role)
        return list(self._nets[role].parameters())

    def net(self, role: str) -> nn.Module:
        """The module that computes ``role``; with LoRA always the shared base (use inside :meth:`role`)."""
        if role == "teacher":
            return self._teacher_net if self._teacher_net is not None else self.denoiser
        if self.student_kind == "lora":
            return self.denoiser
        if role in self._nets:
            return self._nets[role]
        if role in self.targets:  # decay None: the source's own weights, used without gradient
            return self._nets[self.targets[role].source]
        raise KeyError(role)

    @contextlib.contextmanager
    def role(self, name: str) -> Iterator[nn.Module]:
        """Make ``name`` the active role of the shared network and yield the module to call.

        With LoRA, the teacher is a plain network on the base's own tensors (:func:`tied_plain_net`: no adapter
        switch at all); for other roles every adapter layer's active adapter is set directly and the previous state
        restored on exit; nothing else changes, in particular no ``requires_grad`` (peft's ``set_adapter`` /
        ``enable_adapters`` rewrite it for every adapter tensor at every switch: BENCHMARKS.md's lean section
        measures the cost; ``requires_grad`` is :meth:`trainable`'s alone). Entering the active role costs nothing.
        Target roles with ``decay=None`` run the source's weights; callers wrap them in ``torch.no_grad``.
        A headless role has no network: its context changes nothing (its loss picks the roles it calls).
        """
        if name in self.headless:
            yield self.denoiser
            return
        if self.student_kind != "lora" or name == "teacher":
            yield self.net(name)
            return
        prev = (self._base_active, self._base_disabled)
        adapter = self._adapter(name)
        want = (adapter, False)
        if want != prev:
            self._activate(*want)
        try:
            yield self.denoiser
        finally:
            if want != prev:
                self._activate(*prev)

    def _adapter(self, role: str) -> str:
        """The LoRA adapter that computes ``role`` (a target with ``decay=None`` runs its source's)."""
        if role in self.targets and self.targets[role].decay is None:
            return self.targets[role].source
        return role

    @contextlib.contextmanager
    def _network(self, role: str) -> Iterator[nn.Module]:
        """:meth:`role`'s module for one forward: with LoRA and ``lora_merge`` on, the merged plain view of the
        adapter (:mod:`distill_diffusion.lora_merge`) when the forward builds no graph (``no_grad``) or always."""
        with self.role(role) as net:
            merged = self._merged is not None and role != "teacher" and role not in self.headless and (
                self.lora_merge == "always" or not torch.is_grad_enabled())
            if not merged:
                yield net
                return
            with self._merged.active(self._adapter(role)) as plain:
                yield plain

    def _activate(self, adapter: str, disabled: bool) -> None:
        """The adapter state of every LoRA layer, as peft's properties read it (``active_adapters``,
        ``disable_adapters``), without peft's ``requires_grad`` side effects."""
        state = {"_active_adapter": [adapter], "_disable_adapters": disabled}
        for layer in self._tuners:
            layer.__dict__.update(state)  # plain attributes (what nn.Module.__setattr__ would store), set fast
        self._base_active, self._base_disabled = adapter, disabled

    @contextlib.contextmanager
    def trainable(self, role: str) -> Iterator[None]:
        """requires_grad on ``role``'s tensors only, for the duration of its loss and backward (restored on exit)."""
        everything = self.all_trainable()
        saved = [(p, p.requires_grad) for p in everything]
        mine = {id(p) for p in self.parameters(role)}
        for p in everything:
            if p.requires_grad != (id(p) in mine):
                p.requires_grad_(id(p) in mine)
        try:
            yield
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)

    def all_trainable(self) -> list[nn.Parameter]:
        out: list[nn.Parameter] = []
        for role in self.roles:
            out += self.parameters(role)
        return out

    @torch.no_grad()
    def update_target(self, name: str) -> None:
        """EMA step of target ``name`` towards its source: θ' <- decay θ' + (1 - decay) θ."""
        spec = self.targets[name]
        if spec.decay is None:
            return
        src, dst = self.parameters(spec.source), self.parameters(name) if self.student_kind == "lora" else list(
            self._nets[name].parameters())
        torch._foreach_lerp_(dst, src, 1 - spec.decay)

    def set_gradient_checkpointing(self, on: bool) -> None:
        mods = [self.denoiser] if self.student_kind == "lora" else [
            self._nets[r] for r in self.roles if r not in self.headless]
        if on and self.lora_merge == "always":
            # A checkpointed block recomputes its forward in the backward, after the merged weights are gone.
            if self._merge_asked == "always":
                print("note: gradient_checkpointing=true: LoRA forwards with gradient run through peft "
                      "(lora_merge=always applies without gradient only)", file=sys.stderr)
            self.lora_merge = "no_grad"
        for m in mods:
            if on:
                m.enable_gradient_checkpointing()
            else:
                m.disable_gradient_checkpointing()

    def teacher_pipeline(self) -> Any | None:
        """A fresh pipeline of the teacher built from the frozen weights in memory (no disk read), or None under
        mixed precision (the frozen parts are then half precision, unlike a pipeline loaded for sampling).

        Text encoders, VAE, tokenizers are shared (frozen, never modified); the network is a new copy of the
        teacher's weights (adapters stripped), so loading a LoRA into it leaves the training network untouched.
        """
        if self.weight_dtype != torch.float32:
            return None
        net = type(self.denoiser).from_config(self.denoiser.config)
        net.load_state_dict(self._teacher_state(), strict=True)
        net.to(self.device, torch.float32).eval().requires_grad_(False)
        comps = {**self.pipe.components, self.family.denoiser: net}
        comps["scheduler"] = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        pipe = type(self.pipe)(**comps)
        pipe.distill_max_sequence_length = getattr(self.pipe, "distill_max_sequence_length", None)
        return pipe

    def exported_spec(self, spec: Any) -> Any:
        """``spec`` as the exported student samples it: a guidance-embedded network (FLUX.1-dev) was trained with
        the family's default guidance as its input wherever a method asked for none, so its pipeline must feed the
        same value (its ``guidance_scale``)."""
        if not self.family.guidance_embedded(self.denoiser):
            return spec
        g = self.family.default_guidance()
        steps = {k: dataclasses.replace(s, guidance_scale=g) if s.guidance_scale == 1.0 else s
                 for k, s in spec.steps.items()}
        return dataclasses.replace(spec, steps=steps)

    # ---- calling the networks ------------------------------------------------------------------------------------
    def net_out(
        self, role: str, xt: Tensor, t: Tensor, cond: Cond, uncond: Cond | None = None,
        guidance: Tensor | float | None = None, timestep_cond: Tensor | None = None,
    ) -> Tensor:
        """The raw output of ``role`` at (x_t, t), with CFG (diffusers convention) when ``guidance`` is given.

        Conditional and unconditional passes run as one batched forward; a guidance-embedded network (FLUX.1-dev)
        takes ``guidance`` as an input instead, in one pass. xt (B, C, h, w), t (B,) integer timesteps, guidance
        scalar or (B,). Returns (B, C, h, w) in fp32.
        """
        return self.net_out_at(role, xt, self.schedule.net_timestep(t), cond, uncond, guidance, timestep_cond)

    def net_out_at(
        self, role: str, xt: Tensor, net_t: Tensor, cond: Cond, uncond: Cond | None = None,
        guidance: Tensor | float | None = None, timestep_cond: Tensor | None = None,
    ) -> Tensor:
        """:meth:`net_out` with the network's own timestep input ``net_t`` (B,) instead of a training timestep: a
        float between training timesteps for continuous-time methods (``distill_diffusion.trigflow``)."""
        with self._network(role) as net:
            # Networks held in half precision take half-precision inputs; full students compute in their own fp32.
            dtype = self.weight_dtype if role == "teacher" or self.student_kind == "lora" else None

            def run(x: Tensor, tt: Tensor, c: Cond, g: Tensor | None = None, tc: Tensor | None = None) -> Tensor:
                x = self._latent_format(x if dtype is None else x.to(dtype))
                c = c if dtype is None else c.to(dtype)
                return self._call(self.family.forward, net, x, tt, c, g, tc).float()

            if self.family.guidance_embedded(net):
                g = self.family.default_guidance() if guidance is None else guidance
                g = torch.as_tensor(g, dtype=torch.float32, device=xt.device).expand(xt.shape[0]).contiguous()
                return run(xt, net_t, cond, g, timestep_cond)
            if guidance is None or (not isinstance(guidance, Tensor) and guidance == 1.0):
                return run(xt, net_t, cond, None, timestep_cond)
            assert uncond is not None, "guidance needs the unconditional conditioning"
            tc = None if timestep_cond is None else torch.cat([timestep_cond, timestep_cond])
            c, u = run(torch.cat([xt, xt]), torch.cat([net_t, net_t]), cond.cat(uncond), None, tc).chunk(2)
            return schedule.cfg(u, c, guidance)

    def guided(self, role: str, xt: Tensor, t: Tensor, cond: Cond, uncond: Cond | None, w: Tensor) -> tuple[
            Tensor, Tensor]:
        """(x0, eps) of ``role`` guided at w (B,) (diffusers convention) in the form LCM (eq. 8) and PCM write it,
        cond + (w − 1)(cond − uncond) on both x0 and eps (:func:`schedule.paper_cfg`); ``uncond=None``: the
        conditional prediction alone. Both branches run as one batched forward; a guidance-embedded network gets w
        as its input in one pass."""
        if uncond is not None and self.family.guidance_embedded(self.net(role)):
            return self.predict(role, xt, t, cond, guidance=w)
        if uncond is None:
            return self.predict(role, xt, t, cond)
        out_c, out_u = self.net_out(role, torch.cat([xt, xt]), torch.cat([t, t]), cond.cat(uncond)).chunk(2)
        x0, eps = self.schedule.split(out_c, xt, t)
        x0_u, eps_u = self.schedule.split(out_u, xt, t)
        return schedule.paper_cfg(x0_u, x0, w), schedule.paper_cfg(eps_u, eps, w)

    # ---- inner features (DMD2's GAN head, PCM's discriminator) ----------------------------------------------------
    def feature_blocks(self, all_levels: bool = True) -> list[str]:
        """The family's feature blocks of the network (UNet: down, mid and, with ``all_levels``, up blocks)."""
        return self.family.feature_blocks(self.denoiser if self._teacher_net is None else self._teacher_net,
                                          all_levels)

    def bottleneck_block(self) -> str:
        """The block whose output is the network's bottleneck (UNet: the mid block)."""
        return self.family.bottleneck_block(self.denoiser)

    def feature_groups(self) -> int:
        """GroupNorm groups that suit heads on the features (the network's own norm groups)."""
        return self.family.norm_groups(self.denoiser)

    def features(self, role: str, x: Tensor, t: Tensor, cond: Cond, names: list[str], stop: bool) -> list[Tensor]:
        """Outputs of blocks ``names`` of ``role``'s network at (x_t, t) as feature maps (B, C_l, h_l, w_l), from one
        ordinary forward (``stop``: cut after the last of them). Inputs are cast as :meth:`net_out` casts them."""
        with self._network(role) as net:
            dtype = self.weight_dtype if role == "teacher" or self.student_kind == "lora" else x.dtype
            return self.family.features(net, x.to(dtype), self.schedule.net_timestep(t), cond.to(dtype), names,
                                        stop)

    def feature_shapes(self, names: list[str]) -> list[tuple[int, int]]:
        """(channels, spatial side) of each feature block in ``names`` at the training resolution."""
        return self.family.feature_shapes(self.net("teacher"), names, self.encode_uncond(1))

    @contextlib.contextmanager
    def no_checkpointing(self, role: str) -> Iterator[None]:
        """:func:`no_checkpointing` on ``role``'s network."""
        with no_checkpointing(self.net(role)):
            yield

    def _latent_format(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``; with ``compile`` on, a failed compilation turns compilation off for every network
        with one warning line and the call runs eagerly (an error of the eager call itself is raised as usual)."""
        if not self._compiled:
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure of the compiled call: retry eagerly, then say so
            self._compiled = False
            for m in self.denoisers():
                m._compiled_call_impl = None
            out = fn(*args, **kwargs)
            first = (str(e).strip().splitlines() or [""])[0][:160]
            from tqdm.auto import tqdm  # on its own line even while the loop's progress bar is drawn

            tqdm.write(f"warning: compile=true: torch.compile failed on this machine ({type(e).__name__}: {first}); "
                       "training continues without compilation", file=sys.stderr)
            return out

    def predict(
        self, role: str, xt: Tensor, t: Tensor, cond: Cond, uncond: Cond | None = None,
        guidance: Tensor | float | None = None, timestep_cond: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(x0, eps) predicted by ``role`` at (x_t, t); see :meth:`net_out`."""
        out = self.net_out(role, xt, t, cond, uncond, guidance, timestep_cond)
        return self.schedule.split(out, xt, t)

    def denoising_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The teacher's own regression target (eps, v, x0, or the flow velocity) for a denoising loss."""
        return self.schedule.target(x0, eps, t)

    # ---- frozen encoders (distill_diffusion.encoders) -------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> Cond:
        return self.encoders.encode_prompts(prompts)

    def encode_uncond(self, b: int) -> Cond:
        return self.encoders.encode_uncond(b)

    def encode_images(self, images: Tensor, noise: Tensor | None = None) -> Tensor:
        return self.encoders.encode_images(images, noise)

    def decode(self, latents: Tensor) -> Tensor:
        return self.encoders.decode(latents)


def build_models(cfg: Any, spec: MethodSpec, device: torch.device | str = "cpu", sharded: bool = False,
                 pipe: Any | None = None) -> Models:
    """The teacher and the roles ``spec`` declares, wired from a training config (TrainConfig fields): the one
    place the loop, the tests, the benchmarks and the memory planner build :class:`Models`. ``sharded``: the loop
    will shard the full copies (:mod:`distill_diffusion.sharding`), so they are built on the CPU; ``pipe``: a
    teacher pipeline already built, see :class:`Models`."""
    dtype = frozen_dtype(cfg, torch.device(device))
    models = Models(
        cfg.teacher, student=cfg.student, roles=spec.roles, targets=spec.targets, lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha, lora_targets=list(cfg.lora_targets) if cfg.lora_targets else None,
        guidance_embedding_dim=spec.student_guidance_embedding if cfg.student == "full" else None,
        resolution=cfg.resolution, device=device, weight_dtype=dtype, headless_roles=spec.headless,
        channels_last=cfg.channels_last, compile_nets=cfg.compile, max_sequence_length=cfg.max_sequence_length,
        full_copies_on_cpu=sharded, pipe=pipe, lora_merge=cfg.lora_merge,
    )
    data = getattr(cfg, "data", None)
    if data is not None:
        models.encoders = configure_encoders(models, data)
    return models


def frozen_dtype(cfg: Any, device: torch.device) -> torch.dtype:
    """The dtype the frozen weights are held in: ``cfg.mixed_precision``'s, except for a LoRA student trained with
    bf16 on a CPU, whose frozen base stays float32.

    Autocast computes in bf16 either way (it casts a float32 weight per op), and only a float32 base lets the
    adapters run on merged weights (``lora_merge``; a bf16 sum would round the adapter's update away), which is the
    faster path on a CPU (BENCHMARKS.md, lean: bf16 rows). ``lora_merge=off`` or ``compile=true`` (peft's path
    either way) keep the bf16 base. On an accelerator the bf16 base is kept for its memory."""
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    if dtype == torch.bfloat16 and device.type == "cpu" and cfg.student == "lora" and cfg.lora_merge != "off" \
            and not cfg.compile:
        return torch.float32
    return dtype


def configure_encoders(models: Models, data: Any) -> Encoders:
    """The models' encoders with the data config's policies: prompt cache bound, encode batch, and the on-disk
    stores of prompt embeddings and image latents, each fingerprinted with what its tensors depend on."""
    from .artifacts import weights_hash
    from .encoders import LatentStore

    store = latents = None
    if data.text_cache_dir or data.latent_cache_dir:
        teacher = {"teacher_hash": weights_hash(models.teacher_path), "family": models.family.name}
    if data.text_cache_dir:
        store = PromptStore(data.text_cache_dir, {
            **teacher, "max_sequence_length": getattr(models.pipe, "distill_max_sequence_length", None),
            "text_encode_batch": data.text_encode_batch})
    if data.latent_cache_dir:
        source = next((f"{k}={getattr(data, k)}" for k in ("images", "webdataset", "dataset", "fashion_mnist")
                       if getattr(data, k)), "fashion_mnist=default")
        latents = LatentStore(data.latent_cache_dir, {**teacher, "resolution": models.resolution,
                                                      "center_crop": data.center_crop, "source": source})
    return Encoders(models.family, data.prompt_cache_mb << 20, data.text_encode_batch, store, latents)


@contextlib.contextmanager
def frozen(params: list[nn.Parameter]) -> Iterator[None]:
    """requires_grad False on ``params`` for a forward whose gradient must reach only its inputs; restored on exit."""
    saved = [(p, p.requires_grad) for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@contextlib.contextmanager
def no_checkpointing(net: nn.Module) -> Iterator[None]:
    """Gradient checkpointing off for one forward whose gradient flows into another role: a checkpointed backward
    would re-run it under whatever adapter is active at backward time."""
    mods = [m for m in net.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in mods:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in mods:
            m.gradient_checkpointing = True
