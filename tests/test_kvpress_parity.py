"""On a Llama-family model, kvlib keeps exactly the positions NVIDIA's kvpress (0.5.5) keeps.

kvpress pins transformers<5.3, so it is installed with --no-deps (setup.sh) and its package __init__ (pipeline,
attention patches) is never run: stub packages point at its files and only the press modules are imported. Each
kvpress scorer gets what its own hooks would hand it: the attention module, the layer's input hidden states,
the layer's full keys and values, the eager attention weights, and the keyword arguments (position embeddings
among them). KVzip, which only masks in kvpress, is compared by its per-position scores.
"""

import importlib.util
import sys
import types

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import kvlib
from kvlib.cache import fork_cache
from kvlib.presses.base import _rescore_key

PREFIX = 300
CASES = [
    ("knorm", {}, "knorm_press", "KnormPress"),
    ("snapkv", {"window_size": 16, "kernel_size": 5}, "snapkv_press", "SnapKVPress"),
    ("streaming_llm", {"n_sink": 4}, "streaming_llm_press", "StreamingLLMPress"),
    ("lagkv", {"n_sink": 4, "lag_size": 32}, "lagkv_press", "LagKVPress"),
    ("tova", {}, "tova_press", "TOVAPress"),
    ("observed_attention", {}, "observed_attention_press", "ObservedAttentionPress"),
    ("keydiff", {}, "keydiff_press", "KeyDiffPress"),
    ("pyramidkv", {"window_size": 16, "kernel_size": 5, "beta": 20}, "pyramidkv_press", "PyramidKVPress"),
    (
        "expected_attention",
        {"n_future_positions": 512, "n_sink": 4, "use_covariance": True, "use_vnorm": True, "epsilon": 0.0},
        "expected_attention_press",
        "ExpectedAttentionPress",
    ),
    (
        "expected_attention",
        {"n_future_positions": 64, "n_sink": 0, "use_covariance": False, "use_vnorm": False, "epsilon": 0.0},
        "expected_attention_press",
        "ExpectedAttentionPress",
    ),
]
MODULES = {cls: module for *_, module, cls in CASES} | {"KVzipPress": "kvzip_press"}


class ByteTokenizer:
    """What kvlib's kvzip writes for a model without a tokenizer: UTF-8 bytes as token ids; no chat template."""

    chat_template = None

    def encode(self, text, return_tensors=None, add_special_tokens=False):
        ids = [byte % VOCAB for byte in text.encode()]
        return torch.tensor([ids]) if return_tensors == "pt" else ids


@pytest.fixture(scope="module")
def kvpress_presses():
    spec = importlib.util.find_spec("kvpress")
    if spec is None:
        pytest.skip("kvpress is not installed (setup.sh installs kvpress==0.5.5 --no-deps as the reference)")
    root = spec.submodule_search_locations[0]
    saved = {name: sys.modules.get(name) for name in ("kvpress", "kvpress.presses")}
    for name, path in (("kvpress", root), ("kvpress.presses", f"{root}/presses")):
        stub = types.ModuleType(name)
        stub.__path__ = [path]
        sys.modules[name] = stub
    try:
        yield {
            cls: getattr(importlib.import_module(f"kvpress.presses.{module}"), cls) for cls, module in MODULES.items()
        }
    finally:
        for name in [n for n in sys.modules if n.startswith("kvpress")]:
            del sys.modules[name]
        sys.modules.update({k: v for k, v in saved.items() if v is not None})


