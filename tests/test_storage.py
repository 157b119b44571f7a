"""Quantized KV storage (`--kv_quant`): transformers' own quantized layers after the press, exactly.

- With no press, kvlib's suffix logits under each precision equal transformers' `QuantizedCache` used directly.
- The press scores the float prefill: its kept positions are the same at every precision, on every architecture.
- The shared prefill serves every (press, precision) pair bit-identically to prefilling under each.
- `kv_bytes` is what the backend's tensors hold (a hand count), and bad input names what is allowed.
"""

import importlib.util

import pytest
import torch
from test_presses import PRESS_OPTIONS, token_ids
from tiny_models import CONFIGS, tiny_model
from transformers import QuantizedCache
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from kvlib.cache import CachePolicy, Storage, extend, kv_bytes, new_cache, precision_names
from kvlib.measure import ppl
from kvlib.presses import load_press

PREFIX = 64
QUANTIZED = [name for name in precision_names() if name != "none"]
TINY_OPTIONS = {"q_group_size": 16}  # the tiny models' heads have 16 dimensions


def storage(name: str) -> Storage:
    return Storage.parse(name, TINY_OPTIONS)


@pytest.mark.parametrize("precision", QUANTIZED)
@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "qwen2", "phi3"])
@torch.no_grad()
def test_equal_to_quantized_cache_used_directly(arch, precision):
    model, ids = tiny_model(arch), token_ids(batch=1)
    chosen = storage(precision)
    logits, cache = CachePolicy(load_press("none"), chosen).prefill(model, ids[:, :PREFIX])
    ours = extend(model, ids[:, PREFIX:], cache, PREFIX)
    options = {} if precision == "fp8" else {"nbits": chosen.nbits, **chosen.options}
    direct = QuantizedCache(chosen.backend, model.config, **options)
    direct_logits = model(ids[:, :PREFIX], cache=direct, use_cache=True, logits_to_keep=1).logits
    theirs = model(ids[:, PREFIX:], cache=direct, use_cache=True).logits
    assert torch.equal(logits, direct_logits) and torch.equal(ours, theirs)
    assert [type(layer) for layer in cache.layers] == [type(layer) for layer in direct.layers]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("method", sorted(PRESS_OPTIONS))
@torch.no_grad()
def test_presses_keep_the_same_positions_at_every_precision(arch, method):
    model, ids = tiny_model(arch), token_ids(batch=1)
    press = load_press(method, 0.5, **PRESS_OPTIONS[method])
    CachePolicy(press).prefill(model, ids[:, :PREFIX])
    float_kept = press.last_report.kept_indices
    for precision in ("fp8", "hqq-int4"):
        CachePolicy(press, storage(precision)).prefill(model, ids[:, :PREFIX])
        kept = press.last_report.kept_indices
        assert kept.keys() == float_kept.keys()
        assert all(torch.equal(kept[layer], float_kept[layer]) for layer in kept)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@torch.no_grad()
def test_shared_prefill_serves_every_press_and_precision(arch):
    model, ids = tiny_model(arch), token_ids(batch=1)
    policies = {
        f"{method} {precision}": CachePolicy(load_press(method, 0.5, **PRESS_OPTIONS[method]), storage(precision))
        for method in ("knorm", "snapkv", "kvzip")
        for precision in ("none", "fp8", "quanto-int4", "hqq-int2")
    }
    shared = ppl.shared_window_nll(model, ids, policies, PREFIX)
    for label, policy in policies.items():
        assert shared[label] == ppl.window_nll(model, ids, policy, PREFIX), label


@torch.no_grad()
def test_hybrid_model_quantizes_its_full_attention_layers_only():
    model, ids = tiny_model("gemma3"), token_ids(batch=1)
    with pytest.raises(ValueError, match="only full attention"):
        QuantizedCache("hqq", model.config)  # what kvlib's construction replaces
    _, cache = CachePolicy(load_press("knorm", 0.5), storage("hqq-int4")).prefill(model, ids[:, :PREFIX])
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert kinds == ["DynamicSlidingWindowLayer", "HQQQuantizedLayer", "DynamicSlidingWindowLayer"]
    assert torch.isfinite(extend(model, ids[:, PREFIX:], cache, PREFIX)).all()


@torch.no_grad()
def test_kv_bytes_counts_what_the_backends_hold():
    """One layer of 2 KV heads x 64 positions x 16 dims: float32 is 8,192 bytes per tensor. fp8 stores one byte per
    value and one float32 scale; int4 two values per byte, and per group of 16 values a float32 scale and zero point
    (quanto: scale and shift); int2 four values per byte. Residual windows are empty right after the prefill."""
    model, ids = tiny_model("llama"), token_ids(batch=1)
    values = 2 * 64 * 16
    groups = values // 16
    expected = {
        "none": 2 * values * 4,
        "fp8": 2 * (values + 4),
        "quanto-int4": 2 * (values // 2 + groups * 4 * 2),
        "hqq-int4": 2 * (values // 2 + groups * 4 * 2),
        "hqq-int8": 2 * (values + groups * 4 * 2),
        "quanto-int2": 2 * (values // 4 + groups * 4 * 2),
    }
    for precision, per_layer in expected.items():
        _, cache = CachePolicy(load_press("none"), storage(precision)).prefill(model, ids[:, :PREFIX])
        layer = cache.layers[0]
        one_layer = Cache(layers=[layer])
        assert kv_bytes(one_layer) == per_layer, precision
        assert kv_bytes(cache) == 3 * per_layer


def test_float_storage_changes_nothing():
    model, ids = tiny_model("qwen2"), token_ids(batch=1)
    press = load_press("snapkv", 0.5, window_size=8)
    cache = new_cache(model)
    with torch.no_grad(), press(model):
        logits = model(ids[:, :PREFIX], cache=cache, use_cache=True, logits_to_keep=1).logits
    policy_logits, policy_cache = CachePolicy(press).prefill(model, ids[:, :PREFIX])
    assert torch.equal(logits, policy_logits)
    assert all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in policy_cache.layers)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(cache.layers, policy_cache.layers, strict=True))
    assert CachePolicy(press).identity() == {}


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("int4", {}, "unknown kv_quant 'int4'; choose from none, fp8, quanto-int4"),
        ("quanto-int8", {}, "unknown kv_quant 'quanto-int8'"),
        ("hqq-int4", {"group": 8}, r"unknown kv_quant option\(s\) \['group'\]"),
        ("hqq-int4", {"q_group_size": 0}, "q_group_size must be an integer >= 1; got 0"),
        ("quanto-int4", {"axis_key": 1}, r"axis_key for the quanto backend must be one of \[0, -1\]; got 1"),
        ("hqq-int4", {"axis_value": -1}, r"axis_value for the hqq backend must be one of \[0, 1\]; got -1"),
    ],
)
def test_bad_precisions_name_what_is_allowed(name, options, message):
    with pytest.raises(ValueError, match=message):
        Storage.parse(name, options)


def test_group_size_must_divide_the_head_dimension():
    with pytest.raises(ValueError, match="q_group_size 48 does not divide the model's head dimension 64"):
        Storage.parse("hqq-int4", {"q_group_size": 48}).check_head_dim(64)
    Storage.parse("fp8", {"q_group_size": 48}).check_head_dim(64)  # fp8 is per tensor: no groups


def test_missing_backend_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    missing = {"optimum", "optimum.quanto"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    with pytest.raises(ValueError, match="kv_quant quanto-int4 needs the package optimum-quanto"):
        Storage.parse("quanto-int4").check_backend()
    Storage.parse("hqq-int4").check_backend()
