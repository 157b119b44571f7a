"""kvlib: KV-cache compression for causal language models, and the measuring code of the kvlib study.

The press API (`load_press`, `extend`, ...) is loaded on first use, so that `kvlib.analysis` (tables, charts,
the report) imports without torch.
"""

from importlib import import_module

__version__ = "0.2.0"

_LAZY = {
    "PRESSES": "kvlib.presses",
    "Press": "kvlib.presses",
    "PressReport": "kvlib.presses",
    "PrefillLayer": "kvlib.presses",
    "SharedPrefill": "kvlib.presses",
    "list_presses": "kvlib.presses",
    "load_press": "kvlib.presses",
    "option": "kvlib.presses",
    "register": "kvlib.presses",
    "extend": "kvlib.cache",
    "kv_bytes": "kvlib.cache",
    "new_cache": "kvlib.cache",
    "CachePolicy": "kvlib.cache",
    "Storage": "kvlib.cache",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvlib' has no attribute {name!r}")
