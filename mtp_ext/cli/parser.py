"""The ``mtp-ext`` argument parser, one subcommand per module of :mod:`mtp_ext.cli`, and
``main``."""

from __future__ import annotations

import argparse
import os
import sys

from . import assets, chat_data, demo, export_heads, generate, info, train_heads
from .checks import USER_ERRORS, one_line

__all__ = ["DESCRIPTION", "build_parser", "main"]

DESCRIPTION = """Command line: ``mtp-ext info``, ``mtp-ext demo``, ``mtp-ext assets prepare``,
``mtp-ext chat-data``, ``mtp-ext train-heads`` and ``mtp-ext export-heads`` (also
``python -m mtp_ext ...``)."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``mtp-ext`` command; each sets ``func``, the function that runs it."""
    parser = argparse.ArgumentParser(prog="mtp-ext", description=DESCRIPTION)
    parser.add_argument(
        "--debug", action="store_true",
        help="show the full traceback of every error (also: environment MTP_EXT_DEBUG=1); "
             "without it a bad value or a missing input is one line and exit status 2",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (info, demo, assets, chat_data, train_heads, export_heads, generate):
        command.add_parser(sub)
    from ..evaluation.cli import add_parser as add_eval_parser

    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` (default: the process's arguments) and runs the command; returns its exit
    status. A user error (:data:`~mtp_ext.cli.checks.USER_ERRORS`: a bad value, a missing input)
    is printed as one line ``mtp-ext <command>: error: <message>`` and gives status 2, as
    argparse's own errors do; other exceptions, and every one under ``--debug`` or
    ``MTP_EXT_DEBUG=1``, propagate with their traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug or os.environ.get("MTP_EXT_DEBUG", "") not in ("", "0"):
        return args.func(args)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"{parser.prog} {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
