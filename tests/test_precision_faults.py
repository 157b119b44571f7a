"""Fault injection for the cache-precision axis (`--kv_quant`): bad input gets one line before weights load,
variants never mix, a killed quantized run resumes to the same table, a corrupt quantized cell is named."""

import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from cli_run import cli_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from resume import killed_and_resumed

from kvlib.cache import precision_names

REPO = Path(__file__).resolve().parents[1]
FAST = ["--max_length", "320", "--n_ppl", "2", "--kinds", "ppl", "--methods", "knorm", "--ratios", "0.5"]
TINY_GROUPS = '{"q_group_size": 16}'  # the tiny model's heads have 16 dimensions


@pytest.fixture
def grid(capsys, tiny_model_dir, data_dir, tmp_path):
    def run(*extra, output=tmp_path / "out"):
        return cli_error(capsys, "grid", "--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", output,
                       *FAST, *extra)  # fmt: skip

    return run


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kv_quant", "int4"], "unknown kv_quant 'int4'; choose from none, fp8, quanto-int4"),
        (["--kv_quant", "hqq-int4", "--kv_quant_options", '{"q_group_size": 12}'],
         "q_group_size 12 does not divide the model's head dimension 16"),
        (["--kv_quant", "hqq-int4"], "q_group_size 64 does not divide the model's head dimension 16"),
        (["--kv_quant", "quanto-int4", "--kv_quant_options", '{"axis_key": 1}'],
         "axis_key for the quanto backend must be one of [0, -1]; got 1"),
        (["--kv_quant", "fp8", "--kv_quant_options", '{"bits": 4}'], "unknown kv_quant option(s) ['bits']"),
    ],
)  # fmt: skip
def test_bad_precisions_fail_with_one_line_and_touch_nothing(grid, tmp_path, flags, message):
    code, err = grid(*flags)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out" / "cells").exists()


def test_a_missing_backend_names_the_package(grid, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "hqq" else real(name, *a))
    code, err = grid("--kv_quant", "hqq-int4", "--kv_quant_options", TINY_GROUPS)
    assert code == 2 and "kv_quant hqq-int4 needs the package hqq: pip install hqq" in err, err


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    value=st.one_of(
        st.sampled_from(precision_names()), st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", max_size=12)
    )
)
def test_precision_fuzzing(capsys, tmp_path, monkeypatch, value):
    """Any value: past validation to the (missing) model, or one line naming kv_quant and what is allowed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = cli_error(capsys, "grid", "--model", str(tmp_path / "no-model"), "--output_dir", tmp_path / "o",
                        f"--kv_quant={value}")  # fmt: skip
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert ("no-model" in err) == (value in precision_names()), err
    assert not (tmp_path / "o" / "cells").exists()


def test_two_precision_variants_side_by_side(grid, tmp_path):
    """The same precision with two group sizes: two results, each run's table holds its own."""
    tables = {}
    for groups in ('{"q_group_size": 16}', '{"q_group_size": 8}'):
        code, err = grid("--kv_quant", "hqq-int2", "--kv_quant_options", groups)
        assert code == 0, err
        table = pd.read_csv(tmp_path / "out" / "tiny-gpt-neox_wikitext_kv_metrics.csv")
        tables[groups] = table.set_index(["method", "kv_quant"])["ppl"]
        assert sorted(table["kv_quant"]) == ["hqq-int2", "hqq-int2", "none"]  # the float baseline is always there
    cells = list((tmp_path / "out" / "cells").rglob("*hqq-int2-*.json"))
    assert len(cells) == 4  # none and knorm at each group size
    first, second = tables.values()
    assert first[("none", "none")] == second[("none", "none")]  # the float rows are shared results
    assert first[("knorm", "hqq-int2")] != second[("knorm", "hqq-int2")]


def test_a_corrupt_quantized_cell_is_named(grid, tmp_path):
    assert grid("--kv_quant", "fp8")[0] == 0
    cell = next((tmp_path / "out" / "cells").rglob("knorm_0.5_fp8-*.json"))
    cell.write_text(json.dumps({"kind": "ppl"}))
    code, err = grid("--kv_quant", "fp8")
    assert code == 2 and str(cell) in err and "is not a kvlib result" in err, err


def test_sigkill_then_resume_of_a_quantized_run(tiny_model_dir, data_dir, tmp_path):
    args = [sys.executable, "-m", "kvlib", "grid", "--model", str(tiny_model_dir), "--data_dir", str(data_dir),
            *FAST, "--kv_quant", "fp8", "quanto-int4", "--kv_quant_options", TINY_GROUPS]  # fmt: skip
    clean, killed = killed_and_resumed(args, tmp_path)
    columns = ["method", "compression_ratio", "kv_quant", "ppl", "ppl_delta", "kv_bytes", "kv_bytes_ratio"]
    name = "tiny-gpt-neox_wikitext_kv_metrics.csv"
    pd.testing.assert_frame_equal(pd.read_csv(killed / name)[columns], pd.read_csv(clean / name)[columns])
    assert len(pd.read_csv(clean / name)) == 5  # the float baseline, and none + knorm at each precision