@pytest.fixture(scope="module")
def llama_run():
    """A tiny GQA Llama (eager), a prefix, its full cache, and what each attention module was called with and
    returned (its attention weights)."""
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, PREFIX), generator=torch.Generator().manual_seed(3))
    calls = {}

    def record(module, args, kwargs, output):
        calls[module.layer_idx] = (kwargs, output[1])

    hooks = [layer.self_attn.register_forward_hook(record, with_kwargs=True) for layer in model.model.layers]
    full = kvlib.new_cache(model)
    with torch.no_grad():
        model(ids, cache=full, use_cache=True)
    for hook in hooks:
        hook.remove()
    return model, ids, full, calls


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize(
    "name, options, module, cls", CASES, ids=[c[0] + ("" if i < 9 else "_plain") for i, c in enumerate(CASES)]
)
def test_kept_positions_equal_kvpress(kvpress_presses, llama_run, name, options, module, cls, ratio):
    model, ids, full, calls = llama_run
    press = kvlib.load_press(name, compression_ratio=ratio, **options)
    with torch.no_grad(), press(model):
        model(ids, cache=kvlib.new_cache(model), use_cache=True)
    reference = kvpress_presses[cls](compression_ratio=ratio, **options)
    for layer_idx, kept in press.last_report.kept_indices.items():
        layer = full.layers[layer_idx]
        attention = model.model.layers[layer_idx].self_attn
        kwargs, weights = calls[layer_idx]
        attention.rotary_emb = model.model.rotary_emb  # what kvpress's own hooks set up (expected attention reads it)
        try:
            with torch.no_grad():
                scores = reference.score(attention, kwargs["hidden_states"], layer.keys, layer.values, weights, kwargs)
        finally:
            del attention.rotary_emb
        if hasattr(reference, "get_layer_budget"):  # PyramidKV: kvpress's own per-layer budget
            budget = reference.get_layer_budget(attention, PREFIX)
        else:
            budget = kvlib.presses.n_kept(PREFIX, ratio)
        theirs = scores.topk(budget, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(theirs, kept), f"{name} r={ratio} layer {layer_idx}"


def kvpress_kvzip_scores(reference, model, ids, full):
    """kvpress's KVzip scoring (its `prepare` and `score_kvzip`) driven as its `_perform_kvzip_compression` and
    `forward_hook` do, on a copy of the full cache; transformers 5 passes the cache as `cache`, not
    `past_key_values`, so the hook is restated here. Returns kvpress's `score_val` after its sink rule."""
    tokenizer = ByteTokenizer()
    reference._context_ids, reference._cache = ids, fork_cache(full)
    reference.context_length, reference.prefix_length = ids.shape[1], 0
    reference._suffix_ids = tokenizer.encode("\n", return_tensors="pt")
    pairs = reference.prepare(model, tokenizer)

    def hook(module, args, kwargs, output):
        cache_layer = kwargs["cache"].layers[module.layer_idx]
        keys, values = reference.score_kvzip(
            module, kwargs["hidden_states"], cache_layer.keys, cache_layer.values, output[1], kwargs
        )
        cache_layer.keys, cache_layer.values = keys, values

    hooks = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        reference.start_idx = reference.prefix_length
        with torch.no_grad():
            for prefill_ids, repeat_ids in pairs:
                reference.end_idx = reference.start_idx + prefill_ids.shape[1]
                model.model(input_ids=repeat_ids, cache=reference._cache)
                reference.start_idx = reference.end_idx
    finally:
        for handle in hooks:
            handle.remove()
    scores = reference.score_val
    scores[..., : reference.n_sink] = scores.amax() + 1.0  # compress_post: attention sinks are never evicted
    return scores


@pytest.mark.parametrize("chunk_size", [2048, 128, 7])
def test_kvzip_scores_equal_kvpress(kvpress_presses, llama_run, chunk_size):
    model, ids, full, _ = llama_run
    ids = ids[:1]  # kvpress's KVzip scores one sequence at a time
    full = kvlib.new_cache(model)
    with torch.no_grad():
        model(ids, cache=full, use_cache=True)
    press = kvlib.load_press("kvzip", compression_ratio=0.5, n_sink=4, chunk_size=chunk_size)
    shared = kvlib.SharedPrefill.run(model, ids, [press])
    ours = shared.rescored[_rescore_key(press)]
    reference = kvpress_presses["KVzipPress"](compression_ratio=0.5, n_sink=4, chunk_size=chunk_size)
    theirs = kvpress_kvzip_scores(reference, model, ids, full)
    assert sorted(ours) == list(range(model.config.num_hidden_layers))
    for layer_idx, scores in ours.items():
        torch.testing.assert_close(scores, theirs[layer_idx].float(), rtol=1e-5, atol=1e-7)
    # kvlib keeps each head's top positions by those scores (kvpress spreads the budget instead, and only masks)
    with torch.no_grad(), press(model):
        model(ids, cache=kvlib.new_cache(model), use_cache=True)
    for layer_idx, kept in press.last_report.kept_indices.items():
        top = theirs[layer_idx].topk(kvlib.presses.n_kept(PREFIX, 0.5), dim=-1).indices.sort(dim=-1).values
        assert torch.equal(top, kept), f"kvzip layer {layer_idx}"
