"""The method interface: what a distillation paper implements, and the data it receives.

A method owns the maths of one paper. It declares its roles and how they update, and returns losses; the training
loop (``distill_diffusion.loop``) calls backward and steps the optimizers. Methods never touch tokenizers, VAEs,
optimizers or the accelerator.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .models import Models


@dataclass
class Cond:
    """Text conditioning for a batch, in whatever form the teacher's family feeds its network
    (``distill_diffusion.families``).

    prompt_embeds: (B, L, D); pooled: (B, D2) pooled text embedding (SDXL ``text_embeds``, SD3
    ``pooled_projections``, FLUX ``pooled_projections``) or None; time_ids: (B, 6) SDXL ``add_time_ids`` or None;
    mask: (B, L) attention mask of the prompt tokens (SANA) or None.
    """

    prompt_embeds: Tensor
    pooled: Tensor | None = None
    time_ids: Tensor | None = None
    mask: Tensor | None = None

    def _map(self, fn: Any, other: Cond | None = None) -> Cond:
        names = ("prompt_embeds", "pooled", "time_ids", "mask")
        vals = [getattr(self, n) for n in names]
        others = [getattr(other, n) for n in names] if other is not None else [None] * len(names)
        return Cond(*[None if a is None else fn(n, a, b) for n, a, b in zip(names, vals, others)])

    def cat(self, other: Cond) -> Cond:
        """Concatenate along the batch (used to run cond and uncond in one forward)."""
        return self._map(lambda _n, a, b: torch.cat([a, b]), other)

    def index(self, idx: Tensor | slice) -> Cond:
        return self._map(lambda _n, a, _b: a[idx])

    def where(self, keep: Tensor, other: Cond) -> Cond:
        """Per sample, this conditioning where ``keep`` (B,) is True, else ``other``'s (same shapes)."""

        def pick(_n: str, a: Tensor, b: Tensor) -> Tensor:
            return torch.where(keep.to(a.device).reshape(-1, *[1] * (a.ndim - 1)), a, b.to(a.dtype))

        return self._map(pick, other)

    def to(self, dtype: torch.dtype) -> Cond:
        """The same conditioning with its float tensors cast to ``dtype`` (a network held in bf16/fp16 needs its
        inputs so); the attention mask keeps its dtype."""
        return self._map(lambda n, a, _b: a if n == "mask" else a.to(dtype))

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]


