"""The comparison page: the teacher and distilled students generate from one prompt and the same seeds, timed.

Models on the page: the teacher (DDIM, any step count, CFG) plus every run folder found one or two levels under the
runs folder (a folder with ``sampling.json``; extra students exported next to it as ``sampling_<name>.json`` are
listed as models of their own). Everything is loaded through :mod:`distill_diffusion.artifacts`, once, on first use.

NFE (network evaluations per image) is :func:`distill_diffusion.artifacts.nfe`'s, the figure eval reports too: steps x 2
when the model samples with classifier-free guidance, else steps x 1. Hybrid mode (Gandikota & Bau, "Distilling
Diversity and Control in Diffusion Models", 2025): the teacher takes the first step and the student the remaining
ones (:func:`distill_diffusion.artifacts.hybrid_nfe`).
"""

from __future__ import annotations

import logging
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill_diffusion import artifacts
from distill_diffusion.errors import UserError

log = logging.getLogger("app")

TEACHER = "teacher"
EXAMPLES = ["a photo of a sneaker", "a product photo of an ankle boot", "a trouser", "a bag"]
MAX_IMAGES = 8
MAX_SEED = 2**31 - 1
DISPLAY_SIZE = 192  # tiny teachers make 16-32 px images: upscale (nearest) so pixels stay sharp on the page
# Folders never holding a run of their own (pipelines, checkpoints, half-written exports).
_SKIP = ("checkpoints", ".", "__")


@dataclass(frozen=True)
class ModelEntry:
    """A model on the page. ``key`` is stable and safe for element ids; ``run_dir`` is None for the teacher."""

    key: str
    label: str
    run_dir: Path | None = None
    sampling_file: str = artifacts.SAMPLING_FILE
    method: str = "ddim"
    steps: tuple[int, ...] = ()
    default_steps: int = 25
    note: str = ""
    resolution: int | None = None  # the run's training resolution


def find_runs(root: str | Path, max_depth: int = 2, teacher_hash: str | None = None
              ) -> tuple[list[ModelEntry], list[str]]:
    """Students under ``root`` (``root`` itself, its children and grandchildren): (entries, problems).

    A folder with ``sampling.json`` is a run; each ``sampling_<name>.json`` beside it is one more student. Unreadable
    sampling files become one-line problems, never exceptions. ``teacher_hash``: the app's teacher's weights hash;
    students distilled from another teacher get a note.
    """
    root = Path(root)
    found: list[tuple[Path, str, dict[str, Any]]] = []
    problems: list[str] = []

    def visit(d: Path, depth: int) -> None:
        for name in artifacts.list_students(d):
            try:
                found.append((d, name, artifacts.read_sampling(d, name)))
            except UserError as e:
                problems.append(str(e))
        if depth >= max_depth:
            return
        try:
            subs = sorted(p for p in d.iterdir() if p.is_dir())
        except OSError as e:
            problems.append(f"cannot list {d}: {e.strerror}")
            return
        for sub in subs:
            if sub.name.startswith(_SKIP) or ".tmp-" in sub.name or ".old-" in sub.name or artifacts.is_export_dir(sub):
                continue
            visit(sub, depth + 1)

    visit(root, 0)
    entries = []
    for i, (d, fname, info) in enumerate(found):
        rel = d.name if d == root else d.relative_to(root).as_posix()
        student_dir = info.get("student_dir", "student")
        label = rel if fname == artifacts.SAMPLING_FILE else f"{rel}/{student_dir}"
        method = str(info.get("method", "?"))
        note = ""
        if teacher_hash and info.get("teacher_hash") and info["teacher_hash"] != teacher_hash:
            note = f"distilled from another teacher ({info.get('teacher')})"
        entries.append(ModelEntry(key=f"s{i}", label=f"{label} ({method})", run_dir=d, sampling_file=fname,
                                  method=method, steps=tuple(sorted(info["steps"])),
                                  default_steps=int(info["default_steps"]), note=note,
                                  resolution=info.get("resolution")))
    return entries, problems


