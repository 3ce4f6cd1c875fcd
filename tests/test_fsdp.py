"""FSDP2 on CPU with two real ranks (gloo), launched like a user launches eight GPUs: ``accelerate launch
--config_file configs/accelerate/fsdp_cpu_2proc.yaml``, the twin of fsdp_8gpu.yaml.

For every registered method with ``student=full``: the sharded 2-rank run reaches the parameters of a 1-process run
with the same global batch, and a 2-rank run killed with SIGKILL and resumed from its sharded checkpoint ends where
an uninterrupted one does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill_diffusion.config import parse_config
from distill_diffusion.loop import train
from methods import METHODS
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).with_name("accelerate")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate's launcher is not beside this python")]


def _args(name: str, teacher: str, images: str, out: Path, batch: int, steps: int = 4, *extra: str) -> list[str]:
    return ["--method", name, f"teacher={teacher}", f"data.images={images}", f"max_steps={steps}",
            f"batch_size={batch}", f"output_dir={out}", "report_to=none", "student=full", "validation_seeds=0",
            "learning_rate=1e-3", "checkpointing_steps=2", "adam_epsilon=1e-2", *extra]


def _launch(script: list[str], args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(ACCELERATE), "launch", "--config_file", "configs/accelerate/fsdp_cpu_2proc.yaml",
                           "--main_process_port", str(free_port()),
                           *script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _sharded_state(run: Path, step: int) -> dict[str, torch.Tensor]:
    """A sharded checkpoint's networks and extra modules, gathered into one file, keyed like trainable.safetensors
    (``<role>/<name>``, ``extra/<role>/<key>``)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = run / "checkpoints" / f"checkpoint-{step}"
    assert (folder / "sharded").is_dir() and not (folder / "trainable.safetensors").exists()
    dcp_to_torch_save(str(folder / "sharded"), str(run / "gathered.pt"))
    model = torch.load(run / "gathered.pt", weights_only=False)["model"]
    out = {}
    for k, v in model.items():
        head, rest = k.split(".", 1)
        out[f"extra/{head[len('extra_'):]}/{rest}" if head.startswith("extra_") else f"{head}/{rest}"] = v
    return out


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fsdp_two_ranks_equal_one_process(name, tiny_teachers, image_folder, tmp_path):
    two = tmp_path / "two"
    r = _launch(["train.py"], _args(name, tiny_teachers["sd"], image_folder, two, 2))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fsdp: sharded student" in r.stdout and r.stdout.count("run written to") == 1
    one = tmp_path / "one"
    cfg, _ = parse_config(_args(name, tiny_teachers["sd"], image_folder, one, 4), METHODS)
    train(cfg, METHODS[name])
    a = load_file(str(one / "checkpoints" / "checkpoint-4" / "trainable.safetensors"))
    b = _sharded_state(two, 4)
    assert a.keys() == b.keys()
    # Same tolerance and Adam epsilon as the replicated 2-rank test (test_distributed.py): the two runs sum the same
    # per-sample gradients in a different order.
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3, msg=f"{name}: {k} differs between 1 and 2 ranks")
    # The memory planner's per-GPU figures are what the sharded main process counted (memory.json), byte for byte.
    from distill_diffusion.plan import plan

    args = _args(name, tiny_teachers["sd"], image_folder, two, 2)
    planned = plan(name, overrides=args[2:], gpus=2, fsdp=True).to_json()["per_gpu"]
    counted = json.loads((two / "memory.json").read_text())
    assert {k: counted[k] for k in planned} == planned
    # The exported student was gathered from the shards: the same weights as the checkpoint's.
    student = load_file(str(two / "student" / "unet" / "diffusion_pytorch_model.safetensors"))
    role = "student_ema" if any(k.startswith("student_ema/") for k in b) else "student"
    assert all(torch.equal(student[k], b[f"{role}/{k}"]) for k in student)


EMA = ("ema_decay=0.9", "method.student_update_every=2")


def test_fsdp_sigkill_then_resume(tiny_teachers, image_folder, tmp_path):
    """Killed at step 3 (after checkpoint-2), resumed with resume=latest on two ranks: the same final shards as an
    uninterrupted 2-rank run, bit for bit, with a sharded EMA copy exported as the student."""
    out, ref = tmp_path / "run", tmp_path / "ref"
    r = _launch(["tests/crash_run.py", "3"], _args("dmd2", tiny_teachers["sd"], image_folder, out, 2, 5,
                                                   *EMA))
    assert r.returncode != 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".")) == ["checkpoint-2"]
    r = _launch(["train.py"], _args("dmd2", tiny_teachers["sd"], image_folder, out, 2, 5, *EMA, "resume=latest"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "checkpoint-2" in r.stdout
    assert _launch(["train.py"], _args("dmd2", tiny_teachers["sd"], image_folder, ref, 2, 5,
                                       *EMA)).returncode == 0
    a, b = _sharded_state(ref, 5), _sharded_state(out, 5)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    student = load_file(str(out / "student" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(student[k], b[f"student_ema/{k}"]) for k in student)
    assert not all(torch.equal(student[k], b[f"student/{k}"]) for k in student)
