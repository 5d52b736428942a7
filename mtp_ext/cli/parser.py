"""The ``mtp-ext`` argument parser, one subcommand per module of :mod:`mtp_ext.cli`, and
``main``."""

from __future__ import annotations

import argparse

from . import assets, demo, generate, info, train_heads

__all__ = ["DESCRIPTION", "build_parser", "main"]

DESCRIPTION = """Command line: ``mtp-ext info``, ``mtp-ext demo``, ``mtp-ext assets prepare`` and
``mtp-ext train-heads`` (also ``python -m mtp_ext ...``)."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``mtp-ext`` command; each sets ``func``, the function that runs it."""
    parser = argparse.ArgumentParser(prog="mtp-ext", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (info, demo, assets, train_heads, generate):
        command.add_parser(sub)
    from ..evaluation.cli import add_parser as add_eval_parser

    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` (default: the process's arguments) and runs the command; returns its exit
    status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)
