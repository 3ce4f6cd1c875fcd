"""Prompt conditioning at scale: a CPU cache bounded in bytes, fixed-size batch encoding whose rows do not depend on
their companions, and the on-disk store that ``python -m distill_diffusion.precompute`` fills."""

from __future__ import annotations

import pytest
import torch

from distill_diffusion.encoders import Encoders, PromptStore, _nbytes
from distill_diffusion.errors import UserError

PROMPTS = [f"a photo of item {i}" for i in range(12)]


@pytest.fixture(scope="module")
def family(tiny_teachers):
    from methods.lcm import LCM
    from tests.helpers import build

    models, _, _ = build(LCM, tiny_teachers["sdxl"])  # SDXL: two encoders, pooled rows and per-batch time ids
    return models.family


def _equal(a, b) -> bool:
    return all((x is None and y is None) or torch.equal(x, y) for x, y in
               zip((a.prompt_embeds, a.pooled, a.time_ids), (b.prompt_embeds, b.pooled, b.time_ids)))


def test_cache_stays_within_its_byte_bound_and_changes_nothing(family):
    row = _nbytes(Encoders(family).encode_rows(["x"])["x"])
    small, plain = Encoders(family, cache_bytes=3 * row + 1), Encoders(family)
    for i in range(0, 12, 2):
        batch = [PROMPTS[i], PROMPTS[i + 1], PROMPTS[i], PROMPTS[0]]
        assert _equal(small.encode_prompts(batch), plain.encode_prompts(batch))
        assert small.cached_bytes <= 3 * row + 1 and len(small._prompt_cache) <= 3
    assert plain.cached_bytes == 12 * row
    assert all(r.prompt_embeds.device.type == "cpu" for r in small._prompt_cache.values())


def test_fixed_size_batches_give_rows_independent_of_their_companions(family):
    enc = Encoders(family, encode_batch=4)
    alone = enc.encode_rows(["a red square"])["a red square"]  # padded with three empty prompts
    for others in (PROMPTS[:3], PROMPTS[5:8][::-1], ["", "a blue circle"]):
        for pos in range(len(others) + 1):
            chunk = others[:pos] + ["a red square"] + others[pos:]
            assert _equal(enc.encode_rows(chunk)["a red square"], alone), (chunk, pos)


def test_store_round_trip_and_refuses_another_setting(family, tmp_path, monkeypatch):
    fp = {"teacher_hash": "abc", "text_encode_batch": 1}
    first = Encoders(family, store=PromptStore(tmp_path / "s", fp))
    want = first.encode_prompts(PROMPTS[:3])
    reader = Encoders(family, store=PromptStore(tmp_path / "s", fp))
    monkeypatch.setattr(family, "encode_text", lambda _p: (_ for _ in ()).throw(AssertionError("encoded")))
    assert _equal(reader.encode_prompts(PROMPTS[:3]), want)
    with pytest.raises(UserError, match="another setting.*text_encode_batch"):
        PromptStore(tmp_path / "s", dict(fp, text_encode_batch=8))


