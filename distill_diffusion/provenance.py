"""Where a figure was made: the CPU, the thread count and the library versions, recorded in every run folder
(``run_info.json``) and every eval report, so a number can be traced to its machine (CPUs here differ by 6x)."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from typing import Any

PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "clean-fid", "torchmetrics", "numpy", "scipy",
            "distill-diffusion")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def versions() -> dict[str, str]:
    """Python, the platform and each package's installed version ("not installed" when absent)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine() -> dict[str, Any]:
    """The CPU, its logical CPU count and the torch threads of this process."""
    import torch

    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def command_line(prog: str, argv: list[str] | None = None) -> str:
    """The command as a shell would take it back: ``prog`` and each argument shell-quoted (``argv`` None: this
    process's ``sys.argv[1:]``), so a recorded list override such as ``lora_targets=[a,b]`` pastes back as it ran."""
    import shlex
    import sys

    return " ".join([prog, *(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))])


def git_state(tree: Any, rev: str = "HEAD") -> tuple[str | None, bool | None]:
    """(the full commit ``rev`` names in the git checkout ``tree``, whether that checkout has uncommitted changes to
    tracked files); (None, None) where git cannot answer."""
    git = ["git", "-C", str(tree)]
    try:
        sha = subprocess.run([*git, "rev-parse", rev], capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return sha, bool(status)
