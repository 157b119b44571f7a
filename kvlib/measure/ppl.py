"""Suffix perplexity: quality after a compressed prefix.

Each window is split at `int(max_length * prefix_ratio)`. The prefix is prefilled under the press, then every
suffix token is scored from the resulting cache, positions continuing from the uncompressed prefix length. The
first suffix token is predicted by the last prefix logit.

The study prefills each window once for all its presses (`SharedPrefill`): each press prunes its own copy of
that cache, which is bit-identical to prefilling under the press (`window_nll` does that; tests compare them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.nn import functional as F

from kvlib.cache import CachePolicy, as_policy, cache_length, extend, kv_bytes
from kvlib.presses import Press, SharedPrefill
from kvlib.stats import perplexity

SETTINGS = ("prefix_ratio", "n_ppl")


def prefix_length(max_length: int, prefix_ratio: float) -> int:
    return int(max_length * prefix_ratio)


def min_windows(settings) -> int:
    return settings.n_ppl


def check(settings, presses: list[Press]) -> None:
    """Window split and press prefix needs, from the settings alone."""
    prefix = prefix_length(settings.max_length, settings.prefix_ratio)
    suffix = settings.max_length - prefix
    if prefix < 1 or suffix < 2:
        raise ValueError(
            f"max_length {settings.max_length} with prefix_ratio {settings.prefix_ratio} splits a window into "
            f"{prefix} prefix and {suffix} suffix tokens; at least 1 and 2 are needed"
        )
    for press in presses:
        press.check_prefix_length(prefix)


@torch.no_grad()
def _suffix_record(
    model, ids: torch.Tensor, prefix_len: int, last_prefix_logits: torch.Tensor, cache, policy: CachePolicy
) -> dict:
    """Score the suffix from a (pruned) prefix cache; read the cache's size before the suffix grows it. The suffix
    continues at the uncompressed prefix length, or right after the cache when the policy re-rotated it."""
    kept, held_bytes = cache_length(cache), kv_bytes(cache)
    start = policy.next_position(cache, prefix_len)
    suffix_logits = extend(model, ids[:, prefix_len:-1], cache, start)  # the last token predicts nothing
    logits = torch.cat([last_prefix_logits[:, -1:], suffix_logits], dim=1).float()
    targets = ids[:, prefix_len:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return {"nll_sum": nll.item(), "n_tokens": targets.numel(), "cache_length": kept, "kv_bytes": held_bytes}


@torch.no_grad()
def window_nll(model: torch.nn.Module, ids: torch.Tensor, policy: Press | CachePolicy, prefix_len: int) -> dict:
    """NLL of the suffix of one window ([1, length] token ids) after prefilling the prefix under `policy` (a cache
    policy, or a press stored in float)."""
    policy = as_policy(policy)
    last_prefix_logits, cache = policy.prefill(model, ids[:, :prefix_len])
    return _suffix_record(model, ids, prefix_len, last_prefix_logits, cache, policy)


@torch.no_grad()
def shared_window_nll(
    model: torch.nn.Module, ids: torch.Tensor, policies: dict[str, Press | CachePolicy], prefix_len: int
) -> dict:
    """`window_nll` of every policy (label -> policy or press) from one shared prefill of the prefix; a policy that
    reads the prefix its own way (chunked, re-rotated) prefills on its own."""
    policies = {label: as_policy(policy) for label, policy in policies.items()}
    shareable = {label: policy for label, policy in policies.items() if policy.shareable}
    records = {}
    if shareable:
        shared = SharedPrefill.run(model, ids[:, :prefix_len], [policy.press for policy in shareable.values()])
        for label, policy in shareable.items():
            cache = policy.from_shared(shared)
            records[label] = _suffix_record(model, ids, prefix_len, shared.logits, cache, policy)
    for label, policy in policies.items():
        if label not in records:
            records[label] = window_nll(model, ids, policy, prefix_len)
    return {label: records[label] for label in policies}


def measure(
    model: torch.nn.Module,
    tokenizer,
    windows: np.ndarray,
    policies: dict[str, CachePolicy],
    settings,
    log: Callable[[str], None] = print,
) -> Iterator[tuple[str, dict]]:
    """Per-window records of every cache policy over the first `n_ppl` windows; ppl = exp(sum nll_sum / sum
    n_tokens)."""
    policies = {label: as_policy(policy) for label, policy in policies.items()}
    device = next(model.parameters()).device
    prefix_len = prefix_length(windows.shape[1], settings.prefix_ratio)
    records: dict[str, list[dict]] = {label: [] for label in policies}
    effective: dict[str, float] = {}
    chosen = windows[: settings.n_ppl]
    for i, window in enumerate(chosen):
        ids = torch.as_tensor(window, device=device)[None]
        for label, record in shared_window_nll(model, ids, policies, prefix_len).items():
            records[label].append({"window": i, **record})
            report = policies[label].press.last_report
            effective[label] = report.effective_ratio if report else 0.0
        log(f"  window {i + 1}/{len(chosen)}: {len(policies)} cache policies from one prefill")
    for label in policies:
        log(f"  {label}: ppl {perplexity(records[label]):.3f}")
        yield label, {"records": records[label], "effective_ratio": effective.get(label, 0.0)}
