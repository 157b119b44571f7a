"""The study: settings and their validation, stored results and their identity, and running a grid."""

from kvlib.measure import KINDS
from kvlib.study.cells import CellError, output_lock
from kvlib.study.runner import check_context, plan_run, run
from kvlib.study.settings import DEFAULT_METHODS, DEFAULT_RATIOS, Settings, build_press, cells, validate

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_RATIOS",
    "KINDS",
    "CellError",
    "Settings",
    "build_press",
    "cells",
    "check_context",
    "output_lock",
    "plan_run",
    "run",
    "validate",
]
