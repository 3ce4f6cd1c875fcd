"""Two real ranks on CPU equal one process with the same global batch (a LoRA run with two adapters on one base),
and only the main process writes files."""

import os
import shutil
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


def _args(teacher: str, prompts: Path, out: Path, batch: int) -> list[str]:
    return ["--method", "sid", f"teacher={teacher}", f"data.prompts={prompts}", "max_steps=3", f"batch_size={batch}",
            f"output_dir={out}", "report_to=none", "lora_rank=2", "lora_alpha=4", "validation_seeds=0",
            "learning_rate=1e-3", "checkpointing_steps=100", "adam_epsilon=1e-2"]


@pytest.mark.slow
@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate's launcher is not installed beside this python")
def test_two_ranks_equal_one_process(tiny_teachers, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green field\n")
    two = tmp_path / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--main_process_port", str(free_port()),
                        "--mixed_precision", "no", "--dynamo_backend", "no", "train.py",
                        *_args(tiny_teachers["sd"], prompts, two, 2)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("run written to") == 1  # only the main process reports and writes
    one = tmp_path / "one"
    cfg, _ = parse_config(_args(tiny_teachers["sd"], prompts, one, 4), METHODS)
    train(cfg, METHODS["sid"])
    a = load_file(str(one / "checkpoints" / "checkpoint-3" / "trainable.safetensors"))
    b = load_file(str(two / "checkpoints" / "checkpoint-3" / "trainable.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("critic/") for k in a)
    # Tolerance: a tenth of one Adam step (lr 1e-3). The two runs sum the same per-sample gradients in a different
    # order. With Adam's default eps (and SiD's beta1 = 0) an element whose gradient is ~0 moves by +-lr on the sign
    # of its rounding error: on an AVX-512 CPU one LoRA element differed by 2.6e-3 after 3 steps. adam_epsilon=1e-2
    # makes such elements move in proportion to their gradient, so rounding stays rounding.
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3, msg=f"{k} differs between 1 and 2 ranks")
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_finished_run_destroys_its_process_group():
    """run_main destroys the process group after a finished run: left alive, gloo's threads can abort a rank at
    interpreter exit after its run is written (stop 39's CI)."""
    import torch.distributed as dist

    from distill_diffusion.loop import close_process_group

    close_process_group()  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    assert dist.is_initialized()
    close_process_group()
    assert not dist.is_initialized()


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_process_flushes_and_keeps_the_exit_code(world_size):
    """A rank of a multi-process run ends with os._exit (no interpreter finalisation for gloo's threads to abort in),
    its output flushed and its exit code kept; one process exits normally."""
    code = ("import sys; from distill_diffusion.loop import exit_process; print('written', end=''); "
            "print('note', end='', file=sys.stderr); exit_process(3)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "WORLD_SIZE": world_size}, cwd=Path(__file__).resolve().parent.parent)
    assert (r.returncode, r.stdout, r.stderr) == (3, "written", "note")