@pytest.mark.slow
def test_precompute_then_train_from_the_store(tiny_teachers, tmp_path, capsys):
    """The store holds every prompt of the run (a second precompute encodes none) and a run that reads it trains
    the same student as one that encodes."""
    from distill_diffusion import precompute
    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train
    from methods import METHODS
    from tests.test_resume import _student

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    store = tmp_path / "store"

    def args(out, *extra):
        return ["--method", "sid", f"teacher={tiny_teachers['sd']}", f"data.prompts={prompts}", "max_steps=3",
                "batch_size=2", f"output_dir={out}", "report_to=none", "lora_rank=2", "lora_alpha=4",
                "validation_seeds=0", *extra]

    assert precompute.main(args(tmp_path / "x", f"data.text_cache_dir={store}") + ["--processes", "2"]) == 0
    assert "12 distinct prompts, 12 encoded" in capsys.readouterr().out  # 3 steps × batch 2 × 2 ranks = 12
    assert precompute.main(args(tmp_path / "x", f"data.text_cache_dir={store}")) == 0
    assert "6 distinct prompts, 0 encoded" in capsys.readouterr().out
    train(parse_config(args(tmp_path / "a"), METHODS)[0], METHODS["sid"])
    train(parse_config(args(tmp_path / "b", f"data.text_cache_dir={store}"), METHODS)[0], METHODS["sid"])
    a, b = _student(tmp_path / "a"), _student(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert precompute.main(args(tmp_path / "x")) == 2
    assert "data.text_cache_dir" in capsys.readouterr().err


@pytest.mark.slow
def test_latent_store_precompute_then_train_without_decoding(tiny_teachers, image_folder, tmp_path, capsys,
                                                             monkeypatch):
    """Precomputed posteriors give the online latents (to rounding: the store encodes images one at a time, a run
    a batch at a time), and a run reading them decodes no image and trains the student of an online run."""
    from distill_diffusion import data, precompute
    from distill_diffusion.config import parse_config
    from distill_diffusion.loop import train
    from methods import METHODS
    from tests.test_resume import _student

    store = tmp_path / "latents"

    def args(out, *extra):
        return ["--method", "lcm", f"teacher={tiny_teachers['sd']}", f"data.images={image_folder}", "max_steps=3",
                "batch_size=2", f"output_dir={out}", "report_to=none", "lora_rank=2", "lora_alpha=4",
                "validation_seeds=0", "learning_rate=1e-3", *extra]

    assert precompute.main(args(tmp_path / "x", f"data.latent_cache_dir={store}")) == 0
    assert "6 distinct images, 6 encoded" in capsys.readouterr().out
    cfg = parse_config(args(tmp_path / "x", f"data.latent_cache_dir={store}"), METHODS)[0]
    from distill_diffusion.models import build_models

    models = build_models(cfg, METHODS["lcm"].spec(cfg.method, "lora"))
    src = data.ImageFolder(image_folder, models.resolution)
    idx = [i for i in range(len(src)) if models.encoders.latent_store.get(i) is not None]
    noise = torch.randn(len(idx), *models.latent_shape, generator=torch.Generator().manual_seed(0))
    online = models.encode_images(torch.stack([src.image(i) for i in idx]), noise)
    stored = models.encoders.latents(*models.encoders.stored_posterior(idx, src.image), noise)
    torch.testing.assert_close(stored, online, rtol=1e-5, atol=1e-5)

    train(parse_config(args(tmp_path / "online"), METHODS)[0], METHODS["lcm"])
    monkeypatch.setattr(data.ImageFolder, "image", lambda *_: (_ for _ in ()).throw(AssertionError("decoded")))
    train(parse_config(args(tmp_path / "stored", f"data.latent_cache_dir={store}"), METHODS)[0], METHODS["lcm"])
    a, b = _student(tmp_path / "online"), _student(tmp_path / "stored")
    # Per tensor, in norm: the stored latents differ from the online ones by float32 rounding, and Adam's first
    # updates of a LoRA's A (whose gradient starts near 0, B being 0) amplify that in a few elements (1e-4 here),
    # while a different latent would move most of every tensor (the updates are ~1e-3 per element per step).
    rel = {k: float(torch.linalg.vector_norm(a[k] - b[k]) / torch.linalg.vector_norm(b[k])) for k in a}
    assert max(rel.values()) < 1e-3, sorted(rel.items(), key=lambda kv: -kv[1])[:3]
    with pytest.raises(UserError, match="data.latent_cache_dir.*another setting.*resolution"):
        parse = parse_config(args(tmp_path / "y", f"data.latent_cache_dir={store}", "resolution=8"), METHODS)[0]
        build_models(parse, METHODS["lcm"].spec(parse.method, "lora"))
