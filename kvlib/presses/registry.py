"""Presses by name, configured by plain parameters (as lm-evaluation-harness does with its tasks)."""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from kvlib.presses.base import Press

PRESSES: dict[str, type[Press]] = {}


def register(cls: type[Press]) -> type[Press]:
    """Class decorator: make a press loadable by its `name`."""
    if not cls.name or cls.name in PRESSES:
        raise ValueError(f"press name {cls.name!r} is empty or taken")
    PRESSES[cls.name] = cls
    return cls


def press_options(name: str) -> dict[str, Any]:
    """Options of a press (beyond compression_ratio) with their defaults."""
    return {
        f.name: f.default
        for f in fields(PRESSES[name])
        if f.init and f.name != "compression_ratio" and f.default is not MISSING
    }


def list_presses() -> dict[str, dict[str, Any]]:
    """Every registered press name with its options and their defaults."""
    return {name: press_options(name) for name in PRESSES}


def check_press_name(name: str) -> None:
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r}; choose one of {', '.join(PRESSES)}")


def load_press(name: str, compression_ratio: float = 0.0, **options: Any) -> Press:
    """A press by name: `load_press("snapkv", compression_ratio=0.5, window_size=32)`."""
    check_press_name(name)
    allowed = press_options(name)
    unknown = set(options) - set(allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(sorted(unknown))} for press {name!r}; "
            f"its options are: {', '.join(allowed) or 'none'}"
        )
    return PRESSES[name](compression_ratio=compression_ratio, **options)
