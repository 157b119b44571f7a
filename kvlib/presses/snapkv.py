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
        batch, kv_heads, n, dim = keys.shape
        groups = queries.shape[1] // kv_heads
        window = self.window_size
        # Query head h reads KV head h // groups: fold each group's window queries into one matrix per KV head
        # rather than copying the keys once per query head.
        grouped = queries[:, :, -window:].reshape(batch, kv_heads, groups * window, dim)
        logits = (grouped @ keys.transpose(2, 3) * scaling).view(batch, kv_heads, groups, window, n)
        causal = torch.full((window, n), float("-inf"), dtype=logits.dtype, device=logits.device)
        weights = torch.softmax(logits + causal.triu(diagonal=n - window + 1), dim=-1, dtype=torch.float32)
        weights = weights.to(queries.dtype)[..., :-window].mean(dim=-2)  # [batch, kv_heads, groups, n - window]
        scores = F.avg_pool1d(
            weights.reshape(batch, kv_heads * groups, n - window),
            kernel_size=self.kernel_size,
            padding=self.kernel_size // 2,
            stride=1,
        )
        scores = scores.view(batch, kv_heads, groups, n - window).mean(dim=2)
        return F.pad(scores, (0, window), value=scores.max().item())
