"""Export to the tools people generate with: kohya / ComfyUI LoRA files, merged students, diffusers copies.

The kohya file is read back by diffusers' own kohya reader and must give the images of our diffusers-format LoRA,
with alpha != rank (rank 4, alpha 8: a file written with alpha = rank would load at half strength). The flow
transformers' ComfyUI file is checked the way ComfyUI applies it: W + alpha / r · up @ down on the named module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill_diffusion import artifacts, export
from distill_diffusion.errors import UserError

PROMPTS = ["a red square", "a blue circle"]


def _lora_run(teacher: str, out: Path, rank: int = 4, alpha: float = 8) -> Path:
    """A finished LCM-LoRA run whose LoRA is not zero (a fresh LoRA's B is zero and would hide any scale error)."""
    from methods.lcm import LCM
    from tests.helpers import build

    models, method, _ = build(LCM, teacher, "lora", rank=rank, alpha=alpha, sampling_steps=(2,), default_steps=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in models.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=g)
    artifacts.save_run(models, "lcm", method.sampling(), out)
    return out


def _images(pipe, **kw) -> torch.Tensor:
    images, _ = artifacts.sample(pipe, PROMPTS, seeds=[0, 1], output_type="pt", **kw)
    return images


@pytest.mark.parametrize("kind", ["sd", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_kohya_file_loads_in_diffusers_and_gives_our_images(tiny_teachers, tmp_path, kind):
    run = _lora_run(tiny_teachers[kind], tmp_path / "run")
    (f,) = export.export(run, "kohya")
    from safetensors import safe_open

    with safe_open(str(f), "pt") as fh:
        keys = list(fh.keys())
        alphas = {fh.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
        meta = fh.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert alphas == {8.0} and meta["ss_network_alpha"] == "8.0" and meta["ss_network_dim"] == "4"
    assert json.loads(meta["distill_diffusion_sampling"])["default_steps"] == 2

    ours = artifacts.load_student(run, fuse=False)
    theirs = artifacts.load_pipeline(tiny_teachers[kind])
    theirs.load_lora_weights(str(f.parent), weight_name=f.name)
    theirs.set_progress_bar_config(disable=True)
    theirs.distill = ours.distill  # the student's sampling settings, so both sample the same way
    a, b = _images(ours), _images(theirs)
    teacher = artifacts.load_pipeline(tiny_teachers[kind])
    teacher.set_progress_bar_config(disable=True)
    teacher.distill = ours.distill
    base = _images(teacher)
    assert (a - base).abs().max() > 1e-2  # the LoRA changes the images, so the comparison below can fail
    assert (a - b).abs().max() < 1e-4, f"max abs difference {(a - b).abs().max():.2e}"


@pytest.mark.parametrize("kind", ["sd3", pytest.param("flux", marks=pytest.mark.slow)])
def test_flow_lora_file_applies_as_comfyui_does(flow_teachers, tmp_path, kind):
    """ComfyUI's rule for a diffusers-layout LoRA with alpha: W += alpha / r · B @ A on ``transformer.<module>``;
    the result must equal the weights diffusers' fused LoRA gives."""
    run = _lora_run(flow_teachers[kind], tmp_path / "run")
    (f,) = export.export(run, "kohya")
    from safetensors.torch import load_file

    sd = load_file(str(f))
    base = artifacts.load_pipeline(flow_teachers[kind]).transformer.state_dict()
    fused = artifacts.load_student(run, fuse=True).transformer.state_dict()
    modules = {k[: -len(".alpha")] for k in sd if k.endswith(".alpha")}
    assert modules and all(m.startswith("transformer.") for m in modules)
    changed = 0
    for m in modules:
        a, b, alpha = sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"], sd[f"{m}.alpha"].item()
        w = m[len("transformer."):] + ".weight"
        assert alpha == 8.0
        want = base[w] + alpha / a.shape[0] * (b @ a)
        torch.testing.assert_close(fused[w], want, rtol=1e-5, atol=1e-5)
        changed += int((fused[w] - base[w]).abs().max() > 1e-3)
    assert changed == len(modules)


@pytest.mark.parametrize("kind", ["sd", pytest.param("sd3", marks=pytest.mark.slow)])
def test_merged_export_is_a_run_with_the_same_images(tiny_teachers, flow_teachers, tmp_path, kind):
    teacher = {**tiny_teachers, **flow_teachers}[kind]
    run = _lora_run(teacher, tmp_path / "run")
    out = tmp_path / "merged"
    paths = export.export(run, "merged", out)
    assert [p.name for p in paths][0] == "pipeline" and (out / "pipeline" / "model_index.json").is_file()
    info = artifacts.check_run(out)
    assert info["student"] == "full" and info["merged_from"] == str(run)
    torch.testing.assert_close(_images(artifacts.load_student(out)), _images(artifacts.load_student(run)),
                               rtol=0, atol=1e-5)
    # the network alone, in one file: the fused weights under diffusers' keys
    from safetensors.torch import load_file

    single = load_file(str(paths[1]))
    net = artifacts.load_student(run, fuse=True)
    denoiser = getattr(net, "unet", None) or net.transformer
    assert single.keys() == denoiser.state_dict().keys()
    assert all(torch.equal(single[k], v) for k, v in denoiser.state_dict().items())
    card = _card(out / "README.md")
    assert "base_model" not in card and "full-student" in card["tags"]  # a local teacher is no hub base model


def _card(path: Path) -> dict:
    return _card_text(path.read_text())


def test_model_card_metadata_parses_with_huggingface_hub(tiny_teachers, tmp_path):
    run = _lora_run(tiny_teachers["sd"], tmp_path / "run")
    card = _card(run / "README.md")
    assert card["library_name"] == "diffusers" and card["pipeline_tag"] == "text-to-image"
    assert {"distill-diffusion", "lcm", "lora"} <= set(card["tags"]) and "base_model" not in card
    info = dict(json.loads((run / "sampling.json").read_text()), teacher="org/some-model")
    hub = _card_text(artifacts.model_card(info, run))
    assert hub["base_model"] == "org/some-model" and hub["base_model_relation"] == "adapter"
    assert _card_text(artifacts.model_card(dict(info, teacher="embedded"), run))["license"] == "apache-2.0"
    (Path(tiny_teachers["sd"]) / "README.md").write_text("---\nlicense: openrail\n---\n# tiny\n")
    try:
        assert artifacts.card_metadata(dict(info, teacher=tiny_teachers["sd"]))["license"] == "openrail"
    finally:
        (Path(tiny_teachers["sd"]) / "README.md").unlink()


def _card_text(text: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()


def test_diffusers_copy_and_float16_kohya(tiny_teachers, tmp_path):
    run = _lora_run(tiny_teachers["sd"], tmp_path / "run")
    export.export(run, "diffusers", tmp_path / "copy")
    assert (tmp_path / "copy" / "student" / artifacts.LORA_FILE).read_bytes() == \
        (run / "student" / artifacts.LORA_FILE).read_bytes()
    artifacts.check_run(tmp_path / "copy")
    (f,) = export.export(run, "kohya", tmp_path / "half", dtype="float16")
    from safetensors.torch import load_file

    sd = load_file(str(f))
    assert {v.dtype for k, v in sd.items() if not k.endswith(".alpha")} == {torch.float16}


def test_bad_input_is_one_line_and_nothing_is_overwritten(tiny_teachers, tmp_path, capsys):
    from methods.lcm import LCM
    from tests.helpers import build

    run = _lora_run(tiny_teachers["sd"], tmp_path / "run")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert export.main([str(run), "--format", "kohya", "--out", str(taken)]) == 2
    assert (taken / "keep.txt").read_text() == "mine" and len(list(taken.iterdir())) == 1
    assert export.main([str(run), "--format", "onnx"]) == 2
    assert export.main([str(tmp_path / "nope"), "--format", "kohya"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("error: ") for e in err)
    assert "already exists" in err[0] and "onnx" in err[1] and "does not exist" in err[2]

    models, method, _ = build(LCM, tiny_teachers["sd"], "full", sampling_steps=(2,), default_steps=2)
    full = artifacts.save_run(models, "lcm", method.sampling(), tmp_path / "full")
    with pytest.raises(UserError, match="full student.*--format merged"):
        export.export(full, "kohya")


def test_push_to_hub_uploads_the_card_students_and_last_grid(tiny_teachers, tmp_path, monkeypatch):
    """The upload cannot run offline: the call it would make is captured, and a failed one is one clear line."""
    import huggingface_hub

    run = _lora_run(tiny_teachers["sd"], tmp_path / "run")
    for name in ("step_000002.png", "step_000010.png"):
        (run / "validation").mkdir(exist_ok=True)
        (run / "validation" / name).write_bytes(b"png")
    (run / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-10" / "trainable.safetensors").write_bytes(b"x")
    export.export(run, "kohya")
    artifacts.write_card(run)
    assert "validation/step_000010.png" in (run / "README.md").read_text()
    files = artifacts.hub_files(run)
    assert {"README.md", "sampling.json", "student/pytorch_lora_weights.safetensors",
            "validation/step_000010.png", "export/kohya/run_lcm_lora.safetensors"} == set(files)
    calls = {}

    class Api:
        def create_repo(self, repo_id, **kw):
            calls["create"] = (repo_id, kw)

        def upload_folder(self, **kw):
            calls["upload"] = kw
            return huggingface_hub.CommitInfo(commit_url="https://huggingface.co/me/student/commit/1",
                                              commit_message="m", commit_description="", oid="1")

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    assert export.main([str(run), "--push-to-hub", "me/student"]) == 0
    assert calls["create"] == ("me/student", {"repo_type": "model", "private": False, "exist_ok": True})
    assert calls["upload"]["allow_patterns"] == files and calls["upload"]["folder_path"] == str(run)

    class Offline(Api):
        def create_repo(self, repo_id, **kw):
            raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    with pytest.raises(UserError, match="push to me/student failed.*the run is complete"):
        artifacts.push_to_hub(run, "me/student")


def test_attach_eval_shows_in_the_card(tiny_teachers, tmp_path):
    run = _lora_run(tiny_teachers["sd"], tmp_path / "run")
    artifacts.attach_eval(run, "| model | FID |\n|---|---|\n| lcm | 3.1 |\n")
    card = (run / "README.md").read_text()
    assert "## Evaluation" in card and "| lcm | 3.1 |" in card
    assert _card(run / "README.md")["library_name"] == "diffusers"


def test_lora_scale_follows_peft_rules():
    meta = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"attn1.to_q": 2}, "use_rslora": False}
    assert export.lora_scale("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", 4, meta) == 2.0
    assert export.lora_scale("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4, meta) == 0.5
    assert export.lora_scale("x.to_k", 16, dict(meta, use_rslora=True)) == 8 / 4  # alpha / sqrt(r)
    a, b = torch.ones(2, 3), torch.ones(5, 2)
    sd = export.to_kohya({"unet.x.to_q.lora_A.weight": a, "unet.x.to_q.lora_B.weight": b},
                         {"r": 2, "lora_alpha": 6}, "unet")
    assert sd["lora_unet_x_to_q.alpha"].item() == 6.0 and torch.equal(sd["lora_unet_x_to_q.lora_up.weight"], b)
