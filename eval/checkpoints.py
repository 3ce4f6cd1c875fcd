"""Checkpoint folders in ``python -m eval --runs``: scoring every checkpoint of a run without exporting each by hand.

A run's score wanders between its checkpoints (the README's sCM section), so which checkpoint to keep is an eval
question. ``--runs runs/X/checkpoints/checkpoint-2500`` exports that checkpoint once with train.py's
``export_checkpoint`` (no training step; the run is untouched) into ``<cache>/checkpoints/<key>/X_at2500`` and scores
that folder like any run, as row ``X_at2500``. The key follows the checkpoint's path and its files' sizes and times,
so a checkpoint rewritten in place (a resumed run) is exported again. With ``--no-cache`` the export goes to a
temporary folder. A sharded (FSDP) checkpoint is refused by the one-process export (one line from train.py).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from distill_diffusion.checkpoints import is_named, step_of
from distill_diffusion.errors import UserError

TRAIN = Path(__file__).resolve().parent.parent / "train.py"


def is_checkpoint(path: str | Path) -> bool:
    """A checkpoint folder train.py wrote (``<run>/checkpoints/checkpoint-<step>``), not a run folder."""
    p = Path(path)
    return p.parent.name == "checkpoints" and is_named(p) and (p / "state.json").is_file()


def as_run(path: str | Path, cache_dir: Path | None) -> str:
    """The run folder that holds checkpoint ``path``'s student, exported on first use; UserError if it cannot be."""
    ck = Path(path).resolve()
    run = ck.parent.parent
    if not (run / "config.yaml").is_file():
        raise UserError(f"{path}: checkpoint of a run folder without config.yaml; export it with train.py "
                        "export_checkpoint=... and pass that folder")
    files = [f for f in sorted(ck.rglob("*")) if f.is_file()]
    stamp = "".join(f"{f.relative_to(ck)}:{f.stat().st_size}:{f.stat().st_mtime_ns};" for f in files)
    key = hashlib.sha1(f"{ck}|{stamp}".encode()).hexdigest()[:12]
    root = cache_dir / "checkpoints" / key if cache_dir else Path(tempfile.mkdtemp(prefix="eval-checkpoint-"))
    out = root / f"{run.name}_at{step_of(ck)}"
    if (out / "sampling.json").is_file():
        return str(out)
    cmd = [sys.executable, str(TRAIN), "--config", str(run / "config.yaml"), f"export_checkpoint={ck}",
           f"output_dir={out}", "validation_seeds=0", "report_to=none", "allow_overwrite=true"]
    print(f"exporting {path} to {out}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{path}: its export failed ({last})")
    return str(out)