class ModelCache:
    """Pipelines loaded once, on first use, and kept. One lock: loading and sampling are serialised (CPU-bound)."""

    def __init__(self, teacher: str, device: str = "cpu", resolution: int | None = None) -> None:
        self.teacher_name, self.device, self.resolution = teacher, device, resolution
        self._pipes: dict[str, Any] = {}
        self.lock = threading.RLock()

    def loaded(self, key: str) -> Any | None:
        """The pipeline under ``key`` if it is loaded already, else None (never loads)."""
        return self._pipes.get(key)

    def get(self, entry: ModelEntry | None) -> Any:
        """The teacher (``entry`` None) or a student's pipeline."""
        key = TEACHER if entry is None else entry.key
        with self.lock:
            if key not in self._pipes:
                if entry is None:
                    pipe = artifacts.load_teacher(self.teacher_name, device=self.device,
                                                  resolution=self.resolution)
                    # One throw-away step: first calls pay one-off set-up (kernel selection, allocations) that
                    # would otherwise be timed as the model's latency. Guidance 2 so the CFG batch shape is warm.
                    artifacts.sample(pipe, ["warm-up"], 1, [0], 2.0)
                    self._pipes[key] = pipe
                else:
                    # load_student fuses a LoRA into the weights: an unmerged adapter would add work to every
                    # layer and understate the student's speed-up over the teacher.
                    pipe = artifacts.load_student(entry.run_dir, device=self.device, sampling_file=entry.sampling_file)
                    artifacts.sample(pipe, ["warm-up"], min(pipe.distill.steps), [0])
                    self._pipes[key] = pipe
            return self._pipes[key]


def load_hybrid() -> tuple[Callable[..., Any] | None, str]:
    """``distill_diffusion.hybrid.hybrid_sample`` if installed, else (None, why)."""
    try:
        from distill_diffusion.hybrid import hybrid_sample
    except ImportError as e:
        return None, f"hybrid mode unavailable: distill_diffusion.hybrid cannot be imported ({e})"
    return hybrid_sample, ""


@dataclass
class Request:
    """One press of Generate. ``models``: keys of the selected models; ``student_steps``: key -> step count."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    num_images: int = 4
    models: list[str] = field(default_factory=lambda: [TEACHER])
    teacher_steps: int = 25
    guidance: float = 2.5
    hybrid: bool = False
    student_steps: dict[str, int] = field(default_factory=dict)


@dataclass
class Result:
    """One model's output: (image, caption) pairs, wall seconds for the whole seed grid, NFE per image."""

    images: list[tuple[Any, str]]
    seconds: float
    nfe: int
    steps: int
    hybrid: bool = False
    info: str = ""


