import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from kvlib.presses.base import PrefillLayer, Press, option
from kvlib.presses.registry import register

# Queries read at once while gathering their statistics (chunks of about this many elements).
CHUNK_ELEMENTS = 1 << 24
# The farthest position whose float32 rotary tables the linearity check accepts the rounding of (see below).
FAR_POSITION = 1 << 16


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_frequencies(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(angle at the first position, angle per position, scale), each [batch, rotary_dim // 2] or [batch], float64,
    read from rotary tables [batch, n, rotary_dim] in transformers' rotate_half layout (the two halves repeat).

    The angle per position is unwrapped over positions 1, 2, 4, ..., n - 1, so it is as precise as the table
    allows; the tables must be those of a rotation whose angle grows linearly with the position (every RoPE
    variant transformers computes for one call: default, linear, dynamic, YaRN, LongRoPE, Llama 3), or this raises.
    """
    batch, n, rotary_dim = cos.shape
    half = rotary_dim // 2
    if (
        n < 2
        or rotary_dim % 2
        or not (torch.equal(cos[..., :half], cos[..., half:]) and torch.equal(sin[..., :half], sin[..., half:]))
    ):
        raise ValueError(
            f"rotary tables of shape {tuple(cos.shape)} are not transformers' rotate_half layout over at least two "
            "positions; expected_attention cannot read the model's rotary frequencies from them"
        )
    c, s = cos[..., :half].double(), sin[..., :half].double()
    angle = torch.atan2(s, c)  # [batch, n, half], in (-pi, pi]
    scale = (c.square() + s.square()).sqrt().mean(dim=(1, 2))
    start = angle[:, 0]
    step = torch.remainder(angle[:, 1] - start + math.pi, 2 * math.pi) - math.pi
    position = 1
    while position < n - 1:
        position = min(2 * position, n - 1)
        predicted = start + step * position
        turns = torch.round((predicted - angle[:, position]) / (2 * math.pi))
        step = (angle[:, position] + 2 * math.pi * turns - start) / position
    fitted = start[:, None] + step[:, None] * torch.arange(n, dtype=torch.float64, device=cos.device)[:, None]
    error = (torch.remainder(fitted - angle + math.pi, 2 * math.pi) - math.pi).abs().max().item()
    # Tables computed in float32 at far positions (a stream read at its original positions) carry the rounding of
    # position x frequency: ~eps x that angle. Allow it up to FAR_POSITION; a non-linear rotation is off by ~1 rad.
    tolerance = 8 * torch.finfo(cos.dtype).eps * max(1.0, max(n, FAR_POSITION) * step.abs().max().item())
    if error > max(tolerance, 1e-4):
        raise ValueError(
            f"the model's rotary angles do not grow linearly with the position (off by {error:.2e} rad); "
            "expected_attention cannot extrapolate them to future positions"
        )
    return start, step, scale


def unrotate(queries: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Post-RoPE queries [batch, heads, m, dim] back to pre-RoPE (float32), with the rotary tables of their m
    positions [batch, m, rotary_dim] and the tables' scale [batch]: R(-angle) / scale^2 on the first rotary_dim
    dims (the rest, where the rotary is partial, never turned)."""
    rotary_dim = cos.shape[-1]
    q = queries.float()
    c, s = cos[:, None].float(), sin[:, None].float()
    inverse = (1 / scale.square()).float()[:, None, None, None]
    rotated = q[..., :rotary_dim]
    return torch.cat(((rotated * c - _rotate_half(rotated) * s) * inverse, q[..., rotary_dim:]), dim=-1)


@register
@dataclass
class ExpectedAttentionPress(Press):
    """Expected Attention (Devoto et al., 2025, "Expected Attention: KV Cache Compression by Estimating Attention
    from Future Queries Distribution", arXiv:2510.00636; kvpress's ExpectedAttentionPress).

    The pre-RoPE queries of the prefix (the first `n_sink` left out) give a mean and, with `use_covariance`, a
    covariance; both are moved by the average RoPE rotation R of the next `n_future_positions` positions
    (mean R mu, R Sigma R^T). A key k then scores softmax_keys(s k.mu + s^2/2 k^T Sigma k), with s the layer's
    attention scaling (kvpress: 1/sqrt(head_dim), the same for every model here but Gemma's query_pre_attn_scalar),
    averaged over the query heads of each KV group, and with `use_vnorm` multiplied (after adding `epsilon`)
    by the norm of its value. The `n_sink` first positions are always kept.

    Model-agnostic: the pre-RoPE queries are the post-RoPE ones rotated back with the layer's own rotary tables
    (cos, sin; only the first `rotary_dim` dims where the rotary is partial, as in GPT-NeoX), and the future
    rotations come from the angle per position read from those tables (see `rotary_frequencies`). Models
    without rotary embeddings are refused.
    """

    n_future_positions: int = option(512, minimum=1)
    n_sink: int = option(4, minimum=0)
    use_covariance: bool = option(True)
    use_vnorm: bool = option(True)
    epsilon: float = option(0.0, minimum=0.0)
    name = "expected_attention"
    needs_rotary = True

    def queries_needed(self) -> None:
        return None

    def min_prefix_length(self) -> int:
        return max(self.n_sink + 1, 2)  # one query for the statistics, two positions for the rotary frequencies

    def chunk_tokens(self) -> int:
        return self.min_prefix_length()  # every chunk: two positions; the first also its sinks' queries

    def layer_scores(self, layer: PrefillLayer) -> torch.Tensor:
        if layer.rotary is None:
            raise ValueError(
                f"expected_attention needs the model's rotary tables (position_embeddings) in layer "
                f"{layer.layer_idx}; this model passes none to its attention"
            )
        keys, values, scaling = layer.keys, layer.values, layer.scaling
        batch, kv_heads, n, dim = keys.shape
        cos, sin = layer.rotary
        rotary_dim = cos.shape[-1]
        if rotary_dim > dim:
            raise ValueError(f"rotary tables cover {rotary_dim} dims, more than the head's {dim}")
        start, step, scale = rotary_frequencies(cos, sin)
        # The positions of this call: the whole prefix (m = n), or in a chunked prefill the chunk's m, whose keys
        # are the cache so far plus the chunk; only the prefix or the first chunk starts with the sinks' queries.
        m = cos.shape[-2]
        queries = layer.queries[:, :, layer.queries.shape[-2] - m :]
        mean, cov = self._query_statistics(queries, cos, sin, scale, self.n_sink if m == n else 0)

        # The average rotation of the next n_future_positions positions: diag(c) + P diag(s) on the rotary dims.
        future = torch.arange(m, m + self.n_future_positions, dtype=torch.float64, device=keys.device)
        angles = start[:, None, :] + step[:, None, :] * future[None, :, None]  # [batch, future, half]
        c = (angles.cos().mean(dim=1) * scale[:, None]).repeat(1, 2)
        s = (angles.sin().mean(dim=1) * scale[:, None]).repeat(1, 2)
        rotation = torch.eye(dim, dtype=torch.float64, device=keys.device).repeat(batch, 1, 1)
        rotation[:, :rotary_dim, :rotary_dim] = torch.diag_embed(c) + _rotate_half(torch.diag_embed(s).mT).mT
        rotation = rotation.to(mean.dtype)[:, None]  # [batch, 1, dim, dim]
        mean = (rotation @ mean[..., None])[..., 0]  # [batch, q_heads, dim]
        groups = mean.shape[1] // kv_heads

        keys = keys[:, :, self.n_sink :].to(mean.dtype)
        logits = mean.view(batch, kv_heads, groups, dim) @ keys.transpose(2, 3) * scaling  # [b, kv, g, n - sink]
        if self.use_covariance:
            cov = (rotation @ cov @ rotation.mT).view(batch, kv_heads, groups, dim, dim)
            spread = torch.einsum("bhmi,bhgij,bhmj->bhgm", keys, cov, keys)
            logits = logits + spread * (scaling**2 / 2)
        scores = torch.softmax(logits, dim=-1).mean(dim=2)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values[:, :, self.n_sink :].to(scores.dtype).norm(dim=-1)
        return F.pad(scores, (self.n_sink, 0), value=scores.max().item() + 1)

    def _query_statistics(
        self, queries: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: torch.Tensor, skip: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean [batch, q_heads, dim] and covariance [batch, q_heads, dim, dim] (float32) of the pre-RoPE queries
        after the first `skip` (the sinks), gathered a chunk of positions at a time."""
        batch, q_heads, n, dim = queries.shape
        chunk = max(1, CHUNK_ELEMENTS // (batch * q_heads * dim))
        count = n - skip

        def pre_rope(first: int, last: int) -> torch.Tensor:
            return unrotate(queries[:, :, first:last], cos[:, first:last], sin[:, first:last], scale)

        bounds = [(i, min(n, i + chunk)) for i in range(skip, n, chunk)]
        mean = sum(pre_rope(first, last).sum(dim=2) for first, last in bounds) / count
        if not self.use_covariance:
            return mean, None
        cov = torch.zeros((batch, q_heads, dim, dim), dtype=mean.dtype, device=mean.device)
        for first, last in bounds:
            centered = pre_rope(first, last) - mean[:, :, None]
            cov += centered.mT @ centered
        return mean, cov / count
