"""The context-length sweep: the TPOT fit and its bound, the `scaling` command end to end on a tiny model,
bad lengths, peak memory, and pruned caches laid out like unpruned ones (the decode path wastes no gain)."""

import math

import pandas as pd
import pytest
import torch
from cli_run import run_cli
from tiny_models import tiny_model

from kvlib import load_press
from kvlib.analysis import charts, scaling, tables
from kvlib.cache import new_cache
from kvlib.measure.memory import PeakMemory
from kvlib.presses import SharedPrefill


def test_fit_recovers_w_and_c_exactly():
    w, c = 0.0123, 4.5e-6
    lengths = [1024, 2048, 4096, 8192]
    line = scaling.fit_points(lengths, [w + c * n for n in lengths])
    assert line.w == pytest.approx(w, rel=1e-9) and line.c == pytest.approx(c, rel=1e-9)
    assert line.rms == pytest.approx(0, abs=1e-12) and line.r2 == pytest.approx(1.0)
    assert line(10_000) == pytest.approx(w + c * 10_000)


def test_fit_residuals_by_hand():
    # Least squares through (1, 1), (2, 3), (3, 2): w = 1, c = 0.5, residuals -0.5, 1, -0.5.
    line = scaling.fit_points([1, 2, 3], [1, 3, 2])
    assert (line.w, line.c) == pytest.approx((1.0, 0.5))
    assert line.residuals == pytest.approx([-0.5, 1.0, -0.5])
    assert line.rms == pytest.approx(math.sqrt(0.5)) and line.r2 == pytest.approx(1 - 1.5 / 2)


def test_fit_needs_two_lengths():
    with pytest.raises(ValueError, match="two lengths or more"):
        scaling.fit_points([1024, 1024], [0.1, 0.2])


def _runs(tpot: float, prefill: float, kv: int, n: int) -> list[dict]:
    return [
        {"run": i, "prefill_time": prefill, "tpot": tpot, "kv_bytes": kv, "cache_length": kv // 10,
         "peak_memory": 5e6, "other_cpu": 0.0, "loadavg": 0.1}
        for i in range(n)
    ]  # fmt: skip


def _cell(
    method: str, ratio: float, length: int, tpot: float, base_tpot: float, prefill: float = 1.0, n: int = 3
) -> dict:
    kv = 10 * scaling.kept_length(length, ratio)
    return {
        "kind": "scaling",
        "method": method,
        "compression_ratio": ratio,
        "options": {},
        "settings": {"max_length": length, "gen_tokens": 16, "warmup_times": 0, "n_timing": 3},
        "identity_columns": {"model": "m", "dataset": "pg19"},
        "runs": _runs(tpot, prefill, kv, n),
        "baseline_runs": _runs(base_tpot, 1.0, 10 * length, n),
        "prompt_length": length,
        "provenance": {"git_commit": "x"},
    }


def test_bound_and_fraction_on_a_hand_made_table():
    # Baseline TPOT 20 ms at 1000 tokens, 30 ms at 2000: w = 10 ms, c = 10 µs per position.
    cells = [
        _cell("none", 0.0, 1000, 0.020, 0.020),
        _cell("none", 0.0, 2000, 0.030, 0.030),
        _cell("knorm", 0.5, 2000, 0.025, 0.030, prefill=1.2),  # keeps 1000: bound fit(2000)/fit(1000) = 1.5
        _cell("knorm", 0.5, 1000, 0.021, 0.020),  # slower than the baseline
    ]
    table = tables.kind_table("scaling", cells)
    assert list(table.columns[: len(scaling.COLUMNS)]) == scaling.COLUMNS
    row = table[(table.method == "knorm") & (table.context_length == 2000)].iloc[0]
    assert row.kept_length == 1000
    assert row.fit_w == pytest.approx(0.010) and row.fit_c == pytest.approx(1e-5)
    assert row.tpot_speedup == pytest.approx(0.030 / 0.025)
    assert row.bound_speedup == pytest.approx(1.5)
    # achieved saving 1 - 25/30 = 1/6 of the possible 1 - 20/30 = 1/3
    assert row.fraction_of_bound == pytest.approx(0.5)
    assert row.prefill_overhead == pytest.approx(0.2)
    short = table[(table.method == "knorm") & (table.context_length == 1000)].iloc[0]
    assert short.bound_speedup == pytest.approx(0.020 / 0.015)
    assert short.fraction_of_bound == pytest.approx((1 - 0.021 / 0.020) / (1 - 0.015 / 0.020))  # negative
    base = table[table.method == "none"]
    assert (base.bound_speedup == 1).all() and base.fraction_of_bound.isna().all()
    records = tables.kind_records("scaling", cells)
    assert len(records) == 4 * 3 and set(records.context_length) == {1000, 2000}
    text = scaling.observations(table)
    assert "ratio 0.5" in text and "knorm from 2000 tokens" in text
    assert "10.0 ms + 10.00 µs" in scaling.fit_summary(table)
    for chart in (scaling.speedup_chart(table), scaling.memory_chart(table), scaling.prefill_chart(table)):
        assert chart.to_dict()  # a valid Vega-Lite spec


