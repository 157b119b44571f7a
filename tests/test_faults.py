"""Fault injection: results never mix, never silently vanish, and bad input gets a one-line message.

Each case asserts the exit code, the message, and that no finished result was lost or mixed (tiny models)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from cli_run import cli_error
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvlib.models import write_tiny_model
from kvlib.study import output_lock

FAST = ["--n_ppl", "2", "--n_timing", "2", "--warmup_times", "1", "--gen_tokens", "3", "--kinds", "ppl"]
REPO = Path(__file__).resolve().parents[1]


def table(folder: Path, model: str = "tiny-gpt-neox", dataset: str = "wikitext") -> pd.DataFrame:
    return pd.read_csv(folder / f"{model}_{dataset}_kv_metrics.csv")


def cell_files(folder: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (folder / "cells").rglob("*.json")}


@pytest.fixture
def grid(capsys, tiny_model_dir, data_dir, tmp_path):
    def run(*extra, model=tiny_model_dir, output=tmp_path / "out"):
        return cli_error(
            capsys, "grid", "--model", model, "--data_dir", data_dir, "--output_dir", output, *FAST, *extra
        )

    return run


def test_a_partial_rerun_with_other_settings_never_mixes_tables(grid, tmp_path):
    out = tmp_path / "out"
    code, err = grid("--max_length", "640", "--methods", "knorm", "snapkv", "--ratios", "0.5")
    assert code == 0, err
    first = table(out)
    stored = cell_files(out)
    code, err = grid("--max_length", "512", "--methods", "knorm", "--ratios", "0.5")
    assert code == 0, err
    second = table(out)
    assert list(second.method) == ["none", "knorm"] and set(second.max_length) == {512}
    assert all(path.exists() for path in stored), "the 640-token results are still there"
    # Back to the first settings: nothing to measure, and the table is the first one again.
    code, err = grid("--max_length", "640", "--methods", "knorm", "snapkv", "--ratios", "0.5")
    assert code == 0 and "0 cell(s) to run, 3 already done" in err
    again = table(out)
    pd.testing.assert_frame_equal(again.drop(columns="created_at"), first.drop(columns="created_at"))
    for row in again.itertuples():
        assert row.ppl_delta_ci_low <= row.ppl_delta <= row.ppl_delta_ci_high


def test_models_with_the_same_folder_name_never_share_results(grid, tmp_path, smollm2_tokenizer):
    a = write_tiny_model(str(tmp_path / "runA" / "checkpoint-500"), seed=0)
    b = write_tiny_model(str(tmp_path / "runB" / "checkpoint-500"), seed=1)
    code, err = grid("--model", a, "--methods", "knorm", "--ratios", "0.5", "--max_length", "320")
    assert code == 0, err
    ppl_a = table(tmp_path / "out", "checkpoint-500").set_index("method").ppl
    code, err = grid("--model", b, "--methods", "knorm", "--ratios", "0.5", "--max_length", "320")
    assert code == 0 and "2 cell(s) to run, 0 already done" in err
    ppl_b = table(tmp_path / "out", "checkpoint-500").set_index("method").ppl
    assert (ppl_a != ppl_b).all()
    assert len(cell_files(tmp_path / "out")) == 4
    # New weights at the same path are measured again.
    write_tiny_model(str(tmp_path / "runA" / "replacement"), seed=2)
    shutil.rmtree(a)
    (tmp_path / "runA" / "replacement").rename(a)
    code, err = grid("--model", a, "--methods", "knorm", "--ratios", "0.5", "--max_length", "320")
    assert code == 0 and "2 cell(s) to run, 0 already done" in err


def test_ratios_are_identified_exactly(grid, tmp_path):
    out = tmp_path / "out"
    args = ("--methods", "random", "--max_length", "320")
    assert grid(*args, "--ratios", "0.5")[0] == 0
    code, err = grid(*args, "--ratios", "0.5000001")
    assert code == 0 and "1 cell(s) to run, 1 already done" in err
    assert len([p for p in cell_files(out) if p.name.startswith("random_0.5-")]) == 2
    code, err = grid(*args, "--ratios", "0.5")
    assert code == 0 and "0 cell(s) to run, 2 already done" in err
    assert list(table(out).compression_ratio) == [0.0, 0.5, 0.5000001]  # one row each, never merged


@pytest.mark.parametrize(
    "options, message",
    [
        ({"streaming_llm": {"n_sink": -5}}, "streaming_llm press option n_sink must be an integer >= 0; got -5"),
        ({"snapkv": {"window_size": -5}}, "snapkv press option window_size must be an integer >= 1; got -5"),
        ({"snapkv": {"window_size": 0}}, "snapkv press option window_size must be an integer >= 1; got 0"),
        ({"snapkv": {"window_size": "abc"}}, "snapkv press option window_size must be an integer >= 1; got 'abc'"),
        ({"snapkv": {"kernel_size": 4}}, "snapkv press option kernel_size must be an integer >= 1 odd; got 4"),
        ({"lagkv": {"lag_size": 0}}, "lagkv press option lag_size must be an integer >= 1; got 0"),
        ({"knorm": []}, "press_options for 'knorm' must be an object of options; got []"),
    ],
)
def test_bad_press_options_fail_before_anything_loads(capsys, tmp_path, options, message):
    code, err = cli_error(capsys, "grid", "--model", "no/such-model", "--output_dir", tmp_path / "out",
                        "--press_options", json.dumps(options))  # fmt: skip
    assert code == 2 and err.strip() == f"error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_length", "2"], "max_length 2 with prefix_ratio 0.5 splits a window into 1 prefix and 1 suffix"),
        (["--prefix_ratio", "0.9999"], "splits a window into 1023 prefix and 1 suffix tokens"),
        (["--device", "cuda"], "device 'cuda' is not available"),
        (["--device", "tpu7"], "unknown device 'tpu7'"),
        (["--n_ppl", "0"], "n_ppl must be an integer >= 1; got 0"),
    ],
)
def test_bad_settings_fail_with_one_line(capsys, tmp_path, flags, message):
    code, err = cli_error(capsys, "grid", "--model", "no/such-model", "--output_dir", tmp_path / "out", *flags)
    assert code == 2 and message in err and err.count("\n") == 1, err


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flag=st.sampled_from(["--max_length", "--n_ppl", "--n_timing", "--gen_tokens", "--warmup_times", "--max_samples"]),
    value=st.integers(min_value=-(2**40), max_value=2**40),
)
def test_numeric_flags_never_give_a_traceback(capsys, tmp_path, monkeypatch, flag, value):
    """Any integer: either a one-line message naming the flag, or past validation to the (missing) model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = cli_error(capsys, "grid", "--model", str(tmp_path / "no-model"), "--output_dir", tmp_path / "o",
                        flag, str(value))  # fmt: skip
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert any(word in err for word in (flag.strip("-"), "no-model", "exceeds", "prefix")), err


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["knorm", "snapkv", "streaming_llm", "lagkv", "random"]),
    option=st.sampled_from(["window_size", "kernel_size", "n_sink", "lag_size", "seed"]),
    value=st.one_of(st.integers(-1000, 1000), st.floats(allow_nan=True), st.text(max_size=5), st.booleans()),
)
def test_press_option_fuzzing(name, option, value):
    """A press either builds with a valid value, or says which option, which value and what is allowed."""
    import kvlib

    try:
        press = kvlib.load_press(name, compression_ratio=0.5, **{option: value})
    except ValueError as error:
        assert option in str(error) and (repr(value) in str(error) or "unknown option" in str(error))
    else:
        assert getattr(press, option) == value and not isinstance(value, (bool, str))


