"""On a Llama-family model, kvlib keeps exactly the positions NVIDIA's kvpress (0.5.5) keeps.

kvpress pins transformers<5.3, so it is installed with --no-deps (setup.sh) and its package __init__ (pipeline,
attention patches) is never run: stub packages point at its files and only the press modules are imported. Each
kvpress scorer gets what its own hooks would hand it: the attention module, the layer's input hidden states,
the layer's full keys and values, and the keyword arguments (position embeddings among them).
"""

import importlib.util
import sys
import types

import pytest
import torch
from tiny_models import VOCAB, tiny_model

import kvlib

PREFIX = 300
CASES = [
    ("knorm", {}, "knorm_press", "KnormPress"),
    ("snapkv", {"window_size": 16, "kernel_size": 5}, "snapkv_press", "SnapKVPress"),
    ("streaming_llm", {"n_sink": 4}, "streaming_llm_press", "StreamingLLMPress"),
    ("lagkv", {"n_sink": 4, "lag_size": 32}, "lagkv_press", "LagKVPress"),
]


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
        yield {cls: getattr(importlib.import_module(f"kvpress.presses.{module}"), cls) for *_, module, cls in CASES}
    finally:
        for name in [n for n in sys.modules if n.startswith("kvpress")]:
            del sys.modules[name]
        sys.modules.update({k: v for k, v in saved.items() if v is not None})


@pytest.fixture(scope="module")
def llama_run():
    """A tiny GQA Llama, a prefix, its full cache, and what each attention module was called with."""
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, PREFIX), generator=torch.Generator().manual_seed(3))
    calls = {}
    hooks = [
        layer.self_attn.register_forward_hook(
            lambda module, args, kwargs, output: calls.__setitem__(module.layer_idx, kwargs), with_kwargs=True
        )
        for layer in model.model.layers
    ]
    full = kvlib.new_cache(model)
    with torch.no_grad():
        model(ids, cache=full, use_cache=True)
    for hook in hooks:
        hook.remove()
    return model, ids, full, calls


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("name, options, module, cls", CASES, ids=[c[0] for c in CASES])
def test_kept_positions_equal_kvpress(kvpress_presses, llama_run, name, options, module, cls, ratio):
    model, ids, full, calls = llama_run
    press = kvlib.load_press(name, compression_ratio=ratio, **options)
    with torch.no_grad(), press(model):
        model(ids, cache=kvlib.new_cache(model), use_cache=True)
    reference = kvpress_presses[cls](compression_ratio=ratio, **options)
    for layer_idx, kept in press.last_report.kept_indices.items():
        layer = full.layers[layer_idx]
        module_ = model.model.layers[layer_idx].self_attn
        kwargs = calls[layer_idx]
        scores = reference.score(module_, kwargs["hidden_states"], layer.keys, layer.values, None, kwargs)
        theirs = scores.topk(kvlib.presses.n_kept(PREFIX, ratio), dim=-1).indices.sort(dim=-1).values
        assert torch.equal(theirs, kept), f"{name} r={ratio} layer {layer_idx}"
