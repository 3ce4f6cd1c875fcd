"""Typed configuration: shared fields here, one dataclass per method (in its file), YAML holds values only.

Resolution order: the dataclass defaults < the YAML file (``--config``) < ``key=value`` overrides (dotted for nested
keys, e.g. ``method.w_max=12``). Parsing and validation happen before any heavy import, and every mistake becomes a
:class:`UserError` with one line naming the key and the valid choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

LR_SCHEDULES = ("constant", "cosine", "linear")  # TrainConfig.lr_schedule; lr_factor below
LORA_MERGE_MODES = ("auto", "always", "no_grad", "off")  # TrainConfig.lora_merge; distill_diffusion.models.Models


def lr_factor(i: int, warmup: int, total: int, kind: str = "constant", decay_steps: int | None = None) -> float:
    """The learning rate of iteration ``i`` (0-based) as a fraction of the base rate: a linear warm-up over
    ``warmup`` iterations ((i + 1) / warmup), then constant, or a cosine (0.5 (1 + cos(pi p))) or linear (1 - p) decay
    with p = (i + 1 - start) / (total - start + 1), which reaches 1 one iteration past the run's last (``total``
    iterations), so the last update still moves. The decay starts at the warm-up's end, or with ``decay_steps`` at
    ``total - decay_steps`` (warmup-stable-decay: constant until then, so a longer run's checkpoint from before the
    decay is the shorter run's, and a constant run's checkpoint can be annealed by resuming it). A decay is meant to
    end a run settled rather than wherever a constant rate leaves it (issue 21's seed spread; the README's SiD
    section and docs/scm-experiments.md have the measurements)."""
    w = max(warmup, 1)
    if i + 1 < w or kind == "constant":
        return min(1.0, (i + 1) / w)
    start = w if decay_steps is None else max(w, total - decay_steps)
    p = min(1.0, max(0, i + 1 - start) / max(total - start + 1, 1))
    return 0.5 * (1.0 + math.cos(math.pi * p)) if kind == "cosine" else 1.0 - p


@dataclass
class DataConfig:
    images: str | None = None  # a folder of images with same-name .txt captions
    # webdataset tar shards: a path or URL pattern with {000..099} / {a,b} groups, several joined by "::"
    webdataset: str | None = None
    dataset: str | None = None  # a `datasets` dataset saved with save_to_disk (or a hub name where there is network)
    image_column: str = "image"
    caption_column: str = "text"
    prompts: str | None = None  # a text file, one prompt a line (data-free methods)
    fashion_mnist: str | None = None  # folder of the Fashion-MNIST IDX files; default: Debian's or torchvision's
    empty_prompt_prob: float = 0.0  # share of captions replaced by "" (keyed per sample)
    center_crop: bool = True
    check_images: bool = True  # data.images: open every file's header at start (a broken image fails now)
    num_workers: int = 0  # DataLoader worker processes decoding batches ahead of the step (same batches, same order)
    prefetch: int = 2  # batches each worker holds ready
    # Prompt conditioning: kept on the CPU in an LRU cache of at most this many MiB (SDXL: 630 KB a prompt, T5-XXL
    # teachers several MB), encoded text_encode_batch prompts at a time (padded with "" to that size; 1 keeps the
    # embeddings of runs made before the option), and read from / written to text_cache_dir when set (fill it once
    # with python -m distill_diffusion.precompute).
    prompt_cache_mb: int = 2048
    text_encode_batch: int = 1
    text_cache_dir: str | None = None
    # The VAE posterior of each training image on disk (filled by precompute, or as images are first drawn); a run
    # that reads it decodes no image and runs no VAE encoder for those.
    latent_cache_dir: str | None = None


@dataclass
class TrainConfig:
    method_name: str = "lcm"  # set by --method; a YAML written for one method names it here
    teacher: str = "embedded"  # a diffusers pipeline folder or hub id; "embedded" = the shipped Fashion-MNIST teacher
    student: str = "lora"  # "lora" (adapters on the teacher's UNet) or "full" (a trainable copy)
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: list[str] | None = None  # None: diffusers' LCM-LoRA reference list
    init_from: str | None = None  # an earlier run folder whose student starts this one (staged recipes)
    resolution: int | None = None  # None: the teacher's native size
    # Text tokens of a flow teacher's T5 / Gemma slot (SD3, FLUX, SANA): None = the pipeline's default (SD3 256,
    # FLUX 512, SANA 300) or what the teacher folder records (the embedded flow teacher: 0). Exported students
    # record it in sampling.json; a plain pipeline call then passes it as max_sequence_length.
    max_sequence_length: int | None = None
    max_steps: int = 1000
    batch_size: int = 8  # per process
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 0
    # After the warm-up: constant, or cosine / linear decay to 0 at max_steps (diffusers' --lr_scheduler names)
    lr_schedule: str = "constant"
    # cosine / linear: decay over the last this many steps only, constant before (warmup-stable-decay); null: from
    # the warm-up's end. Lets a resumed constant run anneal: resume=<its checkpoint> max_steps=<later> lr_decay_steps=..
    lr_decay_steps: int | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    output_dir: str | None = None  # None: runs/<method>, e.g. runs/lcm
    seed: int = 0
    # An EMA of the student (e.g. 0.999), exported as the run's student; None: the raw student
    ema_decay: float | None = None
    mixed_precision: str = "no"  # no | fp16 | bf16
    # FSDP2 for student=full: shard every role's network, EMA copy and extra module across the processes (null: when
    # accelerate is launched with an FSDP config, e.g. configs/accelerate/fsdp_8gpu.yaml); LoRA students stay
    # replicated. fsdp_shard_teacher: shard the frozen teacher network too (its forwards then all-gather it).
    fsdp: bool | None = None
    fsdp_shard_teacher: bool = False
    gradient_checkpointing: bool = False
    # torch.compile every UNet a step runs (the shared base with its adapters, full copies); compiles on the first
    # steps; a failure to compile prints one warning line and training continues eagerly. BENCHMARKS.md: its effect.
    compile: bool = False
    channels_last: bool = False  # channels-last memory format for the UNets' weights and the latents fed to them
    # LoRA students: how an adapter's forwards run. no_grad: forwards without gradient (EMA targets, a critic read
    # under torch.no_grad) run plain layers on W + s·B·A, merged layer by layer (no peft wrappers, no extra memory);
    # always: forwards with gradient too (their backward takes the adapters' gradients through the factors, without a
    # full-size weight gradient or a merged copy, except under autocast; not with gradient_checkpointing); off:
    # peft's wrappers everywhere; auto: always on a CPU, no_grad on an accelerator (always there is unmeasured).
    # A float32 base only (half-precision bases run peft's). Same maths, rounded in another order
    # (distill_diffusion.lora_merge; BENCHMARKS.md: its effect).
    lora_merge: str = "auto"
    # Keep freed memory in the process for reuse (glibc's allocator: no re-mapping and re-zeroing of multi-MB
    # activations on every op; a resident set that does not shrink after a peak). Same results, bit for bit
    # (distill_diffusion.memory.retain_freed_memory; BENCHMARKS.md: its effect). false: the C library's policy.
    retain_freed_memory: bool = True
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 2
    resume: str | None = None  # "latest" or a checkpoint folder
    validation_steps: int = 0  # 0: only at the end
    # Validation grid: prompts, and the guidance of its teacher row (25 DDIM steps). configs/teachers/<name>.yaml
    # sets them for a named teacher (the embedded one).
    validation_prompts: list[str] = field(default_factory=lambda: [
        "a photo of a cat", "a red car on a street", "a bowl of fruit", "a mountain landscape"])
    validation_guidance: float = 7.5
    validation_seeds: int = 4  # images per prompt in the validation grid; 0: no grid (the run folder is written)
    logging_steps: int = 10
    report_to: str = "tensorboard"  # tensorboard | none
    hub_model_id: str | None = None  # push the finished run's card, student(s) and sampling settings to this Hub repo
    hub_private: bool = False
    max_nonfinite_steps: int = 20  # stop after this many skipped (non-finite) updates in a row
    # fp16: a non-finite update lowers the loss scale (GradScaler) and counts toward max_nonfinite_steps only once
    # the scale is at or below this value
    min_loss_scale: float = 1.0
    allow_overwrite: bool = False  # allow output_dir to hold a finished run that this one replaces
    export_initial: bool = False  # write the student as initialised, without a training step: the untrained row
    # write checkpoint PATH's student (its EMA with ema_decay) as the run folder output_dir, without a training step:
    # scoring a run's every checkpoint, whatever its method's schedule or the learning rate's
    export_checkpoint: str | None = None
    # with export_checkpoint: the uniform average of the tensors of this many checkpoints of its folder, ending at it
    # (stochastic weight averaging: a constant-rate run's score wanders between checkpoints; README, sCM)
    export_average: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    method: Any = None  # the method's own dataclass


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SHARED_KEYS = [f.name for f in dataclasses.fields(TrainConfig)]


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split("\n")[0].split())


def parse_config(argv: list[str], registry: dict[str, type]) -> Any:
    """Parse ``train.py`` arguments into a validated OmegaConf config (struct mode, typed).

    argv: ``[--method NAME] [--config FILE] [--print-config] [key=value ...]``.
    Returns ``(cfg, print_only)``.
    """
    args = _arguments(argv, registry)
    file_values = _read_file(args.config)
    name = _method_name(args, file_values, registry)
    cfg = _merge(args, file_values, name, registry[name].Config())
    if not cfg.output_dir:
        cfg.output_dir = f"runs/{name}"
    if cfg.mixed_precision in ("False", "false"):  # YAML reads a bare `no` (accelerate's word) as false
        cfg.mixed_precision = "no"
    if cfg.lora_merge in ("False", "false"):  # and a bare `off` as false
        cfg.lora_merge = "off"
    validate(cfg)
    return cfg, args.print_config


def _arguments(argv: list[str], registry: dict[str, type]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="train.py", add_help=True,
                                 description="Distill a diffusers teacher into a few-step student.")
    ap.add_argument("--method", help=f"one of: {', '.join(registry)}")
    ap.add_argument("--config", help="a YAML file of values (configs/<method>/<name>.yaml)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys")
    args, unknown = ap.parse_known_args(argv)
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r}; overrides are key=value without dashes (see --help)")
    for ov in args.overrides:
        if "=" not in ov:
            raise UserError(f"override {ov!r} is not key=value (e.g. max_steps=100)")
    return args


def _read_file(path: str | None) -> dict[str, Any]:
    """The values of ``--config`` (empty without one)."""
    from omegaconf import OmegaConf

    if not path:
        return {}
    if not Path(path).is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:
        raise UserError(f"--config {path}: not valid YAML ({_one_line(e)})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"--config {path}: expected a mapping of keys to values")
    return loaded  # type: ignore[return-value]


def _method_name(args: argparse.Namespace, file_values: dict[str, Any], registry: dict[str, type]) -> str:
    file_method = file_values.get("method_name")
    name = args.method or file_method or "lcm"
    if name not in registry:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(registry)}")
    if file_method and file_method != name:
        raise UserError(f"--config {args.config} is written for method {file_method!r}, not {name!r}; "
                        f"use --method {file_method} or a file under configs/{name}/")
    for ov in args.overrides:
        if ov.split("=", 1)[0] == "method_name" and ov.split("=", 1)[1] != name:
            raise UserError("choose the method with --method, not method_name=")
    return name


def _default_files(args: argparse.Namespace, file_values: dict[str, Any], name: str) -> list[Path]:
    """The teacher's own values (configs/teachers/<name>.yaml: validation prompts and guidance), then, with no
    --config, the method's values tuned for the embedded teacher (configs/<method>/default.yaml). The dataclass
    defaults stay the paper's."""
    from .models import embedded_teacher_name

    teacher = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("teacher=")), None)
    teacher = teacher or file_values.get("teacher") or "embedded"
    embedded = embedded_teacher_name(teacher)  # also a shipped teacher's folder given as a path
    files = []
    if embedded is not None:
        files.append(CONFIG_DIR / "teachers" / f"{embedded}.yaml")
    elif teacher.replace("-", "_").isidentifier():  # a name, never a path or hub id
        files.append(CONFIG_DIR / "teachers" / f"{teacher}.yaml")
    if not args.config and embedded is not None:
        files.append(CONFIG_DIR / name / ("default.yaml" if embedded == "embedded" else "flow_default.yaml"))
    return [f for f in files if f.is_file()]


