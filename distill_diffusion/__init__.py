"""distill-diffusion: diffusion step distillation on diffusers, peft and accelerate.

The method-agnostic library. ``load_student(run_dir)`` turns a run folder into a ready diffusers pipeline.
"""

from .artifacts import load_student, load_teacher, sample
from .errors import UserError

__all__ = ["load_student", "load_teacher", "sample", "UserError"]
__version__ = "0.1.0"
