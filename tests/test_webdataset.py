"""webdataset shards and decoding in DataLoader workers: the same samples, in the same keyed order, as every other
source; a run on shards resumes to the same student, with or without workers."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from distill_diffusion import data
from distill_diffusion.errors import UserError


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def shards(image_folder, tmp_path_factory) -> tuple[str, str]:
    """(brace pattern, folder): the image folder's 12 images split over three shards; the first shard's captions
    as .txt, the others' as .json; a stray member without an image that must be skipped."""
    root = tmp_path_factory.mktemp("shards")
    files = sorted(Path(image_folder).glob("*.png"))
    for k in range(3):
        with tarfile.open(root / f"train-{k:03d}.tar", "w") as tar:
            for f in files[4 * k: 4 * k + 4]:
                key = f"{k}/{f.stem}"
                _add(tar, f"{key}.png", f.read_bytes())
                cap = f.with_suffix(".txt").read_text()
                if k == 0:
                    _add(tar, f"{key}.txt", cap.encode())
                else:
                    _add(tar, f"{key}.json", json.dumps({"caption": cap, "width": 24}).encode())
            _add(tar, f"{k}/orphan.txt", b"no image here")
    return str(root / "train-{000..002}.tar"), image_folder


def test_expand_braces():
    assert data.expand_braces("s-{08..10}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar"]
    assert data.expand_braces("{a,b}/x{1..2}") == ["a/x1", "a/x2", "b/x1", "b/x2"]
    assert data.expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(UserError, match="backwards"):
        data.expand_braces("s-{3..1}.tar")


def test_shards_hold_the_folder_samples(shards):
    pattern, folder = shards
    wds = data.WebDataset(pattern, 16)
    ref = data.ImageFolder(folder, 16)
    assert len(wds) == len(ref) == 12
    for i in range(12):
        assert torch.equal(wds.image(i), ref.image(i))
        assert wds.caption(i, 0) == ref.caption(i, 0)


def test_bad_shards_are_one_line(tmp_path):
    with pytest.raises(UserError, match="cannot read shard"):
        data.WebDataset(str(tmp_path / "missing-{0..1}.tar"), 16)
    with tarfile.open(tmp_path / "empty.tar", "w") as tar:
        _add(tar, "a.txt", b"caption only")
    with pytest.raises(UserError, match="no KEY.jpg"):
        data.WebDataset(str(tmp_path / "empty.tar"), 16)


def test_workers_give_the_same_batches_in_the_same_order(shards):
    src = data.WebDataset(shards[0], 16)
    stream = data.Stream(src, seed=3, batch_size=5, accum=2, empty_prompt_prob=0.3)
    plain = list(stream.batches(1, 4))
    ahead = list(stream.batches(1, 4, num_workers=2, prefetch=2))
    assert len(plain) == len(ahead) == 6  # 3 steps × 2 micro-batches, crossing an epoch of 12 samples
    for a, b in zip(plain, ahead):
        assert torch.equal(a.ids, b.ids) and a.prompts == b.prompts and torch.equal(a.images, b.images)


@pytest.mark.slow
def test_webdataset_run_resumes_to_the_same_student(shards, tiny_teachers, tmp_path, monkeypatch):
    """Interrupted at step 3 and resumed (decoding in a worker), against an uninterrupted run without workers."""
    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train
    from methods import METHODS
    from tests.crash_run import crash_at
    from tests.test_resume import _student

    def args(out: Path, *extra: str) -> list[str]:
        return ["--method", "lcm", f"teacher={tiny_teachers['sd']}", f"data.webdataset={shards[0]}", "max_steps=4",
                "batch_size=2", f"output_dir={out}", "report_to=none", "checkpointing_steps=2", "lora_rank=2",
                "lora_alpha=4", "validation_seeds=0", "learning_rate=1e-3", *extra]

    train(parse_config(args(tmp_path / "full"), METHODS)[0], METHODS["lcm"])
    with monkeypatch.context() as m:
        m.setattr(data.Stream, "get", data.Stream.get)  # restored on exit
        crash_at(3, kill=False)
        with pytest.raises(RuntimeError, match="injected fault"):
            train(parse_config(args(tmp_path / "part"), METHODS)[0], METHODS["lcm"])
    train(parse_config(args(tmp_path / "part", "resume=latest", "data.num_workers=1"), METHODS)[0], METHODS["lcm"])
    a, b = _student(tmp_path / "full"), _student(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_webdataset_sigkill_then_resume(shards, tiny_teachers, tmp_path):
    from tests.test_resume import _run, _student

    def args(out: Path, *extra: str) -> list[str]:
        return ["--method", "lcm", f"teacher={tiny_teachers['sd']}", f"data.webdataset={shards[0]}", "max_steps=6",
                "batch_size=2", f"output_dir={out}", "report_to=none", "checkpointing_steps=2", "lora_rank=2",
                "lora_alpha=4", "validation_seeds=0", "learning_rate=1e-3", *extra]

    out, ref = tmp_path / "run", tmp_path / "ref"
    assert _run(args(out), crash_step=3).returncode == -9
    r = _run(args(out, "resume=latest"))
    assert r.returncode == 0 and "checkpoint-2" in r.stdout, r.stderr[-1500:]
    assert _run(args(ref)).returncode == 0
    a, b = _student(ref), _student(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