def _merge(args: argparse.Namespace, file_values: dict[str, Any], name: str, method_cfg: Any) -> Any:
    """dataclass defaults < default files < --config < key=value overrides, each error one line."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.structured(TrainConfig(method_name=name, method=method_cfg))
    for f in _default_files(args, file_values, name):
        values = OmegaConf.to_container(OmegaConf.load(f))
        cfg = OmegaConf.merge(cfg, {k: v for k, v in values.items() if k != "method_name"})
    try:
        cfg = OmegaConf.merge(cfg, file_values)
    except OmegaConfBaseException as e:
        raise UserError(f"--config {args.config}: {_describe(e, name)}") from None
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist(args.overrides))
    except OmegaConfBaseException as e:
        raise UserError(_describe(e, name)) from None
    except ValueError as e:
        raise UserError(f"bad override: {_one_line(e)}") from None


def _describe(e: Exception, method: str) -> str:
    """One line for an OmegaConf error: the key, and the valid choices where it is a misspelling."""
    key = getattr(e, "full_key", None) or ""
    msg = getattr(e, "msg", None) or _one_line(e)
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        if parent == "method":
            return f"unknown key {key!r} for method {method!r}; its keys: {', '.join(_method_keys(e))}"
        if parent == "data":
            return f"unknown key {key!r}; data keys: {', '.join(f.name for f in dataclasses.fields(DataConfig))}"
        close = _closest(key, SHARED_KEYS)
        hint = f" (did you mean {close!r}?)" if close else ""
        return f"unknown key {key!r}{hint}; run `python train.py --method {method} --print-config` for all keys"
    if "Value '" in msg or "could not be converted" in msg or "Invalid type" in msg:
        return f"wrong type for {key!r}: {_one_line(Exception(msg))}"
    return f"{key + ': ' if key else ''}{_one_line(Exception(msg))}"


def _method_keys(e: Exception) -> list[str]:
    obj = getattr(e, "parent_node", None) or getattr(e, "object_type", None)
    try:
        return list(obj.keys())  # type: ignore[union-attr]
    except Exception:
        return []


def _closest(key: str, choices: list[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(key, choices, n=1, cutoff=0.75)
    return m[0] if m else None


def validate(cfg: Any) -> None:
    """Range checks the types cannot express; each failure is one line."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise UserError(msg)

    need(cfg.student in ("lora", "full"), f"student={cfg.student!r}: choose 'lora' or 'full'")
    need(cfg.ema_decay is None or 0 < cfg.ema_decay < 1, f"ema_decay={cfg.ema_decay}: must be in (0, 1), or null")
    need(cfg.lr_schedule in LR_SCHEDULES, f"lr_schedule={cfg.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
    need(cfg.max_steps > 0, f"max_steps={cfg.max_steps}: must be at least 1")
    need(not (cfg.export_checkpoint and cfg.export_initial), "export_checkpoint writes a checkpoint, export_initial "
         "the untrained student: choose one")
    need(cfg.export_average >= 1, f"export_average={cfg.export_average}: must be at least 1 (1: no average)")
    need(cfg.export_average == 1 or cfg.export_checkpoint, f"export_average={cfg.export_average}: averages the "
         "checkpoints ending at export_checkpoint=<checkpoint>; set it")
    need(cfg.lr_decay_steps is None or cfg.lr_schedule != "constant", f"lr_decay_steps={cfg.lr_decay_steps}: "
         "applies to a decaying lr_schedule (cosine or linear); set one, or lr_decay_steps=null")
    need(cfg.lr_decay_steps is None or 0 < cfg.lr_decay_steps <= cfg.max_steps,
         f"lr_decay_steps={cfg.lr_decay_steps}: must be between 1 and max_steps ({cfg.max_steps}), or null")
    need(cfg.batch_size > 0, f"batch_size={cfg.batch_size}: must be at least 1")
    need(cfg.data.num_workers >= 0, f"data.num_workers={cfg.data.num_workers}: must be 0 (decode in the training "
         "process) or more")
    need(cfg.data.prefetch >= 1, f"data.prefetch={cfg.data.prefetch}: must be at least 1")
    need(cfg.data.prompt_cache_mb >= 0, f"data.prompt_cache_mb={cfg.data.prompt_cache_mb}: must be 0 or more")
    need(cfg.data.text_encode_batch >= 1, f"data.text_encode_batch={cfg.data.text_encode_batch}: must be at least 1")
    need(cfg.gradient_accumulation_steps > 0, "gradient_accumulation_steps must be at least 1")
    need(cfg.lora_rank > 0, f"lora_rank={cfg.lora_rank}: must be at least 1")
    need(cfg.lora_alpha > 0, f"lora_alpha={cfg.lora_alpha}: must be positive")
    need(cfg.learning_rate > 0, f"learning_rate={cfg.learning_rate}: must be positive")
    need(cfg.mixed_precision in ("no", "fp16", "bf16"), f"mixed_precision={cfg.mixed_precision!r}: no, fp16 or bf16")
    need(cfg.lora_merge in LORA_MERGE_MODES, f"lora_merge={cfg.lora_merge!r}: {', '.join(LORA_MERGE_MODES)}")
    need(cfg.checkpointing_steps > 0, "checkpointing_steps must be at least 1")
    need(cfg.checkpoints_total_limit is None or cfg.checkpoints_total_limit > 0,
         "checkpoints_total_limit must be at least 1 (or null for no limit)")
    need(cfg.validation_steps >= 0, "validation_steps must be 0 (end only) or positive")
    need(cfg.validation_seeds >= 0, "validation_seeds must be 0 (no validation grid) or positive")
    need(cfg.hub_model_id is None or cfg.hub_model_id.count("/") == 1,
         f"hub_model_id={cfg.hub_model_id!r}: give a Hub repo id, user/name or org/name")
    need(cfg.report_to in ("tensorboard", "none"), f"report_to={cfg.report_to!r}: tensorboard or none")
    need(0.0 <= cfg.data.empty_prompt_prob <= 1.0, "data.empty_prompt_prob must be in [0, 1]")
    need(cfg.resolution is None or cfg.resolution > 0, "resolution must be positive")
    check = getattr(method_object(cfg), "check", None)  # a method's own range checks raise UserError
    if check is not None:
        check()


def to_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg)


def method_object(cfg: Any) -> Any:
    """The method's dataclass instance (with its methods, e.g. ``validate``) from the OmegaConf node."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg.method)
