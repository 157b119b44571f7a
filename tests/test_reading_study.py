"""The reading mode in the study (`--prefill_chunk`, `--positions`): wired through every kind's cache policy,
validated before weights load, resumable, and equal to the one-shot prefill when a chunk holds the whole prefix."""

import sys
from pathlib import Path

import pandas as pd
import pytest
from cli_run import cli_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from resume import killed_and_resumed

REPO = Path(__file__).resolve().parents[1]
FAST = ["--max_length", "512", "--n_ppl", "2", "--kinds", "ppl", "--methods", "knorm", "streaming_llm", "--ratios",
        "0.75"]  # fmt: skip
TABLE = "tiny-gpt-neox_wikitext_kv_metrics.csv"


@pytest.fixture
def grid(capsys, tiny_model_dir, data_dir, tmp_path):
    def run(*extra, output=tmp_path / "out"):
        return cli_error(capsys, "grid", "--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", output,
                       *FAST, *extra)  # fmt: skip

    return run


def test_a_chunk_holding_the_whole_prefix_gives_the_one_shot_perplexity(grid, tmp_path):
    assert grid()[0] == 0
    one_shot = pd.read_csv(tmp_path / "out" / TABLE).set_index("method")
    assert grid("--prefill_chunk", "256")[0] == 0  # the prefix is 256 tokens
    both = pd.read_csv(tmp_path / "out" / TABLE)
    # The table lists both readings side by side; the baseline is always one pass.
    assert list(zip(both["method"], both["prefill_chunk"].fillna(0), strict=True)) == [
        ("none", 0), ("knorm", 0), ("knorm", 256), ("streaming_llm", 0), ("streaming_llm", 256)
    ]  # fmt: skip
    chunked = both[both["prefill_chunk"] == 256].set_index("method")
    pd.testing.assert_series_equal(chunked["ppl"], one_shot["ppl"].drop("none"))
    assert len(list((tmp_path / "out" / "cells").rglob("*.json"))) == 5  # the chunked cells are results of their own


def test_the_report_compares_one_shot_and_chunked_reading(grid, tmp_path):
    from kvlib.analysis import reading, tables

    assert grid()[0] == 0 and grid("--prefill_chunk", "64")[0] == 0
    compared = reading.comparison(tables.read_tables(tmp_path / "out"))
    assert list(compared["method"]) == ["knorm", "streaming_llm"] and set(compared["prefill_chunk"]) == {64}
    assert set(compared["verdict"]) <= {"chunked better", "chunked worse", "not separated"}
    assert (compared["difference"] == compared["chunked_delta"] - compared["one_shot_delta"]).all()


def test_small_chunks_and_rerotation_are_results_of_their_own(grid, tmp_path):
    assert grid("--prefill_chunk", "64", "--positions", "rerotate")[0] == 0
    table = pd.read_csv(tmp_path / "out" / TABLE)
    pressed = table[table["method"] != "none"]
    assert set(pressed["positions"]) == {"rerotate"} and set(pressed["prefill_chunk"]) == {64}
    assert pressed["ppl"].notna().all() and (pressed["kv_bytes_ratio"] < 0.3).all()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prefill_chunk", "0"], "prefill_chunk must be a positive number of tokens"),
        (["--prefill_chunk", "-5"], "prefill_chunk must be a positive number of tokens"),
        (["--prefill_chunk", "128", "--methods", "kvzip"], "prefill_chunk is not available for the kvzip press"),
        (["--prefill_chunk", "16", "--methods", "snapkv"], "prefill_chunk 16 is too short for the snapkv press"),
    ],
)
def test_bad_reading_settings_fail_with_one_line(grid, tmp_path, flags, message):
    code, err = grid(*flags)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out" / "cells").exists()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk=st.integers(min_value=-(2**40), max_value=2**40))
def test_chunk_fuzzing(capsys, tmp_path, monkeypatch, chunk):
    """Any integer: past validation to the (missing) model, or one line naming prefill_chunk."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = cli_error(capsys, "grid", "--model", str(tmp_path / "no-model"), "--output_dir", tmp_path / "o",
                        "--methods", "knorm", "--prefill_chunk", str(chunk))  # fmt: skip
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert ("prefill_chunk" in err) == (chunk < 1), err


def test_sigkill_then_resume_of_a_chunked_run(tiny_model_dir, data_dir, tmp_path):
    args = [sys.executable, "-m", "kvlib", "grid", "--model", str(tiny_model_dir), "--data_dir", str(data_dir),
            *FAST, "--prefill_chunk", "64"]  # fmt: skip
    clean, killed = killed_and_resumed(args, tmp_path)
    columns = ["method", "compression_ratio", "prefill_chunk", "ppl", "ppl_delta", "kv_bytes"]
    pd.testing.assert_frame_equal(pd.read_csv(killed / TABLE)[columns], pd.read_csv(clean / TABLE)[columns])
