"""The press mechanism: how a scoring function becomes a pruned KV cache.

A press is a dataclass with a `compression_ratio` and a `score` method. Used as a context manager,

    with press(model):
        model(prefix_ids, cache=cache, use_cache=True)   # or past_key_values=cache

it prunes `cache` at the end of that prefill: in every full-attention layer each KV head keeps the
`n - int(n * compression_ratio)` prefix positions with the highest scores.

Why the attention interface: transformers hands every attention implementation the post-RoPE queries and
the layer's full keys and values, whatever the architecture (GPT-NeoX's fused, partially rotated QKV
included). kvlib wraps that function for the duration of the context, records what a press reads, and prunes
the returned cache once the model's forward has finished. Outside the context nothing of the press remains.

`SharedPrefill` is the same recording done once for several presses: the model runs the prefix once, keeps
what those presses read (keys, values, the last queries they need, rotary tables if asked), and each press
then prunes its own copy of the cache. It runs the very same `Press.keep` on the very same tensors, so the
result is bit-identical to prefilling under each press (tests check this).

`Press.within_budget(model, budget)` is the chunked variant (`kvlib.cache.chunked`): every forward inside, also
one continuing a cache that already holds positions, prunes each full-attention layer to `budget(layer)`; the
press then scores the whole current cache with the current chunk's queries. Presses that need the whole context
at once (`chunk_refusal`: any press overriding `rescore`, and those in `CHUNK_REFUSALS`) are refused there.

A press that scores by running the model again after the prefill (KVzip re-reads the prefix) overrides
`Press.rescore`: both paths call it once the prefill has filled the cache, still inside the model's forward
(so a timed `with press(model): model(prompt)` counts those passes), with kvlib's own recording paused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import AttentionInterface

from kvlib.cache.layers import eager_function, fork_cache, new_cache, prune_cache


@dataclass
class PressReport:
    """What the last prefill under a press did to the cache."""

    prefix_length: int
    kept_indices: dict[int, torch.Tensor]  # layer -> [batch, kv_heads, n_kept] prefix positions, ascending
    entries_before: int  # KV entries (positions x layers) the cache would hold without the press
    entries_after: int

    @property
    def effective_ratio(self) -> float:
        """Fraction of the whole cache removed (sliding-window layers count as kept)."""
        return 1.0 - self.entries_after / self.entries_before if self.entries_before else 0.0


@dataclass
class PrefillLayer:
    """What one full-attention layer saw during a prefill: everything a press may score with."""

    layer_idx: int
    n_layers: int  # layers of the model (sliding-window ones included)
    queries: torch.Tensor  # [batch, q_heads, w, d] post-RoPE: the last w prefix queries, w = press.queries_needed()
    keys: torch.Tensor  # [batch, kv_heads, n, d], as the cache holds them (post-RoPE)
    values: torch.Tensor  # [batch, kv_heads, n, d]
    scaling: float
    # The rotary tables (cos, sin) of the prefix positions, [batch, n, rotary_dim], for presses that set
    # `needs_rotary`; None for models without rotary embeddings.
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None


def n_kept(n: int, compression_ratio: float) -> int:
    """Positions each KV head keeps out of `n`: the ratio is the fraction removed, rounded down."""
    return n - int(n * compression_ratio)


def check_ratio(compression_ratio: float) -> None:
    if (
        isinstance(compression_ratio, bool)
        or not isinstance(compression_ratio, (int, float))
        or not 0 <= compression_ratio < 1
    ):
        raise ValueError(
            f"compression_ratio must be in [0, 1) (fraction of KV pairs removed); got {compression_ratio!r}"
        )


def option(default: Any, *, minimum: float | None = None, maximum: float | None = None, odd: bool = False) -> Any:
    """A press option with the range it allows; checked (type and range) whenever the press is built."""
    return field(default=default, metadata={"minimum": minimum, "maximum": maximum, "odd": odd})


def _allowed(kind: type, meta: dict) -> str:
    parts = [{int: "an integer", float: "a number", bool: "true or false"}.get(kind, kind.__name__)]
    if meta.get("minimum") is not None:
        parts.append(f">= {meta['minimum']}")
    if meta.get("maximum") is not None:
        parts.append(f"<= {meta['maximum']}")
    if meta.get("odd"):
        parts.append("odd")
    return " ".join(parts)


def _check_option(press: str, name: str, value: Any, kind: Any, meta: dict) -> None:
    if not isinstance(kind, type):
        return  # an annotation kvlib cannot check (a string or a typing construct)
    ok_type = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok_type = True
    ok = ok_type and not (isinstance(value, float) and math.isnan(value))
    if ok and meta.get("minimum") is not None:
        ok = value >= meta["minimum"]
    if ok and meta.get("maximum") is not None:
        ok = value <= meta["maximum"]
    if ok and meta.get("odd"):
        ok = value % 2 == 1
    if not ok:
        raise ValueError(f"{press} press option {name} must be {_allowed(kind, meta)}; got {value!r}")


@dataclass
class Press:
    """Base of all presses. Subclasses define `score` and, when they need them, `min_prefix_length`,
    `queries_needed` and `budget`."""

    compression_ratio: float = 0.0
    name: ClassVar[str] = ""
    needs_rotary: ClassVar[bool] = False  # whether `layer_scores` reads PrefillLayer.rotary
    last_report: PressReport | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_ratio(self.compression_ratio)
        for f in fields(self):
            if f.init and f.name != "compression_ratio":
                _check_option(self.name or type(self).__name__, f.name, getattr(self, f.name), f.type, f.metadata)

    # --- what a press is -----------------------------------------------------------------------------------
    def score(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        """Importance of each prefix position, higher = kept.

        queries [batch, q_heads, w, d] (post-RoPE, the last `queries_needed()` prefix queries),
        keys/values [batch, kv_heads, n, d] -> [batch, kv_heads, n].
        """
        raise NotImplementedError

    def layer_scores(self, layer: PrefillLayer) -> torch.Tensor:
        """Scores from everything the layer saw; presses that need the layer index or rotary tables override it."""
        return self.score(layer.queries, layer.keys, layer.values, layer.scaling)

    def queries_needed(self) -> int | None:
        """How many of the last prefix queries `score` reads (None: all). A shared prefill keeps no more."""
        return None

    def budget(self, n: int, layer: PrefillLayer) -> int:
        """Positions each KV head of this layer keeps out of `n`."""
        return n_kept(n, self.compression_ratio)

    def min_prefix_length(self) -> int:
        """Shortest prefix this press can score; shorter ones raise ValueError before any work."""
        return 1

    def check_prefix_length(self, n: int) -> None:
        need = self.min_prefix_length()
        if n < need:
            raise ValueError(
                f"{self.name} press needs a prefix of at least {need} tokens with {self.options()}; got {n}"
            )

    def options(self) -> dict[str, Any]:
        """The press's own parameters (everything but compression_ratio)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name != "compression_ratio"}

    # --- how it is applied ---------------------------------------------------------------------------------
    def rescore(
        self, model: nn.Module, prefix_ids: torch.Tensor, cache: Cache, observe: Callable
    ) -> dict[int, torch.Tensor] | None:
        """The hook of presses that score by running the model again once the prefill is done (none by default).

        Called after the prefill (live, or in `SharedPrefill.run`), inside the model's forward, with the prefix
        ids [batch, n] and the full, unpruned cache, which it must leave as it was (run on `fork_cache(cache)`).
        `with observe(callback): model(...)` hands `callback` a `PrefillLayer` for every full-attention layer
        call of those passes (the call's queries, and keys/values including what the cache held); kvlib's own
        recording is paused meanwhile. Returns scores [batch, kv_heads, n] per full-attention layer, used by
        `keep` instead of `layer_scores`.
        """
        return None

    def keep(self, layer: PrefillLayer, scores: torch.Tensor | None = None, budget: int | None = None) -> torch.Tensor:
        """Indices of the kept positions, [batch, kv_heads, n_kept], ascending (`scores`: from `rescore`).

        `budget`: positions to keep, given by a chunked prefill (`within_budget`), which checked the press's
        requirements on the whole context beforehand; None: the press's own `budget` of what the layer holds."""
        if budget is None:
            n = layer.keys.shape[-2]
            self.check_prefix_length(n)
            budget = self.budget(n, layer)
        if scores is None:
            scores = self.layer_scores(layer)
        return scores.topk(budget, dim=-1).indices.sort(dim=-1).values

    def chunk_tokens(self) -> int:
        """Fewest tokens a chunk of a chunked prefill must hold for this press to score it (its query window)."""
        return self.queries_needed() or 1

    def protected_positions(self) -> int:
        """Positions the press always keeps (its sinks, its observation window): a budget below them is refused."""
        return max(1, getattr(self, "n_sink", 0), getattr(self, "window_size", 0))

    def chunk_refusal(self) -> str | None:
        """Why this press cannot compress chunk by chunk (None: it can; see `kvlib.cache.chunked`)."""
        if _rescores(self):
            return (
                f"the {self.name} press scores by running the model again over the whole context once it is "
                "prefilled, which a chunk-by-chunk prefill never holds"
            )
        return CHUNK_REFUSALS.get(self.name)

    @contextmanager
    def within_budget(self, model: nn.Module, budget: Callable[[PrefillLayer], int]) -> Iterator[nn.Module]:
        """Like `with press(model)`, but every forward inside prunes each full-attention layer to `budget(layer)`
        positions (capped at what it holds), also a forward that continues a cache already holding positions:
        the chunked prefill of `kvlib.cache.chunked`. After each forward `last_report.kept_indices` holds the
        indices (into what each layer held) of the layers it pruned. Presses with a `chunk_refusal` raise."""
        refusal = self.chunk_refusal()
        if refusal is not None:
            raise ValueError(f"{self.name} press cannot compress chunk by chunk: {refusal}")
        state = _PressState(self, budget)
        with _recording(model, state, rotary=self.needs_rotary):
            yield model

    def prune(self, shared: SharedPrefill) -> Cache:
        """This press's own pruned copy of a shared prefill's cache (the shared cache is left as it was)."""
        if self.compression_ratio == 0:
            kept = {}
        else:
            rescored = None
            if _rescores(self):
                if _rescore_key(self) not in shared.rescored:
                    raise ValueError(f"{self!r} was not among the presses given to SharedPrefill.run")
                rescored = shared.rescored[_rescore_key(self)]
            kept = {
                idx: self.keep(layer, None if rescored is None else rescored[idx])
                for idx, layer in shared.layers.items()
            }
        cache = fork_cache(shared.cache)
        self.last_report = _pruned(cache, kept, shared.prefix_length)
        return cache

    @contextmanager
    def __call__(self, model: nn.Module) -> Iterator[nn.Module]:
        state = _PressState(self)
        with _recording(model, state, rotary=self.needs_rotary):
            yield model


