from dataclasses import dataclass

import torch

from kvlib.presses.base import Press, option
from kvlib.presses.registry import register


@register
@dataclass
class LagKVPress(Press):
    """LagKV (Liang et al., 2025): score each partition of `lag_size` tokens against the next one.

    Keys and values of a partition are min-max normalised with the range of the following partition; the std
    of that normalisation (softmaxed within the partition, keys and values averaged) ranks the tokens. The
    `n_sink` first tokens and the last partition (plus the remainder) are always kept.
    """

    n_sink: int = option(4, minimum=0)
    lag_size: int = option(128, minimum=1)
    name = "lagkv"

    def queries_needed(self) -> int:
        return 0

    def min_prefix_length(self) -> int:
        return self.n_sink + 2 * self.lag_size  # one partition to score and one to score it against

    def score(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        batch, kv_heads, n, _ = keys.shape
        end = self.n_sink + ((n - self.n_sink) // self.lag_size) * self.lag_size
        tail = self.lag_size + n - end
        partition_scores = (
            self._lag_score(keys[:, :, self.n_sink : end]) + self._lag_score(values[:, :, self.n_sink : end])
        ) / 2
        ranks = (partition_scores.argsort(dim=-1).argsort(dim=-1) / self.lag_size).to(keys.dtype)
        always = torch.ones((batch, kv_heads), dtype=ranks.dtype, device=keys.device)
        sink, recent = always[..., None].expand(-1, -1, self.n_sink), always[..., None].expand(-1, -1, tail)
        return torch.cat((sink, ranks.reshape(batch, kv_heads, -1), recent), dim=-1)

    def _lag_score(self, states: torch.Tensor) -> torch.Tensor:
        batch, heads, length, dim = states.shape
        partitions = states.reshape(batch, heads, length // self.lag_size, self.lag_size, dim)
        scored, reference = partitions[:, :, :-1], partitions[:, :, 1:]
        low = reference.min(dim=-2, keepdim=True).values
        high = reference.max(dim=-2, keepdim=True).values
        return ((scored - low) / (high - low)).std(dim=-1).softmax(dim=-1)
