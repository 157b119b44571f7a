from dataclasses import dataclass

import torch
from torch.nn import functional as F

from kvlib.presses.base import Press, n_kept, option
from kvlib.presses.registry import register


@register
@dataclass
class SnapKVPress(Press):
    """SnapKV (Li et al., 2024): keep what the last `window_size` queries attend to.

    Attention of the observation window to the earlier keys, averaged over those queries, average-pooled along
    keys (`kernel_size`) and over the query heads of each KV group. The window itself is always kept.
    """

    window_size: int = option(64, minimum=1)
    kernel_size: int = option(5, minimum=1, odd=True)  # odd: the pooled scores keep the keys' length
    name = "snapkv"

    def queries_needed(self) -> int:
        return self.window_size

    def min_prefix_length(self) -> int:
        # Longer than the window, and long enough that the kept positions still hold the whole window.
        n = self.window_size + 1
        while n_kept(n, self.compression_ratio) < self.window_size:
            n += 1
        return n

    def score(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        batch, kv_heads, n, _ = keys.shape
        groups = queries.shape[1] // kv_heads
        window = self.window_size
        grouped_keys = keys.repeat_interleave(groups, dim=1)  # query head h reads KV head h // groups
        logits = queries[:, :, queries.shape[-2] - window :] @ grouped_keys.transpose(2, 3) * scaling
        causal = torch.full_like(logits, float("-inf")).triu(diagonal=n - window + 1)
        weights = torch.softmax(logits + causal, dim=-1, dtype=torch.float32).to(queries.dtype)[..., :-window]
        scores = F.avg_pool1d(
            weights.mean(dim=-2), kernel_size=self.kernel_size, padding=self.kernel_size // 2, stride=1
        )
        scores = scores.view(batch, kv_heads, groups, n - window).mean(dim=2)
        return F.pad(scores, (0, window), value=scores.max().item())
