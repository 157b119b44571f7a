"""Reliability, round three (issue 22): no hang, no silent drop, no traceback, and a rejected run leaves nothing.

Each case asserts the exit code or the error, and the message naming what is wrong (file, column, row; address)."""

import csv
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from cli_run import run_cli

from kvlib import cli

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
FAST = ["--n_ppl", "2", "--n_timing", "2", "--warmup_times", "0", "--gen_tokens", "3", "--max_samples", "2",
        "--pg19_max_chars", "60000"]  # fmt: skip


def free_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------------- 1. an unreachable Ray cluster


def test_unreachable_ray_address_fails_naming_it_and_touches_nothing(capsys, tiny_model_dir, data_dir, tmp_path):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "grid", "--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", out,
                           "--executor", "ray", "--address", address, "--ray_timeout", "2", "--methods", "knorm",
                           "--ratios", "0.5", "--kinds", "ppl", *FAST)  # fmt: skip
    assert code == 2, err
    assert err.count("\n") == 1 and f"cannot reach the Ray cluster at {address} within 2 s" in err, err
    assert not out.exists()


def test_a_study_with_an_unreachable_ray_address_fails_before_its_output_exists(capsys, tmp_path):
    pytest.importorskip("ray")
    address = f"127.0.0.1:{free_port()}"
    out = tmp_path / "smoke"
    code, _, err = run_cli(capsys, "study", "--preset", "smoke", "--output_dir", out, "--executor", "ray",
                           "--address", address, "--ray_timeout", "1")  # fmt: skip
    assert code == 2 and f"cannot reach the Ray cluster at {address} within 1 s" in err, err
    assert not out.exists()


def test_check_address_accepts_a_listening_port_and_skips_auto():
    from kvlib.study.executors import ClusterUnreachable, check_address

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_address(f"127.0.0.1:{server.getsockname()[1]}", timeout=2)
        check_address(f"ray://127.0.0.1:{server.getsockname()[1]}", timeout=2)
    check_address("auto", timeout=1)  # Ray finds the cluster itself: nothing to probe
    with pytest.raises(ClusterUnreachable, match=r"cannot reach the Ray cluster at 127\.0\.0\.1:\d+ within 1 s"):
        check_address(f"127.0.0.1:{free_port()}", timeout=1)


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf"])
def test_ray_timeout_must_be_positive_seconds(capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["grid", "--executor", "ray", "--ray_timeout", value])
    assert exit_info.value.code == 2
    assert f"must be a number of seconds > 0; got {value!r}" in capsys.readouterr().err


# ----------------------------------------------------- 3. a failed task's report survives a table-rebuild error


def test_failed_task_report_survives_a_rebuild_error(capsys, monkeypatch, tiny_model_dir, data_dir, tmp_path):
    """A task fails, then rebuilding the tables raises for one dataset: both are reported, the other dataset's
    tables are written, and the exit code is 1 (tasks failed), not 2."""
    from kvlib.study import executors

    def ray_run(tasks, output_dir, device="cpu", cpus=1, address=None, log=print, started=None, timeout=30):
        return [], {"pg19 ppl": "RuntimeError: worker died"}

    rebuilt = tmp_path / "out" / "tiny-gpt-neox_wikitext_kv_metrics.csv"

    def rebuild(settings, methods, ratios, kinds):
        if settings.dataset in ("all", "pg19"):
            raise FileNotFoundError(f"windows of {settings.dataset} are gone")
        return [rebuilt]

    monkeypatch.setattr(executors, "run_on_ray", ray_run)
    monkeypatch.setattr(executors, "rebuild_tables", rebuild)
    code, out, err = run_cli(capsys, "grid", "--model", tiny_model_dir, "--data_dir", data_dir, "--dataset", "all",
                             "--output_dir", tmp_path / "out", "--executor", "ray", "--methods", "knorm", "--ratios",
                             "0.5", "--kinds", "ppl", *FAST)  # fmt: skip
    assert code == 1, err
    assert "pg19 ppl: RuntimeError: worker died" in err
    assert "tables of pg19: windows of pg19 are gone" in err
    assert str(rebuilt) in out


