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
