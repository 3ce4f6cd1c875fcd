"""The benchmark's step timer on a tiny teacher: phases are timed, add up to at most the step, and are undone."""

import json

import pytest
import torch

from benchmarks.__main__ import keep_sections, markdown
from benchmarks.train_step import PHASES, run
from distill_diffusion.models import Models


@pytest.mark.slow
def test_train_step_phases_and_markdown(tiny_teachers, image_folder, tmp_path):
    before = (Models.net_out_at, torch.optim.AdamW.step)
    res = run("dmd2", "lora", steps=4, warmup=1, out_dir=tmp_path / "r",
              overrides=[f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}", "batch_size=2",
                         "method.student_update_every=1"])
    assert (Models.net_out_at, torch.optim.AdamW.step) == before, "the instrumentation was not undone"
    p = res["phase_sec_per_step"]
    assert set(PHASES) <= set(p) and res["timed_steps"] == 3
    assert p["teacher forward"] > 0 and p["student forward"] > 0 and p["critic forward"] > 0 and p["optimizer"] > 0
    assert sum(v for k, v in p.items() if k != "backward and the rest") <= res["sec_per_step_mean"] * 1.05
    assert res["memory"]["total_counted_bytes"] > 0
    meta = {"command": "python -m benchmarks", "machine": "m", "versions": "v", "date": "d", "steps": 4,
            "warmup": 1, "threads": 1}
    md = markdown(meta, [res], None, None, None)
    assert "| dmd2 | lora | 2 |" in md and "counted total MB" in md
    json.dumps(res)


