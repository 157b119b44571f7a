"""The command line: result files and their columns, resume, and bad input failing before the model loads."""

import json
import math

import pandas as pd
import pytest
from cli_run import run_cli

from kvlib import cli
from kvlib.analysis import tables
from kvlib.study import runner as study_run

COLUMNS = [
    "method",
    "compression_ratio",
    "kv_quant",
    "ppl",
    "ppl_delta",
    "prefill_time",
    "ttft",
    "tpot",
    "throughput",
    "decode_time",
    "total_generation_time",
    "prefill_speedup",
    "ttft_speedup",
    "tpot_speedup",
    "throughput_ratio",
]
EVALUATE_KNORM = ["evaluate", "--method", "knorm", "--compression_ratio", "0.5"]
FAST = ["--max_length", "320", "--n_ppl", "2", "--n_timing", "2", "--warmup_times", "1", "--gen_tokens", "3"]


@pytest.fixture
def grid_args(tiny_model_dir, data_dir, tmp_path):
    return ["--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", tmp_path, *FAST]


def test_evaluate_writes_tables_with_the_study_columns(capsys, grid_args, tmp_path):
    code, out, err = run_cli(capsys, *EVALUATE_KNORM, *grid_args)
    assert code == 0, err
    table = pd.read_csv(tmp_path / "tiny-gpt-neox_wikitext_kv_metrics.csv")
    assert list(table.columns[: len(COLUMNS)]) == COLUMNS
    assert list(table.method) == ["none", "knorm"] and list(table.compression_ratio) == [0.0, 0.5]
    for column in (
        "ppl_delta_ci_low",
        "ppl_delta_ci_high",
        "tpot_iqr",
        "kv_bytes",
        "kv_bytes_ratio",
        "git_commit",
        "torch_version",
        "transformers_version",
        "device_name",
        "max_length",
        "prefix_ratio",
        "data_source",
    ):
        assert column in table.columns
    base, knorm = table.iloc[0], table.iloc[1]
    assert base.ppl_delta == 0 and base.prefill_speedup == 1 and base.throughput_ratio == 1
    assert knorm.kv_bytes_ratio == pytest.approx(0.5, abs=0.01)
    assert knorm.ppl_delta == pytest.approx(knorm.ppl - base.ppl)
    assert knorm.tpot_speedup == pytest.approx(base.tpot / knorm.tpot)
    records = json.loads((tmp_path / "tiny-gpt-neox_wikitext_kv_metrics.json").read_text())
    assert [r["method"] for r in records] == ["none", "knorm"]
    windows = pd.read_csv(tmp_path / "tiny-gpt-neox_wikitext_kv_windows.csv")
    assert set(windows.kind) == {"ppl", "latency"} and len(windows[windows.kind == "ppl"]) == 4
    assert len(list((tmp_path / "windows").glob("tiny-gpt-neox_wikitext_320-*.npy"))) == 1


def test_grid_resumes_and_survives_interruption(capsys, grid_args, tmp_path, monkeypatch):
    args = ["grid", "--methods", "knorm", "streaming_llm", "--ratios", "0.3", "0.6", *grid_args]
    real_write = study_run.write_json
    calls = []

    def interrupted(*a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(a[0])
        return real_write(*a, **k)

    monkeypatch.setattr(study_run, "write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main([str(a) for a in args])
    cell_dir = tmp_path / "cells" / "tiny-gpt-neox_wikitext"
    assert len(list(cell_dir.rglob("*.json"))) == 3
    assert not list(tmp_path.rglob("*.tmp"))

    calls.clear()
    monkeypatch.setattr(study_run, "write_json", real_write)
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and "7 cell(s) to run, 3 already done" in err
    code, _, err = run_cli(capsys, *args)
    assert "0 cell(s) to run, 10 already done" in err
    # Changing a latency setting reruns latency cells only.
    code, _, err = run_cli(capsys, *args[:-1], "4")
    assert "5 cell(s) to run, 5 already done" in err
    table = pd.read_csv(tmp_path / "tiny-gpt-neox_wikitext_kv_metrics.csv")
    assert len(table) == 5 and table.ppl.notna().all() and table.tpot.notna().all()


def test_dataset_all_writes_a_combined_table(capsys, grid_args, tmp_path):
    code, _, err = run_cli(
        capsys,
        *EVALUATE_KNORM,
        "--dataset",
        "all",
        "--kinds",
        "ppl",
        "--pg19_max_chars",
        "200000",
        *grid_args,
    )
    assert code == 0, err
    combined = pd.read_csv(tmp_path / "tiny-gpt-neox_all_kv_metrics.csv")
    assert sorted(set(combined.dataset)) == ["pg19", "wikitext"] and len(combined) == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "h2o", "--compression_ratio", "0.5"], "unknown press 'h2o'"),
        (["--method", "knorm", "--compression_ratio", "1.0"], r"compression_ratio must be in \[0, 1\).*1.0"),
        (["--method", "knorm", "--compression_ratio", "-0.2"], r"compression_ratio must be in \[0, 1\).*-0.2"),
        (
            ["--method", "knorm", "--compression_ratio", "0.5", "--prefix_ratio", "1"],
            "prefix_ratio must be in .0, 1.; got 1",
        ),
        (
            ["--method", "knorm", "--compression_ratio", "0.5", "--prefix_ratio", "0"],
            "prefix_ratio must be in .0, 1.; got 0",
        ),
        (
            ["--method", "snapkv", "--compression_ratio", "0.5", "--max_length", "100"],
            "snapkv press needs a prefix of at least",
        ),
        (
            ["--method", "knorm", "--compression_ratio", "0.5", "--gen_tokens", "1"],
            "gen_tokens must be an integer >= 2; got 1",
        ),
    ],
)
def test_bad_input_fails_before_the_model_loads(capsys, tmp_path, argv, message):
    code, _, err = run_cli(capsys, "evaluate", "--model", "no/such-model", "--output_dir", tmp_path, *argv)
    assert code == 2
    assert message.split(".*")[0].replace("\\", "") in err or __import__("re").search(message, err), err
    assert not list(tmp_path.iterdir())


def test_unknown_dataset_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["grid", "--dataset", "c4"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'c4'" in capsys.readouterr().err


def test_max_length_beyond_context_and_too_little_text(capsys, grid_args, tmp_path):
    code, _, err = run_cli(capsys, *EVALUATE_KNORM, *grid_args, "--max_length", "4096")
    assert code == 2 and "max_length 4096 exceeds" in err and "context of 2048 tokens" in err
    code, _, err = run_cli(
        capsys,
        *EVALUATE_KNORM,
        "--dataset",
        "pg19",
        "--pg19_max_chars",
        "1000",
        *grid_args,
    )
    assert code == 2 and "pg19 from" in err and "2 are needed" in err


def test_presses_command_lists_options(capsys):
    code, out, _ = run_cli(capsys, "presses")
    assert code == 0 and "snapkv" in out and '"window_size": 64' in out and "lagkv" in out


def test_relative_metrics_are_nan_without_a_baseline():
    settings = {"model": "m", "dataset": "d"}
    cell = {
        "kind": "ppl",
        "method": "knorm",
        "compression_ratio": 0.5,
        "options": {},
        "settings": settings,
        "provenance": {},
        "records": [{"window": 0, "nll_sum": 10.0, "n_tokens": 5, "cache_length": 3}],
    }
    table = tables.metrics_table([cell])
    assert table.ppl.iloc[0] == pytest.approx(math.exp(2)) and math.isnan(table.ppl_delta.iloc[0])
