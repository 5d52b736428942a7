"""``mtp-ext assets prepare``: fetch and parse the texts, and check that the models are
installed."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """Adds the ``assets`` command to the subcommands ``sub``."""
    p = sub.add_parser("assets", help="offline texts and models (see mtp_ext.data)")
    p.add_argument(
        "action", choices=["prepare"], help="prepare: fetch and parse what is missing"
    )
    p.add_argument("--force", action="store_true", help="fetch and parse the texts again")
    p.add_argument("--all-models", action="store_true", help="check every known model")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs ``mtp-ext assets``; returns the exit status."""
    import time

    from ..data.assets import MODELS, model_file
    from ..data.texts import prepare_texts

    t0 = time.perf_counter()
    status = 0
    try:
        prepare_texts(force=args.force)
    except Exception as exc:  # noqa: BLE001  (report and go on to the model check)
        print(f"mtp_ext: preparing the texts failed: {exc}", file=sys.stderr)
        status = 1
    for name in MODELS if args.all_models else ["smollm2-135m"]:
        try:
            print(f"mtp_ext: model {name!r} installed: {model_file(name)}")
        except FileNotFoundError:
            install = MODELS[name].install
            print(f"mtp_ext: model {name!r} is not installed; install it with: {install}")
            status = 1
    print(f"mtp_ext: assets prepare done in {time.perf_counter() - t0:.1f} s")
    return status
