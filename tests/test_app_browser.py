"""The comparison page in a real headless Chromium: type a prompt, press Generate, see every gallery fill.

Needs the ``playwright`` Python package and a Chromium binary (Debian: ``apt-get install chromium``; nothing is
downloaded: playwright drives the system browser through ``executable_path``). Skipped with the reason otherwise.
Leaves a screenshot in ``test-artifacts/app.png``. The README's ``docs/app.png`` is made the same way from real runs:

    python tests/test_app_browser.py --runs runs --teacher embedded --out docs/app.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from tests.helpers import free_port  # noqa: E402
from tests.test_app import make_runs  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def find_chromium() -> str | None:
    exe = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return exe if exe and os.path.exists(exe) else None


def chromium_or_skip() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the browser test needs the playwright Python package (pip install playwright)")
    exe = find_chromium()
    if exe is None:
        pytest.skip("the browser test needs Chromium (apt-get install chromium, or set CHROMIUM=/path/to/chrome)")
    return exe


def drive_page(url: str, exe: str, profile: Path, keys: list[str], n: int, out: Path,
               prompt: str = "a photo of a sneaker", check_empty: bool = True) -> dict[str, str]:
    """Open the page in a fresh headless Chromium profile; with ``check_empty``, check that Generate without a
    prompt only shows a message; type ``prompt``, press Generate, wait until the galleries of ``keys`` hold ``n``
    images each, and save a full-page screenshot to ``out``. Returns the status text, each model's info line and
    any page errors."""
    from playwright.sync_api import sync_playwright

    texts: dict[str, str] = {}
    errors: list[str] = []
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(profile), executable_path=exe, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        try:
            page = ctx.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            box = page.locator("#prompt textarea, #prompt input").first
            box.wait_for(timeout=60_000)
            if check_empty:  # no prompt yet: a message on the page, nothing generated
                page.locator("#generate").click()
                page.locator("#status").get_by_text("Type a prompt first").wait_for(timeout=30_000)
                texts["empty"] = str(page.locator(f"#gallery-{keys[0]} img").count())
            box.fill(prompt)
            page.locator("#generate").click()
            for k in keys:
                page.locator(f"#gallery-{k} img").first.wait_for(timeout=120_000)
                page.wait_for_function(f"document.querySelectorAll('#gallery-{k} img').length >= {n}",
                                       timeout=60_000)
                page.locator(f"#info-{k}").get_by_text("NFE").wait_for(timeout=30_000)
                texts[k] = page.locator(f"#info-{k}").inner_text()
            texts["status"] = page.locator("#status").inner_text()
            page.wait_for_timeout(300)  # let the last thumbnails paint
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            ctx.close()
    texts["errors"] = "\n".join(errors)
    return texts


@pytest.mark.slow
def test_page_in_headless_chromium(tiny_teachers, tmp_path):
    exe = chromium_or_skip()
    from app.ui import build_app, create_comparison

    runs = make_runs(tmp_path / "runs", tiny_teachers["sd"])
    comp = create_comparison(str(runs), tiny_teachers["sd"])
    keys = ["teacher", *(e.key for e in comp.students)]
    n = 4
    demo = build_app(comp, default_teacher_steps=10, default_images=n)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    out = ROOT / "test-artifacts" / "app.png"
    try:
        texts = drive_page(f"http://127.0.0.1:{port}/", exe, tmp_path / "profile", keys, n, out)
    finally:
        demo.close()
    assert texts["empty"] == "0"
    assert "speed-up vs teacher" in texts["status"], texts["status"]
    assert "NFE 20" in texts["teacher"] and all("faster than the teacher" in texts[k] for k in keys[1:]), texts
    assert texts["errors"] == ""
    assert out.stat().st_size > 10_000


def main(argv: list[str] | None = None) -> int:
    """Screenshot the page on real runs (for the README): every model found is selected."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--runs", default="runs")
    p.add_argument("--teacher", default="embedded")
    p.add_argument("--out", default="docs/app.png")
    p.add_argument("--prompt", default="a photo of a sneaker")
    p.add_argument("--images", type=int, default=4)
    a = p.parse_args(argv)
    exe = find_chromium()
    if exe is None:
        print("error: no Chromium found (apt-get install chromium, or set CHROMIUM)", file=sys.stderr)
        return 2
    from app.ui import build_app, create_comparison

    comp = create_comparison(a.runs, a.teacher)
    keys = ["teacher", *(e.key for e in comp.students)]
    demo = build_app(comp, default_images=a.images, max_selected=len(keys))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with tempfile.TemporaryDirectory() as profile:
            texts = drive_page(f"http://127.0.0.1:{port}/", exe, Path(profile), keys, a.images, Path(a.out),
                               a.prompt, check_empty=False)
    finally:
        demo.close()
    print(texts["status"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
