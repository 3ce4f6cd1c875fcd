"""Bad input: one line naming the problem and what to do, exit code 2, no traceback, nothing written damaged.

One table, one row per case, across train.py, eval and app, checked in-process through the CLI entry points (a
subprocess per case is too slow for the suite); tests/test_config.py, test_eval.py and test_app.py check a few through
the real commands, and the last test here checks that under `accelerate launch` our line is the first error printed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from distill_diffusion.loop import run_main
from methods import METHODS


def _tree_hash(root: Path) -> str:
    h = hashlib.sha1()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_teachers, image_folder):
    """Files for the cases: a finished run, broken images, an empty prompt file, a truncated LoRA."""
    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train

    root = tmp_path_factory.mktemp("bad")
    run = root / "run"
    cfg, _ = parse_config(["--method", "lcm", f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}",
                           "max_steps=1", "batch_size=2", f"output_dir={run}", "report_to=none",
                           "validation_seeds=0"], METHODS)
    train(cfg, METHODS["lcm"])
    (root / "empty.txt").write_text("\n\n")
    (root / "prompts.txt").write_text("a red square\na blue circle\n")
    (root / "other.yaml").write_text("num_imagez: 3\n")
    (root / "runs_broken").mkdir()
    (root / "runs_broken" / "half").mkdir()
    (root / "runs_broken" / "half" / "sampling.json").write_text("{not json")
    (root / "imgs").mkdir()
    (root / "imgs" / "a.png").write_bytes(b"not a png")
    (root / "imgs" / "a.txt").write_text("x")
    (root / "noimgs").mkdir()
    (root / "notpipe").mkdir()
    (root / "notpipe" / "x.txt").write_text("x")
    trunc = root / "trunc"
    trunc.mkdir()
    for f in ("sampling.json", "config.yaml"):
        (trunc / f).write_bytes((run / f).read_bytes())
    (trunc / "student").mkdir()
    data = (run / "student" / "pytorch_lora_weights.safetensors").read_bytes()
    (trunc / "student" / "pytorch_lora_weights.safetensors").write_bytes(data[: len(data) // 2])
    latents = root / "latents"  # a latent store made for another image folder
    latents.mkdir()
    (latents / "store.json").write_text('{"source": "images=/elsewhere"}')
    return {"root": root, "run": run, "teacher": tiny_teachers["sd"], "sdxl": tiny_teachers["sdxl"],
            "images": image_folder, "latents": latents}


def _t(b: dict, *extra: str, method: str = "lcm") -> list[str]:
    return ["--method", method, f"teacher={b['teacher']}", f"data.images={b['images']}", "max_steps=1",
            "batch_size=2", "report_to=none", f"output_dir={b['root'] / 'out'}", *extra]


TRAIN_CASES = [
    ("unknown method", lambda b: ["--method", "dmd3"], "unknown method 'dmd3'"),
    ("misspelled key", lambda b: _t(b, "learning_rat=1"), "did you mean 'learning_rate'"),
    ("wrong type", lambda b: _t(b, "batch_size=two"), "batch_size"),
    ("zero steps", lambda b: _t(b, "max_steps=0"), "max_steps=0"),
    ("negative steps", lambda b: _t(b, "max_steps=-5"), "max_steps=-5"),
    ("lora rank 0", lambda b: _t(b, "lora_rank=0"), "lora_rank=0"),
    ("teacher not a pipeline", lambda b: _t(b, f"teacher={b['root'] / 'notpipe'}"), "not a diffusers pipeline"),
    ("teacher path missing", lambda b: _t(b, f"teacher={b['root'] / 'nope'}"), "does not exist"),
    ("hub id offline", lambda b: _t(b, "teacher=someorg/somemodel"), "could not load teacher"),
    ("missing image folder", lambda b: _t(b, f"data.images={b['root'] / 'nodata'}"), "is not a folder"),
    ("folder without images", lambda b: _t(b, f"data.images={b['root'] / 'noimgs'}"), "holds no images"),
    ("unreadable image", lambda b: _t(b, f"data.images={b['root'] / 'imgs'}"), "cannot read image"),
    ("empty prompt file", lambda b: _t(b, "data.images=null", f"data.prompts={b['root'] / 'empty.txt'}",
                                       method="sid"), "is empty"),
    ("prompts for an image method", lambda b: _t(b, "data.images=null", f"data.prompts={b['root'] / 'empty.txt'}"),
     "trains on real images"),
    ("two data sources", lambda b: _t(b, f"data.prompts={b['root'] / 'empty.txt'}"), "one data source"),
    ("saved dataset missing", lambda b: _t(b, "data.images=null", f"data.dataset={b['root'] / 'nods'}"),
     "could not be loaded"),
    ("yaml for another method", lambda b: ["--method", "lcm", "--config", "configs/dmd2/default.yaml"],
     "written for method 'dmd2'"),
    ("init_from another base", lambda b: _t(b, f"teacher={b['sdxl']}", f"init_from={b['run']}"),
     "was distilled from teacher"),
    ("init_from without sampling.json", lambda b: _t(b, f"init_from={b['root'] / 'noimgs'}"), "no sampling.json"),
    ("output_dir holds a run", lambda b: _t(b, f"output_dir={b['run']}"), "already holds a run"),
    ("resume path not a checkpoint", lambda b: _t(b, f"resume={b['root']}"), "not a checkpoint folder"),
    ("export_checkpoint not a checkpoint", lambda b: _t(b, f"export_checkpoint={b['root']}"),
     "is not a checkpoint folder"),
    ("export_checkpoint with export_initial", lambda b: _t(b, f"export_checkpoint={b['root']}",
                                                            "export_initial=true"), "choose one"),
    ("export_average below 1", lambda b: _t(b, "export_average=0"), "must be at least 1"),
    ("export_average without export_checkpoint", lambda b: _t(b, "export_average=2"), "ending at export_checkpoint"),
    ("mixed precision typo", lambda b: _t(b, "mixed_precision=fp32"), "mixed_precision='fp32'"),
    ("text length on a UNet teacher", lambda b: _t(b, "max_sequence_length=8"), "only flow-transformer teachers"),
    ("gradient checkpointing through other roles", lambda b: _t(b, "gradient_checkpointing=true", method="sid"),
     "gradient_checkpointing"),
    ("webdataset shards missing", lambda b: _t(b, "data.images=null", f"data.webdataset={b['root']}/s-{{0..1}}.tar"),
     "cannot read shard"),
    ("negative data workers", lambda b: _t(b, "data.num_workers=-1"), "data.num_workers=-1"),
    ("hub id without an owner", lambda b: _t(b, "hub_model_id=student"), "hub_model_id='student'"),
    ("latent store of another dataset", lambda b: _t(b, f"data.latent_cache_dir={b['latents']}"), "another setting"),
]




def _e(b: dict, *extra: str, runs: list[str] | None = None) -> list[str]:
    run = [str(b["run"])] if runs is None else runs
    return ["--runs", *run, "--prompts", str(b["root"] / "prompts.txt"), "--reference", b["images"],
            "--num-images", "4", "--teacher-steps", "1", "--out", str(b["root"] / "report"), "--cache-dir",
            str(b["root"] / "cache"), "--quiet", *extra]


EVAL_CASES = [
    ("eval: no runs", lambda b: ["--prompts", str(b["root"] / "prompts.txt")], "no runs"),
    ("eval: run without sampling.json", lambda b: _e(b, runs=[str(b["root"] / "noimgs")]), "has no sampling.json"),
    ("eval: run folder missing", lambda b: _e(b, runs=[str(b["root"] / "nope")]), "does not exist"),
    ("eval: truncated LoRA in a run", lambda b: _e(b, runs=[str(b["root"] / "trunc")]),
     "not a readable safetensors file"),
    ("eval: empty prompt file", lambda b: _e(b, "--prompts", str(b["root"] / "empty.txt")), "empty"),
    ("eval: reference smaller than asked", lambda b: _e(b, "--num-images", "100"), "100"),
    ("eval: teacher missing", lambda b: _e(b, "--teacher", str(b["root"] / "nope")), "does not exist"),
    ("eval: unknown option value", lambda b: _e(b, "--features", "bogus"), "bogus"),
    ("eval: zero images", lambda b: _e(b, "--num-images", "0"), "--num-images must be >= 1"),
    ("eval: both guidance options", lambda b: _e(b, "--teacher-guidance", "2", "--guidance-grid", "1", "2"),
     "not allowed with"),
    ("eval: config with an unknown key", lambda b: _e(b, "--config", str(b["root"] / "other.yaml")), "num_imagez"),
]

def _x(b: dict, *extra: str) -> list[str]:
    return [str(b["run"]), *extra]


EXPORT_CASES = [
    ("export: unknown format", lambda b: _x(b, "--format", "onnx"), "--format 'onnx'"),
    ("export: nothing asked", lambda b: _x(b), "give --format"),
    ("export: run folder missing", lambda b: [str(b["root"] / "nope"), "--format", "kohya"], "does not exist"),
    ("export: out holds files", lambda b: _x(b, "--format", "kohya", "--out", str(b["root"] / "imgs")),
     "already exists and is not empty"),
    ("export: unknown dtype", lambda b: _x(b, "--format", "kohya", "--dtype", "fp8"), "--dtype 'fp8'"),
]

APP_CASES = [
    ("app: runs folder missing", lambda b: ["--runs", str(b["root"] / "nope")], "does not exist"),
    ("app: teacher missing", lambda b: ["--runs", str(b["root"]), "--teacher", str(b["root"] / "nope")],
     "does not exist"),
    ("app: port out of range", lambda b: ["--runs", str(b["root"]), "--port", "0"], "--port 0"),
    ("app: port not a number", lambda b: ["--runs", str(b["root"]), "--port", "http"], "invalid int value"),
]

CASES = [("train", *c) for c in TRAIN_CASES] + [("eval", *c) for c in EVAL_CASES] + [("app", *c) for c in APP_CASES]
CASES += [("export", *c) for c in EXPORT_CASES]


def _entry(tool: str):
    if tool == "train":
        return lambda argv: run_main(argv, METHODS)
    if tool == "eval":
        from eval.__main__ import main
        return main
    if tool == "export":
        from distill_diffusion.export import main
        return main
    from app.__main__ import main
    return main


def test_the_table_covers_every_tool():
    assert len(CASES) >= 20 and {c[0] for c in CASES} == {"train", "eval", "app", "export"}


@pytest.mark.parametrize("tool, case, argv, fragment", CASES, ids=[c[1] for c in CASES])
def test_bad_input(tool, case, argv, fragment, bad, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    before = _tree_hash(bad["run"])
    code = _entry(tool)(argv(bad))
    err = capsys.readouterr().err.strip()
    assert code == 2, (case, err)
    assert err.startswith("error: ") and fragment in err, (case, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, (case, err)
    assert _tree_hash(bad["run"]) == before, f"{case}: the existing run was modified"
    assert not (bad["root"] / "report").exists(), f"{case}: a report was started"


@pytest.mark.slow
def test_first_error_under_accelerate_launch_is_ours(tmp_path):
    """accelerate launch re-raises the child's exit status with its own traceback; our line must come before it."""
    import os
    import shutil
    import subprocess
    import sys

    accel = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([accel, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no", "train.py", "--method", "lcm", "learning_rat=1",
                        f"output_dir={tmp_path / 'o'}"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    first = next(i for i, ln in enumerate(lines) if "error" in ln.lower() or "Traceback" in ln)
    assert lines[first].startswith("error: ") and "learning_rate" in lines[first], r.stderr
    assert not (tmp_path / "o").exists()


def test_truncated_lora_in_run(bad):
    from distill_diffusion import UserError, load_student

    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_student(bad["root"] / "trunc")


def test_run_without_sampling_json(bad):
    from distill_diffusion import UserError, load_student

    with pytest.raises(UserError, match="has no sampling.json"):
        load_student(bad["root"] / "noimgs")
