"""Streaming perplexity (kind `streaming`): a long text read chunk by chunk into a bounded cache.

- Reading scores every token after the first exactly as one full pass would when nothing is evicted (the last logit
  of a chunk predicts the next chunk's first token), and a press whose budget holds the whole stream reads as the
  dense cache, bit for bit, at both position modes.
- The recompute reference reads each chunk afresh after the window before it.
- A bounded cache never holds more than budget + chunk positions, and holds as much at the end as early on.
- In the study: the table and records, the references, resume, and bad input refused before weights load.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from cli_run import cli_error
from tiny_models import VOCAB, tiny_model
from torch.nn import functional as F

from kvlib import load_press
from kvlib.cache import CachePolicy, kv_bytes
from kvlib.cache.chunked import chunk_bounds
from kvlib.cache.layers import new_cache
from kvlib.cache.positions import POSITION_MODES
from kvlib.measure import streaming

ARCHS = ["llama", "gpt_neox", "gemma3"]
N, CHUNK = 300, 64


def stream_ids(n: int = N) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def full_pass_nll(model, ids) -> np.ndarray:
    logits = model(ids).logits[0, :-1].float()
    return F.cross_entropy(logits, ids[0, 1:], reduction="none").double().numpy()


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_streaming_scores_every_token_as_one_full_pass(arch):
    model, ids = tiny_model(arch), stream_ids()
    scores = streaming.read(model, ids, CachePolicy(load_press("none"), prefill_chunk=CHUNK))
    assert np.isnan(scores.nll[0])  # the first token has nothing to be predicted from
    np.testing.assert_allclose(scores.nll[1:], full_pass_nll(model, ids), rtol=0, atol=1e-4)
    records = scores.records()
    assert sum(r["n_tokens"] for r in records) == N - 1


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("positions", POSITION_MODES)
@pytest.mark.parametrize("name", ["streaming_llm", "snapkv", "tova", "expected_attention", "knorm"])
def test_a_budget_holding_the_whole_stream_reads_as_the_dense_cache(arch, positions, name):
    model, ids = tiny_model(arch), stream_ids()
    dense = streaming.read(model, ids, CachePolicy(load_press("none"), prefill_chunk=CHUNK))
    options = {"window_size": 8} if name == "snapkv" else {}
    policy = CachePolicy(load_press(name, 0.5, **options), prefill_chunk=CHUNK, kv_budget=N, positions=positions)
    pressed = streaming.read(model, ids, policy)
    np.testing.assert_array_equal(pressed.nll, dense.nll)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_recompute_reads_each_chunk_afresh_after_the_window_before_it(arch):
    model, ids, window = tiny_model(arch), stream_ids(), 50
    scores = streaming.recompute(model, ids, CHUNK, window)
    with torch.no_grad():
        for start, end in chunk_bounds(N, CHUNK):
            logits = model(ids[:, max(0, start - window) : end]).logits[0, -(end - start) :].float()
            targets = ids[0, start + 1 : min(end + 1, N)]
            expected = F.cross_entropy(logits[: len(targets)], targets, reduction="none").double().numpy()
            np.testing.assert_allclose(scores.nll[start + 1 : start + 1 + len(targets)], expected, atol=1e-5)
    whole = streaming.recompute(model, ids, CHUNK, N)  # a window holding the stream: the full pass
    np.testing.assert_allclose(whole.nll[1:], full_pass_nll(model, ids), atol=1e-4)


def test_a_bounded_stream_holds_at_most_budget_plus_chunk_and_stays_flat(monkeypatch):
    monkeypatch.setattr(streaming, "BUCKET", 128)
    model, ids, budget = tiny_model("llama"), stream_ids(1024), 96
    with torch.no_grad():
        cache = new_cache(model)
        model(ids[:, :1], cache=cache, use_cache=True)
    per_position = kv_bytes(cache)
    policy = CachePolicy(load_press("streaming_llm", 0.5), prefill_chunk=CHUNK, kv_budget=budget)
    bounded = [r["cache_bytes"] for r in streaming.read(model, ids, policy).records()]
    dense_policy = CachePolicy(load_press("none"), prefill_chunk=CHUNK)
    dense = [r["cache_bytes"] for r in streaming.read(model, ids, dense_policy).records()]
    assert max(bounded) == (budget + CHUNK) * per_position
    assert bounded[2:] == [bounded[-1]] * (len(bounded) - 2)  # flat once the budget is full
    assert dense == sorted(dense) and dense[-1] == 1024 * per_position


# ------------------------------------------------------------------------------------------------- the study

STUDY = ["--dataset", "pg19", "--kinds", "streaming", "--max_length", "512", "--max_samples", "8", "--ratios", "0.5"]


@pytest.fixture
def stream_run(capsys, tiny_model_dir, data_dir, tmp_path):
    def run(*extra, output=tmp_path / "out"):
        return cli_error(capsys, "grid", "--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", output,
                       *STUDY, *extra)  # fmt: skip

    return run


def test_the_study_writes_every_reading_with_its_references_and_resumes(stream_run, tmp_path):
    args = ["--methods", "streaming_llm", "--kv_budget", "128", "--prefill_chunk", "128", "--stream_tokens", "1500"]
    code, err = stream_run(*args)
    assert code == 0, err
    table = pd.read_csv(tmp_path / "out" / "tiny-gpt-neox_pg19_kv_streaming.csv")
    readings = list(zip(table["method"], table["positions"], strict=True))
    assert readings == [
        ("none", "original"),
        ("recompute", "original"),
        ("window", "original"),
        ("window", "rerotate"),
        ("streaming_llm", "original"),
        ("streaming_llm", "rerotate"),
    ]
    assert (table["tokens"] == 1500).all() and table["ppl"].notna().all()
    assert table.loc[table["method"] == "recompute", "ppl_vs_reference"].item() == 0
    bounded = table[table["method"] != "none"]
    assert (bounded["peak_cache_bytes"] < table.loc[table["method"] == "none", "peak_cache_bytes"].item()).all()
    assert (table["ci_low"] <= table["ppl"]).all() and (table["ppl"] <= table["ci_high"]).all()
    records = pd.read_csv(tmp_path / "out" / "tiny-gpt-neox_pg19_kv_streaming_records.csv")
    assert len(records) == 6 * 2  # two 1024-token buckets per reading
    code, err = stream_run(*args)
    assert code == 0 and "0 cell(s) to run, 2 already done" in err


def test_the_default_stream_is_four_trained_contexts(stream_run, tmp_path, tiny_model_dir):
    from kvlib.models import context_length, load_config

    trained = context_length(load_config(str(tiny_model_dir)))
    code, err = stream_run("--methods", "streaming_llm", "--kv_budget", "64", "--max_samples", "2")
    assert code == 2 and f"stream_tokens {4 * trained} needs" in err and "max_samples is 2" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--stream_tokens", "1"], "stream_tokens must be an integer >= 2"),
        (["--stream_tokens", "100"], "stream_tokens 100 must exceed the chunk of 512 tokens"),
        (["--stream_tokens", "3000", "--max_samples", "3"], "max_samples is 3 (raise it to 6)"),
        (["--stream_tokens", "3000", "--pg19_max_chars", "2000"], "pg19 from"),
        (["--stream_tokens", "3000", "--kv_quant", "fp8"], "the streaming kind reads in float"),
        (["--stream_tokens", "3000", "--ratios", "0.3", "0.5"], "give one ratio"),
        (["--stream_tokens", "3000", "--kv_budget", "2"], "kv_budget 2 is below the 4 positions"),
        (["--stream_tokens", "3000", "--kv_budget", "5000"], "kv_budget 5000 is larger than the context"),
        (["--stream_tokens", "3000", "--prefill_chunk", "0"], "prefill_chunk must be a positive number"),
        (["--stream_tokens", "3000", "--methods", "kvzip"], "prefill_chunk is not available for the kvzip press"),
    ],
)
def test_bad_streaming_input_is_refused_in_one_line_before_weights_load(stream_run, tmp_path, flags, message):
    methods = [] if "--methods" in flags else ["--methods", "streaming_llm"]
    code, err = stream_run(*methods, *flags)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and message in err, err
    assert len(lines) == 1 and "loading" not in err
    assert not (tmp_path / "out").exists()