@pytest.mark.parametrize("content", [b"5", b"{}", b"\xff\xfe not utf-8", b'{"kind": "ppl"'])
def test_a_foreign_or_corrupt_cell_file_is_named(grid, tmp_path, content):
    out = tmp_path / "out"
    assert grid("--methods", "knorm", "--ratios", "0.5", "--max_length", "320")[0] == 0
    victim = sorted(cell_files(out))[0]
    others = {p: p.read_bytes() for p in cell_files(out) if p != victim}
    victim.write_bytes(content)
    code, err = grid("--methods", "knorm", "--ratios", "0.5", "--max_length", "320")
    assert code == 2 and str(victim) in err and err.count("\n") == 1, err
    assert all(p.read_bytes() == data for p, data in others.items())


@pytest.mark.parametrize("content", [b"", b"\n \n", b"caf\xe9\n"])
def test_bad_text_files_are_named(capsys, tiny_model_dir, data_dir, tmp_path, content):
    local = tmp_path / "data"
    shutil.copytree(data_dir / "pg19", local / "pg19")
    (local / "wikitext-2-raw-v1").mkdir()
    (local / "wikitext-2-raw-v1" / "wiki.test.raw").write_bytes(content)
    code, err = cli_error(capsys, "grid", "--model", tiny_model_dir, "--data_dir", local, "--output_dir",
                        tmp_path / "out", *FAST)  # fmt: skip
    assert code == 2 and "wiki.test.raw" in err and err.count("\n") == 1, err


