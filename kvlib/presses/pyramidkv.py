from dataclasses import dataclass

import torch

from kvlib.presses.base import PrefillLayer, option
from kvlib.presses.registry import register
from kvlib.presses.snapkv import SnapKVPress


@register
@dataclass
class PyramidKVPress(SnapKVPress):
    """PyramidKV (Cai et al., 2024, arXiv:2406.02069): SnapKV scores, with budgets that shrink with depth.

    kvpress's PyramidKVPress schedule (from KVCache-Factory): with `w = window_size` and `n` prefix positions,
    `capacity = w + n * (1 - compression_ratio)`, the first layer keeps `max_num` and the last `min_num`, linearly
    in between, where `min_num = (capacity - w) / beta` and `max_num = 2 (capacity - w) - min_num` (capped at
    `n - w`, `min_num` then raised to keep the sum); layer i keeps `round(max_num - i (max_num - min_num) /
    (layers - 1))`, so the layers together keep about `n * layers * (1 - compression_ratio)`. Where that
    pyramid does not fit (`n >= max_num >= min_num >= w` fails), every layer keeps `round(n * (1 -
    compression_ratio))`, as kvpress does. Layers count as in the model config (sliding-window layers included,
    though they are not pruned). The observation window is kept whenever the layer's budget allows.
    """

    beta: int = option(20, minimum=1)
    name = "pyramidkv"

    def min_prefix_length(self) -> int:
        return self.window_size + 1  # one position to score besides the window (budgets may not hold the window)

    def score(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        scores = super().score(queries, keys, values, scaling)
        window = scores[..., -self.window_size :]
        return torch.cat((scores[..., : -self.window_size], window + 1), dim=-1)  # the window ranks first

    def budget(self, n: int, layer: PrefillLayer) -> int:
        window, ratio = self.window_size, self.compression_ratio
        capacity = window + n * (1 - ratio)
        min_num = (capacity - window) / self.beta
        max_num = (capacity - window) * 2 - min_num
        if max_num >= n - window:
            max_num = n - window
            min_num = (capacity - window) * 2 - max_num
        if not n >= max_num >= min_num >= window:
            return max(1, round(n * (1 - ratio)))
        steps = (max_num - min_num) / (layer.n_layers - 1) if layer.n_layers > 1 else 0.0
        return round(max_num - layer.layer_idx * steps)
