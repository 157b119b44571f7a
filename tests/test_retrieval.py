"""Needle retrieval: prompts at token level, scoring, seeding, early refusal of bad settings, the shared prefill,
the command line with its Wilson intervals, and resume."""

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from test_shared_prefill import presses as all_presses
from tiny_models import VOCAB, tiny_model

from kvlib import cli, study
from kvlib.analysis import retrieval as analysis
from kvlib.analysis.stats import wilson_interval
from kvlib.measure import retrieval
from kvlib.presses import load_press


def occurrences(haystack: np.ndarray, needle: np.ndarray) -> list[int]:
    n = len(needle)
    return [i for i in range(len(haystack) - n + 1) if np.array_equal(haystack[i : i + n], needle)]


@pytest.fixture
def windows() -> np.ndarray:
    # Random token ids that are not digits, spaces or the needle's words (so the needle can only occur once).
    return np.random.default_rng(0).integers(20_000, 40_000, size=(3, 400))


def settings(**changes) -> study.Settings:
    return replace(study.Settings(max_length=400, depths=[0.0, 0.25, 0.5, 1.0], trials=2), **changes)


# ---------------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_once_at_its_depth_and_the_question_after_the_context(smollm2_tokenizer, windows, depth):
    trial = retrieval.build_trial(smollm2_tokenizer, windows, 400, trial=4, depth=depth, seed=7)
    needle = retrieval._tokens(smollm2_tokenizer, retrieval.NEEDLE.format(value=trial.value))
    question = retrieval._tokens(smollm2_tokenizer, retrieval.QUESTION)
    assert len(trial.context) + len(trial.question) == 400
    available = 400 - len(needle) - len(question)
    assert trial.needle_position == int(depth * available)
    assert occurrences(trial.context, needle) == [trial.needle_position]
    assert np.array_equal(trial.question, question)
    window = windows[4 % 3]  # trial t takes window t % n_windows
    assert np.array_equal(trial.context[: trial.needle_position], window[: trial.needle_position])
    assert np.array_equal(
        trial.context[trial.needle_position + len(needle) :], window[trial.needle_position : available]
    )
    assert 5 <= len(trial.value) <= 7 and trial.value.isdigit() and trial.value[0] != "0"
    assert trial.value in smollm2_tokenizer.decode(trial.context)


def test_question_aware_puts_the_question_at_the_end_of_the_context(smollm2_tokenizer, windows):
    agnostic = retrieval.build_trial(smollm2_tokenizer, windows, 400, 1, 0.5, seed=0)
    aware = retrieval.build_trial(smollm2_tokenizer, windows, 400, 1, 0.5, seed=0, question_aware=True)
    assert len(aware.context) == 400 and len(aware.question) == 0
    assert np.array_equal(aware.context, np.concatenate([agnostic.context, agnostic.question]))


def test_question_and_answer_tokens_get_their_true_positions(monkeypatch):
    """After a pruned context the question continues at the uncompressed context length, decoding after it."""
    model = tiny_model("llama")
    rng = np.random.default_rng(0)
    trial = retrieval.Trial(0, 0.5, "12345", 30, 0, rng.integers(0, VOCAB, 80), rng.integers(0, VOCAB, 6))
    starts = []
    real_extend = retrieval.extend

    def recording(model, ids, cache, start):
        starts.append((start, ids.shape[1]))
        return real_extend(model, ids, cache, start)

    monkeypatch.setattr(retrieval, "extend", recording)
    answer = retrieval.shared_trial_answers(model, trial, {"knorm": load_press("knorm", 0.5)}, answer_tokens=4)["knorm"]
    assert answer["cache_length"] == 40  # half of the 80 context tokens kept...
    assert starts == [(80, 6), (86, 1), (87, 1), (88, 1)]  # ...yet the question starts at position 80


def test_scoring_is_the_pass_key_in_the_answer():
    assert retrieval.is_correct("48213", " 48213. Remember")
    assert retrieval.is_correct("48213", "The key: 48213")
    assert not retrieval.is_correct("48213", " 4821 3")
    assert not retrieval.is_correct("48213", " 48231")