def test_observations_say_when_a_press_never_pays():
    cells = [_cell("none", 0.0, n, 0.010 + 1e-6 * n, 0.010 + 1e-6 * n) for n in (1000, 2000)]
    cells += [_cell("snapkv", 0.7, n, 0.010 + 1e-6 * n, 0.010 + 1e-6 * n) for n in (1000, 2000)]
    text = scaling.observations(scaling.scaling_table(cells))
    assert "never saves 10% up to 2000 tokens: snapkv" in text
    assert "no interquartile range" not in text  # three runs per cell


def test_observations_say_when_one_run_cannot_resolve_the_noise():
    # Baseline 20 / 33 / 40 ms at 1000 / 2000 / 3000 tokens: the fit's residuals are the run's noise scale.
    cells = [_cell("none", 0.0, n, t, t, n=1) for n, t in ((1000, 0.020), (2000, 0.033), (3000, 0.040))]
    cells += [_cell("knorm", 0.5, 3000, 0.030, 0.040, n=1)]
    text = scaling.observations(scaling.scaling_table(cells))
    line = scaling.fit_points([1000, 2000, 3000], [0.020, 0.033, 0.040])
    assert "1 timed run(s) per cell: no interquartile range" in text
    assert f"by {1e3 * line.rms:.1f} ms RMS ({100 * line.rms / 0.033:.0f}% of its median TPOT)" in text


def test_peak_memory_sees_an_allocation():
    with PeakMemory("cpu") as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
        del block
    grew = peak.record()["peak_memory"]
    assert 32 * 2**20 <= grew < 1024 * 2**20


def test_pruned_caches_are_contiguous():
    """A pruned cache decodes from tensors laid out like an unpruned cache's (no strided views after gather)."""
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = torch.randint(0, 128, (1, 96))
    presses = [load_press("knorm", compression_ratio=0.5), load_press("snapkv", compression_ratio=0.5, window_size=8)]
    shared = SharedPrefill.run(model, ids, presses)
    for press in presses:
        cache = press.prune(shared)
        assert all(layer.keys.is_contiguous() and layer.values.is_contiguous() for layer in cache.layers)
        live = new_cache(model)
        with torch.no_grad(), press(model):
            model(ids, cache=live, use_cache=True)
        assert all(layer.keys.is_contiguous() and layer.values.is_contiguous() for layer in live.layers)
        assert live.layers[0].keys.shape[-2] == 48


# ------------------------------------------------------------------------------------------ the command


FAST = ["--n_timing", "2", "--warmup_times", "0", "--gen_tokens", "3", "--pg19_max_chars", "60000"]