def test_every_dataset_is_checked_before_the_first_is_measured(capsys, tiny_model_dir, data_dir, tmp_path):
    local = tmp_path / "data"
    shutil.copytree(data_dir / "wikitext-2-raw-v1", local / "wikitext-2-raw-v1")
    (local / "pg19" / "test").mkdir(parents=True)  # no books
    code, err = cli_error(capsys, "grid", "--model", tiny_model_dir, "--data_dir", local, "--dataset", "all",
                        "--output_dir", tmp_path / "out", *FAST)  # fmt: skip
    assert code == 2 and "no PG-19 books" in err
    assert not (tmp_path / "out" / "cells").exists()


def test_plot_refuses_a_foreign_csv(capsys, tmp_path):
    foreign = tmp_path / "other.csv"
    foreign.write_text("a,b\n1,2\n")
    code, err = cli_error(capsys, "plot", "--csv", foreign)
    assert code == 2 and f"{foreign} is not a kvlib metrics table" in err


def test_two_runs_on_one_output_directory(grid, tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        os.environ.pop("KVLIB_HELD_LOCK")  # as another process would see it
        code, err = grid("--methods", "knorm", "--ratios", "0.5", "--max_length", "320")
    assert code == 2 and "another kvlib run is writing to" in err and f"pid {os.getpid()}" in err
    assert not (out / "cells").exists()


def test_leftovers_of_a_killed_run_are_removed(grid, tmp_path):
    out = tmp_path / "out"
    leftover = out / "cells" / "x" / ".knorm_0.5-abc.json.k2j3.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("{")
    half_dir = out / "model" / ".tiny.u8x.tmp"
    half_dir.mkdir(parents=True)
    assert grid("--methods", "knorm", "--ratios", "0.5", "--max_length", "320")[0] == 0
    assert not leftover.exists() and not half_dir.exists()


def test_a_tiny_model_killed_while_written_leaves_nothing(tmp_path, smollm2_tokenizer, monkeypatch):
    from transformers import PreTrainedModel

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        write_tiny_model(str(tmp_path / "tiny"))
    assert not (tmp_path / "tiny").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("kill_after", ["measuring", "2 cell(s)"])
def test_sigkill_then_resume_gives_the_same_table(tiny_model_dir, data_dir, tmp_path, kill_after):
    """Kill the grid with SIGKILL at a chosen point, resume, and compare with an uninterrupted run."""
    args = [sys.executable, "-m", "kvlib", "grid", "--model", str(tiny_model_dir), "--data_dir", str(data_dir),
            "--max_length", "320", "--methods", "knorm", "snapkv", "--ratios", "0.3", "0.6", *FAST]  # fmt: skip
    clean = tmp_path / "clean"
    subprocess.run([*args, "--output_dir", str(clean)], check=True, capture_output=True, cwd=REPO, timeout=300)

    killed = tmp_path / "killed"
    process = subprocess.Popen([*args, "--output_dir", str(killed)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    marker = "[wikitext ppl]" if kill_after == "measuring" else "loading"
    for line in process.stderr:
        if marker in line or time.monotonic() > deadline:
            break
    if kill_after != "measuring":
        while not list((killed / "cells").rglob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    resumed = subprocess.run([*args, "--output_dir", str(killed)], capture_output=True, text=True, cwd=REPO,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    columns = ["method", "compression_ratio", "ppl", "ppl_delta", "ppl_delta_ci_low", "ppl_delta_ci_high"]
    pd.testing.assert_frame_equal(table(killed)[columns], table(clean)[columns])
    assert not list(killed.rglob(".*.tmp"))
