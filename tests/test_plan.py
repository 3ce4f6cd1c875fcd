"""The memory planner: its counted figures equal a real run's memory.json, byte for byte; its per-GPU figures follow
the FSDP2 sharding rules; its meta-device teachers match loaded ones; bad input is one line and exit code 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill_diffusion import plan
from methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("trainable_bytes", "frozen_bytes", "gradient_bytes_peak", "optimizer_state_bytes", "total_counted_bytes")


def _train(method: str, overrides: list[str], out: Path) -> dict:
    """A real short run in this process; its memory.json. Mixed precision needs a fresh accelerate state."""
    from accelerate.state import AcceleratorState

    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train

    args = ["--method", method, "max_steps=1", "batch_size=1", "report_to=none", "validation_seeds=0",
            f"output_dir={out}", *overrides]
    AcceleratorState._reset_state(True)
    try:
        train(parse_config(args, METHODS)[0], METHODS[method])
    finally:
        AcceleratorState._reset_state(True)
    return json.loads((out / "memory.json").read_text())


# Every role updates at step 0 (DMD2's generator every step here), so every optimizer holds its state, as the
# planner assumes (the steady state of a run).
RUNS = [
    ("lcm", ["teacher=embedded", "student=lora"]),
    ("dmd2", ["teacher=embedded", "student=full", "method.student_update_every=1"]),
    ("sid", ["teacher=embedded", "student=full", "ema_decay=0.9"]),
    ("scm", ["teacher=embedded-flow", "student=lora"]),
    ("dmd2", ["teacher=embedded-flow", "student=lora", "method.student_update_every=1"]),
    # lora_merge=off: on a CPU a bf16 LoRA run otherwise keeps its base float32 (models.frozen_dtype); the planner
    # plans for an accelerator, where the base is bf16, and this case checks that count
    ("tscd", ["teacher=embedded", "student=lora", "method.adversarial=true", "mixed_precision=bf16", "max_steps=4",
              "lora_merge=off"]),
    ("lcm", ["teacher=embedded", "student=full", "mixed_precision=fp16"]),
]


@pytest.mark.slow  # a real run each (a few seconds); the default set checks the planner offline
@pytest.mark.parametrize("i", [pytest.param(i, id=f"{m}-{'-'.join(o)}") for i, (m, o) in enumerate(RUNS)])
def test_counted_figures_equal_the_runs_memory_json(i, tmp_path):
    """The planner builds the run on the meta device through the library's own code: its counted figures are the
    memory.json of a real run, exactly (trainable per role, frozen, gradient peak, optimizer states, total)."""
    method, overrides = RUNS[i]
    mem = _train(method, overrides, tmp_path)
    p = plan.plan(method, None, overrides + ["max_steps=1"] * (method != "tscd"))
    assert {k: p.counted[k] for k in KEYS} == {k: mem[k] for k in KEYS}
    assert p.per_gpu == p.counted  # one GPU: nothing to share


def _built(overrides: list[str], method: str = "dmd2") -> plan.Built:
    cfg, cls = plan.run_config(method, None, overrides)
    return plan.build(cfg, cls)


def _shard(t, gpus: int) -> int:
    return (math.ceil(t.shape[0] / gpus) * math.prod(t.shape[1:]) if t.ndim else 1) * t.element_size()


def _full(t) -> int:
    return t.numel() * t.element_size()


def test_fsdp_shards_full_copies_moments_and_heads_but_not_encoders():
    """--fsdp with a full student: each parameter of the student, the critic, the EMA copy and the GAN head holds
    ceil(dim0 / gpus) rows per rank, and so do their Adam moments (not AdamW's scalar step); the teacher is sharded
    only with --shard-teacher; text encoder and VAE stay whole. Without --fsdp every GPU holds everything."""
    b = _built(["teacher=embedded", "student=full", "ema_decay=0.5"])
    counted = plan.summarize(b).counted
    assert plan.summarize(b, gpus=8).per_gpu == counted  # DDP-style replication
    assert plan.summarize(b, gpus=1, fsdp=True).per_gpu == counted
    g = 3
    p = plan.summarize(b, gpus=g, fsdp=True)
    for role in ("student", "critic"):
        assert p.per_gpu["trainable_bytes"][role] == sum(_shard(t, g) for t in b.params[role])
        opt = b.optimizers[role]
        assert p.per_gpu["optimizer_state_bytes"][role] == sum(
            _shard(v, g) if v.shape == q.shape else _full(v) for q, st in opt.state.items() for v in st.values())
    assert p.per_gpu["gradient_bytes_peak"] == max(p.per_gpu["trainable_bytes"].values())
    ema = list(b.models._nets["student_ema"].parameters())
    assert p.per_gpu["frozen_bytes"] == counted["frozen_bytes"] - sum(_full(t) - _shard(t, g) for t in ema)
    teacher = list(b.models.denoiser.parameters())
    t = plan.summarize(b, gpus=g, fsdp=True, shard_teacher=True)
    assert t.per_gpu["frozen_bytes"] == p.per_gpu["frozen_bytes"] - sum(_full(x) - _shard(x, g) for x in teacher)
    for q in (p, t):
        assert sum(r["bytes"] for r in q.frozen) == q.counted["frozen_bytes"]
        assert sum(r["bytes_per_gpu"] for r in q.frozen) == q.per_gpu["frozen_bytes"]
        assert {r["part"] for r in q.frozen if r["sharded"]} >= {"student_ema: full copy, EMA of student"}
    assert next(r for r in t.frozen if r["part"] == "unet (teacher)")["sharded"]
    assert all(r["sharded"] for r in p.roles)


def test_lora_students_are_never_sharded():
    """--fsdp with a LoRA student: one replicated base and small adapters; the plan says so and counts it all."""
    b = _built(["teacher=embedded", "student=lora"])
    p = plan.summarize(b, gpus=8, fsdp=True)
    assert p.per_gpu == p.counted and not any(r["sharded"] for r in p.roles + p.frozen)
    assert any("nothing is sharded" in n for n in p.notes)
    assert sum(r["bytes"] for r in p.frozen) == p.counted["frozen_bytes"]


def test_lora_merge_always_plans_like_peft():
    """lora_merge=always keeps no merged weights for the backward (tests/test_lora_merge.py checks the saved
    tensors), so its plan and notes are peft's."""
    always = plan.summarize(_built(["teacher=embedded", "student=lora", "lora_merge=always"]))
    off = plan.summarize(_built(["teacher=embedded", "student=lora", "lora_merge=off"]))
    assert always.notes == off.notes and always.counted == off.counted


def test_the_output_says_activations_are_not_counted(capsys):
    """One line says what is not counted and where the measured peak is."""
    assert plan.main(["--method", "lcm", "teacher=embedded"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "activations are not counted" in line]
    assert len(lines) == 1 and "cuda_peak_allocated_bytes" in lines[0]
    assert "student (LoRA r=16)" in out and "unet (teacher)" in out and "total" in out


def test_json_form(capsys):
    assert plan.main(["--method", "sid", "teacher=embedded", "--student", "full", "--gpus", "4", "--fsdp",
                      "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["gpus"] == 4 and got["fsdp"] and got["student"] == "full" and set(KEYS) <= set(got["counted"])
    assert got["per_gpu"]["total_counted_bytes"] < got["counted"]["total_counted_bytes"]
    assert {r["role"] for r in got["roles"]} == {"student", "critic"}


def _pipes_agree(folder: str) -> None:
    from torch import nn

    from distill_diffusion.models import load_pipeline

    real, meta = load_pipeline(folder), plan.meta_pipeline(Path(folder))

    def tensors(m: nn.Module) -> list:
        seen = {id(t): (tuple(t.shape), t.dtype) for t in list(m.parameters()) + list(m.buffers())}
        return sorted(seen.values(), key=str)

    mods = {n for n, m in real.components.items() if isinstance(m, nn.Module)}
    assert mods == {n for n, m in meta.components.items() if isinstance(m, nn.Module)}
    for n in mods:
        assert tensors(real.components[n]) == tensors(meta.components[n]), n
        assert all(t.is_meta for t in meta.components[n].parameters())


@pytest.mark.slow
def test_meta_teachers_hold_the_loaded_teachers_tensors(tiny_teachers, flow_teachers):
    """Built from config files on the meta device, every component of a teacher has the tensors (shapes, dtypes,
    ties) of the same teacher loaded with its weights: SD, SDXL, SD3 (with T5), FLUX.1-dev, SANA (Gemma2, DC-AE)."""
    for folder in (tiny_teachers["sd"], tiny_teachers["sdxl"], flow_teachers["sd3"], flow_teachers["flux_dev"],
                   flow_teachers["sana"]):
        _pipes_agree(folder)


@pytest.mark.parametrize("arch, params", [("sd15", 859_520_964), ("sdxl", 2_567_463_684),
                                          ("flux1_dev", 11_901_408_320), ("sd35_medium", None),
                                          ("sana_1600m_1024px", None)])
def test_shipped_architectures_build(arch, params):
    """Each shipped architecture builds on meta; SD1.5's and SDXL's UNets and FLUX.1-dev's transformer have their
    published parameter counts."""
    pipe = plan.meta_pipeline(plan.ARCHITECTURES_DIR / arch)
    net = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    assert params is None or sum(p.numel() for p in net.parameters()) == params
    assert (plan.ARCHITECTURES_DIR / "README.md").read_text().count(f"`{arch}`") >= 1


def test_every_config_teacher_resolves_offline():
    """Every configs/<method>/*.yaml names a teacher the planner can build without a download."""
    teachers = {(yaml.safe_load(f.read_text()) or {}).get("teacher") for f in (ROOT / "configs").glob("*/*.yaml")}
    for t in teachers - {None}:
        assert (plan.teacher_folder(t) / "model_index.json").is_file(), t
    assert set(plan.HUB_ARCHITECTURES.values()) == {p.name for p in plan.ARCHITECTURES_DIR.iterdir() if p.is_dir()}


def test_a_shipped_config_plans_offline(capsys):
    """A hub teacher's config plans from the shipped architecture (SD1.5, full DMD2 student on 8 GPUs)."""
    assert plan.main(["--method", "dmd2", "--config", "configs/dmd2/sd15_1step.yaml", "--gpus", "8", "--fsdp"]) == 0
    out = capsys.readouterr().out
    assert "config files of sd15" in out and "FSDP2" in out and "student (full copy)" in out


@pytest.mark.slow
def test_sdxl_lora_config_plans_offline():
    """The command of the issue: DMD2's SDXL LoRA recipe, two adapters and a GAN head on one bf16 base."""
    p = plan.plan("dmd2", str(ROOT / "configs/dmd2/sdxl_4step_lora.yaml"), gpus=8)
    assert p.architecture == "sdxl" and p.mixed_precision == "bf16" and p.lora_rank == 64
    unet = next(r for r in p.frozen if r["part"] == "unet (teacher)")
    assert unet["dtype"] == "bf16" and unet["bytes"] == 2 * 2_567_463_684
    assert next(r for r in p.frozen if r["part"] == "vae")["dtype"] == "fp32"


@pytest.mark.slow
def test_table_markdown():
    text = plan.table_markdown(archs=["sd15"], methods=["lcm"])
    assert "| SD1.5 | lcm |" in text and "| lcm | LoRA, 1 GPU |" in text and "activations" in text


BAD = [
    (["--method", "nope"], "unknown method"),
    (["--method", "dmd2", "--config", "configs/dmd2/missing.yaml"], "no such file"),
    (["--method", "lcm", "teacher=someone/unknown-model"], "no shipped architecture"),
    (["--method", "lcm", "--gpus", "0"], "--gpus 0"),
    (["--method", "lcm", "--shard-teacher"], "--fsdp"),
    (["--method", "lcm", "--student", "half"], "half"),
    (["lcm"], "--method"),
]


@pytest.mark.parametrize("argv, words", BAD, ids=[w for _, w in BAD])
def test_bad_input_is_one_line_and_exit_code_2(argv, words, capsys):
    assert plan.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and words in err


@pytest.mark.slow
def test_bad_input_through_the_module(tmp_path):
    """``python -m distill_diffusion.plan``: one line, exit code 2, no traceback."""
    r = subprocess.run([sys.executable, "-m", "distill_diffusion.plan", "--method", "dmd2", "--config",
                        str(tmp_path / "none.yaml")], cwd=ROOT, capture_output=True, text=True,
                       env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