def test_scaling_command_writes_one_row_per_cell_and_resumes(capsys, tiny_model_dir, data_dir, tmp_path):
    args = ["scaling", "--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", tmp_path,
            "--lengths", "192", "256", "--methods", "knorm", "streaming_llm", "--ratios", "0.5", *FAST]  # fmt: skip
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "pg19 at 192 tokens: 3 cell(s) to run" in err and "pg19 at 256 tokens: 3 cell(s) to run" in err
    table = pd.read_csv(tmp_path / "tiny-gpt-neox_pg19_kv_scaling.csv")
    keys = sorted(zip(table.method, table.compression_ratio, table.context_length, strict=True))
    assert keys == sorted((m, r, n) for n in (192, 256) for m, r in [("none", 0.0), ("knorm", 0.5),
                                                                     ("streaming_llm", 0.5)])  # fmt: skip
    assert (table.peak_memory >= 0).all() and table.peak_memory.notna().all()
    assert table.fit_points.eq(2).all() and table.fit_rms.abs().max() < 1e-9  # two lengths: an exact line
    pressed = table[table.method != "none"]
    assert (pressed.kept_length == pressed.context_length // 2).all()
    assert (pressed.kv_bytes_ratio.round(2) == 0.5).all()
    records = pd.read_csv(tmp_path / "tiny-gpt-neox_pg19_kv_scaling_records.csv")
    assert len(records) == 6 * 2 and (records.peak_memory >= 0).all()
    assert {"prefill_time", "tpot", "kv_bytes", "peak_memory", "other_cpu"} <= set(records.columns)
    assert scaling.read_tables(tmp_path).shape[0] == 6
    assert not (tmp_path / "tiny-gpt-neox_pg19_kv_metrics.csv").exists()  # the sweep writes its own table only

    cells = {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").rglob("*.json")}
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and err.count("0 cell(s) to run, 3 already done") == 2, err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").rglob("*.json")} == cells


def test_a_sweep_read_in_chunks_lists_its_rows_beside_the_one_pass_rows(capsys, tiny_model_dir, data_dir, tmp_path):
    args = ["scaling", "--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", tmp_path,
            "--lengths", "192", "256", "--methods", "streaming_llm", "--ratios", "0.5", *FAST]  # fmt: skip
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    code, _, err = run_cli(capsys, *args, "--prefill_chunk", "64")
    assert code == 0, err
    assert err.count("1 cell(s) to run, 1 already done") == 2, err  # the one-pass baseline is shared
    table = pd.read_csv(tmp_path / "tiny-gpt-neox_pg19_kv_scaling.csv")
    keys = sorted(zip(table.method, table.prefill_chunk.fillna(0).astype(int), table.context_length, strict=True))
    expected = [(m, c, n) for n in (192, 256) for m, c in [("none", 0), ("streaming_llm", 0), ("streaming_llm", 64)]]
    assert keys == sorted(expected)
    assert scaling.read_tables(tmp_path).shape[0] == 6
    chunked = table[table.prefill_chunk.notna()]
    assert (chunked.kept_length == chunked.context_length // 2).all() and (chunked.kv_bytes_ratio.round(2) == 0.5).all()
    assert set(scaling.table_view(table).method) == {"none", "streaming_llm", "streaming_llm · chunks of 64"}
    text = scaling.observations(table)
    assert "streaming_llm · chunks of 64 at ratio 0.5, 256 tokens: the run's peak is" in text, text
    assert "for the uncompressed prefill in one pass timed beside it" in text and "Read in one pass," in text
    spec = scaling.memory_chart(table).to_dict()
    methods = {row["method"] for row in next(iter(spec["datasets"].values()))}
    assert methods == {"none", "streaming_llm", "streaming_llm · chunks of 64"}
    scale = spec["spec"]["layer"][0]["encoding"]["color"]["scale"]
    colours = dict(zip(scale["domain"], scale["range"], strict=True))
    assert colours["streaming_llm · chunks of 64"] in charts.FAMILY_COLORS["position-based eviction"]


@pytest.mark.parametrize(
    "lengths, message",
    [(["0"], "every length must be an integer >= 2; got 0"),
     (["256", "4096"], "context of 2048 tokens; ask for lengths up to 2048"),
     (["2"], "scaling context length 2 is too short: it must exceed gen_tokens (3)")],
)  # fmt: skip
def test_bad_lengths_fail_before_measuring(capsys, tiny_model_dir, data_dir, tmp_path, lengths, message):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "scaling", "--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", out,
                           "--lengths", *lengths, "--methods", "knorm", *FAST)  # fmt: skip
    assert code == 2 and message in err, err
    assert not out.exists() and "loading" not in err  # rejected before the output folder is made


def test_the_analysis_side_imports_without_torch():
    import subprocess
    import sys

    code = "import kvlib.analysis.scaling, sys; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