def _display(img: Any) -> Any:
    from PIL import Image

    side = max(img.size)
    if side >= DISPLAY_SIZE:
        return img
    k = max(1, DISPLAY_SIZE // side)
    return img.resize((img.width * k, img.height * k), Image.NEAREST)


def _md(text: str) -> str:
    """Text (folder names, error messages) made literal inside Markdown: no table breaks, emphasis or raw HTML."""
    return re.sub(r"([\\`*|<\[\]])", r"\\\1", str(text))


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s >= 0.1 else f"{s * 1000:.0f} ms"


class Comparison:
    """The page's logic without gradio: validate a request, sample each selected model, describe the results."""

    def __init__(self, teacher: str, students: list[ModelEntry], problems: list[str] | None = None,
                 runs_note: str = "", cache: ModelCache | None = None,
                 hybrid: tuple[Callable[..., Any] | None, str] | None = None) -> None:
        name = Path(teacher).name if Path(teacher).exists() else teacher
        sampler = "DDIM"
        loaded = cache.loaded(TEACHER) if cache is not None else None
        if loaded is not None:  # the teacher's own reference scheduler (flow teachers keep theirs)
            sampler = type(loaded.scheduler).__name__.removesuffix("Scheduler")
        self.teacher = ModelEntry(key=TEACHER, label=f"teacher ({name}, {sampler})")
        self.students = students
        self.by_key = {e.key: e for e in [self.teacher, *students]}
        self.problems = problems or []
        self.runs_note = runs_note
        self.cache = cache or ModelCache(teacher)
        self.hybrid_fn, self.hybrid_note = hybrid if hybrid is not None else load_hybrid()

    def check(self, req: Request) -> str | None:
        """A one-line message for the page when the request cannot run, else None."""
        if not (req.prompt or "").strip():
            return "Type a prompt first (or click one of the examples)."
        if req.seed is None or int(req.seed) != req.seed or not 0 <= req.seed <= MAX_SEED:
            return f"The seed must be a whole number from 0 to {MAX_SEED}."
        if req.num_images is None or not 1 <= int(req.num_images) <= MAX_IMAGES:
            return f"The number of images must be 1 to {MAX_IMAGES}."
        if not req.models:
            return "Select at least one model."
        unknown = [k for k in req.models if k not in self.by_key]
        if unknown:
            return f"Unknown model(s): {', '.join(unknown)}."
        if TEACHER in req.models:
            if req.teacher_steps is None or not 1 <= int(req.teacher_steps) <= 1000:
                return "Teacher steps must be 1 to 1000."
            if req.guidance is None or req.guidance < 1:
                return "Guidance must be at least 1 (1 = no guidance)."
        for k in req.models:
            e = self.by_key[k]
            if e.run_dir is None:
                continue
            s = req.student_steps.get(k, e.default_steps)
            if s not in e.steps:
                return (f"{e.label} supports {', '.join(map(str, e.steps))} steps, not {s}; pick one of those "
                        "(a distilled student is trained for its own step counts).")
        if req.hybrid and self.hybrid_fn is None:
            return self.hybrid_note + "; untick hybrid."
        return None

    def run(self, req: Request) -> tuple[str, dict[str, Result], list[str]]:
        """(status markdown, results by model key, warnings). Never raises: failures become messages."""
        msg = self.check(req)
        if msg:
            return f"⚠️ {msg}", {}, [msg]
        n, seed = int(req.num_images), int(req.seed)
        prompts, seeds = [req.prompt.strip()] * n, list(range(seed, seed + n))
        neg = (req.negative_prompt or "").strip() or None
        results: dict[str, Result] = {}
        warnings: list[str] = []
        notes: list[str] = []
        order = [k for k in [TEACHER, *(e.key for e in self.students)] if k in req.models]
        for k in order:
            e = self.by_key[k]
            try:
                results[k] = self._sample(e, req, prompts, seeds, neg, notes)
            except UserError as err:
                warnings.append(f"{e.label}: {err}")
            except Exception as err:  # a broken run must not take the page down: one line here, traceback in the log
                log.exception("sampling %s failed", e.label)
                warnings.append(f"{e.label} failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
        t = results.get(TEACHER)
        for k, r in results.items():
            r.info = self._info(self.by_key[k], r, t, n)
        return self._status(results, t, warnings, notes), results, warnings

    def _sample(self, e: ModelEntry, req: Request, prompts: list[str], seeds: list[int], neg: str | None,
                notes: list[str]) -> Result:
        with self.cache.lock:
            if e.run_dir is None:
                pipe = self.cache.get(None)
                steps, g = int(req.teacher_steps), float(req.guidance)
                cfg = artifacts.uses_cfg(pipe, g)
                if neg and not cfg:
                    notes.append("The negative prompt needs guidance > 1 on the teacher; it was not used.")
                images, secs = artifacts.sample(pipe, prompts, steps, seeds, g, neg if cfg else None)
                nfe = artifacts.nfe(pipe, steps, g)
            else:
                pipe = self.cache.get(e)
                steps = int(req.student_steps.get(e.key, e.default_steps))
                cfg = artifacts.uses_cfg(pipe, pipe.distill.get(steps).guidance_scale)
                if req.hybrid:
                    if neg:
                        notes.append("Hybrid sampling does not take a negative prompt; it was not used.")
                    teacher = self.cache.get(None)
                    images, secs = self.hybrid_fn(teacher, pipe, prompts, steps, seeds, float(req.guidance),
                                                  output_type="pil")
                    nfe = artifacts.hybrid_nfe(teacher, pipe, steps, float(req.guidance))
                else:
                    if neg and not cfg:
                        notes.append(f"{e.label} samples without CFG, so it ignores the negative prompt.")
                    images, secs = artifacts.sample(pipe, prompts, steps, seeds, None, neg if cfg else None)
                    nfe = artifacts.nfe(pipe, steps)
        shown = [(_display(img), f"seed {sd}") for img, sd in zip(images, seeds)]
        return Result(images=shown, seconds=float(secs), nfe=nfe, steps=steps,
                      hybrid=e.run_dir is not None and req.hybrid)

    def _info(self, e: ModelEntry, r: Result, t: Result | None, n: int) -> str:
        parts = [f"**{_seconds(r.seconds)}** for {n} image{'s' * (n > 1)} ({_seconds(r.seconds / n)} each)",
                 f"{r.steps} step{'s' * (r.steps > 1)}", f"NFE {r.nfe}"]
        if e.run_dir is not None and t is not None:
            parts.append(f"**×{t.seconds / max(r.seconds, 1e-9):.1f}** faster than the teacher")
        if e.note:
            parts.append(f"⚠️ {_md(e.note)}")
        return " · ".join(parts)

    def _status(self, results: dict[str, Result], t: Result | None, warnings: list[str], notes: list[str]) -> str:
        blocks = []
        if results:
            rows = ["| model | steps | NFE | time | per image | speed-up vs teacher |", "|---|---|---|---|---|---|"]
            for k, r in results.items():
                label = _md(self.by_key[k].label) + (" — hybrid" if r.hybrid else "")
                speed = "—" if t is None else f"×{t.seconds / max(r.seconds, 1e-9):.1f}"
                rows.append(f"| {label} | {r.steps} | {r.nfe} | {_seconds(r.seconds)} | "
                            f"{_seconds(r.seconds / max(len(r.images), 1))} | {speed} |")
            blocks.append("\n".join(rows))
            if t is None:
                blocks.append("Select the teacher too to see the speed-up.")
        blocks += [f"⚠️ {_md(w)}" for w in warnings]
        blocks += [f"ℹ️ {_md(x)}" for x in dict.fromkeys(notes)]
        return "\n\n".join(blocks) or "Nothing was generated."

    def intro(self) -> str:
        """The page's notes about what was found: no runs, unreadable runs, hybrid availability."""
        lines = []
        if not self.students:
            lines.append(f"⚠️ {self.runs_note or 'No distilled students found.'} Showing the teacher only. "
                         "A run folder holds `sampling.json` (written by `train.py` when it exports the student).")
        lines += [f"⚠️ {_md(p)}" for p in self.problems]
        return "\n\n".join(lines)


def build_app(comp: Comparison, default_guidance: float = 2.5, default_teacher_steps: int = 25,
              default_images: int = 4, max_selected: int = 4) -> Any:
    """The gradio Blocks for a :class:`Comparison`. Event ``/generate`` takes (prompt, negative prompt, seed,
    number of images, selected model keys, teacher steps, guidance, hybrid, one step count per student) and returns
    (status, then gallery and info per model: the teacher first, then students in page order)."""
    import gradio as gr

    models = [comp.teacher, *comp.students]
    selected = [m.key for m in models[:max_selected]]
    with gr.Blocks(title="distill-diffusion: teacher vs students") as demo:
        gr.Markdown("## Teacher vs distilled students\nOne prompt, the same seeds (seed … seed + n − 1) for every "
                    "model; time is wall-clock sampling time on this machine, NFE = network evaluations per image.")
        intro = comp.intro()
        gr.Markdown(intro, visible=bool(intro), elem_id="intro")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", placeholder="a photo of a sneaker", lines=1, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative",
                                      info="Used by models that sample with CFG: the teacher with guidance > 1.")
                gr.Examples([[p] for p in EXAMPLES], inputs=[prompt], label="Examples")
            with gr.Column(scale=2):
                choice = gr.CheckboxGroup([(m.label, m.key) for m in models], value=selected, label="Models",
                                          elem_id="models")
                with gr.Row(equal_height=True):
                    seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed", scale=3,
                                     elem_id="seed")
                    dice = gr.Button("Random seed", scale=1, elem_id="random-seed")
                n_images = gr.Slider(1, MAX_IMAGES, value=default_images, step=1, label="Number of images (seed grid)",
                                     elem_id="num-images")
                hybrid = gr.Checkbox(False, label="Hybrid: the teacher takes the first step, the student finishes "
                                     "(Distilling Diversity and Control in Diffusion Models)",
                                     interactive=comp.hybrid_fn is not None, elem_id="hybrid",
                                     info=comp.hybrid_note or "Uses the teacher's guidance for its step.")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown(elem_id="status")
        columns, outputs, steps_inputs = [], [], []
        with gr.Row(equal_height=False):
            for m in models:
                with gr.Column(visible=m.key in selected, min_width=260, elem_id=f"col-{m.key}") as col:
                    gr.Markdown(f"### {_md(m.label)}" + (f"\n⚠️ {_md(m.note)}" if m.note else ""))
                    if m.run_dir is None:
                        with gr.Row():
                            t_steps = gr.Slider(1, 100, value=default_teacher_steps, step=1, label="Teacher steps",
                                                elem_id="teacher-steps")
                            guidance = gr.Slider(1, 15, value=default_guidance, step=0.5, label="Guidance (CFG)",
                                                 elem_id="guidance")
                    else:
                        steps_inputs.append(gr.Dropdown(list(m.steps), value=m.default_steps, label="Steps",
                                                        elem_id=f"steps-{m.key}",
                                                        info=f"{m.method}: trained for these step counts"))
                    gallery = gr.Gallery(label=m.label, show_label=False, columns=2, format="png", object_fit="contain",
                                         elem_id=f"gallery-{m.key}", interactive=False, height=600)
                    info = gr.Markdown(elem_id=f"info-{m.key}")
                columns.append(col)
                outputs += [gallery, info]

        def generate(prompt_v, negative_v, seed_v, n_v, chosen, t_steps_v, guidance_v, hybrid_v, *student_steps):
            req = Request(prompt=prompt_v or "", negative_prompt=negative_v or "", seed=seed_v, num_images=n_v,
                          models=list(chosen or []), teacher_steps=t_steps_v, guidance=guidance_v,
                          hybrid=bool(hybrid_v),
                          student_steps={e.key: s for e, s in zip(comp.students, student_steps)})
            text, results, warnings = comp.run(req)
            for w in warnings:
                gr.Warning(w)
            out: list[Any] = [text]
            for m in models:
                r = results.get(m.key)
                out += [r.images if r else [], r.info if r else ""]
            return out

        inputs = [prompt, negative, seed, n_images, choice, t_steps, guidance, hybrid, *steps_inputs]
        go.click(generate, inputs, [status, *outputs], api_name="generate", concurrency_limit=1)
        prompt.submit(generate, inputs, [status, *outputs], api_visibility="undocumented", concurrency_limit=1)
        dice.click(lambda: random.randint(0, MAX_SEED), None, seed, api_visibility="undocumented")
        choice.change(lambda chosen: [gr.update(visible=m.key in (chosen or [])) for m in models], choice, columns,
                      api_visibility="undocumented")
    return demo


