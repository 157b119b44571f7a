from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer
from transformers.cache_utils import Cache

from kvlib.cache.layers import fork_cache
from kvlib.presses.base import PrefillLayer, Press, option
from kvlib.presses.registry import register

# Attention weights computed at once: reconstruction queries are taken in blocks of about this many weights.
CHUNK_ELEMENTS = 1 << 25
# kvpress's wording, and how many tokens of the previous chunk the prompt of a later chunk ends with.
FIRST_PROMPT = "\n\nRepeat the previous context exactly."
LATER_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
PREVIOUS_TOKENS = 8


@lru_cache(maxsize=4)
def _load_tokenizer(source: str) -> Any:
    return AutoTokenizer.from_pretrained(source)


@register
@dataclass
class KVzipPress(Press):
    """KVzip (Kim et al., 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
    arXiv:2505.23416; kvpress's KVzipPress): keep what the model needs to repeat the prefix.

    After the prefill the model reads, for each chunk of `chunk_size` prefix tokens, "Repeat the previous context
    exactly." (later chunks: "... starting with" and the previous chunk's last 8 tokens), the tokenizer's
    assistant-turn suffix (its chat template's, else a newline) and the chunk itself, on a copy of the full cache
    at positions n, n + 1, .... A position's score is the largest attention it receives from those
    reconstruction queries, softmax taken over the `n_sink` first positions, the chunk and the reconstruction
    tokens (as kvpress does), maximised over the query heads of its KV group; the `n_sink` first positions are
    always kept. Those passes make the prefill 2-3 times as costly (kvpress's estimate); they run inside the press
    (`Press.rescore`), so a timed `with press(model): model(prompt)` includes them.

    Unlike kvpress, which only masks and spreads the budget over heads and layers (`layerwise=False`), kvlib
    really prunes, every KV head keeping `n - int(n * compression_ratio)` positions; per-position scores are
    kvpress's. The whole prefix is the context (kvpress skips a chat-template header it expects before it).
    kvpress's `kvzip_plus_normalization` is not offered (it needs the output projection, which kvlib does not
    locate model-agnostically). The repeat prompt needs the model's tokenizer: `press.tokenizer` if set, else
    the one saved with the model (`model.config.name_or_path`); a model built from a bare config (no
    name_or_path, as in kvlib's tests) gets the prompt's UTF-8 bytes as token ids.
    """

    n_sink: int = option(4, minimum=0)
    chunk_size: int = option(2048, minimum=1)
    tokenizer: Any = field(default=None, init=False, repr=False, compare=False)
    name = "kvzip"

    def queries_needed(self) -> int:
        return 0

    def rescore(
        self, model: nn.Module, prefix_ids: torch.Tensor | None, cache: Cache, observe: Callable
    ) -> dict[int, torch.Tensor]:
        if prefix_ids is None:
            raise ValueError("the kvzip press reads the prefix again: call the model with input_ids")
        batch, n = prefix_ids.shape
        first, later, suffix = (
            torch.tensor(ids, dtype=prefix_ids.dtype, device=prefix_ids.device) for ids in self._prompts(model)
        )
        scores: dict[int, torch.Tensor] = {}
        for start in range(0, n, self.chunk_size):
            end = min(n, start + self.chunk_size)
            if start == 0:
                prompt = first.expand(batch, -1)
            else:
                previous = prefix_ids[:, max(0, start - self.chunk_size, start - PREVIOUS_TOKENS) : start]
                prompt = torch.cat((later.expand(batch, -1), previous), dim=1)
            repeat = torch.cat((prompt, suffix.expand(batch, -1), prefix_ids[:, start:end]), dim=1)

            def record(layer: PrefillLayer, start: int = start, end: int = end) -> None:
                best = self._reconstruction_attention(layer, start, end)
                layer_scores = scores.setdefault(
                    layer.layer_idx, torch.zeros((batch, best.shape[1], n), dtype=best.dtype, device=best.device)
                )
                layer_scores[..., start:end] = best

            positions = torch.arange(n, n + repeat.shape[1], device=repeat.device).expand(batch, -1)
            with torch.no_grad(), observe(record):
                model(repeat, cache=fork_cache(cache), position_ids=positions, use_cache=True, logits_to_keep=1)
        if scores:
            top = max(layer_scores.max() for layer_scores in scores.values())
            for layer_scores in scores.values():
                layer_scores[..., : self.n_sink] = top + 1  # attention sinks are never evicted
        return scores

    def _reconstruction_attention(self, layer: PrefillLayer, start: int, end: int) -> torch.Tensor:
        """Largest attention each position of the chunk [start, end) receives: [batch, kv_heads, end - start]."""
        queries, keys = layer.queries, layer.keys
        batch, kv_heads, _, dim = keys.shape
        q_len = queries.shape[-2]
        groups = queries.shape[1] // kv_heads
        sink = min(self.n_sink, start)
        keys = torch.cat((keys[:, :, :sink], keys[:, :, start:end], keys[:, :, -q_len:]), dim=2)
        ctx = end - start
        queries = queries.view(batch, kv_heads, groups, q_len, dim)
        best = torch.zeros((batch, kv_heads, ctx), dtype=torch.float32, device=keys.device)
        rows = max(1, CHUNK_ELEMENTS // (batch * kv_heads * groups * keys.shape[2]))
        for first in range(0, q_len, rows):
            last = min(q_len, first + rows)
            logits = queries[:, :, :, first:last] @ keys[:, :, None].transpose(-1, -2) * layer.scaling
            own = (
                torch.arange(q_len, device=keys.device)[None, :]
                > torch.arange(first, last, device=keys.device)[:, None]
            )
            logits[..., sink + ctx :] = logits[..., sink + ctx :].masked_fill(own, float("-inf"))  # causal
            weights = torch.softmax(logits, dim=-1, dtype=torch.float32)[..., sink : sink + ctx]
            best = torch.maximum(best, weights.amax(dim=(2, 3)))
        return best

    def _prompts(self, model: nn.Module) -> tuple[list[int], ...]:
        """Token ids of the first chunk's prompt, a later chunk's prompt, and the assistant-turn suffix."""
        tokenizer = self.tokenizer
        source = getattr(getattr(model, "config", None), "name_or_path", "") or ""
        if tokenizer is None and not source:
            # A model built from a bare config has no tokenizer: its prompt is written in UTF-8 bytes.
            vocab = model.get_input_embeddings().num_embeddings
            return tuple([byte % vocab for byte in text.encode()] for text in (FIRST_PROMPT, LATER_PROMPT, "\n"))
        if tokenizer is None:
            try:
                tokenizer = _load_tokenizer(source)
            except Exception as error:
                raise ValueError(
                    f"the kvzip press writes a repeat prompt and needs the model's tokenizer; none loads from "
                    f"model.config.name_or_path={source!r} ({error}); set press.tokenizer"
                ) from error
        if getattr(tokenizer, "chat_template", None) is None:
            suffix = "\n"
        else:  # kvpress's way: the text the template puts between a user turn's content and the answer
            dummy = "dummy context"
            separator = "\n" + "#" * len(dummy)
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": dummy + separator}],
                add_generation_prompt=True,
                tokenize=False,
                enable_thinking=False,
            )
            suffix = text.split(separator)[1]
        return tuple(list(tokenizer.encode(t, add_special_tokens=False)) for t in (FIRST_PROMPT, LATER_PROMPT, suffix))
