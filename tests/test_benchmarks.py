"""The benchmark's step timer on a tiny teacher: phases are timed, add up to at most the step, and are undone."""

import json

import torch

from benchmarks.__main__ import markdown
from benchmarks.train_step import PHASES, run
from distill_diffusion.models import Models


def test_train_step_phases_and_markdown(tiny_teachers, image_folder, tmp_path):
    before = (Models.unet_out, torch.optim.AdamW.step)
    res = run("dmd2", "lora", steps=4, warmup=1, out_dir=tmp_path / "r",
              overrides=[f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}", "batch_size=2",
                         "method.student_update_every=1"])
    assert (Models.unet_out, torch.optim.AdamW.step) == before, "the instrumentation was not undone"
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
