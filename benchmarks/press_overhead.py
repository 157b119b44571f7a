"""Prefill overhead of each press against no press, kvlib beside NVIDIA kvpress 0.5.5, on SmolLM2-135M.

    .venv/bin/python benchmarks/press_overhead.py [--length 1024] [--ratio 0.5] [--repetitions 5]

One wikitext window of `length` tokens is prefilled into an empty cache under each press; the configurations are
interleaved (none, kvlib knorm, kvpress knorm, ...) `repetitions` times after one warm-up round. Overhead is
median(press) / median(none) - 1; the IQR is that of the per-round ratios. Run it alone on the machine.

kvpress pins transformers<5.3, so it is installed with --no-deps and only its press modules are imported; its
attention-layer hook reads `past_key_values` and `cache_position`, which transformers 5.24 no longer passes, so
a two-line adapter hands them over (the press's own scoring and pruning run unchanged).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import types

import numpy as np
import torch
from common import interleaved, machine_line, median_iqr, wikitext_windows

import kvlib
from kvlib import models

PRESSES = {  # kvlib name -> (kvpress module, class)
    "knorm": ("knorm_press", "KnormPress"),
    "snapkv": ("snapkv_press", "SnapKVPress"),
    "streaming_llm": ("streaming_llm_press", "StreamingLLMPress"),
    "lagkv": ("lagkv_press", "LagKVPress"),
}


def kvpress_classes() -> dict[str, type]:
    spec = importlib.util.find_spec("kvpress")
    if spec is None:
        sys.exit("kvpress is not installed: .venv/bin/pip install --no-deps kvpress==0.5.5")
    root = spec.submodule_search_locations[0]
    for name, path in (("kvpress", root), ("kvpress.presses", f"{root}/presses")):
        stub = types.ModuleType(name)
        stub.__path__ = [path]
        sys.modules[name] = stub
    return {
        name: getattr(importlib.import_module(f"kvpress.presses.{module}"), cls)
        for name, (module, cls) in PRESSES.items()
    }


def adapt(press):
    """kvpress's hook, fed the argument names it expects (transformers 5.24 passes `cache`, no cache_position)."""
    hook = press.forward_hook

    def forward_hook(module, args, kwargs, output):
        q_len = kwargs["hidden_states"].shape[1]
        return hook(
            module, args, {**kwargs, "past_key_values": kwargs["cache"], "cache_position": torch.arange(q_len)}, output
        )

    press.forward_hook = forward_hook
    return press


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()

    model, tokenizer = models.load_model("smollm2", device="cpu", dtype="float32")
    ids = torch.as_tensor(wikitext_windows(tokenizer, args.length, 1)[0])[None]
    reference = kvpress_classes()

    def prefill(context):
        def call():
            cache = kvlib.new_cache(model)
            with torch.no_grad(), context(model):
                model(ids, cache=cache, use_cache=True, logits_to_keep=1)
            assert cache.layers[0].keys.shape[-2] in (args.length, kvlib.presses.n_kept(args.length, args.ratio),
                                                       int(args.length * (1 - args.ratio)))  # fmt: skip

        return call

    configs = {"none": prefill(kvlib.load_press("none"))}
    for name in PRESSES:
        configs[f"kvlib {name}"] = prefill(kvlib.load_press(name, compression_ratio=args.ratio))
        configs[f"kvpress {name}"] = prefill(adapt(reference[name](compression_ratio=args.ratio)))
    times = interleaved(configs, args.repetitions)

    base = np.array(times["none"])
    print(f"# prefill overhead vs no press: SmolLM2-135M, {args.length} tokens, ratio {args.ratio}, "
          f"{args.repetitions} interleaved repetitions; {machine_line()}")  # fmt: skip
    print(f"no press: median {median_iqr(base)[0]:.3f} s (IQR {median_iqr(base)[1]:.3f} s)")
    print("| press | kvlib overhead (median) | kvlib IQR | kvpress overhead (median) | kvpress IQR |")
    print("|---|---|---|---|---|")
    for name in PRESSES:
        cells = []
        for library in ("kvlib", "kvpress"):
            runs = np.array(times[f"{library} {name}"])
            overhead = np.median(runs) / np.median(base) - 1
            iqr = median_iqr(runs / base)[1]
            cells += [f"{100 * overhead:+.1f}%", f"{100 * iqr:.1f} pp"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
