"""Does a pruned cache decode as fast as an unpruned cache of the same length?

    .venv/bin/python benchmarks/decode_path.py [--length 8192] [--ratio 0.5] [--tokens 16] [--repetitions 15]

A press that keeps k of n positions can at best decode like a plain prefill of k tokens. This compares, on the
bundled SmolLM2-135M and the first `--length`-token window of PG-19, the TPOT of
- `plain k`: a plain (no press) prefill of the first k = n - int(n * ratio) tokens, decoding from position k;
- `knorm`, `snapkv`: one shared prefill of all n tokens, each press pruning its own copy to k positions per head
  (`press.prune`, bit-identical to prefilling under the press), decoding from position n with `cache.extend`;
- `knorm, cloned`: the knorm cache with every tensor copied afresh (`.clone()`), to tell the tensors' layout and
  allocation apart from the rest of the decode path.
Every repetition decodes `--tokens` tokens from its own fork of the prepared cache (the prepared tensors are
never written), round-robin across configurations (benchmarks/common.py `interleaved`); it prints medians and
IQRs, the ratio to `plain k`, and the structure of each cache (contiguity, layer lengths, and the aten operators
one decode step runs: equal counts mean the same kernels, mask and Python path). Run it alone: on a shared
machine the timings mean little (the structure does not depend on the machine).
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from common import data_dir, interleaved, machine_line, median_iqr

import kvlib
from kvlib import data, models
from kvlib.cache import extend, fork_cache, new_cache
from kvlib.presses import SharedPrefill
from kvlib.presses.base import n_kept


def decode(model, cache, start: int, tokens: int) -> None:
    """`tokens` greedy steps from a fork of `cache`, the first token at position `start`."""
    forked = fork_cache(cache)
    token = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        for step in range(tokens):
            token = extend(model, token, forked, start + step)[:, -1].argmax(dim=-1, keepdim=True)


def ops_per_step(model, cache, start: int) -> int:
    """aten operators one decode step runs (the second step from a fork): a count that no busy machine skews."""
    from torch.profiler import ProfilerActivity, profile

    forked = fork_cache(cache)
    token = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        extend(model, token, forked, start)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            extend(model, token, forked, start + 1)
    return sum(1 for event in profiler.events() if event.name.startswith("aten::"))


def structure(model, cache, start: int) -> str:
    lengths = sorted({layer.keys.shape[-2] for layer in cache.layers})
    contiguous = all(layer.keys.is_contiguous() and layer.values.is_contiguous() for layer in cache.layers)
    return (f"layer lengths {lengths}, contiguous {contiguous}, dtype {cache.layers[0].keys.dtype}, "
            f"{ops_per_step(model, cache, start)} aten ops per decode step")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192, help="prompt tokens the presses prune")
    parser.add_argument("--ratio", type=float, default=0.5, help="compression ratio of the presses")
    parser.add_argument("--tokens", type=int, default=16, help="decoded tokens per repetition")
    parser.add_argument("--repetitions", type=int, default=15)  # 5 left 15% IQRs at 8192 here
    args = parser.parse_args()

    print(f"# {machine_line()}")
    model, tokenizer = models.load_model("smollm2", device="cpu", dtype="float32")
    window = data.load_windows("pg19", tokenizer, args.length, max_samples=1, data_dir=data_dir(),
                               pg19_max_chars=max(200_000, 8 * args.length))[0]  # fmt: skip
    ids = torch.as_tensor(window)[None]
    kept = n_kept(args.length, args.ratio)

    plain = new_cache(model)
    with torch.no_grad():
        model(ids[:, :kept], cache=plain, use_cache=True, logits_to_keep=1)
    presses = {name: kvlib.load_press(name, compression_ratio=args.ratio) for name in ("knorm", "snapkv")}
    shared = SharedPrefill.run(model, ids, list(presses.values()))
    caches = {f"plain {kept}": (plain, kept)}
    caches |= {name: (press.prune(shared), args.length) for name, press in presses.items()}
    cloned = fork_cache(caches["knorm"][0])
    for layer in cloned.layers:
        layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
    caches["knorm, cloned"] = (cloned, args.length)
    del shared

    for name, (cache, start) in caches.items():
        print(f"{name:>14}: {structure(model, cache, start)}")
    configs = {name: partial(decode, model, cache, start, args.tokens) for name, (cache, start) in caches.items()}
    times = interleaved(configs, args.repetitions, warmup=1)
    reference = median_iqr(times[f"plain {kept}"])[0]
    print(f"TPOT over {args.tokens} tokens, {args.repetitions} interleaved repetitions, prompt {args.length} tokens, "
          f"ratio {args.ratio} -> {kept} kept")  # fmt: skip
    for name, seconds in times.items():
        median, iqr = median_iqr([t / args.tokens for t in seconds])
        print(f"{name:>14}: {median * 1e3:7.2f} ms (IQR {iqr * 1e3:.2f})  x{median * args.tokens / reference:.2f} "
              f"of plain {kept}")  # fmt: skip


if __name__ == "__main__":
    main()
