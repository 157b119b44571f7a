"""Prefill overhead of each press against no press, kvlib beside NVIDIA kvpress 0.5.5, on SmolLM2-135M.

    .venv/bin/python benchmarks/press_overhead.py [--length 1024] [--ratio 0.5] [--repetitions 5]

One wikitext window of `length` tokens is prefilled into an empty cache under each press; the configurations are
interleaved (none, kvlib knorm, kvpress knorm, ...) `repetitions` times after one warm-up round, every other round
in reverse order so that no configuration always follows the same one. Overhead is median(press) / median(none)
- 1; the IQR is that of the per-round ratios. On a 2-core VM the prefill itself varies by several percent between
runs, more than most presses add, so the script also times the work each press adds inside the prefill
(scoring, choosing and pruning; kvlib: `Press.keep` and `prune_cache`, kvpress: `compress`), which does not
depend on how fast the rest of the forward ran. Run it alone on the machine.

kvpress pins transformers<5.3, so it is installed with --no-deps and only its press modules are imported; its
attention-layer hook reads `past_key_values` and `cache_position`, which transformers 5.24 no longer passes, so
a two-line adapter hands them over (the press's own scoring and pruning run unchanged).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
import types

import numpy as np
import torch
from common import interleaved, machine_line, median_iqr, wikitext_windows

import kvlib
from kvlib import models
from kvlib.presses import base as mechanism

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


class AddedWork:
    """Seconds spent in the press's own work during the last prefill (scoring, choosing, pruning)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, owner, name: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()

    model, tokenizer = models.load_model("smollm2", device="cpu", dtype="float32")
    ids = torch.as_tensor(wikitext_windows(tokenizer, args.length, 1)[0])[None]
    reference = kvpress_classes()

    def prefill(context, work: AddedWork | None = None):
        def call():
            if work is not None:
                work.seconds = 0.0
            cache = kvlib.new_cache(model)
            with torch.no_grad(), context(model):
                model(ids, cache=cache, use_cache=True, logits_to_keep=1)
            assert cache.layers[0].keys.shape[-2] in (args.length, kvlib.presses.n_kept(args.length, args.ratio),
                                                       int(args.length * (1 - args.ratio)))  # fmt: skip

            if work is not None:
                added[context_name(context)].append(work.seconds)

        return call

    added: dict[str, list[float]] = {}
    names: dict[int, str] = {}

    def context_name(context) -> str:
        return names[id(context)]

    configs = {"none": prefill(kvlib.load_press("none"))}
    kvlib_work = AddedWork()  # kvlib's own work: the per-layer choice and the pruning after the forward
    kvlib_work.wrap(mechanism, "prune_cache")
    for name in PRESSES:
        ours = kvlib.load_press(name, compression_ratio=args.ratio)
        kvlib_work.wrap(ours, "keep")
        theirs = adapt(reference[name](compression_ratio=args.ratio))
        their_work = AddedWork()
        their_work.wrap(theirs, "compress")
        for library, press, work in (("kvlib", ours, kvlib_work), ("kvpress", theirs, their_work)):
            names[id(press)] = f"{library} {name}"
            added[f"{library} {name}"] = []
            configs[f"{library} {name}"] = prefill(press, work)
    times = interleaved(configs, args.repetitions)

    base = np.array(times["none"])
    print(f"# prefill overhead vs no press: SmolLM2-135M, {args.length} tokens, ratio {args.ratio}, "
          f"{args.repetitions} interleaved repetitions; {machine_line()}")  # fmt: skip
    print(f"no press: median {median_iqr(base)[0]:.3f} s (IQR {median_iqr(base)[1]:.3f} s)")
    print("| press | kvlib overhead (median) | kvlib IQR | kvlib added work | kvpress overhead (median) | kvpress IQR "
          "| kvpress added work |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in PRESSES:
        cells = []
        for library in ("kvlib", "kvpress"):
            runs = np.array(times[f"{library} {name}"])
            overhead = np.median(runs) / np.median(base) - 1
            iqr = median_iqr(runs / base)[1]
            work = np.median(added[f"{library} {name}"][-args.repetitions :])
            cells += [
                f"{100 * overhead:+.1f}%",
                f"{100 * iqr:.1f} pp",
                f"{work * 1e3:.1f} ms ({100 * work / np.median(base):.1f}%)",
            ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
