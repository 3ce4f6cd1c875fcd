"""The run-folder contract in distill_diffusion.artifacts: atomic writes, which teacher is the embedded one, a
finished run versus an unfinished one, the students a run holds, and the NFE of a sampling spec."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from distill_diffusion import artifacts
from distill_diffusion.errors import UserError
from distill_diffusion.method import SamplingSpec, StepSampling
from distill_diffusion.models import embedded_teacher_path

# ---- atomic writes -------------------------------------------------------------------------------------------


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    f = tmp_path / "a.json"
    artifacts.atomic_write(f, "é1")
    assert f.read_bytes() == "é1".encode()
    artifacts.atomic_write(f, b"\x00\x01")
    assert f.read_bytes() == b"\x00\x01"
    with pytest.raises(RuntimeError, match="crash"), artifacts.atomic_file(f) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert f.read_bytes() == b"\x00\x01" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_atomic_file_keeps_the_suffix_numpy_needs(tmp_path):
    import numpy as np

    with artifacts.atomic_file(tmp_path / "x.npy") as tmp:
        np.save(tmp, np.arange(3))  # np.save appends .npy to a name without it: the rename would miss the file
    assert np.load(tmp_path / "x.npy").tolist() == [0, 1, 2] and len(list(tmp_path.iterdir())) == 1


# ---- the teacher ---------------------------------------------------------------------------------------------


def test_is_embedded_teacher_by_name_or_path(tmp_path, monkeypatch):
    here = embedded_teacher_path()
    for t in ("embedded", "", None, str(here), here, str(here) + "/"):
        assert artifacts.is_embedded_teacher(t), t
    monkeypatch.chdir(here.parent)
    assert artifacts.is_embedded_teacher(here.name)  # a relative path to the same folder
    for t in (str(tmp_path), "org/name", "embedded2"):
        assert not artifacts.is_embedded_teacher(t), t


def test_check_teacher_messages(tmp_path):
    (tmp_path / "notpipe").mkdir()
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    (tmp_path / "file").write_text("x")
    artifacts.check_teacher(str(tmp_path / "pipe"))
    artifacts.check_teacher("someorg/somemodel")  # a hub id is checked when loading
    cases = [(tmp_path / "notpipe", "is not a diffusers pipeline folder"), (tmp_path / "nope", "does not exist"),
             (tmp_path / "file", "is a file"), ("nope", "does not exist")]
    for teacher, text in cases:
        with pytest.raises(UserError, match=text):
            artifacts.check_teacher(str(teacher))


def test_check_teacher_says_how_to_build_a_missing_embedded_teacher(monkeypatch, tmp_path):
    import distill_diffusion.models

    folders = distill_diffusion.models.EMBEDDED_TEACHERS  # a clone whose shipped teachers were not built
    monkeypatch.setattr(distill_diffusion.models, "embedded_teacher_path",
                        lambda name="embedded": tmp_path / folders[name])
    with pytest.raises(UserError, match="embedded teacher 'embedded' is missing.*toy.train_teacher`"):
        artifacts.check_teacher("embedded")
    with pytest.raises(UserError, match="embedded teacher 'embedded-flow' is missing.*toy.train_flow_teacher`"):
        artifacts.check_teacher("embedded-flow")


# ---- run folders ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tiny_teachers, tmp_path_factory) -> Path:
    """A finished LCM run (LoRA student) with two stage students beside the final one, as TSCD exports them."""
    from methods.lcm import LCM
    from tests.helpers import build

    models, method, _ = build(LCM, tiny_teachers["sd"], "lora", sampling_steps=(2, 4), default_steps=4)
    spec = method.sampling()
    out = tmp_path_factory.mktemp("run") / "lcm"
    artifacts.save_run(models, "lcm", spec, out)
    for k in (4, 2):
        artifacts.save_run(models, "lcm", SamplingSpec({k: spec.steps[k]}, k), out, folder_name=f"student_S{k}")
    return out


def test_check_run_accepts_a_finished_run(run):
    info = artifacts.check_run(run)
    assert info["method"] == "lcm" and sorted(info["steps"]) == [2, 4] and info["student"] == "lora"
    assert artifacts.check_run(run, "sampling_student_S2.json")["student_dir"] == "student_S2"


def test_check_run_refuses_an_unfinished_run(run, tmp_path):
    half = tmp_path / "half"
    shutil.copytree(run, half)
    os.remove(half / "student" / artifacts.LORA_FILE)  # killed between sampling.json and the student's export
    with pytest.raises(UserError, match="missing student/pytorch_lora_weights.safetensors; the run did not finish"):
        artifacts.check_run(half)
    with pytest.raises(UserError, match="did not finish"):
        artifacts.load_student(half)
    artifacts.check_run(half, "sampling_student_S4.json")  # the stage students are complete
    (half / "sampling.json").unlink()
    with pytest.raises(UserError, match="has no sampling.json"):
        artifacts.check_run(half)
    with pytest.raises(UserError, match="does not exist"):
        artifacts.check_run(tmp_path / "nope")


def test_check_run_of_a_full_student_needs_its_pipeline(tmp_path):
    (tmp_path / "student").mkdir()
    (tmp_path / "sampling.json").write_text('{"student": "full", "default_steps": 1, "steps": {"1": '
                                            '{"scheduler": "LCMScheduler", "timesteps": [999]}}}')
    with pytest.raises(UserError, match="missing student/model_index.json"):
        artifacts.check_run(tmp_path)
    (tmp_path / "student" / "model_index.json").write_text("{}")
    assert artifacts.check_run(tmp_path)["steps"][1].timesteps == [999]
    assert artifacts.is_export_dir(tmp_path / "student") and not artifacts.is_export_dir(tmp_path)


def test_list_students_final_first_then_stages(run, tmp_path):
    assert artifacts.list_students(run) == ["sampling.json", "sampling_student_S2.json", "sampling_student_S4.json"]
    for name in ("samplingX.json", "sampling.json.bak", "sampling-x.json"):
        (tmp_path / name).write_text("{}")
    assert artifacts.list_students(tmp_path) == []
    assert artifacts.list_students(tmp_path / "nope") == []
    for f in artifacts.list_students(run):  # every name is a student load_student can read
        assert artifacts.check_run(run, f)["steps"]


def test_is_export_dir_of_a_lora_student(run):
    assert artifacts.is_export_dir(run / "student") and artifacts.is_export_dir(run / "student_S2")
    assert not artifacts.is_export_dir(run)


# ---- NFE -----------------------------------------------------------------------------------------------------


def _pipe(steps: dict[int, StepSampling] | None = None, time_cond_proj_dim: int | None = None) -> SimpleNamespace:
    """A stand-in pipeline: the UNet config the CFG decision reads, and a run's settings when ``steps`` is given."""
    stand_in = type("StableDiffusionPipeline", (SimpleNamespace,), {})  # the family is read from the class name
    p = stand_in(unet=SimpleNamespace(config=SimpleNamespace(time_cond_proj_dim=time_cond_proj_dim)))
    if steps is not None:
        p.distill = artifacts.RunSampling({"steps": steps, "default_steps": max(steps)}, "run")
    return p