def test_reference_lcm_shard_timing_and_matched_settings(tmp_path):
    """The webdataset shard holds PNG + caption pairs equal to the images given; the step arithmetic; our side of
    the comparison parses to the settings the reference script is given."""
    import io
    import tarfile

    import numpy as np
    import pytest
    from PIL import Image

    from benchmarks import reference_lcm as R
    from distill_diffusion.config import parse_config
    from distill_diffusion.families import UNET_LORA_TARGETS as DEFAULT_LORA_TARGETS
    from methods import METHODS

    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 8, 8, generator=g) * 2 - 1 for _ in range(3)]
    caps = ["a photo of a bag", "a sneaker", "an ankle boot"]
    assert R.write_shard(tmp_path / "s.tar", zip(imgs, caps)) == 3
    with tarfile.open(tmp_path / "s.tar") as tar:
        names = tar.getnames()
        assert names == ["000000.png", "000000.txt", "000001.png", "000001.txt", "000002.png", "000002.txt"]
        for i, (img, cap) in enumerate(zip(imgs, caps)):
            got = np.asarray(Image.open(io.BytesIO(tar.extractfile(f"{i:06d}.png").read())))
            want = ((img + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            assert got.shape == (8, 8, 3) and (got == want).all()
            assert tar.extractfile(f"{i:06d}.txt").read().decode() == cap

    assert R.per_step(20.0, 50.0, 10, 40) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        R.per_step(20.0, 50.0, 40, 40)
    assert R.steady_median([0.0, 5.0, 6.0, 7.5, 8.5], skip=1) == pytest.approx(1.0)  # the slow first step skipped
    recs = [{"who": w, "repeat": r, "steps": n, "wall_s": t, "inproc_s": None} for w, r, n, t in [
        ("ref_autocast_off", 0, 10, 20.0), ("ref_autocast_off", 0, 40, 50.0), ("ours", 0, 10, 15.0),
        ("ours", 0, 40, 30.0), ("ref_autocast_off", 1, 10, 21.0), ("ref_autocast_off", 1, 40, 57.0),
        ("ours", 1, 10, 16.0), ("ours", 1, 40, 34.0)]]
    s = R.summarize(recs, 10, 40)
    assert s["sec_per_step"]["ours"] == pytest.approx([0.5, 0.6])
    assert s["median"]["ref_autocast_off"] == pytest.approx(1.1) and s["median"]["ours"] == pytest.approx(0.55)
    assert s["ratio"] == {"ref_autocast_off": pytest.approx(0.5)}
    res = {"summary": s, "command": "c", "date": "d", "versions": "v", "short": 10, "long": 40, "repeats": 2,
           "script": {"sha256": "0" * 64, "url": "u"},
           "settings": {**{k: 1 for k in ("batch", "resolution", "lora_rank", "lora_alpha", "learning_rate", "warmup",
                                          "huber_c", "num_ddim_timesteps", "threads")},
                        "lora_targets": R.LORA_TARGETS, "w_ours": [1.5, 3.0], "w_script": [0.5, 2.0]}}
    md = "\n".join(R.markdown_section(res))
    assert "| 0.550 | 0.500, 0.600 |" in md and "**0.50**" in md and "0.50×, met." in md
    # Spliced into BENCHMARKS.md before the sampling section, once, whatever else the file holds.
    bench = tmp_path / "B.md"
    bench.write_text("# B\n\n## Training\n\nt\n\n## Sampling\n\ns\n")
    (tmp_path / "B.json").write_text(json.dumps({"lean": 1}))
    R.write(bench, res)
    R.write(bench, res)
    text = bench.read_text()
    assert text.count(R.START) == 1 and text.index("\nt\n") < text.index(R.START) < text.index("## Sampling")
    assert json.loads((tmp_path / "B.json").read_text())["lean"] == 1

    # Our command parses, and to the values the script gets (its omega range is our w range minus one).
    cfg, _ = parse_config(R.ours_argv(tmp_path / "o", 40)[2:], METHODS)
    assert (cfg.batch_size, cfg.lora_rank, cfg.lora_alpha, cfg.resolution, cfg.max_steps) == (32, 16, 16, 32, 40)
    assert list(cfg.lora_targets) == R.LORA_TARGETS == DEFAULT_LORA_TARGETS and cfg.mixed_precision == "no"
    assert (cfg.learning_rate, cfg.lr_warmup_steps, cfg.method.huber_c, cfg.method.loss_type) == (5e-4, 50, 1e-3,
                                                                                                    "huber")
    cfg16, _ = parse_config(R.ours_argv(tmp_path / "o", 40, bf16=True)[2:], METHODS)
    assert cfg16.mixed_precision == "bf16" and cfg16.batch_size == 32  # our bf16 option, else the same work
    ref = R.reference_argv(*(tmp_path / x for x in "wstxyo"), "off", steps=40)
    flag = {ref[i]: ref[i + 1] for i in range(5, len(ref) - 1) if ref[i].startswith("--")}
    assert flag["--lora_target_modules"].split(",") == R.LORA_TARGETS and flag["--train_batch_size"] == "32"
    assert (float(flag["--w_min"]), float(flag["--w_max"])) == (cfg.method.w_min - 1, cfg.method.w_max - 1)
    assert flag["--max_train_steps"] == "40" and flag["--mixed_precision"] == "no"


def test_quality_reports_newer_first_and_kept(tmp_path):
    from benchmarks.__main__ import load_quality

    def row(label, steps, fid):
        return {"label": label, "steps": steps, "fid": fid, "clip": 1.0, "accuracy": 0.5, "diversity": 0.1}

    old = tmp_path / "old.json"  # a BENCHMARKS.json holding an older report
    old.write_text(json.dumps({"quality": [{"meta": {"command": "old"}, "rows": [
        row("teacher (w=3)", 25, 3.0), row("dmd2", 1, 18.4), row("sid", 1, 3.9)]}]}))
    new = tmp_path / "report.json"  # an eval report of a retrained dmd2
    new.write_text(json.dumps({"meta": {"command": "new"}, "rows": [row("teacher (w=3)", 1, 19.7),
                                                                   row("dmd2", 1, 4.4)]}))
    quality = load_quality([str(new), str(old)], tmp_path / "none.json")
    md = markdown({"command": "c", "machine": "m", "versions": "v", "date": "d"}, [], None, quality, None)
    table = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0] for line in table] == ["| teacher (w=3)", "| teacher (w=3)", "| dmd2", "| sid"]
    assert "| dmd2 | 1 | 4.40 |" in md and "18.40" not in md  # the newer report's row replaces the older one's
    assert table[0].startswith("| teacher (w=3) | 1 |")  # the teacher's rows first, by steps
    # no --quality: the reports kept in the JSON stay
    assert load_quality(None, old) == json.loads(old.read_text())["quality"]
    # a report both given and already kept in the JSON is listed once
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"quality": quality}))
    assert [q["meta"]["command"] for q in load_quality([str(new), str(both)], both)] == ["new", "old"]


