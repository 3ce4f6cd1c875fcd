"""The evaluation harness: FID against clean-fid and torchmetrics, reference caching, CLIP score through the
transformers-5 adapter, diversity, the hybrid sampler, the report for two tiny runs, and bad input (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill_diffusion import artifacts
from distill_diffusion.errors import UserError
from eval import metrics
from eval.__main__ import build_parser, load_config, main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared machine: one thread avoids OpenMP oversubscription (10-50x faster under load)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---- tiny models and data ------------------------------------------------------------------------------------


def tiny_clip(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(image_size=32, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def synthetic(label: int, n: int, seed: int, size: int = 32) -> np.ndarray:
    """(n, size, size, 3) uint8: class 0 a bright horizontal bar, class 1 a vertical one, jittered, on noise."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n, size, size, 3)) * 60).astype(np.float32)
    for i in range(n):
        c = size // 2 + int(rng.integers(-3, 4))
        w = size // 6
        if label == 0:
            x[i, c - w : c + w, :, :] += 180
        else:
            x[i, :, c - w : c + w, :] += 180
    return x.clip(0, 255).astype(np.uint8)


def save_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def evaluator_dir(tmp_path_factory) -> Path:
    """A tiny CLIP trained for a few dozen steps on two synthetic classes ("t-shirt" bars vs "trouser" bars)."""
    import torch.nn.functional as F

    from distill_diffusion.toy.fmnist import caption
    from distill_diffusion.toy.tokenizer import build_clip_tokenizer

    model, tok = tiny_clip(), build_clip_tokenizer(16)
    model.text_model.embeddings.token_embedding.requires_grad_(False)  # 49408 x 32: random codes suffice
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    labels = torch.tensor([0, 1] * 8)
    for step in range(40):
        # interleaved to match labels 0, 1, 0, 1, ...
        imgs = np.stack([synthetic(0, 8, 2 * step), synthetic(1, 8, 2 * step + 1)], 1).reshape(16, 32, 32, 3)
        pix = metrics.evaluator_pixels(torch.from_numpy(imgs).permute(0, 3, 1, 2))
        caps = [caption(int(lab), step + i) for i, lab in enumerate(labels)]
        ids = tok(caps, padding="max_length", max_length=16, return_tensors="pt").input_ids
        img = F.normalize(metrics.as_tensor(model.get_image_features(pixel_values=pix)), dim=-1)
        txt = F.normalize(metrics.as_tensor(model.get_text_features(input_ids=ids)), dim=-1)
        logits = 10 * img @ txt.T
        pos = labels[:, None] == labels[None, :]
        loss = sum(-(torch.logsumexp(lg.masked_fill(~pos, -1e4), 1) - torch.logsumexp(lg, 1)).mean()
                   for lg in (logits, logits.T))
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("evaluator")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def fm(evaluator_dir) -> metrics.EvaluatorFeatures:
    return metrics.EvaluatorFeatures(metrics.load_evaluator(evaluator_dir)[0])


@pytest.fixture(scope="module")
def runs(tiny_teachers, tmp_path_factory) -> list[str]:
    """Two LCM runs on the tiny SD teacher, exported with artifacts.save_run (tests may import methods)."""
    from distill_diffusion.artifacts import save_run
    from methods.lcm import LCM
    from tests.helpers import build

    root = tmp_path_factory.mktemp("runs")
    out = []
    for name, steps, default in (("lcm_a", (1, 2), 2), ("lcm_b", (2, 4), 4)):
        models, method, _ = build(LCM, tiny_teachers["sd"], "lora", w_min=2.0, w_max=3.0, sampling_steps=steps,
                                  default_steps=default)
        out.append(str(save_run(models, "lcm", method.sampling(), root / name, extra={"step": 5 * len(out)})))
    return out


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("a photo of a t-shirt\n\na trouser\n")
    return p