# --------------------------------------------------------------- 2 and 4. tables edited by hand, named on load


def _copy_results(tmp_path: Path, pattern: str) -> list[Path]:
    paths = sorted(RESULTS.glob(pattern))
    if not paths:
        pytest.skip(f"no committed results matching {pattern} in {RESULTS}")
    return [Path(shutil.copy(p, tmp_path / p.name)) for p in paths]


def _edit(path: Path, column: str, row: int | None = None, value: str | None = None, rename: str | None = None):
    """Edit a CSV as a person would: set one cell (row counted from 1 after the header), rename or drop a column."""
    with open(path, newline="") as handle:
        lines = list(csv.reader(handle))
    index = lines[0].index(column)
    if rename is not None:
        lines[0][index] = rename
    elif row is None:
        lines = [line[:index] + line[index + 1 :] for line in lines]
    else:
        lines[row][index] = value
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(lines)


def _read_retrieval(folder):
    from kvlib.analysis import retrieval

    return retrieval.read_retrieval(folder)


def _read_scaling(folder):
    from kvlib.analysis import scaling

    return scaling.read_tables(folder)


def _read_metrics(folder):
    from kvlib.analysis import tables

    return tables.read_tables(folder)


def _read_window_records(folder):
    transfer = pytest.importorskip("kvlib.analysis.transfer")
    return [transfer.ppl_records(path) for path in sorted(Path(folder).glob("*_kv_windows.csv"))]


CASES = {
    "retrieval column removed": ("*_kv_retrieval*.csv", "_kv_retrieval.csv", "accuracy", None, None, None,
                                 _read_retrieval, r"column 'accuracy' is missing"),
    "retrieval column renamed": ("*_kv_retrieval*.csv", "_kv_retrieval.csv", "accuracy", None, None, "acc",
                                 _read_retrieval, r"column 'accuracy' is missing"),
    "retrieval accuracy not a number": ("*_kv_retrieval*.csv", "_kv_retrieval.csv", "accuracy", 2, "high", None,
                                        _read_retrieval, r"column 'accuracy', row 2 \(line 3\): 'high' is not a"),
    "retrieval accuracy NaN": ("*_kv_retrieval*.csv", "_kv_retrieval.csv", "accuracy", 3, "nan", None,
                               _read_retrieval, r"column 'accuracy', row 3 \(line 4\) is empty or NaN"),
    "retrieval accuracy emptied": ("*_kv_retrieval*.csv", "_kv_retrieval.csv", "accuracy", 3, "", None,
                                   _read_retrieval, r"column 'accuracy', row 3 \(line 4\) is empty or NaN"),
    "retrieval accuracy out of range": ("*_kv_retrieval*.csv", "_kv_retrieval.csv", "accuracy", 1, "1.5", None,
                                        _read_retrieval, r"column 'accuracy', row 1 \(line 2\): 1.5 is out of range"),
    "retrieval records correct edited": ("*_kv_retrieval*.csv", "_kv_retrieval_records.csv", "correct", 4, "maybe",
                                         None, _read_retrieval, r"column 'correct', row 4 \(line 5\): 'maybe'"),
    "sweep column removed": ("*_kv_scaling*.csv", "_kv_scaling.csv", "tpot", None, None, None, _read_scaling,
                             r"column 'tpot' is missing"),
    "sweep tpot not a number": ("*_kv_scaling*.csv", "_kv_scaling.csv", "tpot", 5, "fast", None, _read_scaling,
                                r"column 'tpot', row 5 \(line 6\): 'fast' is not a number"),
    "sweep length not an integer": ("*_kv_scaling*.csv", "_kv_scaling.csv", "context_length", 2, "1024.5", None,
                                    _read_scaling, r"column 'context_length', row 2 \(line 3\): 1024.5 is not an"),
    "metrics ppl not a number": ("*_kv_metrics.csv", "pg19_kv_metrics.csv", "ppl", 3, "abc", None, _read_metrics,
                                 r"column 'ppl', row 3 \(line 4\): 'abc' is not a number"),
    "metrics method emptied": ("*_kv_metrics.csv", "pg19_kv_metrics.csv", "method", 2, "", None, _read_metrics,
                               r"column 'method', row 2 \(line 3\) is empty or NaN"),
    "window records nll not a number": ("*_kv_windows.csv", "pg19_kv_windows.csv", "nll_sum", 7, "lots", None,
                                        _read_window_records, r"column 'nll_sum', row 7 \(line 8\): 'lots' is not"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_table_edited_by_hand_is_named_with_file_column_and_row(tmp_path, case):
    pattern, suffix, column, row, value, rename, read, message = CASES[case]
    copied = _copy_results(tmp_path, pattern)
    target = next(p for p in copied if p.name.endswith(suffix))
    _edit(target, column, row, value, rename)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(target))}(:| is not a kvlib [a-z ]+:) {message}"):
        read(tmp_path)


