from dataclasses import dataclass

import torch
from torch.nn import functional as F

from kvlib.presses.base import Press
from kvlib.presses.registry import register


@register
@dataclass
class TOVAPress(Press):
    """TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs", arXiv:2401.06104): keep what the last
    query attends to.

    The last prefix query's attention over the prefix keys (softmax), averaged over all query heads, ranks the
    positions; every KV head keeps the same positions, as in kvpress's TOVAPress. The last position itself is
    always kept.
    """

    name = "tova"

    def queries_needed(self) -> int:
        return 1

    def min_prefix_length(self) -> int:
        return 2  # one position to score besides the last

    def score(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        batch, kv_heads, n, dim = keys.shape
        groups = queries.shape[1] // kv_heads
        last = queries[:, :, -1:].reshape(batch, kv_heads, groups, dim)  # query head h reads KV head h // groups
        logits = last @ keys.transpose(2, 3) * scaling  # [batch, kv_heads, groups, n]
        weights = torch.softmax(logits, dim=-1, dtype=torch.float32).to(queries.dtype)[..., :-1]
        scores = weights.mean(dim=(1, 2))[:, None].expand(batch, kv_heads, n - 1)
        return F.pad(scores, (0, 1), value=scores.max().item() + 1)
