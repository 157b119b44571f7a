"""Every press on the real SmolLM2-135M (Llama architecture, grouped KV heads) and real wikitext."""

import math

import pytest
import torch

import kvlib
from kvlib import data
from kvlib.measure import ppl
from kvlib.presses import PrefillLayer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def window(smollm2, data_dir):
    _, tokenizer = smollm2
    return data.load_windows("wikitext", tokenizer, 1024, max_samples=1, data_dir=data_dir)[0]


@pytest.mark.parametrize("name", sorted(kvlib.PRESSES))
def test_each_press_at_half_gives_a_finite_suffix_nll(smollm2, window, name):
    model, _ = smollm2
    ratio = 0.0 if name == "none" else 0.5
    press = kvlib.load_press(name, compression_ratio=ratio)
    record = ppl.window_nll(model, torch.as_tensor(window)[None], press, prefix_len=512)
    assert math.isfinite(record["nll_sum"]) and record["n_tokens"] == 512
    empty = torch.empty(0)
    budgets = [press.budget(512, PrefillLayer(i, 30, empty, empty, empty, 1.0)) for i in range(30)]
    assert record["cache_length"] == (512 if name == "none" else max(budgets))  # the longest layer
    nll_per_token = record["nll_sum"] / record["n_tokens"]
    assert 1.0 < nll_per_token < 6.0, f"{name}: implausible NLL/token {nll_per_token:.3f} for a trained model"


@pytest.mark.parametrize("precision", ["fp8", "quanto-int4", "hqq-int4"])
def test_quantized_storage_equals_quantized_cache_used_directly(smollm2, window, precision):
    """The precision axis on the real model: kvlib's policy (float prefill, then transformers' quantized layers)
    gives the logits of `QuantizedCache` fed the same prefix and suffix, to the bit."""
    from transformers import QuantizedCache

    from kvlib.cache import CachePolicy, Storage

    model, _ = smollm2
    ids = torch.as_tensor(window[:640])[None]
    storage = Storage.parse(precision)
    with torch.no_grad():
        _, cache = CachePolicy(kvlib.load_press("none"), storage).prefill(model, ids[:, :512])
        ours = kvlib.extend(model, ids[:, 512:], cache, 512)
        options = {} if precision == "fp8" else {"nbits": storage.nbits, **storage.options}
        direct = QuantizedCache(storage.backend, model.config, **options)
        model(ids[:, :512], cache=direct, use_cache=True, logits_to_keep=1)
        theirs = model(ids[:, 512:], cache=direct, use_cache=True).logits
    assert torch.equal(ours, theirs)