def test_committed_tables_pass_validation(tmp_path):
    for pattern in ("*_kv_metrics.csv", "*_kv_retrieval*.csv", "*_kv_scaling*.csv"):
        _copy_results(tmp_path, pattern)
    assert len(_read_metrics(tmp_path)) and len(_read_scaling(tmp_path)) and len(_read_retrieval(tmp_path)[0])


@pytest.mark.parametrize("column, value", [("ppl", "abc"), ("tpot", "fast")])
def test_plot_refuses_a_non_numeric_cell_naming_it(capsys, tmp_path, column, value):
    (csv_path,) = [p for p in _copy_results(tmp_path, "smollm2_pg19_kv_metrics.csv")]
    rows = len(pd.read_csv(csv_path))
    _edit(csv_path, column, 3, value)
    code, out, err = run_cli(capsys, "plot", "--csv", csv_path)
    assert code == 2 and not out, err
    assert f"{csv_path}: column {column!r}, row 3 (line 4): {value!r} is not a number" in err
    assert rows == len(pd.read_csv(csv_path)) and not (tmp_path / "plots").exists()


# ------------------------------------------------------------------------- 5. the ratio axis with one ratio


def test_ratio_axis_shows_the_only_ratio_measured(tmp_path):
    vl_convert = pytest.importorskip("vl_convert")
    from kvlib.analysis import charts

    (csv_path,) = _copy_results(tmp_path, "smollm2_pg19_kv_metrics.csv")
    table = pd.read_csv(csv_path)
    table = table[table.compression_ratio.isin([0.0, 0.5])]
    for chart in (charts.ppl_chart(table, interactive=False), charts.speed_chart(table, "tpot", interactive=False)):
        svg = vl_convert.vegalite_to_svg(chart.to_dict())
        labels = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
        axis = labels[: labels.index("compression ratio (fraction of prefix KV removed)")]
        assert "0.5" in axis and "1" not in axis, axis


# ------------------------------------------------------- 6. a rejected run leaves the file system as it was


@pytest.mark.parametrize("existing", [False, True])
def test_a_run_rejected_in_planning_creates_no_folder_and_no_lock(capsys, tiny_model_dir, data_dir, tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    code, _, err = run_cli(capsys, "scaling", "--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir", out,
                           "--lengths", "256", "4096", "--methods", "knorm", *FAST)  # fmt: skip
    assert code == 2 and "context of 2048 tokens" in err, err
    assert (list(out.iterdir()) == []) if existing else not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [(["--lengths", "2", "--gen_tokens", "2"], "scaling context length 2 is too short: it must exceed gen_tokens (2)"),
     (["--lengths", "64", "--ratios", "0.01"], "too short for knorm at ratio 0.01: it removes no position there")],
)  # fmt: skip
def test_the_sweep_refuses_lengths_where_nothing_is_measured(capsys, tiny_model_dir, tmp_path, argv, message):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "scaling", "--model", tiny_model_dir, "--output_dir", out, "--methods", "knorm",
                           "--n_timing", "1", "--warmup_times", "0", *argv)  # fmt: skip
    assert code == 2 and message in err and "loading" not in err, err
    assert not out.exists()