def test_bars_judge_ratios_against_the_same_report(tmp_path):
    """Each bar's ratio, by hand, on a synthetic report; untrained runs are not judged; bad input exits 2."""
    from benchmarks import bars

    def t(steps, fid, acc):
        return {"kind": "teacher", "steps": steps, "nfe": 2.0 * steps, "fid": fid, "accuracy": acc}

    def s(run, method, steps, fid, acc):
        return {"kind": "student", "label": run, "run": run, "method": method, "steps": steps, "nfe": float(steps),
                "fid": fid, "accuracy": acc}

    rows = [t(1, 20.0, 0.6), t(2, 6.0, 0.8), t(25, 4.0, 0.86),
            s("runs/sid", "sid", 1, 5.9, 0.82), s("runs/sid0", "sid", 1, 50.0, 0.1),
            s("runs/lcm", "lcm", 1, 30.0, 0.4), s("runs/lcm", "lcm", 2, 5.0, 0.7), s("runs/lcm", "lcm", 4, 4.9, 0.8)]
    meta = {"runs": [{"dir": "runs/sid", "trained_steps": 300}, {"dir": "runs/sid0", "trained_steps": 0},
                     {"dir": "runs/lcm", "trained_steps": 800}]}
    p = tmp_path / "report.json"
    p.write_text(json.dumps({"meta": meta, "rows": rows}))
    res = {(x["student"], x["steps"], x["bar"]): x for x in bars.judge(*bars.load(p), bars.BARS["embedded-flow"])}
    assert not any(k[0] == "runs/sid0" for k in res), "an untrained baseline was judged"
    one = res[("runs/sid", 1, "1-step FID vs teacher 25 steps")]
    assert abs(one["value"] - 5.9 / 4.0) < 1e-12 and one["pass"]  # 1.475 <= 1.5
    assert abs(res[("runs/sid", 1, "1-step FID vs teacher 1 step")]["value"] - 0.295) < 1e-12
    acc = res[("runs/sid", 1, "1-step accuracy")]
    assert abs(acc["value"] - 4.0) < 1e-9 and acc["pass"]  # 86% - 82% = 4 points
    assert not any(k[0] == "runs/lcm" and k[1] == 1 for k in res), "LCM has no one-step bar"
    two = res[("runs/lcm", 2, "2/4-step FID vs teacher 25 steps")]
    assert abs(two["value"] - 1.25) < 1e-12 and not two["pass"]
    same = res[("runs/lcm", 2, "2/4-step FID vs teacher at the same NFE")]  # NFE 2: the teacher's 1 step
    assert abs(same["value"] - 0.25) < 1e-12 and same["pass"]
    assert res[("runs/lcm", 4, "2/4-step FID vs teacher at the same NFE")]["text"].startswith("FID 4.90 vs teacher 2")
    table = bars.students_table(*bars.load(p))
    assert "| runs/sid | 1 | 1 | 5.90 | 1.48 | — | 82.0% | n/a |" in table  # no teacher row costs 1 NFE
    assert "| runs/lcm | 2 | 2 | 5.00 | 1.25 | 0.25 | 70.0% | n/a |" in table and "runs/sid0 (untrained)" in table
    assert bars.main([str(p), "--table"]) == 0
    assert bars.main([str(tmp_path / "missing.json")]) == 2
    only = tmp_path / "teacher_only.json"
    only.write_text(json.dumps({"meta": {}, "teacher_table": []}))
    assert bars.main([str(only)]) == 2


def test_dmd2_four_step_bars_by_hand():
    """Issue 21's DMD2 bars at 4 steps: FID <= 1.2x the 25-step teacher, diversity >= 0.8x the 4-step teacher's;
    one-step DMD2 rows and other methods' 4-step rows are not judged by them."""
    from benchmarks import bars

    teachers = {4: {"kind": "teacher", "steps": 4, "nfe": 8.0, "fid": 3.3, "diversity": 0.13},
                25: {"kind": "teacher", "steps": 25, "nfe": 50.0, "fid": 3.0, "diversity": 0.15}}

    def s(run, method, steps, fid, div):
        return {"kind": "student", "label": run, "run": run, "method": method, "steps": steps, "nfe": float(steps),
                "fid": fid, "diversity": div}

    rows = [s("a", "dmd2", 4, 3.6, 0.105), s("b", "dmd2", 4, 3.61, 0.1039), s("c", "dmd2", 1, 4.0, 0.05),
            s("d", "sid", 4, 9.0, 0.01)]
    res = {(x["student"], x["bar"]): x for x in bars.judge(teachers, rows, {}, bars.dmd2_few_step_bars())}
    assert {k[0] for k in res} == {"a", "b"}
    fid, div = res[("a", "DMD2 4-step FID vs teacher 25 steps")], res[("a", "DMD2 4-step diversity vs teacher 4 steps")]
    assert abs(fid["value"] - 1.2) < 1e-12 and fid["pass"] and abs(div["value"] - 0.105 / 0.13) < 1e-12 and div["pass"]
    assert not res[("b", "DMD2 4-step FID vs teacher 25 steps")]["pass"]  # 3.61 / 3.0 > 1.2
    assert not res[("b", "DMD2 4-step diversity vs teacher 4 steps")]["pass"]  # 0.1039 < 0.8 x 0.13 = 0.104
    assert any(b.name.startswith("DMD2 4-step") for b in bars.BARS["embedded"])


