"""Quantized KV storage on SmolLM2: kvlib's suffix NLL per precision against transformers' `QuantizedCache` used
directly, window by window, and the bytes each precision holds per cached position.

    python benchmarks/kv_quant_parity.py [--windows 3] [--dataset wikitext]

kvlib path: `CachePolicy(none press, Storage(precision))` prefills the prefix (float prefill, then the kept
positions handed to transformers' quantized layer) and `kvlib.cache.extend` scores the suffix. Direct path: the
model fed prefix then suffix through `QuantizedCache(backend, config, ...)` as a transformers user would. Not a
timing benchmark: it prints the NLL difference (expected 0.0: the same layers get the same tensors) and the bytes.
"""

from __future__ import annotations

import argparse
import math

import torch
from common import data_dir
from torch.nn import functional as F
from transformers import QuantizedCache

from kvlib import data, models
from kvlib.cache import CachePolicy, Storage, cache_length, extend, kv_bytes, precision_names
from kvlib.presses import load_press


@torch.no_grad()
def suffix_nll(
    model, ids: torch.Tensor, prefix: int, prefill_logits: torch.Tensor, suffix_logits: torch.Tensor
) -> float:
    logits = torch.cat([prefill_logits[:, -1:], suffix_logits[:, :-1]], dim=1).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, prefix:].reshape(-1), reduction="sum").item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--dataset", default="wikitext")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max_length", type=int, default=1024)
    args = parser.parse_args()
    model, tokenizer = models.load_model(args.model, "cpu", "float32")
    windows = data.load_windows(args.dataset, tokenizer, args.max_length, max_samples=args.windows, data_dir=data_dir())
    prefix = args.max_length // 2
    print(f"{args.model}, {args.dataset}, {args.windows} windows of {args.max_length} tokens, prefix {prefix}")
    print("precision     kvlib ppl  direct ppl  max |dNLL| per window  ppl vs float  KV bytes/position  bytes vs float")
    float_ppl = float_bytes = None
    for precision in precision_names():
        if precision in ("hqq-int3", "hqq-int1"):
            continue
        storage = Storage.parse(precision)
        ours, theirs = [], []
        for window in windows:
            ids = torch.as_tensor(window)[None]
            logits, cache = CachePolicy(load_press("none"), storage).prefill(model, ids[:, :prefix])
            held, positions = kv_bytes(cache), cache_length(cache)
            ours.append(suffix_nll(model, ids, prefix, logits, extend(model, ids[:, prefix:], cache, prefix)))
            if storage.quantized:
                options = {} if precision == "fp8" else {"nbits": storage.nbits, **storage.options}
                direct = QuantizedCache(storage.backend, model.config, **options)
                direct_logits = model(ids[:, :prefix], cache=direct, use_cache=True, logits_to_keep=1).logits
                suffix = model(ids[:, prefix:], cache=direct, use_cache=True).logits
                theirs.append(suffix_nll(model, ids, prefix, direct_logits, suffix))
            else:
                theirs.append(ours[-1])
        tokens = len(windows) * (args.max_length - prefix)
        ppl, direct_ppl = math.exp(sum(ours) / tokens), math.exp(sum(theirs) / tokens)
        worst = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
        float_ppl = float_ppl or ppl
        float_bytes = float_bytes or held
        print(
            f"{precision:12s} {ppl:10.3f} {direct_ppl:11.3f} {worst:22.3g} {100 * (ppl / float_ppl - 1):+11.2f}% "
            f"{held / positions:18.0f} {held / float_bytes:15.3f}"
        )


if __name__ == "__main__":
    main()
