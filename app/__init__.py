"""A Gradio page comparing the teacher with distilled students: same prompt, same seeds, side by side, timed.

    python -m app [--runs runs/] [--teacher embedded|PATH|ORG/NAME] [--port 7860] [--host 127.0.0.1] [--share]

Reads only run folders (through :mod:`distill_diffusion.artifacts`); never imports ``methods/``. The page itself is
built by :func:`app.ui.build_app` (imported lazily so CLI errors print before gradio loads).
"""
