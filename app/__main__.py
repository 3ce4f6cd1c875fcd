"""python -m app [--runs runs/] [--teacher embedded|PATH|ORG/NAME] [--port 7860] [--host 127.0.0.1] [--share]

Opens the comparison page (teacher vs distilled students, same prompt and seeds, timed). Binds 127.0.0.1 unless
``--host`` says otherwise; ``--share`` makes a public gradio link. Bad input prints one ``error: ...`` line, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from distill_diffusion.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit code 2 (argparse prints usage + message)
        raise UserError(message)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(prog="python -m app", description="Compare a teacher with distilled students.")
    p.add_argument("--runs", default=None,
                   help="folder searched one or two levels deep for run folders (default: runs/ if it exists)")
    p.add_argument("--teacher", default="embedded",
                   help="teacher pipeline: 'embedded' (the shipped Fashion-MNIST one), a folder or a hub id")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the page to the network")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--device", default="cpu", help="torch device for sampling, e.g. cuda")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        args = parse_args(argv)
        if not 0 < args.port < 65536:
            raise UserError(f"--port {args.port}: give a port from 1 to 65535")
        from distill_diffusion.artifacts import is_embedded_teacher

        from .ui import build_app, create_comparison

        comp = create_comparison(args.runs, args.teacher, args.device)
        demo = build_app(comp, default_guidance=2.5 if is_embedded_teacher(args.teacher) else 7.5)
        if args.host not in ("127.0.0.1", "localhost"):
            print(f"note: binding {args.host}: the page is reachable from other machines", file=sys.stderr)
        try:
            demo.launch(server_name=args.host, server_port=args.port, share=args.share)
        except OSError as e:
            raise UserError(f"cannot serve on {args.host}:{args.port} ({e}); pass another --port") from None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
