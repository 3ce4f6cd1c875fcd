"""``python tests/crash_run.py STEP train.py-args...``: train.py that SIGKILLs itself when step STEP begins (its
first batch is drawn), for the crash-and-resume tests. Fault injection lives here, not in the loop."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill_diffusion import data  # noqa: E402
from distill_diffusion.loop import run_main  # noqa: E402
from methods import METHODS  # noqa: E402


def crash_at(step: int, kill: bool = True) -> None:
    """Patch the data stream so that drawing step ``step``'s batch kills the process (or raises RuntimeError)."""
    get = data.Stream.get

    def patched(self: data.Stream, s: int, micro: int = 0) -> data.Samples:
        if s == step:
            if kill:
                os.kill(os.getpid(), 9)
            raise RuntimeError(f"injected fault at step {s}")
        return get(self, s, micro)

    data.Stream.get = patched  # type: ignore[method-assign]


if __name__ == "__main__":
    crash_at(int(sys.argv[1]))
    raise SystemExit(run_main(sys.argv[2:], METHODS))
