"""KV-cache presses. Importing this package registers every built-in press."""

from kvlib.presses import (  # noqa: F401  (registration)
    expected_attention,
    keydiff,
    knorm,
    kvzip,
    lagkv,
    no_press,
    observed_attention,
    pyramidkv,
    random,
    snapkv,
    streaming_llm,
    tova,
)
from kvlib.presses.base import PrefillLayer, Press, PressReport, SharedPrefill, n_kept, option
from kvlib.presses.registry import PRESSES, check_press_name, list_presses, load_press, register

__all__ = [
    "PRESSES",
    "PrefillLayer",
    "Press",
    "PressReport",
    "SharedPrefill",
    "check_press_name",
    "list_presses",
    "load_press",
    "n_kept",
    "option",
    "register",
]
