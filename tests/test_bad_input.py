"""Bad input: one line naming the problem and what to do, exit code 2, no traceback, nothing written damaged.

One row per case, checked in-process through the CLI entry points (a subprocess per case is too slow for the suite);
tests/test_config.py checks a few through `python train.py` itself.
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
                           "validation_seeds=1"], METHODS)
    train(cfg, METHODS["lcm"])
    (root / "empty.txt").write_text("\n\n")
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
    return {"root": root, "run": run, "teacher": tiny_teachers["sd"], "sdxl": tiny_teachers["sdxl"],
            "images": image_folder}


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
    ("mixed precision typo", lambda b: _t(b, "mixed_precision=fp32"), "mixed_precision='fp32'"),
    ("gradient checkpointing through other roles", lambda b: _t(b, "gradient_checkpointing=true", method="sid"),
     "gradient_checkpointing"),
]


@pytest.mark.parametrize("case, argv, fragment", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input(case, argv, fragment, bad, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _tree_hash(bad["run"])
    code = run_main(argv(bad), METHODS)
    err = capsys.readouterr().err.strip()
    assert code == 2, (case, err)
    assert err.startswith("error: ") and fragment in err, (case, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert _tree_hash(bad["run"]) == before, f"{case}: the existing run was modified"


def test_truncated_lora_in_run(bad):
    from distill_diffusion import UserError, load_student

    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_student(bad["root"] / "trunc")


def test_run_without_sampling_json(bad):
    from distill_diffusion import UserError, load_student

    with pytest.raises(UserError, match="has no sampling.json"):
        load_student(bad["root"] / "noimgs")
