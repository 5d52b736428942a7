"""User errors of the command line: which exceptions :func:`~mtp_ext.cli.parser.main` reports as
one line ``mtp-ext <command>: error: <message>`` (exit status 2, as argparse does), and the checks
of file arguments that commands run before loading a model."""

from __future__ import annotations

import os

__all__ = ["USER_ERRORS", "check_heads_folder", "check_model", "one_line"]

# Raised for bad values or missing inputs; any other exception is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError)


def one_line(exc: BaseException) -> str:
    """The exception's message on one line."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip()) or repr(exc)


def check_model(name: str) -> None:
    """FileNotFoundError unless ``name`` is a known model or a transformers model folder."""
    from ..data.assets import MODELS

    if name not in MODELS and not os.path.isfile(os.path.join(name, "config.json")):
        raise FileNotFoundError(
            f"--model {name!r} is neither a known model {sorted(MODELS)} nor a model folder "
            f"(no config.json there)"
        )


def check_heads_folder(folder: str, flag: str) -> None:
    """FileNotFoundError unless ``folder`` holds heads written by ``save_pretrained``."""
    from ..heads import CONFIG_NAME, WEIGHTS_NAME

    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"{flag} {folder!r} is not a heads folder (no {name} there)")