@pytest.fixture(scope="module")
def ref_folder(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    return save_pngs(tmp_path_factory.mktemp("ref"), (rng.random((24, 16, 16, 3)) * 255).astype(np.uint8))


# ---- the adapter ----------------------------------------------------------------------------------------------


def test_tensor_clip_adapter_returns_projected_tensors():
    """transformers 5 returns an output object from get_*_features; the adapter gives torchmetrics the tensor."""
    model = tiny_clip().eval()
    pix = torch.randn(2, 3, 32, 32)
    raw = model.get_image_features(pixel_values=pix)
    assert not isinstance(raw, torch.Tensor)  # the transformers-5 behaviour the adapter exists for
    wrapped = metrics.TensorCLIP(model)
    with torch.no_grad():
        got = wrapped.get_image_features(pix)
        want = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
        ids = torch.tensor([[49406, 320, 49407, 49407]])
        txt = wrapped.get_text_features(ids, torch.ones_like(ids))
    assert isinstance(got, torch.Tensor) and got.shape == (2, 16) and txt.shape == (1, 16)
    torch.testing.assert_close(got, want)
    t = torch.ones(3)
    assert metrics.as_tensor(t) is t
    with pytest.raises(TypeError):
        metrics.as_tensor(object())


# ---- FID ------------------------------------------------------------------------------------------------------


def test_fid_self_is_zero_and_equals_clean_fid(fm, tmp_path):
    from cleanfid import fid as cfid

    a = np.concatenate([synthetic(0, 20, 1, 24), synthetic(1, 20, 2, 24)])
    b = synthetic(0, 40, 3, 24)
    fa, fb = metrics.extract(fm, a), metrics.extract(fm, b)
    self_fid = metrics.fid_from_stats(*metrics.gaussian(fa), *metrics.gaussian(fa))
    ours = metrics.fid_from_stats(*metrics.gaussian(fa), *metrics.gaussian(fb))
    assert ours > 1.0
    assert abs(self_fid) < 1e-6 * ours
    theirs = cfid.compute_fid(str(save_pngs(tmp_path / "a", a)), str(save_pngs(tmp_path / "b", b)), mode="clean",
                              custom_feat_extractor=fm, custom_fn_resize=fm.resizer(), device=torch.device("cpu"),
                              num_workers=0, batch_size=16, verbose=False)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_torchmetrics_fid_agrees_within_one_percent(fm):
    """torchmetrics' FrechetInceptionDistance(feature=the same module) on raw uint8 images vs clean-fid's maths."""
    a = np.concatenate([synthetic(0, 30, 4), synthetic(1, 30, 5)])
    b = np.concatenate([synthetic(0, 45, 6), synthetic(1, 15, 7)])
    ours = metrics.fid_from_stats(*metrics.gaussian(metrics.extract(fm, a)), *metrics.gaussian(metrics.extract(fm, b)))
    tm = metrics.fid_torchmetrics(torch.from_numpy(b).permute(0, 3, 1, 2), torch.from_numpy(a).permute(0, 3, 1, 2),
                                  feature=fm)
    assert ours > 0.1
    assert tm == pytest.approx(ours, rel=0.01)
    pre = metrics.fid_torchmetrics(metrics.extract(fm, b), metrics.extract(fm, a))  # the report's path
    assert pre == pytest.approx(ours, rel=0.01)


def test_reference_stats_cached_and_invalidated_when_features_change(fm, ref_folder, tmp_path, monkeypatch):
    import cleanfid.fid

    calls = []
    real = cleanfid.fid.get_folder_features
    monkeypatch.setattr(cleanfid.fid, "get_folder_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref = metrics.Reference("folder", str(ref_folder))
    s1 = metrics.reference_stats(ref, fm, tmp_path, verbose=False)
    s2 = metrics.reference_stats(ref, fm, tmp_path, verbose=False)
    assert len(calls) == 1 and s1.n == 24
    np.testing.assert_array_equal(s1.mu, s2.mu)
    other = metrics.EvaluatorFeatures(tiny_clip(seed=1))  # different weights: different features
    assert other.key != fm.key
    s3 = metrics.reference_stats(ref, other, tmp_path, verbose=False)
    assert len(calls) == 2 and not np.allclose(s3.mu, s1.mu)
    # a folder's stats computed here agree with clean-fid's on the same files
    np.testing.assert_allclose(s1.mu, real(str(ref_folder), fm, num_workers=0, device=torch.device("cpu"),
                                           custom_fn_resize=fm.resizer(), verbose=False).mean(0), rtol=1e-6)


def test_stats_file_dimension_checked(fm, tmp_path):
    p = tmp_path / "stats.npz"
    np.savez(p, mu=np.zeros(7), sigma=np.eye(7))
    with pytest.raises(UserError, match="7-d"):
        metrics.reference_stats(metrics.Reference("stats", str(p)), fm, None)


# ---- CLIP score, accuracy, diversity -------------------------------------------------------------------------


def test_clip_score_higher_for_matching_prompts(evaluator_dir):
    from distill_diffusion.toy.fmnist import caption

    clip = metrics.load_clip(None, evaluator_dir)
    imgs = np.concatenate([synthetic(0, 8, 100), synthetic(1, 8, 101)])
    labels = [0] * 8 + [1] * 8
    match, mismatch = metrics.ClipScore(clip), metrics.ClipScore(clip)
    match.update(imgs, [caption(lab, 0) for lab in labels])
    mismatch.update(imgs, [caption(1 - lab, 0) for lab in labels])
    assert match.compute() > mismatch.compute() + 1.0
    pred = metrics.ZeroShot(clip).predict(imgs)
    assert (pred == np.array(labels)).mean() >= 0.75


def test_diversity_closed_form():
    f = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    # prompt "a": orthogonal pair -> 1; prompt "b": parallel pair -> 0; mean over prompts 0.5
    assert metrics.diversity(f, ["a", "a", "b", "b"]) == pytest.approx(0.5)
    assert metrics.diversity(f[:2], ["a", "b"]) is None


# ---- the hybrid sampler --------------------------------------------------------------------------------------


def test_hybrid_teacher_step_is_guided_ddim(tiny_teachers, runs):
    from diffusers.utils.torch_utils import randn_tensor

    from distill_diffusion import schedule
    from distill_diffusion.artifacts import load_student, load_teacher
    from distill_diffusion.hybrid import hybrid_sample, teacher_first_step
    from distill_diffusion.method import StepSampling
    from eval.generate import ComponentTimer

    teacher, student = load_teacher(tiny_teachers["sd"]), load_student(runs[1])
    prompts, seeds, w, t1, t2 = ["a red square", "a blue circle"], [3, 4], 2.5, 999, 499
    first = StepSampling("LCMScheduler", [t1, t2])
    got = teacher_first_step(teacher, prompts, first, [torch.Generator().manual_seed(s) for s in seeds], w, 16)
    with torch.no_grad():
        x = randn_tensor((2, 4, 8, 8), generator=[torch.Generator().manual_seed(s) for s in seeds])
        cond, uncond = teacher.encode_prompt(prompts, "cpu", 1, True)
        t = torch.full((2,), t1)
        out = teacher.unet(torch.cat([x, x]), t1, encoder_hidden_states=torch.cat([uncond, cond])).sample
        u, c = out.chunk(2)
        ac = teacher.scheduler.alphas_cumprod
        x0, eps = schedule.split_prediction(schedule.cfg(u, c, w), x, t, ac, "epsilon")
        want = schedule.ddim_step(x0, eps, torch.full((2,), t2), ac)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    with ComponentTimer([teacher, student]) as timer:
        imgs, _ = hybrid_sample(teacher, student, prompts, 4, seeds, w, output_type="np")
    assert imgs.shape == (2, 16, 16, 3)
    assert timer.unet_samples == 2 * (2 + 3)  # teacher: 1 step with CFG (2), student: 3 steps (1 each)
    again, _ = hybrid_sample(teacher, student, prompts, 4, seeds, w, output_type="np")
    np.testing.assert_array_equal(imgs, again)
    with pytest.raises(UserError, match="steps >= 2"):
        hybrid_sample(teacher, student, prompts, 1, seeds, w)


def test_row_nfe_is_the_one_function_and_checked_by_the_hooks(tiny_teachers, runs):
    from distill_diffusion import artifacts
    from eval.generate import EvalSet, Generator, Row

    student, teacher = artifacts.load_student(runs[1]), artifacts.load_teacher(tiny_teachers["sd"])
    es = EvalSet(["a red square"] * 3, [0, 1, 2], [None] * 3, "test")
    for row, want in ((Row("lcm_b", "student", 4), 4), (Row("teacher", "teacher", 2, 2.0), 4),
                      (Row("lcm_b+", "hybrid", 2, 2.0), 3)):
        gen = Generator(row, teacher, student)
        list(gen.stream(es, 2, warmup=False))
        assert gen.speed(2).nfe == want == gen.timer.unet_samples / 3
    gen.timer.unet_samples += 1  # a hook count the stated NFE does not match: the report would be wrong
    with pytest.raises(RuntimeError, match="hooks counted"):
        gen.speed(2)


# ---- the CLI and the report ----------------------------------------------------------------------------------


def _cli(runs, prompt_file, ref_folder, evaluator_dir, out, cache, *extra):
    return ["--runs", *runs, "--prompts", str(prompt_file), "--seeds-per-prompt", "2", "--reference",
            str(ref_folder), "--num-images", "8", "--batch-size", "4", "--teacher-steps", "1", "2",
            "--teacher-guidance", "2", "--evaluator", str(evaluator_dir), "--features", "evaluator",
            "--out", str(out), "--cache-dir", str(cache), "--quiet", *extra]


@pytest.mark.slow
def test_report_for_two_runs_and_teacher_cache(runs, prompt_file, ref_folder, evaluator_dir, tmp_path):
    out, cache = tmp_path / "report", tmp_path / "cache"
    assert main(_cli(runs, prompt_file, ref_folder, evaluator_dir, out, cache, "--hybrid")) == 0
    for f in ("report.md", "report.json", "fid_vs_steps.png", "quality_vs_latency.png", "grid.png"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    rows = {(r["label"], r["steps"]): r for r in rep["rows"]}
    assert set(rows) == {("teacher (w=2)", 1), ("teacher (w=2)", 2), ("lcm_a", 1), ("lcm_a", 2), ("lcm_b", 2),
                         ("lcm_b", 4), ("lcm_a+teacher-first (w=2)", 2), ("lcm_b+teacher-first (w=2)", 2),
                         ("lcm_b+teacher-first (w=2)", 4)}
    assert rows[("teacher (w=2)", 2)]["nfe"] == 4 and rows[("lcm_b", 4)]["nfe"] == 4
    assert rows[("lcm_b+teacher-first (w=2)", 4)]["nfe"] == 5
    for r in rep["rows"]:
        assert r["fid"] is not None and r["clip"] is not None and r["latency_ms"] > 0 and r["diversity"] is not None
        assert r["fid_torchmetrics"] == pytest.approx(r["fid"], rel=0.01)
    assert rows[("teacher (w=2)", 2)]["speedup"] == pytest.approx(1.0)
    m = rep["meta"]
    assert m["command"].startswith("python -m eval --runs") and m["features"]["name"].startswith("evaluator:")
    assert m["versions"]["clean-fid"] and m["seeds"]["first"] == 0 and len(m["grid_prompts"]) == 4
    scored = [(r["dir"], r["method"], r["trained_steps"]) for r in m["runs"]]
    assert scored == [(runs[0], "lcm", 0), (runs[1], "lcm", 5)]
    md = (out / "report.md").read_text()
    assert "| lcm_b | 4 |" in md and "note: lcm_a at 1 step" in md
    assert not any(r["cached"] for r in rep["rows"])

    # a new student does not pay again for the teacher
    out2 = tmp_path / "report2"
    assert main(_cli(runs[1:], prompt_file, ref_folder, evaluator_dir, out2, cache, "--update-cards")) == 0
    rep2 = json.loads((out2 / "report.json").read_text())
    card = (Path(runs[1]) / "README.md").read_text()  # --update-cards: the run's rows and the teacher's in its card
    assert "## Evaluation" in card and "| lcm_b | 4 |" in card and "| teacher (w=2) | 2 |" in card
    assert "| lcm_a |" not in card and not (Path(runs[0]) / "eval.md").exists()
    teacher_rows = [r for r in rep2["rows"] if r["kind"] == "teacher"]
    assert teacher_rows and all(r["cached"] for r in teacher_rows)
    assert [r["fid"] for r in teacher_rows] == [rows[("teacher (w=2)", s)]["fid"] for s in (1, 2)]


def test_teacher_only_table(tiny_teachers, prompt_file, ref_folder, evaluator_dir, tmp_path):
    out = tmp_path / "tt"
    argv = ["--teacher-only", "--teacher", tiny_teachers["sd"], "--prompts", str(prompt_file), "--seeds-per-prompt",
            "2", "--reference", str(ref_folder), "--num-images", "6", "--batch-size", "3", "--teacher-steps", "1",
            "2", "--guidance-grid", "1.5", "3", "--seed-sets", "2", "--evaluator", str(evaluator_dir), "--out",
            str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    (e1, e2) = rep["teacher_table"]
    assert e1["steps"] == 1 and e2["steps"] == 2 and len(e1["per_seed_set"]) == 2
    assert str(e1["guidance"]) == min(e1["grid_fid"], key=lambda g: e1["grid_fid"][g]) and e1["guidance"] in (1.5, 3)
    assert e2["per_seed_set"][1]["guidance"] == e2["guidance"]
    assert "±" in (out / "report.md").read_text()


@pytest.mark.parametrize("case", ["no_runs", "no_sampling", "empty_prompts", "small_reference", "missing_teacher",
                                  "bad_option"])
def test_bad_input_exits_2_with_one_line(case, runs, prompt_file, ref_folder, evaluator_dir, tmp_path, capsys):
    argv = _cli(runs[:1], prompt_file, ref_folder, evaluator_dir, tmp_path / "r", tmp_path / "c")
    if case == "no_runs":
        argv = ["--prompts", str(prompt_file)]
    elif case == "no_sampling":
        (tmp_path / "half_run").mkdir()
        argv[1] = str(tmp_path / "half_run")
    elif case == "empty_prompts":
        (tmp_path / "empty.txt").write_text("\n  \n")
        argv[argv.index("--prompts") + 1] = str(tmp_path / "empty.txt")
    elif case == "small_reference":
        argv[argv.index("--num-images") + 1] = "100"
    elif case == "missing_teacher":
        argv += ["--teacher", str(tmp_path / "nope")]
    else:
        argv += ["--features", "bogus"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "r").exists()


def test_cli_subprocess_one_line_no_traceback():
    r = subprocess.run([sys.executable, "-m", "eval"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: no runs")


def test_feature_selection_offline(evaluator_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(metrics, "INCEPTION_DIRS", (str(tmp_path),))
    assert isinstance(metrics.select_features("auto", evaluator_dir), metrics.EvaluatorFeatures)
    with pytest.raises(UserError, match="Inception"):
        metrics.select_features("inception", evaluator_dir)
    with pytest.raises(UserError, match="does not exist"):
        metrics.select_features("auto", evaluator_dir, inception_weights=str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="no feature model"):
        metrics.select_features("auto", None)


def test_configs_parse_and_unknown_keys_fail(tmp_path):
    cfg = load_config(str(ROOT / "configs/eval/coco2014_30k.yaml"), build_parser())
    assert cfg["num_images"] == 30000 and cfg["features"] == "inception" and cfg["image_size"] == 256
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_imagez: 3\n")
    with pytest.raises(UserError, match="num_imagez"):
        load_config(str(bad), build_parser())


def test_teacher_rows_use_trailing_ddim(tiny_teachers):
    """The teacher's few-step rows start at the last timestep (a "leading" DDIM would start 1 step at t = 1)."""
    from eval.generate import Context

    ctx = Context(es=None, ref=None, fm=None, clip=None, zero_shot=None, teacher_ref=tiny_teachers["sd"],
                  teacher_hash="x")
    sched = ctx.teacher().scheduler
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [999, 749, 499, 249]
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [999]


def test_teacher_rows_share_their_cache_key_between_teacher_only_and_runs(tiny_teachers, flow_teachers):
    """A flow teacher's rows are labelled (and keyed) by its own flow scheduler with or without runs; the runs'
    resolution drops out of the key when it is the teacher's own, so a --teacher-only ruler serves later reports."""
    from types import SimpleNamespace

    from eval.__main__ import set_teacher_sampling

    def ctx():
        return SimpleNamespace(teacher_resolution=None, teacher_sampler=None)

    c = ctx()
    set_teacher_sampling(c, flow_teachers["sd3"], [])
    assert c.teacher_sampler.startswith("FlowMatchEulerDiscreteScheduler") and c.teacher_resolution is None
    native = artifacts.teacher_facts(tiny_teachers["sd"])[1]
    c = ctx()
    set_teacher_sampling(c, tiny_teachers["sd"], [{"info": {"resolution": native, "schedule": "vp"}}])
    assert (c.teacher_sampler, c.teacher_resolution) == (None, None)
    c = ctx()
    set_teacher_sampling(c, tiny_teachers["sd"], [{"info": {"resolution": 2 * native, "schedule": "vp"}}])
    assert c.teacher_resolution == 2 * native
    c = ctx()  # runs name their teacher; an embedded one by its name
    set_teacher_sampling(c, "embedded-flow", [{"info": {"resolution": 32, "schedule": "flow"}}])
    assert c.teacher_sampler.startswith("FlowMatchEulerDiscreteScheduler") and c.teacher_resolution is None


def test_row_labels_keep_a_symlinked_run_folder_s_own_name(tmp_path, monkeypatch):
    """A run linked under another name (benchmarks.quality reuses sweep runs so) is labelled by the link, not its
    target; repeated names are numbered and "." takes the folder's name."""
    from eval.__main__ import unique_names

    (tmp_path / "sweeps" / "point=1").mkdir(parents=True)
    (tmp_path / "dmd2_seed3").symlink_to(tmp_path / "sweeps" / "point=1")
    (tmp_path / "a" / "run").mkdir(parents=True)
    (tmp_path / "b" / "run").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "run")
    linked = [str(tmp_path / "dmd2_seed3"), str(tmp_path / "sweeps" / "point=1")]
    assert unique_names(linked) == ["dmd2_seed3", "point=1"]
    assert unique_names([".", str(tmp_path / "b" / "run/")]) == ["run#1", "run#2"]


def test_an_averaged_student_is_named_in_the_report_notes(tmp_path):
    """A student exported with ``export_average`` says so in the report (its label is only the folder's name): the
    steps come from its sampling.json, as ``check_run`` reads it; a plain export adds no note."""
    from eval.__main__ import averaged_notes

    lora = tmp_path / "swa" / "student" / artifacts.LORA_FILE
    lora.parent.mkdir(parents=True)
    lora.write_bytes(b"")
    (tmp_path / "swa" / artifacts.SAMPLING_FILE).write_text(json.dumps(
        {"student": "lora", "steps": {}, "averaged_steps": [2750, 3000]}))
    runs = [{"info": artifacts.check_run(tmp_path / "swa")}, {"info": {"student": "lora", "steps": {}}}]
    assert averaged_notes(runs, ["swa", "plain"]) == [
        "swa: weights are the uniform average of the checkpoints at steps 2750, 3000"]


@pytest.mark.slow
def test_a_checkpoint_folder_is_scored_as_its_export(tiny_teachers, image_folder, prompt_file, ref_folder,
                                                     evaluator_dir, tmp_path, capsys):
    """``--runs RUN/checkpoints/checkpoint-N`` exports the checkpoint once (train.py's export_checkpoint) into the
    cache and scores it as row RUN_atN: the last checkpoint scores exactly as the run's own export; a second eval
    takes the export from the cache."""
    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train
    from methods import METHODS

    run = tmp_path / "lcm_run"
    cfg, _ = parse_config(["--method", "lcm", f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}",
                           "max_steps=2", "checkpointing_steps=1", "batch_size=2", f"output_dir={run}",
                           "report_to=none", "validation_seeds=0", "learning_rate=1e-3"], METHODS)
    train(cfg, METHODS["lcm"])
    cache = tmp_path / "cache"
    cks = [str(run / "checkpoints" / f"checkpoint-{i}") for i in (1, 2)]
    assert main(_cli([str(run), *cks], prompt_file, ref_folder, evaluator_dir, tmp_path / "r1", cache)) == 0
    assert capsys.readouterr().err.count("exporting ") == 2
    rep = json.loads((tmp_path / "r1" / "report.json").read_text())
    rows = {(r["label"], r["steps"]): r["fid"] for r in rep["rows"]}
    assert [r["checkpoint"] for r in rep["meta"]["runs"]] == [None, *cks]
    steps = sorted(s for (label, s) in rows if label == "lcm_run")
    assert steps and all(rows[("lcm_run_at2", s)] == rows[("lcm_run", s)] for s in steps)
    assert any(rows[("lcm_run_at1", s)] != rows[("lcm_run", s)] for s in steps)
    assert main(_cli(cks[1:], prompt_file, ref_folder, evaluator_dir, tmp_path / "r2", cache)) == 0
    assert "exporting " not in capsys.readouterr().err
