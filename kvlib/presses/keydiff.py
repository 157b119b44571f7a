from dataclasses import dataclass

import torch
from torch.nn import functional as F

from kvlib.presses.base import Press
from kvlib.presses.registry import register


@register
@dataclass
class KeyDiffPress(Press):
    """KeyDiff (Park et al., 2025, arXiv:2504.15364): keep the keys least similar to the average key.

    The anchor is the mean of the layer's L2-normalised keys (per KV head); a position scores minus the cosine
    similarity of its key to that anchor. As in kvpress's KeyDiffPress, the whole prefix is scored at once (the
    paper's block-wise iterative eviction is not reproduced).
    """

    name = "keydiff"

    def queries_needed(self) -> int:
        return 0

    def score(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        anchor = F.normalize(keys, p=2, dim=-1).mean(dim=2, keepdim=True)
        return -F.cosine_similarity(keys, anchor, dim=-1)
