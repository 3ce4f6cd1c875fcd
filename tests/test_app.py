"""The comparison app: finding runs, the page's messages, NFE accounting, the gradio API end to end, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

ROOT = Path(__file__).resolve().parent.parent


def make_runs(root: Path, teacher: str) -> Path:
    """runs/group/lcm_sd with its student (1, 2, 4, 8 steps) and an extra export student_S4 (4 steps only)."""
    from distill_diffusion import artifacts
    from distill_diffusion.method import SamplingSpec
    from methods import METHODS
    from tests.helpers import build

    models, method, _ = build(METHODS["lcm"], teacher)
    spec = method.sampling()
    run = root / "group" / "lcm_sd"
    artifacts.save_run(models, "lcm", spec, run)
    artifacts.save_run(models, "lcm", SamplingSpec({4: spec.steps[4]}, 4), run, folder_name="student_S4")
    return root


@pytest.fixture(scope="module")
def runs(tiny_teachers, tmp_path_factory) -> Path:
    return make_runs(tmp_path_factory.mktemp("runs"), tiny_teachers["sd"])


@pytest.fixture(scope="module")
def comp(runs, tiny_teachers):
    from app.ui import create_comparison

    return create_comparison(str(runs), tiny_teachers["sd"])


def test_find_runs_lists_extra_exports_and_reports_broken_runs(runs, tmp_path):
    from app.ui import find_runs

    entries, problems = find_runs(runs)
    assert [(e.label, e.steps, e.default_steps, e.sampling_file) for e in entries] == [
        ("group/lcm_sd (lcm)", (1, 2, 4, 8), 4, "sampling.json"),
        ("group/lcm_sd/student_S4 (lcm)", (4,), 4, "sampling_student_S4.json"),
    ]
    assert problems == []
    # A run three levels down is not searched; a broken sampling.json is a one-line problem, not a crash.
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "sampling.json").write_text("{}")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "sampling.json").write_text("{not json")
    entries, problems = find_runs(tmp_path)
    assert entries == [] and len(problems) == 1 and "bad" in problems[0] and "not a valid sampling file" in problems[0]
    # A teacher with different weights than the run's gets a note.
    entries, _ = find_runs(runs, teacher_hash="0" * 16)
    assert "another teacher" in entries[0].note


def test_messages_for_bad_requests(comp):
    from app.ui import TEACHER, Request

    s0 = comp.students[0].key
    cases = [
        (Request(prompt="   "), "Type a prompt"),
        (Request(prompt="a bag", models=[]), "Select at least one model"),
        (Request(prompt="a bag", seed=-1), "seed must be"),
        (Request(prompt="a bag", num_images=0), "number of images"),
        (Request(prompt="a bag", models=[TEACHER], guidance=0.5), "Guidance must be at least 1"),
        (Request(prompt="a bag", models=[s0], student_steps={s0: 3}), "supports 1, 2, 4, 8 steps, not 3"),
    ]
    for req, text in cases:
        status, results, warnings = comp.run(req)
        assert results == {} and text in status and len(warnings) == 1 and text in warnings[0], (req, status)


def test_no_runs_still_shows_the_teacher_with_a_message(tiny_teachers, tmp_path):
    from app.ui import Request, create_comparison

    comp = create_comparison(str(tmp_path), tiny_teachers["sd"])
    assert comp.students == [] and "No run folders found" in comp.intro() and "teacher only" in comp.intro()
    status, results, _ = comp.run(Request(prompt="a bag", num_images=1, teacher_steps=2))
    assert list(results) == ["teacher"] and "Select the teacher" not in status


def test_generate_counts_nfe_and_timing(comp):
    from app.ui import TEACHER, Request

    s0, s1 = (e.key for e in comp.students)
    req = Request(prompt="a bag", negative_prompt="blurry", seed=7, num_images=2, models=[TEACHER, s0, s1],
                  teacher_steps=3, guidance=2.5, student_steps={s0: 2})
    status, results, warnings = comp.run(req)
    assert warnings == []
    t, a, b = results[TEACHER], results[s0], results[s1]
    assert (t.nfe, a.nfe, b.nfe) == (6, 2, 4)  # teacher with CFG: steps x 2; LoRA LCM students: steps x 1
    assert [c for _, c in t.images] == ["seed 7", "seed 8"] == [c for _, c in a.images]
    assert all(img.size[0] >= 128 for img, _ in a.images)  # upscaled for display
    assert "NFE 6" in t.info and "NFE 2" in a.info and "faster than the teacher" in a.info and " s" in a.info
    assert "| group/lcm_sd (lcm) | 2 | 2 |" in status and "ignores the negative prompt" in status
    # Image i of the grid is seed + i's image whatever the grid (reproducible), and seeds differ.
    other = comp.run(Request(prompt="a bag", seed=8, num_images=1, models=[s0], student_steps={s0: 2}))[1][s0]
    assert list(other.images[0][0].getdata()) == list(a.images[1][0].getdata())
    assert list(other.images[0][0].getdata()) != list(a.images[0][0].getdata())


def test_hybrid_calls_teacher_then_student_and_counts_nfe(comp):
    from app.ui import TEACHER, Comparison, Request

    calls = []

    def fake_hybrid(teacher, student, prompts, steps, seeds, teacher_guidance, output_type="pil"):
        calls.append((teacher, student, prompts, steps, seeds, teacher_guidance, output_type))
        from PIL import Image

        return [Image.new("RGB", (16, 16)) for _ in prompts], 0.5

    c = Comparison(comp.teacher.label, comp.students, cache=comp.cache, hybrid=(fake_hybrid, ""))
    s0 = c.students[0].key
    status, results, _ = c.run(Request(prompt="a bag", seed=3, num_images=2, models=[TEACHER, s0],
                                       teacher_steps=2, guidance=3.0, hybrid=True, student_steps={s0: 4}))
    (teacher, student, prompts, steps, seeds, g, out), = calls
    assert teacher is comp.cache.get(None) and student is comp.cache.get(c.students[0])
    assert (prompts, steps, seeds, g, out) == (["a bag"] * 2, 4, [3, 4], 3.0, "pil")
    assert results[s0].nfe == 2 + 3 and results[s0].hybrid  # teacher's first step with CFG, then 3 student steps
    assert "hybrid" in status
    # Without the module the checkbox's request is refused with the reason.
    c2 = Comparison("t", comp.students, cache=comp.cache, hybrid=(None, "hybrid mode unavailable: x"))
    assert "hybrid mode unavailable" in c2.run(Request(prompt="a", models=[s0], hybrid=True))[0]


def test_hybrid_module_when_present(comp):
    from app.ui import load_hybrid

    fn, why = load_hybrid()
    if fn is None:
        pytest.skip(f"distill_diffusion.hybrid is not there yet: {why}")
    from app.ui import Comparison, Request

    c = Comparison("t", comp.students, cache=comp.cache, hybrid=(fn, ""))
    s0 = c.students[0].key
    status, results, warnings = c.run(Request(prompt="a bag", num_images=2, models=[s0], hybrid=True,
                                              student_steps={s0: 2}))
    assert warnings == [] and len(results[s0].images) == 2, status


@pytest.mark.slow
def test_gradio_api_end_to_end(comp):
    from gradio_client import Client

    from app.ui import build_app

    demo = build_app(comp)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        s0, s1 = (e.key for e in comp.students)
        out = client.predict("a photo of a sneaker", "", 1, 2, ["teacher", s0], 4, 2.0, False, 2, 4,
                             api_name="/generate")
        status, t_gal, t_info, a_gal, a_info, b_gal, b_info = out
        assert len(t_gal) == 2 and len(a_gal) == 2 and b_gal == [] and b_info == ""
        assert all(Path(x["image"]).is_file() for x in t_gal + a_gal)
        assert [x["caption"] for x in a_gal] == ["seed 1", "seed 2"]
        assert "NFE 8" in t_info and "NFE 2" in a_info and "faster than the teacher" in a_info
        assert "speed-up vs teacher" in status
        # Bad input is a message on the page, not a stack trace.
        status = client.predict("", "", 1, 2, ["teacher"], 4, 2.0, False, 2, 4, api_name="/generate")[0]
        assert "Type a prompt" in status
        with pytest.raises(Exception, match="not in the list of choices"):
            client.predict("a bag", "", 1, 2, [s0], 4, 2.0, False, 3, 4, api_name="/generate")
    finally:
        demo.close()


@pytest.mark.slow
@pytest.mark.parametrize("args, text", [
    (["--runs", "/nonexistent/runs"], "runs folder '/nonexistent/runs' does not exist"),
    (["--teacher", "/nonexistent/teacher"], "teacher '/nonexistent/teacher' does not exist"),
    (["--port", "0"], "--port 0"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, text, tmp_path):
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "app", *args], cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], p.stderr