def test_a_failed_locked_run_removes_only_what_it_created(tmp_path):
    from kvlib.study import output_lock

    fresh = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), output_lock(fresh):
        raise RuntimeError("rejected while planning")
    assert list(tmp_path.iterdir()) == []  # the folder, its new parent and the lock file are gone
    existing = tmp_path / "existing"
    (existing / "cells").mkdir(parents=True)
    with pytest.raises(RuntimeError), output_lock(existing):
        raise RuntimeError("rejected")
    assert [p.name for p in existing.iterdir()] == ["cells"]
    with pytest.raises(RuntimeError), output_lock(fresh):
        (fresh / "result.json").write_text("{}")
        raise RuntimeError("failed after writing a result")
    assert sorted(p.name for p in fresh.iterdir()) == ["result.json"]  # what the run wrote stays


def test_plan_run_leaves_the_callers_settings_alone(tiny_model_dir, data_dir, tmp_path):
    from kvlib import study

    settings = study.Settings(model=str(tiny_model_dir), data_dir=str(data_dir), output_dir=str(tmp_path / "out"),
                              max_length=128, max_samples=2, n_ppl=2)  # fmt: skip
    before = replace(settings)
    planned = study.plan_run(settings, ["knorm"], [0.5], ["ppl"])
    assert settings == before and settings.device is None and settings.dtype is None
    assert planned.settings.device == "cpu" and planned.settings.dtype == "float32"
    assert not (tmp_path / "out").exists()  # planning reads, never writes


# ------------------------------------------------------------------------------------------------ code health


def test_the_package_version_is_kvlib_version():
    from setuptools.config.pyprojecttoml import read_configuration

    import kvlib

    assert read_configuration(REPO / "pyproject.toml", expand=True)["project"]["version"] == kvlib.__version__


def test_measure_imports_no_analysis_and_analysis_no_torch():
    code = (
        "import sys, kvlib.measure\n"
        "assert not [m for m in sys.modules if m.startswith('kvlib.analysis')], 'measure imported analysis'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    code = (
        "import sys\n"
        "from kvlib.analysis import tables, validate, report\n"
        "assert set(tables.kind_builders()) == {'scaling', 'retrieval', 'streaming'}\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_timing_fields_and_summaries_are_defined_once():
    from kvlib import stats
    from kvlib.analysis import charts, tables
    from kvlib.analysis import stats as analysis_stats
    from kvlib.measure import latency

    assert latency.TIMING_FIELDS is tables.TIMING_FIELDS is charts.TIME_METRICS is stats.TIMING_FIELDS
    assert analysis_stats.median_iqr is stats.median_iqr and analysis_stats.perplexity is stats.perplexity


def test_a_model_file_is_hashed_once_per_process(monkeypatch, tmp_path):
    from kvlib import models

    calls = []
    monkeypatch.setattr(models, "sha256_file", lambda path: calls.append(Path(path)) or f"digest-{len(calls)}")
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    first = models.fingerprint(str(gguf))
    assert models.fingerprint(str(gguf)) == first and calls == [gguf]
    gguf.write_bytes(b"GGUF" + bytes(65))  # a new version of the file is hashed again
    assert models.fingerprint(str(gguf)) != first and calls == [gguf, gguf]


@pytest.mark.parametrize("notebook", sorted((REPO / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_notebooks_pass_the_output_stripping_filter(notebook):
    """What scripts/notebook_filter.sh makes git store is exactly the file: no outputs, and no key-order churn in
    the next commit of anyone who has the filter."""
    stripped = subprocess.run([sys.executable, "-m", "nbstripout", "--keep-id"], input=notebook.read_bytes(),
                              capture_output=True, check=True, timeout=120).stdout  # fmt: skip
    assert stripped == notebook.read_bytes()
