"""Export a run's student to the tools people generate with.

    python -m distill_diffusion.export RUN --format diffusers|kohya|merged [--out DIR] [--dtype float16]

- ``diffusers``: the student as the run holds it (a peft / diffusers LoRA file with its adapter metadata, or a full
  pipeline), with ``sampling.json`` and the model card: a copy of the run folder's student part.
- ``kohya``: one LoRA ``.safetensors`` for ComfyUI / A1111 / kohya's tools. UNet families (SD1.x / SD2.x / SDXL):
  ``lora_unet_<module with underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, the module names in
  diffusers spelling, which ComfyUI (``comfy/lora.py``'s ``model_lora_keys_unet``), A1111 and diffusers' kohya
  reader all map. Flow transformers (SD3, FLUX, SANA): ComfyUI's diffusers layout, ``transformer.<module>.lora_A``
  / ``lora_B`` with an ``.alpha`` per module, because ComfyUI ignores the safetensors metadata where diffusers keeps
  ``lora_alpha``. Each ``.alpha`` is the run's real one (rank × the LoRA's scale), unlike diffusers'
  ``convert_state_dict_to_kohya``, which writes alpha = rank whatever ``lora_alpha`` was.
- ``merged``: the LoRA fused into the base weights, written as a run folder with a full student (``pipeline/``, a
  diffusers pipeline with the default step count's scheduler, and ``sampling.json``), which ``load_student``,
  ``python -m eval`` and the app read like any run; plus ``<denoiser>.safetensors``, the network alone in one file
  (diffusers keys, which ComfyUI's "Load Diffusion Model" node detects).

The exported file's sampling settings (scheduler, timesteps, guidance, initial-noise scale) are in ``sampling.json``
and the model card: a distilled student sampled with the teacher's scheduler gives poor images.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from . import artifacts
from .errors import UserError
from .families import family_for

FORMATS = ("diffusers", "kohya", "merged")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- the LoRA file and its scales -------------------------------------------------------------------------------


def read_lora(run_dir: str | Path, info: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict with the denoiser prefix, e.g. ``unet.<module>.lora_A.weight``; the peft config of the
    denoiser's adapter, read from the file's own ``lora_adapter_metadata``)."""
    from safetensors import safe_open

    f = Path(run_dir) / info.get("student_dir", "student") / artifacts.LORA_FILE
    with safe_open(str(f), "pt") as fh:
        state = {k: fh.get_tensor(k) for k in fh.keys()}
        raw = json.loads((fh.metadata() or {}).get("lora_adapter_metadata", "{}"))
    prefix = family_for(info["pipeline"]).denoiser + "."
    meta = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    if not meta:  # files written before the metadata was kept: the run's recorded LoRA config
        meta = dict(info.get("lora") or {})
    if "lora_alpha" not in meta or "r" not in meta:
        raise UserError(f"{f}: no LoRA alpha / rank in the file or sampling.json; re-export the run")
    return state, meta


def _pattern_value(module: str, pattern: dict[str, Any], default: Any) -> Any:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a module name ending in it."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scale(module: str, rank: int, meta: dict[str, Any]) -> float:
    """The factor peft multiplies ``B @ A`` by for ``module``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    alpha = float(_pattern_value(module, meta.get("alpha_pattern") or {}, meta["lora_alpha"]))
    return alpha / (rank ** 0.5 if meta.get("use_rslora") else rank)


def lora_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{prefixed module name: (A [r, in, ...], B [out, r, ...])}`` of a peft-format state dict."""
    out: dict[str, list[torch.Tensor | None]] = {}
    for k, v in state.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", k)
        if m is None:
            raise UserError(f"unexpected key {k!r} in the LoRA file (only lora_A / lora_B weights are exported)")
        out.setdefault(m.group(1), [None, None])[m.group(2) == "B"] = v
    missing = [k for k, (a, b) in out.items() if a is None or b is None]
    if missing:
        raise UserError(f"the LoRA file lacks lora_A or lora_B of {missing[0]}; re-export the run")
    return {k: (a, b) for k, (a, b) in out.items()}  # type: ignore[misc]


def to_kohya(state: dict[str, torch.Tensor], meta: dict[str, Any], denoiser: str) -> dict[str, torch.Tensor]:
    """The LoRA in the layout ComfyUI / A1111 / kohya read, with each module's real alpha (module docstring)."""
    out = {}
    for name, (a, b) in lora_modules(state).items():
        module = name[len(denoiser) + 1:]
        alpha = torch.tensor(lora_scale(module, a.shape[0], meta) * a.shape[0], dtype=torch.float32)
        if denoiser == "unet":
            key = "lora_unet_" + module.replace(".", "_")
            out |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": alpha}
        else:
            out |= {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b, f"{name}.alpha": alpha}
    return {k: v.contiguous() for k, v in out.items()}