def test_nfe_of_a_student_spec_with_and_without_cfg():
    ts = [999, 759, 499, 259]
    plain = _pipe({4: StepSampling("LCMScheduler", ts, 1.0), 2: StepSampling("LCMScheduler", ts[::2], 1.0)})
    assert artifacts.nfe(plain, 4) == 4 and artifacts.nfe(plain, 2) == 2 and artifacts.nfe(plain) == 4
    cfg = _pipe({4: StepSampling("DDIMScheduler", ts, 4.5)})
    assert artifacts.nfe(cfg, 4) == 8  # cond and uncond per step
    assert artifacts.nfe(cfg, 4, guidance=1.0) == 4  # an explicit guidance overrides the run's
    embedded_w = _pipe({4: StepSampling("LCMScheduler", ts, 8.0)}, time_cond_proj_dim=256)
    assert artifacts.nfe(embedded_w, 4) == 4  # a full LCM student takes w as an input, not through CFG
    with pytest.raises(UserError, match="supports \\[4\\] steps, not 3"):
        artifacts.nfe(cfg, 3)


def test_nfe_of_the_teacher_and_of_a_hybrid():
    teacher = _pipe()
    assert artifacts.nfe(teacher, 25, 7.5) == 50 and artifacts.nfe(teacher, 3, 1.0) == 3
    assert artifacts.nfe(teacher) == 25 and artifacts.nfe(teacher, 2, 0.0) == 2  # sample's defaults
    ts = [999, 759, 499, 259]
    plain = _pipe({4: StepSampling("LCMScheduler", ts, 1.0)})
    cfg = _pipe({4: StepSampling("DDIMScheduler", ts, 3.0)})
    assert artifacts.hybrid_nfe(teacher, plain, 4, 3.0) == 2 + 3  # the teacher's guided first step, 3 student steps
    assert artifacts.hybrid_nfe(teacher, cfg, 4, 3.0) == 2 + 3 * 2
    assert artifacts.hybrid_nfe(teacher, plain, 4, 1.0) == 1 + 3


def test_adapter_metadata_lists_target_modules_sorted():
    """peft keeps target_modules as a set (iteration order follows string hashing, different in every process): the
    LoRA file's metadata must not depend on it, so that the same tensors are written as the same bytes."""
    from peft import LoraConfig

    metas = [artifacts.adapter_metadata(LoraConfig(r=4, lora_alpha=8, target_modules=t))
             for t in (["to_v", "to_q", "ff.net.2", "to_k"], ["ff.net.2", "to_k", "to_q", "to_v"])]
    assert metas[0]["target_modules"] == ["ff.net.2", "to_k", "to_q", "to_v"]
    assert json.dumps(metas[0], sort_keys=True) == json.dumps(metas[1], sort_keys=True)
    assert metas[0]["r"] == 4 and metas[0]["lora_alpha"] == 8