def test_same_seed_same_trials_other_seed_other_needles(smollm2_tokenizer, windows):
    first = retrieval.trials(smollm2_tokenizer, windows, settings(seed=3))
    again = retrieval.trials(smollm2_tokenizer, windows, settings(seed=3))
    other = retrieval.trials(smollm2_tokenizer, windows, settings(seed=4))
    assert len(first) == 4 * 2 and [t.depth for t in first] == [0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 1.0, 1.0]
    for a, b in zip(first, again, strict=True):
        assert (a.value, a.depth, a.needle_position, a.window) == (b.value, b.depth, b.needle_position, b.window)
        assert np.array_equal(a.context, b.context) and np.array_equal(a.question, b.question)
    assert [t.value for t in first] != [t.value for t in other]
    assert len({t.value for t in first}) == len(first)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"depths": [0.5, 1.5]}, r"every depth must be a number in \[0, 1\].*got 1.5"),
        ({"depths": []}, "depths must be a non-empty list"),
        ({"trials": 0}, "trials must be an integer >= 1; got 0"),
        ({"answer_tokens": 0}, "answer_tokens must be an integer >= 1; got 0"),
        ({"question_aware": "yes"}, "question_aware must be true or false"),
        ({"lengths": [100]}, r"retrieval context length 100 is too short: .* need 1\d\d tokens"),
    ],
)
def test_bad_settings_are_refused_before_anything_loads(changes, message):
    with pytest.raises(ValueError, match=message):
        study.validate(replace(study.Settings(), **changes), ["knorm"], [0.5], ["retrieval"])


def test_a_press_needing_a_longer_context_is_refused():
    long_window = study.Settings(lengths=[1024, 140], press_options={"snapkv": {"window_size": 512}})
    with pytest.raises(
        ValueError,
        match=r"context length 1024 compresses up to 9\d\d tokens .*: snapkv press needs a prefix of at least",
    ):
        study.validate(long_window, ["snapkv"], [0.5], ["retrieval"])


# ----------------------------------------------------------------------------------------------- shared prefill


# 0 question tokens: question-aware (decoding right after the prefill); gemma3 has sliding-window layers too.
@pytest.mark.parametrize("arch, question", [("llama", 6), ("llama", 0), ("gemma3", 6)])
def test_shared_prefill_gives_the_answers_of_prefilling_under_each_press(arch, question):
    model = tiny_model(arch)
    rng = np.random.default_rng(1)
    trial = retrieval.Trial(0, 0.5, "1", 30, 0, rng.integers(0, VOCAB, 72), rng.integers(0, VOCAB, question))
    shared = retrieval.shared_trial_answers(model, trial, all_presses(0.5), answer_tokens=4)
    for label, press in all_presses(0.5).items():
        alone = retrieval.trial_answer(model, trial, press, answer_tokens=4)
        assert alone["tokens"] == shared[label]["tokens"], label
        assert torch.equal(alone["logits"], shared[label]["logits"]), label
        assert alone["kv_bytes"] == shared[label]["kv_bytes"], label


# ------------------------------------------------------------------------------------------------ table, CLI


def test_wilson_interval_known_values():
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)  # the classic example
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    low, high = wilson_interval(20, 40)
    assert low == pytest.approx(1 - high) and low == pytest.approx(0.3520, abs=1e-4)
    with pytest.raises(ValueError, match="correct must be in"):
        wilson_interval(5, 4)


def test_grid_retrieval_writes_the_table_with_wilson_intervals_and_resumes(capsys, tiny_model_dir, data_dir,
                                                                          tmp_path):  # fmt: skip
    argv = ["grid", "--kinds", "retrieval", "--model", tiny_model_dir, "--data_dir", data_dir, "--output_dir",
            tmp_path, "--max_samples", "3", "--methods", "knorm", "snapkv", "--ratios", "0.5", "--lengths", "256",
            "320", "--depths", "0.2", "0.8", "--trials", "2", "--answer_tokens", "3"]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    table = pd.read_csv(tmp_path / "tiny-gpt-neox_wikitext_kv_retrieval.csv", dtype={"length": str})
    assert list(table.columns[: len(analysis.TABLE_COLUMNS)]) == analysis.TABLE_COLUMNS
    assert list(zip(table.method, table.length, strict=True)) == [
        (m, length) for m in ("none", "knorm", "snapkv") for length in ("256", "320", "all")
    ]
    for row in table.itertuples():
        assert row.n_trials == (8 if row.length == "all" else 4)
        assert (row.ci_low, row.ci_high) == pytest.approx(wilson_interval(row.correct, row.n_trials))
        assert row.accuracy == pytest.approx(row.correct / row.n_trials)
    assert set(table.depths) == {"[0.2, 0.8]"} and set(table.trials) == {2}
    records = pd.read_csv(tmp_path / "tiny-gpt-neox_wikitext_kv_retrieval_records.csv", dtype={"needle": str})
    assert len(records) == 3 * 2 * 4
    assert all(n in a for n, a, c in zip(records.needle, records.answer.fillna(""), records.correct, strict=True) if c)
    assert (records.context_length + records.question_length == records.length).all()
    pressed = records[records.method != "none"]
    assert (pressed.kv_bytes < records[records.method == "none"].kv_bytes.max()).all()

    cells = {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").rglob("*.json")}
    assert len(cells) == 3 * 2
    assert cli.main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert err.count("0 cell(s) to run, 3 already done") == 2, err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").rglob("*.json")} == cells


def test_retrieval_analysis_imports_without_torch():
    code = "import kvlib.analysis.retrieval, sys; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
