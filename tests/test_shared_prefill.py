"""One shared prefill, each press pruning its own copy, equals prefilling under each press: bit for bit on CPU."""

import pytest
import torch
from test_presses import PREFIX, PRESS_OPTIONS, token_ids
from tiny_models import CONFIGS, tiny_model

import kvlib
from kvlib.measure import ppl


def presses(ratio: float) -> dict[str, kvlib.Press]:
    """Every registered press (the baseline at ratio 0), with the small-prefix options of the oracle tests."""
    built = {}
    for name in kvlib.PRESSES:
        if name == "none":
            built[name] = kvlib.load_press("none")
        else:
            built[name] = kvlib.load_press(name, compression_ratio=ratio, **PRESS_OPTIONS.get(name, {}))
    return built


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_shared_prefill_is_bit_identical(arch, implementation):
    """Every press at two ratios from ONE shared prefill (as the study runs a dataset) equals each press alone."""
    model = tiny_model(arch, attn_implementation=implementation)
    ids = token_ids(batch=1)
    shared_presses = {f"{label} {ratio}": press for ratio in (0.25, 0.75) for label, press in presses(ratio).items()}
    shared = ppl.shared_window_nll(model, ids, shared_presses, PREFIX)
    shared_kept = {label: press.last_report.kept_indices for label, press in shared_presses.items()}
    for ratio in (0.25, 0.75):
        for name, press in presses(ratio).items():
            label = f"{name} {ratio}"
            alone = ppl.window_nll(model, ids, press, PREFIX)
            assert alone == shared[label], f"{arch}/{implementation} {label}"
            if name == "none":
                assert shared_kept[label] == {}
                continue
            kept = press.last_report.kept_indices
            assert kept.keys() == shared_kept[label].keys()
            assert all(torch.equal(kept[layer], shared_kept[label][layer]) for layer in kept)


def test_a_rescoring_press_rescores_once_for_all_its_ratios():
    model = tiny_model("llama")
    ids = token_ids(batch=1)[:, :PREFIX]
    kvzips = [kvlib.load_press("kvzip", compression_ratio=r, **PRESS_OPTIONS.get("kvzip", {})) for r in (0.25, 0.75)]
    other = kvlib.load_press("kvzip", compression_ratio=0.25, **{**PRESS_OPTIONS.get("kvzip", {}), "n_sink": 0})
    shared = kvlib.SharedPrefill.run(model, ids, [*kvzips, other])
    assert len(shared.rescored) == 2  # one per options, not per ratio


def test_shared_prefill_leaves_the_shared_cache_as_it_was():
    model = tiny_model("gemma3")  # sliding layers too: their copies must grow on their own
    ids = token_ids(batch=2)
    pressed = [kvlib.load_press("knorm", compression_ratio=0.5), kvlib.load_press("none")]
    shared = kvlib.SharedPrefill.run(model, ids[:, :PREFIX], pressed)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in shared.cache.layers]
    for press in pressed:
        cache = press.prune(shared)
        kvlib.extend(model, ids[:, PREFIX:], cache, PREFIX)
    for (keys, values), layer in zip(before, shared.cache.layers, strict=True):
        assert torch.equal(keys, layer.keys) and torch.equal(values, layer.values)


def test_shared_prefill_keeps_only_the_queries_its_presses_read():
    model = tiny_model("llama")
    ids = token_ids(batch=1)[:, :PREFIX]
    cheap = kvlib.SharedPrefill.run(model, ids, [kvlib.load_press("knorm", compression_ratio=0.5)])
    assert cheap.query_bytes() == 0
    window = kvlib.SharedPrefill.run(model, ids, [kvlib.load_press("snapkv", compression_ratio=0.5, window_size=8)])
    assert all(layer.queries.shape[-2] == 8 for layer in window.layers.values())