def test_scm_bars_by_hand():
    """Issue 19's bars: FID <= 1.5x / 1.2x the 25-step teacher at one / two steps (four steps: no FID bar), diversity
    >= 0.8x the 25-step teacher's at every step count; other methods' rows are not judged."""
    from benchmarks import bars

    teachers = {25: {"kind": "teacher", "steps": 25, "nfe": 50.0, "fid": 3.2918, "diversity": 0.1069}}

    def s(steps, fid, div, method="scm"):
        return {"kind": "student", "label": f"{method}{steps}", "run": "r", "method": method, "steps": steps,
                "nfe": float(steps), "fid": fid, "diversity": div}

    rows = [s(1, 4.9376, 0.0856), s(2, 3.9502, 0.0855), s(4, 9.0, 0.09), s(1, 1.0, 0.2, "dmd2")]
    res = {(x["student"], x["bar"]): x for x in bars.judge(teachers, rows, {}, bars.BARS["scm"])}
    assert set(res) == {("scm1", "sCM FID vs teacher 25 steps"), ("scm2", "sCM FID vs teacher 25 steps"),
                        ("scm1", "sCM diversity vs teacher 25 steps"), ("scm2", "sCM diversity vs teacher 25 steps"),
                        ("scm4", "sCM diversity vs teacher 25 steps")}
    assert res[("scm1", "sCM FID vs teacher 25 steps")]["pass"]  # 4.9376 <= 1.5 x 3.2918 = 4.9377
    assert not res[("scm2", "sCM FID vs teacher 25 steps")]["pass"]  # 3.9502 > 1.2 x 3.2918 = 3.95016
    assert res[("scm1", "sCM diversity vs teacher 25 steps")]["pass"]  # 0.0856 >= 0.08552
    assert not res[("scm2", "sCM diversity vs teacher 25 steps")]["pass"]  # 0.0855 < 0.08552
    assert res[("scm4", "sCM diversity vs teacher 25 steps")]["pass"]


def test_same_nfe_bar_judges_every_few_step_row_against_the_teacher_at_its_cost():
    """Issue 21: a k-step student (k > 1) against the teacher row of NFE k (k / 2 steps with CFG); one-step rows and
    rows without such a teacher row are not judged."""
    from benchmarks import bars

    teachers = {2: {"kind": "teacher", "steps": 2, "nfe": 4.0, "fid": 5.0}, 4: {"kind": "teacher", "steps": 4,
                                                                              "nfe": 8.0, "fid": 3.2}}

    def s(run, steps, fid):
        return {"kind": "student", "label": run, "run": run, "method": "lcm", "steps": steps, "nfe": float(steps),
                "fid": fid}

    rows = [s("a", 4, 4.9), s("b", 8, 3.3), s("c", 1, 2.0), s("d", 2, 1.0)]
    res = {x["student"]: x for x in bars.judge(teachers, rows, {}, bars.same_nfe_bars())}
    assert set(res) == {"a", "b"}
    assert res["a"]["pass"] and abs(res["a"]["value"] - 4.9 / 5.0) < 1e-12
    assert not res["b"]["pass"] and abs(res["b"]["value"] - 3.3 / 3.2) < 1e-12
    assert any(b.name == "few-step FID vs teacher at the same NFE" for b in bars.BARS["embedded"])


