"""The report: ``report.md`` (the table), ``report.json`` (the same numbers, versions, seeds, features, command),
``fid_vs_steps.png``, ``quality_vs_latency.png`` and ``grid.png`` (the same prompts and seeds across all rows)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from distill_diffusion import provenance
from distill_diffusion.artifacts import TEACHER_SPACING


def versions() -> dict[str, str]:
    out = provenance.versions()
    try:
        import distill_diffusion

        out["distill_diffusion"] = distill_diffusion.__version__
    except ImportError:
        pass
    return out


def meta(a: Any, command: str, ctx: Any, teacher: str, grid: list[float]) -> dict[str, Any]:
    import torch

    es = ctx.es
    return {
        "command": command,
        "cwd": os.getcwd(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "device": ctx.device,
        "torch_threads": torch.get_num_threads(),
        "cpu": provenance.cpu_name(),
        "teacher": {"ref": teacher, "weights_hash": ctx.teacher_hash,
                    "sampler": ctx.teacher_sampler or f"DDIMScheduler, eta 0, timestep_spacing={TEACHER_SPACING!r}"},
        "guidance_grid": grid,
        "prompts": {"source": es.source, "n": len(es), "distinct": len(set(es.prompts)),
                    "seeds_per_prompt": getattr(a, "seeds_per_prompt", 1)},
        "seeds": {"rule": "image i uses seed + i (one torch.Generator per image)", "seed": a.seed,
                  "first": es.seeds[0] if es.seeds else None, "last": es.seeds[-1] if es.seeds else None},
        "features": {"name": ctx.fm.name, "key": ctx.fm.key, "dim": ctx.fm.num_features,
                     "resize": f"clean-fid clean (PIL bicubic, float) to {ctx.fm.size} px"},
        "clip_score_model": ctx.clip.name if ctx.clip is not None else None,
        "accuracy": ("zero-shot class of the evaluator over the 10 Fashion-MNIST class names == the prompt's class"
                     if ctx.zero_shot is not None else None),
        "diversity": "mean pairwise cosine distance of the FID features among images of the same prompt",
        "reference": ({"source": ctx.ref.source, "n": ctx.ref.n, "feature_key": ctx.ref.feature_key}
                      if ctx.ref is not None else None),
        "batch_size": ctx.batch_size,
        "image_size": ctx.image_size,
        "latency": "median over full batches of (batch seconds / batch size) after one warm-up batch",
        "nfe": "denoising-network evaluations per image (a CFG step counts twice, a guidance-embedded step once), "
               "as the app states them; a hook checks them",
        "grid_indices": es.grid,
        "grid_prompts": [es.prompts[i] for i in es.grid],
        "grid_seeds": [es.seeds[i] for i in es.grid],
    }


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _pm(m: float | None, s: float | None, fmt: str = ".2f") -> str:
    return "n/a" if m is None else f"{m:{fmt}} ± {s:{fmt}}"


def _clean(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "grid"} for r in rows]


def table(rows: list[dict[str, Any]], m: dict[str, Any]) -> str:
    feat = m["features"]["name"]
    head = (f"| model | steps | NFE | FID ({feat}) | CLIP ({m['clip_score_model'] or 'n/a'}) | accuracy | diversity "
            f"| latency ms/img (batch {m['batch_size']}) | img/s | speed-up |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        acc = "n/a" if r.get("accuracy") is None else f"{100 * r['accuracy']:.1f}%"
        sp = "n/a" if r.get("speedup") is None else f"{r['speedup']:.1f}×"
        lines.append(f"| {r['label']} | {r['steps']} | {r['nfe']:.0f} | {_f(r['fid'])} | {_f(r['clip'])} | {acc} | "
                     f"{_f(r['diversity'], '.3f')} | {r['latency_ms']:.1f} | {r['images_per_s']:.1f} | {sp} |")
    return "\n".join(lines)


def shares_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | steps | network ms | VAE decode ms | text encoder ms | other ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms_per_image"]
        lines.append(f"| {r['label']} | {r['steps']} | {ms['unet']:.2f} | {ms['vae_decode']:.2f} | "
                     f"{ms['text_encoder']:.2f} | {ms['other']:.2f} |")
    return "\n".join(lines)


def header(m: dict[str, Any]) -> str:
    ref = m["reference"]
    return "\n".join([
        f"- Command: `{m['command']}`",
        f"- Teacher: `{m['teacher']['ref']}` (weights {m['teacher']['weights_hash']}), {m['teacher']['sampler']}",
        f"- Prompts: {m['prompts']['source']}, {m['prompts']['n']} images ({m['prompts']['distinct']} distinct "
        f"prompts), seeds {m['seeds']['first']}..{m['seeds']['last']} (image i: seed + i)",
        f"- FID features: {m['features']['name']} ({m['features']['dim']}-d, {m['features']['resize']}); reference: "
        + (f"{ref['source']} ({ref['n'] if ref['n'] is not None else '?'} images)" if ref else "none (FID n/a)"),
        f"- CLIP score: {m['clip_score_model'] or 'n/a'}; accuracy: {m['accuracy'] or 'n/a'}",
        f"- Diversity: {m['diversity']}",
        f"- Speed: {m['nfe']}; {m['latency']}; device {m['device']}, {m['torch_threads']} threads",
    ])


def write(out: Path, rows: list[dict[str, Any]], every: list[dict[str, Any]], m: dict[str, Any]) -> None:
    """The comparison report: rows = best teacher rows, students, hybrids; ``every`` = all teacher rows tried."""
    out.mkdir(parents=True, exist_ok=True)
    ref = m.get("reference_teacher_row", {})
    md = ["# Evaluation report", "", header(m), "",
          f"Speed-up: latency of the teacher at {ref.get('steps')} steps (w={ref.get('guidance')}) / the row's.", "",
          table(rows, m), "", "## Time per image by component", "", shares_table(rows), ""]
    if len({r["guidance"] for r in every}) > 1:
        md += ["## Teacher guidance search (FID)", "", "| steps | " + " | ".join(
            f"w={g:g}" for g in m["guidance_grid"]) + " |", "|---|" + "---|" * len(m["guidance_grid"])]
        for s in sorted({r["steps"] for r in every}):
            fids = {r["guidance"]: r["fid"] for r in every if r["steps"] == s}
            md.append(f"| {s} | " + " | ".join(_f(fids.get(g)) for g in m["guidance_grid"]) + " |")
        md.append("")
    for note in m.get("notes", []):
        md.append(f"- note: {note}")
    md += ["", "![FID vs steps](fid_vs_steps.png) ![quality vs latency](quality_vs_latency.png)", "",
           "![grid](grid.png)", ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    (out / "report.json").write_text(json.dumps({"meta": m, "rows": _clean(rows), "teacher_rows": _clean(every)},
                                                indent=1, default=_json_default), encoding="utf-8")
    plot_fid_vs_steps(out / "fid_vs_steps.png", rows, m)
    plot_quality_vs_latency(out / "quality_vs_latency.png", rows, m)
    grid_png(out / "grid.png", rows, m)


def write_teacher_table(out: Path, entries: list[dict[str, Any]], m: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    feat = m["features"]["name"]
    sets = len(entries[0]["seed_offsets"]) if entries else 0
    lines = [f"| steps | guidance | NFE | FID ({feat}) | CLIP | accuracy | diversity | latency ms/img |",
             "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        acc_m = None if e["accuracy_mean"] is None else 100 * e["accuracy_mean"]
        acc_s = None if e["accuracy_std"] is None else 100 * e["accuracy_std"]
        lines.append(f"| {e['steps']} | {e['guidance']:g} | {e['nfe']:.0f} | {_pm(e['fid_mean'], e['fid_std'])} | "
                     f"{_pm(e['clip_mean'], e['clip_std'])} | {_pm(acc_m, acc_s, '.1f')}% | "
                     f"{_pm(e['diversity_mean'], e['diversity_std'], '.3f')} | {_f(e['latency_ms_mean'], '.1f')} |")
    grids = ["", "Guidance search on the first seed set (FID):", "",
             "| steps | " + " | ".join(f"w={g:g}" for g in m["guidance_grid"]) + " |",
             "|---|" + "---|" * len(m["guidance_grid"])]
    for e in entries:
        grids.append(f"| {e['steps']} | " + " | ".join(_f(e["grid_fid"].get(str(g))) for g in m["guidance_grid"])
                     + " |")
    md = ["# Teacher table", "", header(m), "",
          f"Mean ± sample std over {sets} seed sets (seed offsets {entries[0]['seed_offsets'] if entries else []}); "
          "guidance picked per step count on the first set.", "", *lines, *grids, "",
          "![FID vs steps](fid_vs_steps.png)", "", "![grid](grid.png)", ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    (out / "report.json").write_text(json.dumps({"meta": m, "teacher_table": _clean(entries)}, indent=1,
                                                default=_json_default), encoding="utf-8")
    rows = [{"label": e["label"], "name": "teacher", "kind": "teacher", "steps": e["steps"], "fid": e["fid_mean"],
             "grid": e["grid"]} for e in entries]
    plot_fid_vs_steps(out / "fid_vs_steps.png", rows, m)
    grid_png(out / "grid.png", rows, m)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fid_vs_steps(path: Path, rows: list[dict[str, Any]], m: dict[str, Any]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    models: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r.get("fid") is not None:
            models.setdefault("teacher (DDIM)" if r["kind"] == "teacher" else r["name"], []).append(
                (r["steps"], r["fid"]))
    for name, pts in models.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ticks = sorted({p[0] for pts in models.values() for p in pts})
    if ticks:
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("steps")
    ax.set_ylabel(f"FID ({m['features']['name']})")
    ax.set_title("FID vs steps")
    if models:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_quality_vs_latency(path: Path, rows: list[dict[str, Any]], m: dict[str, Any]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    names = sorted({("teacher" if r["kind"] == "teacher" else r["name"]) for r in rows})
    for name in names:
        pts = [r for r in rows if ("teacher" if r["kind"] == "teacher" else r["name"]) == name
               and r.get("fid") is not None]
        if not pts:
            continue
        ax.plot([r["latency_ms"] for r in pts], [r["fid"] for r in pts], marker="o", linestyle="", label=name)
        for r in pts:
            ax.annotate(str(r["steps"]), (r["latency_ms"], r["fid"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"latency per image, ms (batch {m['batch_size']}, {m['device']})")
    ax.set_ylabel(f"FID ({m['features']['name']})")
    ax.set_title("quality vs latency (labels: steps)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grid_png(path: Path, rows: list[dict[str, Any]], m: dict[str, Any]) -> None:
    """Rows: models; columns: the same (prompt, seed) pairs."""
    plt = _plt()
    rows = [r for r in rows if r.get("grid") is not None and len(r["grid"])]
    if not rows:
        return
    cols = len(rows[0]["grid"])
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.1 * cols + 2.2, 1.15 * len(rows) + 0.6), squeeze=False)
    for i, r in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.imshow(r["grid"][j])
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"{r['label']}\n{r['steps']} steps", rotation=0, ha="right", va="center", fontsize=7)
            if i == 0:
                p, s = m["grid_prompts"][j], m["grid_seeds"][j]
                ax.set_title(f"{textwrap.shorten(p, 40, placeholder='…')}\nseed {s}".replace(" of ", " of\n", 1)
                             if len(p) > 22 else f"{p}\nseed {s}", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use python -m eval")
