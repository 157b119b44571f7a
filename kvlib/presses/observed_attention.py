from dataclasses import dataclass

import torch

from kvlib.presses.base import Press
from kvlib.presses.registry import register

# Attention weights computed at once: queries are taken in chunks of about this many weights (128 MiB in float32).
CHUNK_ELEMENTS = 1 << 25


@register
@dataclass
class ObservedAttentionPress(Press):
    """Observed attention, H2O-style (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle", arXiv:2306.14048): keep
    the positions the prefix's own queries attended to most.

    A position's score is the attention it received from every prefix query (causal softmax), divided by the
    number of queries that could see it, averaged over the query heads of each KV group, as in kvpress's
    ObservedAttentionPress. kvpress reads the eager attention matrix; kvlib recomputes it from the queries and
    keys, a chunk of queries at a time, so that no n x n matrix of all heads is ever held (any attention
    implementation works).
    """

    name = "observed_attention"

    def queries_needed(self) -> None:
        return None

    def score(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        batch, kv_heads, n, dim = keys.shape
        q_heads = queries.shape[1]
        groups = q_heads // kv_heads
        # The queries are the last m of the n positions: the whole prefix (m = n), or in a chunked prefill the
        # current chunk's, whose keys are the cache so far plus the chunk (query row i is key position offset + i).
        queries = queries[:, :, max(0, queries.shape[-2] - n) :]
        m = queries.shape[-2]
        offset = n - m
        received = torch.zeros((batch, kv_heads, groups, n), dtype=queries.dtype, device=queries.device)
        chunk = max(1, CHUNK_ELEMENTS // (batch * q_heads * n))
        for start in range(0, m, chunk):
            end = min(m, start + chunk)
            block = queries[:, :, start:end].reshape(batch, kv_heads, groups * (end - start), dim)
            logits = (block @ keys.transpose(2, 3) * scaling).view(batch, kv_heads, groups, end - start, n)
            query_pos = torch.arange(offset + start, offset + end, device=keys.device)[:, None]
            hidden = torch.arange(n, device=keys.device)[None, :] > query_pos  # causal: later keys are unseen
            logits = logits.masked_fill(hidden, float("-inf"))
            received += torch.softmax(logits, dim=-1, dtype=torch.float32).to(queries.dtype).sum(dim=-2)
        # Queries that could see each key: n - j of the whole prefix, at most the m queries of a chunk.
        seen_by = torch.arange(n, 0, -1, device=keys.device, dtype=received.dtype).clamp(max=m)
        return (received / seen_by).mean(dim=2)
