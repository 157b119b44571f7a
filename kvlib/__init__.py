"""kvlib: KV-cache compression for causal language models, and the measuring code of the kvlib study."""

from kvlib.cache import extend, kv_bytes, new_cache
from kvlib.presses import PRESSES, Press, PressReport, list_presses, load_press, register

__version__ = "0.1.0"

__all__ = [
    "PRESSES",
    "Press",
    "PressReport",
    "extend",
    "kv_bytes",
    "list_presses",
    "load_press",
    "new_cache",
    "register",
]