def test_quality_spread_over_seed_runs_and_bars_on_the_mean(tmp_path):
    """Mean ± sample std, min and max per step count over the seed runs; stage students and the untrained run stay
    out of the spread; the bars judge the mean; a run counts as finished only at its last step."""
    from benchmarks import bars, quality

    def s(run, steps, fid, acc, label=None):
        return {"kind": "student", "label": label or run.split("/")[-1], "run": run, "method": "sid", "steps": steps,
                "nfe": float(steps), "fid": fid, "accuracy": acc, "diversity": 0.1}

    rows = [{"kind": "teacher", "label": "teacher (w=3)", "steps": 1, "nfe": 2.0, "fid": 20.0, "accuracy": 0.6},
            {"kind": "teacher", "label": "teacher (w=3)", "steps": 25, "nfe": 50.0, "fid": 4.0, "accuracy": 0.86},
            s("runs/a_seed0", 1, 5.0, 0.90), s("runs/a_seed1", 1, 6.0, 0.84), s("runs/a_seed2", 1, 7.0, 0.81),
            s("runs/a_seed0", 1, 99.0, 0.1, label="a_seed0/student_S4"), s("runs/a_untrained", 1, 50.0, 0.2)]
    out = quality.aggregate({"rows": rows}, ["runs/a_seed0", "runs/a_seed1", "runs/a_seed2"], "runs/a_untrained")
    # rows are labelled by the setting (--name, the runs' prefix), so two settings of one method read apart
    assert quality.setting_name("runs/sid_seed2") == "sid" and quality.setting_name("r/scm_r64_untrained") == "scm_r64"
    seed = [r for r in out if r.get("spread")]
    assert len(seed) == 1 and seed[0]["fid"] == 6.0
    sp = seed[0]["spread"]["fid"]
    assert (sp["std"], sp["min"], sp["max"], sp["n"]) == (1.0, 5.0, 7.0, 3)
    assert [r["label"] for r in out if r["kind"] == "student" and not r.get("spread")] == ["a untrained"]
    md = quality.markdown(out, "python -m benchmarks.quality --method sid")
    assert "| a x3 seeds | 1 | 1 | 6.00 ± 1.00 (5.00–7.00) | 85.0 ± 4.6% |" in md
    res = bars.judge({r["steps"]: r for r in out if r["kind"] == "teacher"}, seed, {}, bars.BARS["embedded-flow"])
    assert {x["bar"]: x["pass"] for x in res} == {"1-step FID vs teacher 25 steps": True,  # 1.5x exactly
                                                  "1-step FID vs teacher 1 step": True, "1-step accuracy": True}
    # quality.json judged by the bars' own command: the seeds' mean, never the untrained row
    runs = [{"dir": f"runs/a_seed{k}", "trained_steps": 300} for k in range(3)]
    p = tmp_path / "quality.json"
    p.write_text(json.dumps(quality.payload("cmd", out, {"rows": rows, "meta": {"runs": runs + [
        {"dir": "runs/a_untrained", "trained_steps": 0}]}})))
    assert [x["student"] for x in bars.judge(*bars.load(p), bars.BARS["embedded-flow"])] == ["a x3 seeds"] * 3
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("max_steps: 300\n")
    (run / "sampling.json").write_text(json.dumps({"step": 200}))
    assert not quality.finished(run)
    (run / "sampling.json").write_text(json.dumps({"step": 300}))
    assert quality.finished(run) and not quality.finished(tmp_path / "missing")


def test_data_scale_section_replaces_itself(tmp_path):
    from benchmarks import data_scale

    r = {"command": "python -m benchmarks.data_scale", "when": "now", "cpu": "cpu", "threads": 1,
         "args": {"batch": 8, "size": 1024, "prompts": 4},
         "workers": {"decode_s_per_batch": 0.5, "s_per_step": {"0": 1.0, "1": 0.5}},
         "text": {"ms_per_prompt": {"1": 4.0, "8": 1.0}, "batch32_encode_s": 0.1, "batch32_store_s": 0.01}}
    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\nkept\n")
    data_scale.write(out, r)
    data_scale.write(out, dict(r, when="later"))
    text = out.read_text()
    assert text.count(data_scale.START) == 1 and "kept" in text and "later" in text
    assert "| 1 | 0.500 | 2.00× |" in text and "| 8 | 1.00 | 4.00× |" in text