def create_comparison(runs: str | None, teacher: str = "embedded", device: str = "cpu") -> Comparison:
    """Find the students and load the teacher (eagerly: a wrong ``--teacher`` fails here, as a UserError).

    ``runs`` None means ``runs/`` if it exists (a missing default is a note on the page, not an error); a given
    ``runs`` folder that does not exist is a UserError.
    """
    if runs is not None and not Path(runs).is_dir():
        raise UserError(f"runs folder {runs!r} does not exist; give the folder holding your run folders (the "
                        "output_dir of train.py or its parent)")
    artifacts.check_teacher(teacher)  # before loading diffusers (seconds)
    root = runs if runs is not None else "runs"
    if Path(root).is_dir():
        students, problems = find_runs(root, teacher_hash=artifacts.weights_hash(teacher))
        note = "" if students else f"No run folders found under {root}/ (one or two levels deep)."
    else:
        students, problems, note = [], [], "No runs/ folder here (pass --runs FOLDER)."
    # The teacher samples at its students' training resolution (when they agree; else its own default).
    resolutions = {e.resolution for e in students if not e.note} - {None}
    cache = ModelCache(teacher, device, resolutions.pop() if len(resolutions) == 1 else None)
    cache.get(None)
    return Comparison(teacher, students, problems, note, cache)
