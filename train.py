"""Distill a diffusers teacher into a few-step student.

    accelerate launch train.py --method lcm [--config configs/lcm/<file>.yaml] [key=value ...]
    python train.py --method lcm --print-config
"""

import sys

from distill_diffusion.loop import exit_process, run_main
from methods import METHODS

if __name__ == "__main__":
    exit_process(run_main(sys.argv[1:], METHODS))
