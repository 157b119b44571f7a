"""Is the random press's non-monotonic curve the attention sink? A reproducible probe, not part of the study.

The committed offline run shows `random` worse at ratios 0.3-0.5 than at 0.7. The hypothesis: its damage comes
from which KV heads lose position 0 (the first token, an attention sink). This script scores SmolLM2-135M on
the first two wikitext windows of 768 tokens (prefix 384, suffix 384, as the offline preset) under the random
press at ratios 0.3, 0.5 and 0.7, with and without position 0 forced kept; the forced variant otherwise keeps
the same random positions (the same seeded scores; position 0 takes the place of the lowest-scoring kept one
in the heads that had dropped it). It prints a table of suffix perplexities and of how many (layer, KV head)
pairs lost position 0.

    .venv/bin/python benchmarks/random_sink_probe.py            # text from $KVLIB_DATA_DIR, else ../shared/data

A few minutes on 2 CPU cores (13 prefills and suffix passes of 768 tokens); run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import kvlib  # noqa: E402
from kvlib.data import load_windows  # noqa: E402
from kvlib.models import load_model  # noqa: E402
from kvlib.presses.random import RandomPress  # noqa: E402

MAX_LENGTH = 768
PREFIX = MAX_LENGTH // 2  # prefix_ratio 0.5, as the offline preset
WINDOWS = 2
RATIOS = (0.3, 0.5, 0.7)


@dataclass
class RandomKeepFirstPress(RandomPress):
    """The random press's scores with position 0 raised above all others: always kept, the rest unchanged.
    Not registered: a probe, not a method of the study."""

    name = "random_keep0"

    def score(self, queries, keys, values, scaling):
        scores = super().score(queries, keys, values, scaling).clone()
        scores[..., 0] = math.inf
        return scores


def data_dir() -> Path:
    return Path(os.environ.get("KVLIB_DATA_DIR") or REPO.parent / "shared" / "data")


@torch.no_grad()
def suffix_nll(model, ids: torch.Tensor, press) -> tuple[float, int, int, int]:
    """(NLL sum, tokens, heads that lost position 0, heads) of the suffix of one window after prefilling its
    prefix under `press` (None: no compression); positions continue from the uncompressed prefix length."""
    cache = kvlib.new_cache(model)
    if press is None:
        last = model(ids[:, :PREFIX], cache=cache, use_cache=True).logits[:, -1:]
        lost, heads = 0, 0
    else:
        with press(model):
            last = model(ids[:, :PREFIX], cache=cache, use_cache=True).logits[:, -1:]
        kept = press.last_report.kept_indices  # layer -> [batch, kv_heads, n_kept]
        lost = sum(int((k[..., 0] != 0).sum()) for k in kept.values())  # ascending: index 0 kept <=> first == 0
        heads = sum(k.shape[0] * k.shape[1] for k in kept.values())
    logits = torch.cat([last, kvlib.extend(model, ids[:, PREFIX:-1], cache, PREFIX)], dim=1).float()
    targets = ids[:, PREFIX:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return float(nll), targets.numel(), lost, heads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="the random press's seed (the study's default: 0)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    model, tokenizer = load_model("smollm2", device="cpu", dtype="float32")
    windows = load_windows("wikitext", tokenizer, MAX_LENGTH, WINDOWS, data_dir(), min_windows=WINDOWS)
    ids = [torch.as_tensor(w, dtype=torch.long)[None] for w in windows[:WINDOWS]]

    def ppl(press) -> tuple[float, int, int]:
        results = [suffix_nll(model, window, press) for window in ids]
        nll, tokens = sum(r[0] for r in results), sum(r[1] for r in results)
        return math.exp(nll / tokens), sum(r[2] for r in results), sum(r[3] for r in results)

    base, _, _ = ppl(None)
    print(f"SmolLM2-135M (bundled GGUF, float32, CPU), wikitext windows 0-{WINDOWS - 1} of {MAX_LENGTH} tokens "
          f"from {data_dir()}, prefix {PREFIX}, random seed {args.seed}")  # fmt: skip
    print(f"baseline suffix perplexity: {base:.2f}\n")
    header = f"{'ratio':>5}  {'random':>9}  {'Δ':>8}  {'lost pos 0':>11}  {'random, pos 0 kept':>18}  {'Δ':>8}"
    print(header)
    print("-" * len(header))
    for ratio in RATIOS:
        plain, lost, heads = ppl(RandomPress(compression_ratio=ratio, seed=args.seed))
        kept0, _, _ = ppl(RandomKeepFirstPress(compression_ratio=ratio, seed=args.seed))
        print(f"{ratio:>5g}  {plain:>9.2f}  {plain - base:>+8.2f}  {f'{lost}/{heads}':>11}  {kept0:>18.2f}  "
              f"{kept0 - base:>+8.2f}")  # fmt: skip
    print(f"\n({time.perf_counter() - started:.0f} s; 'lost pos 0': (window, layer, KV head) triples whose kept set "
          "lacks position 0)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
