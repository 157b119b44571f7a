"""The cache policy's home: how a prefix enters the cache, what is kept, how it is stored, which positions it claims.

- `layers`: building, forking and pruning transformers' `Cache` of per-layer classes;
- `storage`: float or quantized storage of the kept positions (transformers' quantized layers);
- `feed`: `extend()`, the one way to feed tokens after a pruned prefix, and what a cache holds (`kv_bytes`);
- `policy`: `CachePolicy`, the press and the storage together, which every measurement kind drives.
"""

from kvlib.cache.feed import cache_length, extend, kv_bytes
from kvlib.cache.layers import fork_cache, new_cache, prune_cache
from kvlib.cache.policy import CachePolicy, as_policy
from kvlib.cache.storage import FLOAT, Storage, precision_names

__all__ = [
    "FLOAT",
    "CachePolicy",
    "as_policy",
    "Storage",
    "cache_length",
    "extend",
    "fork_cache",
    "kv_bytes",
    "new_cache",
    "precision_names",
    "prune_cache",
]
