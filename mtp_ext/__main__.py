"""Command line: ``mtp-ext info`` and ``mtp-ext demo`` (also ``python -m mtp_ext ...``)."""

from __future__ import annotations

import argparse
import sys


def _info(_: argparse.Namespace) -> int:
    from .info import info_text

    print(info_text())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(vocab=args.vocab, batch=args.batch, k=args.k, seed=args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtp-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, build and the backends of every op")
    p_info.set_defaults(func=_info)
    p_demo = sub.add_parser(
        "demo", help="run every op on model-sized random inputs, check it, and time it"
    )
    p_demo.add_argument("--vocab", type=int, default=49152, help="vocabulary size V")
    p_demo.add_argument("--batch", type=int, default=8, help="batch size B")
    p_demo.add_argument("--k", type=int, default=8, help="intermediate tokens for marginalization")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
