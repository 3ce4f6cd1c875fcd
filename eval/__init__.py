"""The evaluation harness: ``python -m eval`` compares the teacher and student runs on the same prompts and seeds.

Reads run folders only through :mod:`distill_diffusion.artifacts` (``load_student``, ``load_teacher``, ``sample``,
``read_sampling``, ``weights_hash``) and the shared hybrid sampler :mod:`distill_diffusion.hybrid`; never imports
``methods``. Modules: ``generate`` (prompts, seeds, rows, timing, the teacher cache), ``metrics`` (FID, CLIP score,
accuracy, diversity), ``report`` (markdown, JSON, plots, grid), ``teacher_table`` (the teacher's reference table).
"""