class StepRNG:
    """Random draws keyed by (seed, step, global sample index, tag), so a run's randomness does not depend on how it
    was split across processes or interrupted and resumed.

    Per-sample draws use one generator per sample; shared draws (one value for the whole global batch, e.g. DMD2's
    backward-simulation step) use a generator keyed without the sample index.
    """

    def __init__(self, seed: int, step: int, sample_ids: Tensor, device: torch.device | str = "cpu") -> None:
        self.seed, self.step, self.device = seed, step, torch.device(device)
        self.sample_ids = [int(i) for i in sample_ids]

    def _gen(self, *key: Any) -> torch.Generator:
        h = hashlib.blake2b(repr((self.seed, self.step) + key).encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))

    def randn(self, shape: tuple[int, ...], tag: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal noise of shape (B, *shape), row i keyed by sample i."""
        rows = [torch.randn(shape, generator=self._gen(tag, i)) for i in self.sample_ids]
        return torch.stack(rows).to(self.device, dtype)

    def rand(self, tag: str) -> Tensor:
        """U[0, 1) per sample, (B,)."""
        return torch.stack([torch.rand((), generator=self._gen(tag, i)) for i in self.sample_ids]).to(self.device)

    def randint(self, low: int, high: int, tag: str) -> Tensor:
        """Integers in [low, high) per sample, (B,) int64."""
        return torch.stack(
            [torch.randint(low, high, (), generator=self._gen(tag, i)) for i in self.sample_ids]
        ).to(self.device)

    def uniform(self, low: float, high: float, tag: str) -> Tensor:
        return low + (high - low) * self.rand(tag)

    def shared_randint(self, low: int, high: int, tag: str) -> int:
        """One integer in [low, high) for the whole global batch at this step."""
        return int(torch.randint(low, high, (), generator=self._gen(tag, "shared")))


@dataclass
class Batch:
    """What a method receives at a step.

    latents: (B, C, h, w) VAE latents of real images, already multiplied by the VAE scaling factor; None for
    data-free runs. cond / uncond: the prompts' and the empty prompt's conditioning. prompts: the captions.
    rng: keyed random draws for this step and these samples.
    """

    latents: Tensor | None
    cond: Cond
    uncond: Cond
    prompts: list[str]
    rng: StepRNG

    def __len__(self) -> int:
        return len(self.cond)


@dataclass
class StepSampling:
    """How a student samples at one step count (diffusers scheduler + explicit timesteps)."""

    scheduler: str  # a diffusers scheduler class name, e.g. "LCMScheduler", "FlowMatchLCMScheduler"
    timesteps: list[Any]  # explicit timesteps, in sampling order (flow schedules: σ · T, informative)
    guidance_scale: float = 1.0  # diffusers convention; for full LCM students it feeds the guidance embedding
    scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    init_noise_scale: float = 1.0  # the initial latent is init_noise_scale * N(0, I)
    sigmas: list[float] | None = None  # flow schedules: the exact sigmas passed to the pipeline (``sigmas=``)
    eta: float | None = None  # TCDScheduler's γ, which the SD pipelines take as ``eta=`` (None: their default, 0)

    def call_kwargs(self) -> dict[str, Any]:
        """What a diffusers pipeline call takes to run these steps: ``sigmas=`` (flow) or ``timesteps=`` (VP), and
        ``eta=`` when the sampler has a γ."""
        where = {"sigmas": list(self.sigmas)} if self.sigmas is not None else {"timesteps": list(self.timesteps)}
        return where if self.eta is None else {**where, "eta": self.eta}


@dataclass
class SamplingSpec:
    """Per supported step count, how the student samples; written to ``sampling.json``."""

    steps: dict[int, StepSampling]
    default_steps: int


@dataclass
class TargetSpec:
    """A target network: a no-gradient copy of ``source`` updated by EMA with ``decay`` after each of its steps.

    ``decay=None`` means the source's own current weights, used without gradient (LCM-LoRA, TSCD-LoRA).
    """

    source: str = "student"
    decay: float | None = None


@dataclass
class OptimizerSettings:
    """Per-role optimizer overrides; None falls back to the shared config."""

    learning_rate: float | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    eps: float | None = None
    max_grad_value: float | None = None  # element-wise gradient clip (SiD's clip_grad_value_)


@dataclass(frozen=True)
class MethodSpec:
    """What a method declares before any network loads; :func:`distill_diffusion.models.build_models` and the loop
    read it, the method never wires anything itself.

    roles: trainable roles in update order. headless: roles among them that own no network (no LoRA adapter, no
    copy): their trainable tensors are the method's :meth:`Method.extra_modules` (TSCD's heads on teacher
    features). targets: target networks by name. needs_images: False for data-free methods (prompts suffice).
    checkpointing_safe: True when no gradient flows through another role's (checkpointed) forward.
    student_guidance_embedding: a full student that also embeds the guidance scale (LCM's w-conditioning), of this
    size; the family builds it where its architecture can (UNets: ``time_cond_proj_dim``). init_roles: the roles
    ``init_from`` starts from the earlier run (the student from its export, any other from its last checkpoint).
    fixed_length: the method's schedule is cut from ``max_steps`` (TSCD's stages, Phased DMD's phases), so a resume
    with another ``max_steps`` would move its boundaries under a half-trained run; the loop refuses it.
    """

    roles: tuple[str, ...] = ("student",)
    headless: tuple[str, ...] = ()
    targets: dict[str, TargetSpec] = field(default_factory=dict)
    needs_images: bool = True
    checkpointing_safe: bool = True
    student_guidance_embedding: int | None = None
    init_roles: tuple[str, ...] = ("student",)
    fixed_length: bool = False


@dataclass(frozen=True)
class RunContext:
    """The few facts of the run a method may read (never the loop's config itself)."""

    max_steps: int = 1000
    mixed_precision: str = "no"


class Method:
    """One distillation algorithm. Owns the maths; never calls backward, step or the accelerator.

    Subclasses set ``Config`` (a dataclass of the paper's defaults), declare themselves in :meth:`spec` and
    implement :meth:`loss` and :meth:`sampling`; :meth:`updates`, :meth:`resets`, :meth:`optimizer_settings`,
    :meth:`extra_modules` and :meth:`exports` are optional. Inherit only from this class; never from a concrete
    method.
    """

    Config: ClassVar[type]

    def __init__(self, cfg: Any, run: RunContext, models: Models) -> None:
        self.cfg, self.run, self.models = cfg, run, models

    @classmethod
    def spec(cls, cfg: Any, student: str) -> MethodSpec:
        """The declaration for this config and student kind ("lora" or "full")."""
        return MethodSpec()

    def updates(self, step: int) -> tuple[str, ...]:
        """Which roles update at this step (two time-scale rules live here)."""
        return self.models.roles

    def resets(self, step: int) -> tuple[str, ...]:
        """Roles to start over from the teacher before this step's updates, their optimizer state dropped (Phased
        DMD restarts its critic at each phase start). A function of the step alone, so a resumed run matches."""
        return ()

    def optimizer_settings(self, role: str) -> OptimizerSettings:
        return OptimizerSettings()

    def extra_modules(self) -> dict[str, nn.Module]:
        """Extra trainable modules per role (a GAN head belongs to the critic). Built in __init__."""
        return {}

    def loss(self, role: str, batch: Batch, step: int) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss for ``role`` at ``step`` and floats to log."""
        raise NotImplementedError

    def sampling(self) -> SamplingSpec:
        raise NotImplementedError

    def exports(self, step: int) -> dict[str, SamplingSpec]:
        """Extra students to export at ``step`` (after its updates), by folder name (TSCD's per-stage students)."""
        return {}


def masked_mean(per_sample: Tensor) -> tuple[Tensor, int]:
    """Mean of the finite entries of a (B,) loss; returns (mean, number of non-finite samples dropped).

    A non-finite sample contributes zero loss and zero gradient, so one bad sample cannot poison an update.
    """
    ok = torch.isfinite(per_sample.detach())
    dropped = int((~ok).sum())
    safe = torch.where(ok, per_sample, torch.zeros_like(per_sample))
    return safe.sum() / ok.sum().clamp(min=1), dropped