# Presses whose scores need the whole context at once; a chunked prefill refuses them rather than approximate them.
CHUNK_REFUSALS = {
    "lagkv": "its partitions of lag_size consecutive tokens would be cut again over an already pruned cache, "
    "where neighbours are no longer consecutive tokens",
}


def _rescores(press: Press) -> bool:
    """Whether the press runs extra passes after the prefill (overrides `Press.rescore`)."""
    return type(press).rescore is not Press.rescore


def _rescore_key(press: Press) -> str:
    """Rescoring depends on the press and its options, not on its ratio (the ratio only sets how many positions
    `keep` takes from the scores): one shared prefill rescores once for all ratios of a press."""
    return f"{type(press).__qualname__} {sorted(press.options().items())!r}"


def _pruned(cache: Cache, kept: dict[int, torch.Tensor], prefix_length: int) -> PressReport:
    before, after = prune_cache(cache, kept)
    return PressReport(prefix_length, dict(kept), before, after)


# --- recording a prefill through the attention interface -------------------------------------------------------


def _attention_implementation(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation is None:
        raise TypeError(
            f"{type(model).__name__} is not a transformers model with an attention implementation "
            "(config._attn_implementation is missing); kvlib presses need one"
        )
    return implementation


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    modules = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    if not modules:
        raise TypeError(
            f"{type(model).__name__} has no attention modules with a `layer_idx` (transformers' cache-aware "
            "attention); kvlib presses cannot prune its cache"
        )
    return modules


def _n_layers(model: nn.Module) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


class _Recorder:
    """Receives each attention layer's inputs during a prefill; subclasses decide what to keep."""

    queries: int | None = None  # last queries to keep (None: all)
    chunked = False  # whether a prefill may continue a cache that already holds positions (`within_budget`)

    def __init__(self) -> None:
        self.prefix_length = 0
        self.rescoring = False  # a press's `rescore` passes are running: record nothing
        self.observer: Callable[[PrefillLayer], None] | None = None  # who sees those passes' attention calls

    def begin(self, n: int, layer_idx: int, queries_in_call: int) -> None:
        if n != queries_in_call and not self.chunked:
            raise ValueError(
                f"a press compresses a prefill into an empty cache; layer {layer_idx} already held "
                f"{n - queries_in_call} positions"
            )
        self.prefix_length = n

    def layer(self, layer: PrefillLayer) -> None:
        raise NotImplementedError

    def rescore(self, model: nn.Module, ids: torch.Tensor | None, cache: Cache, observe: Callable) -> None:
        """Run the `Press.rescore` hooks of the presses that have one (once the prefill is done)."""

    def finish(self, cache: Cache, ids: torch.Tensor | None) -> None:
        raise NotImplementedError


class _PressState(_Recorder):
    """One press applied live: score each layer as it passes, prune once the forward has finished."""

    def __init__(self, press: Press, budget: Callable[[PrefillLayer], int] | None = None):
        super().__init__()
        self.press = press
        self.budget = budget  # a chunked prefill's budget per layer (None: the press's own, one-shot)
        self.chunked = budget is not None
        self.queries = press.queries_needed()
        self.kept: dict[int, torch.Tensor] = {}
        self.deferred: dict[int, PrefillLayer] = {}  # layers of a rescoring press, kept once its passes are done
        self.scores: dict[int, torch.Tensor] | None = None

    def layer(self, layer: PrefillLayer) -> None:
        if self.budget is not None:  # chunked: prune only a layer holding more than its budget
            held = layer.keys.shape[-2]
            budget = min(held, self.budget(layer))
            if budget < held:
                self.kept[layer.layer_idx] = self.press.keep(layer, budget=budget)
        elif self.press.compression_ratio > 0:
            if _rescores(self.press):
                self.deferred[layer.layer_idx] = layer
            else:
                self.kept[layer.layer_idx] = self.press.keep(layer)

    def rescore(self, model: nn.Module, ids: torch.Tensor | None, cache: Cache, observe: Callable) -> None:
        if self.deferred:
            self.press.check_prefix_length(self.prefix_length)
            self.scores = self.press.rescore(model, ids, cache, observe)

    def finish(self, cache: Cache, ids: torch.Tensor | None) -> None:
        for idx, layer in self.deferred.items():
            self.kept[idx] = self.press.keep(layer, None if self.scores is None else self.scores[idx])
        self.deferred, self.scores = {}, None
        report = _pruned(cache, self.kept, self.prefix_length)
        if self.press.compression_ratio > 0 and not self.kept and not self.chunked:
            raise ValueError("no layer of this model could be compressed: every attention layer uses a sliding window")
        self.press.last_report = report
        self.kept = {}


def _last_queries(queries: torch.Tensor, count: int | None) -> torch.Tensor:
    if count is None:
        return queries
    return queries[:, :, queries.shape[-2] - min(count, queries.shape[-2]) :]


@contextmanager
def _recording(model: nn.Module, recorder: _Recorder, rotary: bool) -> Iterator[None]:
    """Wrap the model's attention function so that every full-attention layer of a prefill reaches `recorder`,
    and call `recorder.finish` with the cache once the model's forward has returned."""
    implementation = _attention_implementation(model)
    modules = _attention_modules(model)
    if getattr(model, "_kvlib_press_active", False):
        raise RuntimeError("a kvlib press is already active on this model; nest presses is not supported")
    module_ids = {id(m) for m in modules}
    n_layers = _n_layers(model)
    registry = AttentionInterface._global_mapping
    had_entry = implementation in registry
    original = registry.get(implementation)
    if original is None:
        if implementation != "eager":
            raise TypeError(f"attention implementation {implementation!r} is not registered in transformers")
        eager = {id(m): eager_function(m) for m in modules}
    rotary_tables: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        inner = original if original is not None else eager.get(id(module)) or eager_function(module)
        output = inner(module, query, key, value, attention_mask, **kwargs)
        if recorder.rescoring:  # a press's own passes after the prefill: only its observer sees them
            if recorder.observer is not None and id(module) in module_ids and kwargs.get("sliding_window") is None:
                recorder.observer(
                    PrefillLayer(
                        module.layer_idx, n_layers, query, key, value, kwargs["scaling"], rotary_tables.get(id(module))
                    )
                )
        # A decoding step (one query), or another model: nothing to do; a chunk of a chunked prefill may be one token.
        elif id(module) in module_ids and (query.shape[-2] > 1 or recorder.chunked):
            recorder.begin(key.shape[-2], module.layer_idx, query.shape[-2])
            if kwargs.get("sliding_window") is None:  # sliding-window layers keep their window
                recorder.layer(
                    PrefillLayer(
                        layer_idx=module.layer_idx,
                        n_layers=n_layers,
                        queries=_last_queries(query, recorder.queries),
                        keys=key,
                        values=value,
                        scaling=kwargs["scaling"],
                        rotary=rotary_tables.get(id(module)),
                    )
                )
        return output

    def remember_rotary(module, args, kwargs):
        rotary_tables[id(module)] = kwargs.get("position_embeddings")

    @contextmanager
    def observe(callback: Callable[[PrefillLayer], None]) -> Iterator[None]:
        recorder.observer = callback
        try:
            yield
        finally:
            recorder.observer = None

    def after_forward(_module, args, kwargs, output):
        if recorder.rescoring or recorder.prefix_length == 0:
            return output  # decoding steps inside the context, and a press's own passes, leave the cache alone
        cache = next(
            (
                c
                for c in (getattr(output, "cache", None), kwargs.get("cache"), kwargs.get("past_key_values"))
                if c is not None
            ),
            None,
        )
        if cache is None:
            raise ValueError("a press needs the model called with use_cache=True and a cache to prune")
        ids = kwargs.get("input_ids", args[0] if args else None)
        recorder.rescoring = True
        try:
            recorder.rescore(model, ids, cache, observe)
        finally:
            recorder.rescoring = False
        recorder.finish(cache, ids)
        recorder.prefix_length = 0
        rotary_tables.clear()
        return output

    hooks = [model.register_forward_hook(after_forward, with_kwargs=True)]
    if rotary:
        hooks += [m.register_forward_pre_hook(remember_rotary, with_kwargs=True) for m in modules]
    registry[implementation] = attention
    model._kvlib_press_active = True
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        model._kvlib_press_active = False
        if had_entry:
            registry[implementation] = original
        else:
            registry.pop(implementation, None)


# --- one prefill, several presses ------------------------------------------------------------------------------


class _SharedRecorder(_Recorder):
    def __init__(self, queries: int | None, presses: list[Press]):
        super().__init__()
        self.queries = queries
        self.presses = presses
        self.layers: dict[int, PrefillLayer] = {}
        self.cache: Cache | None = None
        self.rescored: dict[str, dict[int, torch.Tensor] | None] = {}

    def layer(self, layer: PrefillLayer) -> None:
        # Keys and values are the cache's own tensors; queries are a slice, cloned so the full tensor can go.
        queries = layer.queries if self.queries is None else layer.queries.clone()
        self.layers[layer.layer_idx] = PrefillLayer(
            layer.layer_idx, layer.n_layers, queries, layer.keys, layer.values, layer.scaling, layer.rotary
        )

    def rescore(self, model: nn.Module, ids: torch.Tensor | None, cache: Cache, observe: Callable) -> None:
        for press in self.presses:
            key = _rescore_key(press)
            if _rescores(press) and press.compression_ratio > 0 and self.layers and key not in self.rescored:
                self.rescored[key] = press.rescore(model, ids, cache, observe)

    def finish(self, cache: Cache, ids: torch.Tensor | None) -> None:
        self.cache = cache


@dataclass
class SharedPrefill:
    """One uncompressed prefill, kept so that several presses can each prune their own copy of its cache.

    It holds the full cache, and per full-attention layer the last `queries_needed` queries the presses read
    (the most any of them needs) and the rotary tables when one of them needs them; `rescored` holds the
    scores of presses with a `rescore` hook (once per press and options, whatever their ratios), computed in `run`.
    """

    logits: torch.Tensor
    cache: Cache
    layers: dict[int, PrefillLayer]
    prefix_length: int
    rescored: dict[str, dict[int, torch.Tensor] | None] = field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def run(cls, model: nn.Module, ids: torch.Tensor, presses: list[Press], logits_to_keep: int = 1) -> SharedPrefill:
        needs = [p.queries_needed() for p in presses if p.compression_ratio > 0]
        queries = None if any(n is None for n in needs) else max(needs, default=0)
        for press in presses:
            press.check_prefix_length(ids.shape[1])
        recorder = _SharedRecorder(queries, presses)
        cache = new_cache(model)
        rotary = any(p.needs_rotary for p in presses)
        with _recording(model, recorder, rotary=rotary):
            logits = model(ids, cache=cache, use_cache=True, logits_to_keep=logits_to_keep).logits
        if any(p.compression_ratio > 0 for p in presses) and not recorder.layers:
            raise ValueError("no layer of this model could be compressed: every attention layer uses a sliding window")
        return cls(logits, cache, recorder.layers, ids.shape[1], recorder.rescored)

    def query_bytes(self) -> int:
        """Bytes of everything kept beyond the cache itself (queries, and scores of rescoring presses)."""
        total = 0
        for layer in self.layers.values():
            total += layer.queries.numel() * layer.queries.element_size()
        for scores in self.rescored.values():
            total += sum(s.numel() * s.element_size() for s in (scores or {}).values())
        return total