# ---- the three formats -------------------------------------------------------------------------------------------


def _metadata(info: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, str]:
    """safetensors metadata: kohya's ``ss_`` keys the UIs show, and the sampling settings the student needs."""
    md = {"distill_diffusion_method": info["method"], "distill_diffusion_teacher": str(info["teacher"]),
          "distill_diffusion_sampling": json.dumps({"default_steps": info["default_steps"], "steps": info["steps"]})}
    if meta is not None:
        md |= {"ss_network_module": "networks.lora", "ss_network_dim": str(meta["r"]),
               "ss_network_alpha": str(meta["lora_alpha"])}
    return md


def export_kohya(run_dir: Path, info: dict[str, Any], out: Path, dtype: torch.dtype) -> list[Path]:
    from safetensors.torch import save_file

    state, meta = read_lora(run_dir, info)
    kohya = to_kohya(state, meta, family_for(info["pipeline"]).denoiser)
    kohya = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in kohya.items()}
    f = out / f"{run_dir.name}_{info['method']}_lora.safetensors"
    save_file(kohya, str(f), metadata=_metadata(info, meta))
    return [f]


def export_diffusers(run_dir: Path, info: dict[str, Any], out: Path, dtype: torch.dtype) -> list[Path]:
    if dtype != torch.float32:
        raise UserError("--format diffusers copies the run's float32 files; --dtype applies to kohya and merged")
    shutil.copytree(run_dir / info.get("student_dir", "student"), out / "student")
    for name in (artifacts.SAMPLING_FILE, "README.md", "config.yaml", "run_info.json"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / name)
    return [out / "student", out / artifacts.SAMPLING_FILE]


def export_merged(run_dir: Path, info: dict[str, Any], out: Path, dtype: torch.dtype) -> list[Path]:
    """The student with its LoRA fused, as a run folder with a full student and the network in one file."""
    from safetensors.torch import save_file

    pipe = artifacts.load_student(run_dir, fuse=True, dtype=dtype)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    denoiser = family_for(info["pipeline"]).denoiser
    net = getattr(pipe, denoiser)
    single = out / f"{run_dir.name}_{info['method']}_{denoiser}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(single), metadata=_metadata(info))
    merged = dict(info, student="full", student_dir="pipeline", lora=None, merged_from=str(run_dir))
    (out / artifacts.SAMPLING_FILE).write_text(json.dumps(merged, indent=2))
    (out / "README.md").write_text(artifacts.model_card(merged, out))
    return [out / "pipeline", single, out / artifacts.SAMPLING_FILE]


EXPORTERS = {"diffusers": export_diffusers, "kohya": export_kohya, "merged": export_merged}


def export(run_dir: str | Path, fmt: str, out: str | Path | None = None, dtype: str = "float32") -> list[Path]:
    """Write ``run_dir``'s student in ``fmt`` to ``out`` (default ``RUN/export/FMT``); returns the written paths.

    ``out`` must not exist or be empty: nothing already there is overwritten, and the folder appears whole (written
    beside it and renamed) or not at all."""
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    artifacts.check_run(run_dir)  # a finished export, before anything loads
    info = json.loads((run_dir / artifacts.SAMPLING_FILE).read_text())  # as written: step counts as strings
    if fmt == "kohya" and info.get("student") != "lora":
        raise UserError(f"{run_dir} holds a full student, which has no LoRA to convert; use --format merged "
                        "(one safetensors file of the network) or diffusers")
    out = Path(out) if out is not None else run_dir / "export" / fmt
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; give another --out or remove it")
    with artifacts.atomic_dir(out) as tmp:
        written = EXPORTERS[fmt](run_dir, info, tmp, DTYPES[dtype])
    return [out / p.relative_to(tmp) for p in written]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m distill_diffusion.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a finished run folder (output_dir of train.py)")
    ap.add_argument("--format", default=None, help=" / ".join(FORMATS))
    ap.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                    help="upload the run's card, student(s), sampling settings and kohya file (after --format "
                         "kohya) to this Hub model repo")
    ap.add_argument("--private", action="store_true", help="create the Hub repo private")
    ap.add_argument("--out", default=None, help="the folder to write (default RUN/export/FORMAT); must not exist")
    ap.add_argument("--dtype", default="float32",
                    help=f"{' / '.join(DTYPES)}: weights' dtype in kohya / merged files (float16 halves their size)")
    a = ap.parse_args(argv)
    try:
        if a.format is None and a.push_to_hub is None:
            raise UserError("give --format diffusers|kohya|merged, --push-to-hub REPO_ID, or both")
        for p in export(a.run, a.format, a.out, a.dtype) if a.format else []:
            print(f"wrote {p}")
        if a.push_to_hub:
            print(f"pushed to {a.push_to_hub}: {artifacts.push_to_hub(a.run, a.push_to_hub, a.private)}")
    except UserError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
