"""The measuring instrument: PPL identity, latency fields, relative metrics and the bootstrap."""

import math

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_model
from torch.nn import functional as F

import kvlib
from kvlib.analysis import stats
from kvlib.files import atomic_write
from kvlib.measure import latency, ppl


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt_neox")


def windows(n=3, length=96, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n, length))


@torch.no_grad()
def test_no_press_ppl_equals_one_plain_forward_pass(model):
    batch = windows()
    prefix = 48
    records = [ppl.window_nll(model, torch.as_tensor(w)[None], kvlib.load_press("none"), prefix) for w in batch]
    for record, window in zip(records, batch, strict=True):
        ids = torch.as_tensor(window)[None]
        logits = model(ids).logits[0, prefix - 1 : -1]
        expected = F.cross_entropy(logits, ids[0, prefix:], reduction="sum").item()
        assert record["n_tokens"] == 48
        assert record["nll_sum"] == pytest.approx(expected, rel=1e-5)
        assert record["cache_length"] == prefix
    assert stats.perplexity(records) == pytest.approx(
        math.exp(sum(r["nll_sum"] for r in records) / sum(r["n_tokens"] for r in records))
    )


class Protocol:
    prefix_ratio, n_ppl, gen_tokens, warmup_times, n_timing = 0.5, 3, 6, 1, 3


def test_pressed_ppl_records_compressed_cache(model):
    presses = {"s": kvlib.load_press("streaming_llm", compression_ratio=0.5), "b": kvlib.load_press("none")}
    results = dict(ppl.measure(model, None, windows(), presses, Protocol, log=lambda _: None))
    records, baseline = results["s"]["records"], results["b"]["records"]
    assert len(records) == 3 and all(r["cache_length"] == 24 and math.isfinite(r["nll_sum"]) for r in records)
    assert all(r["kv_bytes"] * 2 == b["kv_bytes"] for r, b in zip(records, baseline, strict=True))
    assert results["s"]["effective_ratio"] == pytest.approx(0.5)


def test_latency_fields_positive_and_consistent(model):
    presses = {"k": kvlib.load_press("knorm", compression_ratio=0.5)}
    results = dict(latency.measure(model, None, windows(1, 128), presses, Protocol, log=lambda _: None))
    runs, baseline = results["k"]["runs"], results["k"]["baseline_runs"]
    assert len(runs) == len(baseline) == 3
    for run in runs:
        assert all(run[name] > 0 for name in latency.TIMING_FIELDS)
        assert run["other_cpu"] >= 0 and run["loadavg"] >= 0
        assert run["ttft"] >= run["prefill_time"]
        assert run["total_generation_time"] == pytest.approx(run["ttft"] + run["decode_time"])
        assert run["tpot"] == pytest.approx(run["decode_time"] / 5)
        assert run["throughput"] == pytest.approx(6 / run["total_generation_time"])
    assert runs[0]["kv_bytes"] * 2 == baseline[0]["kv_bytes"]
    with pytest.raises(ValueError, match="gen_tokens must be at least 2"):
        latency.time_generation(model, torch.as_tensor(windows(1, 128))[None, 0], kvlib.load_press("none"), 1)


def test_generation_after_press_is_greedy_continuation_of_full_cache_at_ratio_zero(model):
    """Decoding with positions continuing from the prompt: at ratio 0 the pressed path equals plain greedy."""
    prompt = torch.as_tensor(windows(1, 64)[0])[None]
    cache = kvlib.new_cache(model)
    with kvlib.load_press("snapkv", compression_ratio=0.0, window_size=8)(model), torch.no_grad():
        token = model(prompt, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    generated = [token.item()]
    for step in range(4):
        token = kvlib.extend(model, token, cache, 64 + step)[:, -1].argmax(-1, keepdim=True)
        generated.append(token.item())
    expected = model.generate(prompt, max_new_tokens=5, do_sample=False, min_new_tokens=5)[0, 64:].tolist()
    assert generated == expected


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    base = [{"window": i, "nll_sum": float(x), "n_tokens": 100} for i, x in enumerate(rng.uniform(200, 300, 20))]
    same = stats.ppl_delta_ci(base, base)
    assert same == (0.0, 0.0)
    worse = [{**r, "nll_sum": r["nll_sum"] + 10} for r in base]
    low, high = stats.ppl_delta_ci(worse, base)
    point = stats.perplexity(worse) - stats.perplexity(base)
    assert 0 < low < point < high
    with pytest.raises(ValueError, match="same windows"):
        stats.ppl_delta_ci(worse[:5], base)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as handle:
            handle.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]