def test_sweep_grid_points_and_table(tmp_path, monkeypatch):
    from benchmarks import sweep

    grid = sweep.parse_grid(["method.student_update_every=2,5", "method.timesteps=[999,499],[999]"])
    assert grid == [("method.student_update_every", ["2", "5"]), ("method.timesteps", ["[999,499]", "[999]"])]
    pts = sweep.points(grid)
    assert len(pts) == 4 and pts[1] == {"method.student_update_every": "2", "method.timesteps": "[999]"}
    assert sweep.point_name(pts[0]) == "student_update_every=2,timesteps=_999,499_"
    with pytest.raises(ValueError, match="key=value1,value2"):
        sweep.parse_grid(["learning_rate"])

    calls = {}

    def fake_train_all(cmds, env):
        calls["cmds"] = cmds
        return True

    def fake_score(runs, out, threads, args, env):
        calls["score"] = (runs, args)
        rows = [{"kind": "teacher", "label": "teacher (w=3)", "steps": 25, "nfe": 50, "fid": 3.0, "accuracy": 0.85,
                 "diversity": 0.15, "run": None}]
        for i, r in enumerate(runs):
            rows.append({"kind": "student", "label": f"p{i}", "run": r, "steps": 1, "nfe": 1, "fid": 5.0 + i,
                         "accuracy": 0.9, "diversity": 0.05 * (i + 1)})
        (tmp_path / "out" / "eval").mkdir(parents=True)
        (tmp_path / "out" / "eval" / "report.json").write_text(json.dumps({"rows": rows}))
        return True

    monkeypatch.setattr(sweep, "train_all", fake_train_all)
    monkeypatch.setattr(sweep, "score", fake_score)
    monkeypatch.setattr(sweep, "ROOT", tmp_path)
    assert sweep.main(["--method", "dmd2", "--grid", "learning_rate=1e-5,3e-4", "--out", str(tmp_path / "out"),
                       "--runs-dir", str(tmp_path / "runs"), "max_steps=10", "lora_targets=[to_q,to_k]"]) == 0
    run0, cmd0 = calls["cmds"][0]
    assert run0 == tmp_path / "runs" / "dmd2" / "learning_rate=1e-5"
    assert cmd0[-4:] == ["max_steps=10", "lora_targets=[to_q,to_k]", "learning_rate=1e-5", f"output_dir={run0}"]
    assert calls["score"][1][:2] == ["--num-images", "500"]
    md = (tmp_path / "out" / "sweep.md").read_text()
    assert "max_steps=10 'lora_targets=[to_q,to_k]'`" in md  # the printed command pastes into a shell as it ran
    assert "| learning_rate=1e-5 | 1 | 1 | 5.00 | 90.0% | 0.050 |" in md and "| teacher (w=3) | 25 |" in md
    assert sweep.main(["--method", "dmd2", "--grid", "oops"]) == 2


def test_quality_resumes_an_interrupted_run(tmp_path, monkeypatch):
    import subprocess

    from benchmarks import quality

    fresh, cut = tmp_path / "a_seed0", tmp_path / "a_seed1"
    (cut / "checkpoints" / "checkpoint-200").mkdir(parents=True)
    seen = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    assert quality.train_all([(fresh, ["py", "train.py", "seed=0"]), (cut, ["py", "train.py", "seed=1"])], {})
    assert seen == [["py", "train.py", "seed=0"], ["py", "train.py", "seed=1", "resume=latest"]]


def test_regenerating_the_tables_keeps_other_commands_sections():
    old = ("# Benchmarks\nold tables\n\n<!-- data-scale:start -->\n## Data\nrows\n<!-- data-scale:end -->\n\n"
           "<!-- reference-lcm:start -->\nold ref\n<!-- reference-lcm:end -->\n")
    new = "# Benchmarks\nnew tables\n\n<!-- reference-lcm:start -->\nnew ref\n<!-- reference-lcm:end -->\n"
    out = keep_sections(old, new)
    assert "new tables" in out and "old tables" not in out
    assert "new ref" in out and "old ref" not in out  # a section the command writes itself is its new one
    assert "<!-- data-scale:start -->\n## Data\nrows\n<!-- data-scale:end -->" in out
    assert keep_sections(out, new) == out  # idempotent


