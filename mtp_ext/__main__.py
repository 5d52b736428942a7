"""``python -m mtp_ext``: the command line, :func:`mtp_ext.cli.main`."""

from mtp_ext.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
