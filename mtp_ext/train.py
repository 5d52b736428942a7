"""Compatibility alias: the training code lives in :mod:`mtp_ext.training`."""

from .training import *  # noqa: F401,F403
from .training import __all__  # noqa: F401