def test_tables_not_measured_again_are_kept_with_their_provenance(tmp_path):
    """--no-train / --no-sampling keep the tables in --out's JSON; a kept sampling table names its own command."""
    import json

    from benchmarks.__main__ import main

    row = {"method": "lcm", "student": "lora", "error": "kept row"}
    samp = {"images": 64, "batch": 16, "rows": []}
    meta = {"command": "python -m benchmarks --steps 9", "date": "2026-01-01 00:00 UTC", "steps": 9, "warmup": 2,
            "threads": 1}
    (tmp_path / "B.json").write_text(json.dumps({"meta": meta, "train": [row], "sampling": samp, "data": {"x": 1}}))
    assert main(["--no-train", "--no-sampling", "--out", str(tmp_path / "B.md")]) == 0
    data = json.loads((tmp_path / "B.json").read_text())
    assert data["train"] == [row] and data["sampling"]["rows"] == [] and data["data"] == {"x": 1}
    assert data["meta"]["steps"] == 9 and data["sampling"]["measured"]["command"] == meta["command"]
    text = (tmp_path / "B.md").read_text()
    assert "steps 3..9" in text and "kept row" in text and "Measured by `python -m benchmarks --steps 9`" in text


def test_hold_keeps_a_core_busy_for_its_seconds(capsys):
    import time

    from benchmarks import machine

    t0 = time.monotonic()
    assert machine.hold_core(0.2) >= 1 and 0.2 <= time.monotonic() - t0 < 5
    assert machine.main(["--hold", "-1"]) == 2 and "positive" in capsys.readouterr().err


def test_factor_emas_against_a_hand_computation():
    """benchmarks.ema_factors: EMA(A), EMA(B), EMA(BA) and the gap / lag figures on two steps of one layer."""
    import torch

    from benchmarks.ema_factors import FactorEMAs

    a0, b0 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0], [0.0]])  # B = 0 at the start, as an adapter
    a1, b1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0], [1.0]])
    e = FactorEMAs([0.5])
    e.observe([(a0, b0)])
    e.observe([(a1, b1)])
    ea, eb, eba = (a0 + a1) / 2, (b0 + b1) / 2, (b0 @ a0 + b1 @ a1) / 2
    f = e.figures()[0.5]
    assert abs(f["gap"] - float((eb @ ea - eba).norm() / eba.norm())) < 1e-6 and f["gap"] > 0
    assert abs(f["lag"] - float((b1 @ a1 - eba).norm() / eba.norm())) < 1e-6


def test_lean_merge_rows_and_kept_rows(tmp_path, monkeypatch):
    """--merge times lora_merge=off / no_grad / auto per method (interleaved); --keep keeps the earlier section's
    other rows, naming the command that measured them."""
    from benchmarks import lean

    calls = []
    secs = {"lora_merge=off": 2.0, "lora_merge=no_grad": 1.6, "lora_merge=auto": 1.0,
            "mixed_precision=bf16 lora_merge=off": 1.5, "mixed_precision=bf16": 0.5}

    def fake(tree, method, steps, warmup, threads, overrides):
        calls.append((method, " ".join(overrides)))
        return {"sec_per_step_median": secs[" ".join(overrides)]}

    monkeypatch.setattr(lean, "train_step", fake)
    rows, raw = lean.merge_rows(["lcm", "sid"], repeats=2, steps=4, warmup=1, threads=1)
    assert calls[:3] == [("lcm", "lora_merge=off"), ("lcm", "lora_merge=no_grad"), ("lcm", "lora_merge=auto")]
    assert len(calls) == 12 and len(raw["sid/auto"]) == 2
    by = {r["item"]: r for r in rows}
    auto = by["LoRA on merged weights, every forward (auto on a CPU): lcm (issue 23)"]
    assert auto["ratio"] == 2.0 and auto["status"] == "default" and auto["unit"] == "s"
    calls.clear()
    bf16_rows, _ = lean.merge_rows(["lcm"], repeats=1, steps=4, warmup=1, threads=1, bf16=True)
    assert calls[3:] == [("lcm", "mixed_precision=bf16 lora_merge=off"), ("lcm", "mixed_precision=bf16")]
    assert [r["ratio"] for r in bf16_rows if r["item"].startswith("mixed_precision=bf16")] == [3.0]
    old = {"lean": {"command": "python -m benchmarks.lean --old", "date": "2026-01-01 00:00 UTC",
                    "rows": [lean.row("CFG", "x", 1.0, 0.5), {**auto, "before": 9.0}], "raw": {}}}
    (tmp_path / "B.json").write_text(json.dumps(old))
    kept = lean.kept_rows(rows, lean.earlier_section(tmp_path / "B.json"))
    assert [r["item"] for r in kept] == ["CFG"]
    assert kept[0]["source"] == "`python -m benchmarks.lean --old` (2026-01-01 00:00 UTC)"
    assert "measured by `python -m benchmarks.lean --old`" in lean.markdown(
        {"command": "c", "date": "d", "threads": 1, "rows": kept + rows})


