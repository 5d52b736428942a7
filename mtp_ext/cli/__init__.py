"""The command line, ``mtp-ext`` (also ``python -m mtp_ext``): :mod:`~mtp_ext.cli.parser` builds
the parser and runs a command; each command has its module (:mod:`~mtp_ext.cli.info`,
:mod:`~mtp_ext.cli.demo` with :mod:`~mtp_ext.cli.ops_demo`, :mod:`~mtp_ext.cli.assets`,
:mod:`~mtp_ext.cli.train_heads`, :mod:`~mtp_ext.cli.generate`; ``eval`` is
:mod:`mtp_ext.evaluation.cli`), and :mod:`~mtp_ext.cli.compare` runs ``mtp_ext.generate`` beside
``model.generate``; :mod:`~mtp_ext.cli.checks` says which errors are the user's (one line, exit
status 2) and checks file arguments before a model loads."""

from .parser import build_parser, main

__all__ = ["build_parser", "main"]