def test_machine_script_step_ratio(tmp_path, capsys):
    """--step-json: the reference machine's script step (issue 23) over the one measured here; a JSON without
    the section is one error line and exit code 2."""
    from benchmarks import machine

    f = tmp_path / "B.json"
    f.write_text(json.dumps({"reference": {"date": "today", "summary": {"median": {"ref_autocast_off": 1.72}}}}))
    assert machine.script_step_ratio(str(f))["script_step_slowdown"] == 2.0
    (tmp_path / "bad.json").write_text("{}")
    assert machine.main(["--step-json", str(tmp_path / "bad.json")]) == 2
    assert "no benchmarks.reference_lcm section" in capsys.readouterr().err


def test_recorded_commands_paste_back_as_they_ran(monkeypatch):
    import shlex

    from distill_diffusion.provenance import command_line

    argv = ["--grid", "lora_targets=[a,b]", "out dir/x", "plain", "it's"]
    line = command_line("python -m benchmarks.sweep", argv)
    assert shlex.split(line) == ["python", "-m", "benchmarks.sweep", *argv]
    assert line.startswith("python -m benchmarks.sweep --grid 'lora_targets=[a,b]' ")
    monkeypatch.setattr("sys.argv", ["prog", "a b"])
    assert command_line("p") == "p 'a b'"  # no argv: this process's own


def test_tcd_gamma_copy_rewrites_every_sampler_and_keeps_the_run(tmp_path, capsys):
    """benchmarks.tcd_gamma samples a copy: TCDScheduler at the same timesteps in every sampling file (the main one
    cut to the asked step counts), LCM's boundary settings dropped; the run is untouched; a flow run or a missing
    step count is one line and exit 2."""
    from benchmarks.quality import ROOT
    from benchmarks.tcd_gamma import main, tcd_copy

    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    lcm = {"scheduler": "LCMScheduler", "timesteps": [999, 499], "guidance_scale": 1.0,
           "scheduler_kwargs": {"timestep_scaling": 1e4, "original_inference_steps": 50}}
    main_file = {"steps": {"2": lcm, "4": dict(lcm, timesteps=[999, 739, 499, 239])}, "default_steps": 2}
    stage = {"steps": {"4": dict(lcm, scheduler="TCDScheduler", timesteps=[999, 739, 499, 239])}, "default_steps": 4}
    (run / "sampling.json").write_text(json.dumps(main_file))
    (run / "sampling_student_S4.json").write_text(json.dumps(stage))
    tcd_copy(run, tmp_path / "copy", [4], 0.3)
    got = json.loads((tmp_path / "copy" / "sampling.json").read_text())
    assert list(got["steps"]) == ["4"] and got["default_steps"] == 4
    assert got["steps"]["4"]["scheduler"] == "TCDScheduler"
    assert got["steps"]["4"]["timesteps"] == [999, 739, 499, 239]
    assert got["steps"]["4"]["scheduler_kwargs"] == {"original_inference_steps": 50} and got["steps"]["4"]["eta"] == 0.3
    assert json.loads((tmp_path / "copy" / "sampling_student_S4.json").read_text())["steps"]["4"]["timesteps"] == \
        [999, 739, 499, 239]
    assert not (tmp_path / "copy" / "checkpoints").exists()
    assert json.loads((run / "sampling.json").read_text()) == main_file
    with pytest.raises(ValueError, match="none of the step counts"):
        tcd_copy(run, tmp_path / "copy", [8], 0.3)
    flow = dict(lcm, scheduler="FlowMatchLCMScheduler")
    (run / "sampling.json").write_text(json.dumps(dict(main_file, steps={"2": flow})))
    assert main(["--run", str(run), "--steps", "2", "--name", "probe_test"]) == 2
    assert "not a VP consistency/TCD sampler" in capsys.readouterr().err
    assert not (ROOT / "runs" / "_tcd_gamma" / "probe_test").exists()
