"""The answer-first summary, the memory-quality chart, the family palette, the explorable table and the progress
display's estimate: from small tables written here (no model, no torch in the analysis)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from kvlib.analysis import charts, report, summary
from kvlib.progress import StudyProgress, group_seconds, stored_seconds_per_cell

REPO = Path(__file__).resolve().parents[1]


def metrics(rows: list[tuple], model: str = "m", dataset: str = "wikitext", **columns) -> pd.DataFrame:
    """(method, ratio, Δ, low, high, kv_bytes_ratio[, kv_quant]) rows plus the baseline."""
    table = [{"method": "none", "compression_ratio": 0.0, "ppl": 20.0, "ppl_delta": 0.0, "ppl_delta_ci_low": 0.0,
              "ppl_delta_ci_high": 0.0, "kv_bytes_ratio": 1.0, "kv_quant": "none"}]  # fmt: skip
    for method, ratio, delta, low, high, memory, *quant in rows:
        table.append({"method": method, "compression_ratio": ratio, "ppl": 20.0 + delta, "ppl_delta": delta,
                      "ppl_delta_ci_low": low, "ppl_delta_ci_high": high, "kv_bytes_ratio": memory,
                      "kv_quant": quant[0] if quant else "none"})  # fmt: skip
    return pd.DataFrame(table).assign(model=model, dataset=dataset, **columns)


def test_the_best_configuration_fits_the_budget_and_names_what_it_cannot_be_told_from():
    table = metrics([
        ("snapkv", 0.5, 0.30, 0.20, 0.40, 0.50),
        ("knorm", 0.5, 0.35, 0.25, 0.45, 0.50),   # overlaps snapkv: not separable
        ("tova", 0.5, 0.90, 0.80, 1.00, 0.50),    # clearly worse
        ("snapkv", 0.3, 0.10, 0.05, 0.15, 0.70),  # better, but over the 50% budget
        ("none", 0.0, 0.05, 0.00, 0.10, 0.50, "quanto-int8"),
    ])  # fmt: skip
    (answer,) = summary.answers(table, budgets=(0.75, 0.5, 0.25))
    at_75, at_50, at_25 = answer.choices
    assert at_75.row["configuration"] == "quanto-int8 cache (no eviction)"
    assert at_50.row["configuration"] == "quanto-int8 cache (no eviction)"
    assert "snapkv at ratio 0.5" not in at_50.tied  # [0.20, 0.40] does not overlap [0.00, 0.10]
    assert at_25.row is None
    # Without the quantised row, snapkv is best at 50% and knorm cannot be told from it; tova can.
    (answer,) = summary.answers(table[table.kv_quant == "none"], budgets=(0.5,))
    (choice,) = answer.choices
    assert choice.row["configuration"] == "snapkv at ratio 0.5"
    assert choice.tied == ["knorm at ratio 0.5"]


def test_tables_without_a_precision_column_are_float_caches_and_memory_is_estimated_where_missing():
    table = metrics([("snapkv", 0.5, 0.3, 0.2, 0.4, math.nan)]).drop(columns="kv_quant")
    table["cache_length"] = [512.0, 256.0]
    rows = summary.configurations(table)
    assert list(rows["kv_quant"]) == ["none", "none"]
    assert rows["kv_bytes_ratio"].tolist() == [1.0, 0.5]
    assert rows["memory_estimated"].tolist() == [False, True]
    (answer,) = summary.answers(table, budgets=(0.5,))
    assert answer.estimated_memory
    assert "50%*" in summary.to_markdown([answer])


def test_pareto_frontier_keeps_only_undominated_rows():
    rows = pd.DataFrame({"kv_bytes_ratio": [0.3, 0.5, 0.5, 0.7, 0.9], "ppl_delta": [4.0, 2.0, 3.0, 2.5, 0.1]})
    frontier = summary.pareto_frontier(rows)
    assert frontier[["kv_bytes_ratio", "ppl_delta"]].values.tolist() == [[0.3, 4.0], [0.5, 2.0], [0.9, 0.1]]


def scaling_rows(speedups: dict[int, float], fit_rms: float = 0.001, tpot: float = 0.1) -> pd.DataFrame:
    rows = [{"model": "m", "dataset": "pg19", "method": "none", "compression_ratio": 0.0, "context_length": n,
             "tpot": tpot, "tpot_speedup": 1.0, "n_timing_runs": 1, "fit_rms": fit_rms} for n in speedups]  # fmt: skip
    rows += [{"model": "m", "dataset": "pg19", "method": "snapkv", "compression_ratio": 0.5, "context_length": n,
              "tpot": tpot / s, "tpot_speedup": s, "n_timing_runs": 1, "fit_rms": fit_rms}
             for n, s in speedups.items()]  # fmt: skip
    return pd.DataFrame(rows)


def test_speed_pays_from_the_length_where_the_gain_exceeds_the_noise_at_every_longer_length():
    table = scaling_rows({1024: 1.005, 2048: 1.30, 4096: 1.005, 8192: 1.5, 16384: 1.8})  # noise: 1% of TPOT
    sentence = summary.where_speed_pays(table, "m", "pg19")
    assert "from 8192 tokens" in sentence and "snapkv at ratio 0.5" in sentence and "1.80×" in sentence
    noisy = scaling_rows({1024: 1.02, 2048: 1.05, 4096: 1.08}, fit_rms=0.01)  # noise 10%: no gain counts
    assert "no press decoded faster" in summary.where_speed_pays(noisy, "m", "pg19")
    two_lengths = scaling_rows({1024: 1.02, 2048: 1.05}).assign(fit_points=2, fit_rms=0.0)  # no scatter to judge by
    assert "noise not measured" in summary.where_speed_pays(two_lengths, "m", "pg19")
    assert "not measured" in summary.where_speed_pays(pd.DataFrame(), "m", "pg19")
    assert "other text" in summary.where_speed_pays(table, "m", "wikitext")
    assert "not measured for other (the context-length sweep ran on m)" in summary.where_speed_pays(
        table, "other", "pg19"
    )


def test_speed_pays_reads_a_press_in_chunks_as_a_series_of_its_own():
    # One pass never gains; read in chunks of 512 the press gains at every length. Grouped with its one-pass rows
    # it would gain or not depending on which row of a length came last.
    one_pass = scaling_rows({1024: 1.0, 2048: 1.0, 4096: 1.0}).assign(prefill_chunk=math.nan)
    chunked = one_pass[one_pass.method == "snapkv"].assign(prefill_chunk=512, tpot_speedup=1.5)
    sentence = summary.where_speed_pays(pd.concat([one_pass, chunked], ignore_index=True), "m", "pg19")
    assert "from 1024 tokens on, snapkv · chunks of 512 at ratio 0.5" in sentence, sentence


def test_the_summary_opens_on_the_answer_that_meets_the_most_budgets():
    fits = metrics([("snapkv", 0.5, 0.3, 0.2, 0.4, 0.5)], model="b", dataset="wikitext")
    nothing_fits = metrics([("snapkv", 0.5, 0.3, 0.2, 0.4, 0.9)], model="a", dataset="pg19")
    answers = summary.answers(pd.concat([nothing_fits, fits]))
    assert [a.model for a in answers] == ["b", "a"] and summary.one_line(answers).index("b /") < 40
    html = summary.to_html(answers)
    model_menu, dataset_menu = html.split('data-kvlib-axis="model">')[1], html.split('data-kvlib-axis="dataset">')[1]
    assert model_menu.startswith('<option value="b">b</option><option value="a">')
    assert dataset_menu.startswith('<option value="wikitext">')


def test_retrieval_and_decode_time_are_reported_where_measured():
    table = metrics([("snapkv", 0.5, 0.3, 0.2, 0.4, 0.5)], tpot_speedup=[1.0, 1.25], timing_flag=["", "spread 14%"])
    retrieval = pd.DataFrame([{"model": "m", "dataset": "wikitext", "method": "snapkv", "compression_ratio": 0.5,
                               "length": "all", "accuracy": 0.75, "ci_low": 0.5, "ci_high": 0.9}])  # fmt: skip
    (answer,) = summary.answers(table, retrieval, budgets=(0.5,))
    cells = summary._cells(answer.choices[0])
    assert cells[3] == "75% [50, 90]"
    assert cells[4] == "1.25× (⚠ spread 14%)"
    assert "context-length sweep" in answer.unmeasured and "quantised caches" in answer.unmeasured


def test_markdown_html_and_one_line_name_every_model_and_dataset():
    table = pd.concat([metrics([("snapkv", 0.5, 0.3, 0.2, 0.4, 0.5)], model=m, dataset=d)
                       for m in ("a", "b") for d in ("pg19", "wikitext")])  # fmt: skip
    answers = summary.answers(table)
    assert [(a.model, a.dataset) for a in answers] == [("a", "pg19"), ("a", "wikitext"), ("b", "pg19"),
                                                       ("b", "wikitext")]  # fmt: skip
    html = summary.to_html(answers)
    assert html.count('class="kvlib-answer"') == 4 and 'data-kvlib-axis="model"' in html
    assert 'data-kvlib-axis="dataset"' in html
    line = summary.one_line(answers)
    assert line.count("snapkv at ratio 0.5") == 4 and "\n" not in line
    markdown = summary.to_markdown(answers)
    assert markdown.count("| ≤ 50% | snapkv at ratio 0.5 |") == 4


def test_readme_summary_is_replaced_between_its_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"top\n{summary.README_START}\nold\n{summary.README_END}\nbottom\n")
    assert summary.fill_readme(readme, "new answer")
    assert readme.read_text() == f"top\n{summary.README_START}\nnew answer\n{summary.README_END}\nbottom\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not summary.fill_readme(plain, "x") and plain.read_text() == "no markers\n"


def test_the_repository_readme_has_the_summary_markers():
    text = (REPO / "README.md").read_text()
    assert text.index(summary.README_START) < text.index(summary.README_END)
    assert text.index("## Two commands") < text.index(summary.README_START)


def test_summary_imports_without_torch():
    code = "import kvlib.analysis.summary, sys; assert 'torch' not in sys.modules"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert completed.returncode == 0, completed.stderr[-2000:]


# ----------------------------------------------------------------------------------------- charts and table


def test_family_palette_gives_every_method_its_own_colour_and_shape_pair():
    from kvlib.study.settings import DEFAULT_METHODS

    methods = [*DEFAULT_METHODS, "fp8", "snapkv+fp8"]
    styles = charts.method_styles(methods)
    assert set(styles) == set(methods)
    pairs = [(colour, shape) for colour, shape, _ in styles.values()]
    assert len(set(pairs)) == len(pairs)
    assert charts.family("streaming_llm") == "position-based eviction"
    assert charts.family("fp8") == "precision" and charts.family("snapkv+fp8") == "combinations"
    assert styles["streaming_llm"][0] not in {styles[m][0] for m in methods if charts.family(m) != charts.family(
        "streaming_llm")}  # fmt: skip


def test_memory_quality_chart_marks_the_frontier_and_selects_methods_by_legend():
    rows = [("snapkv", 0.5, 0.3, 0.2, 0.4, 0.5), ("knorm", 0.5, 0.5, 0.4, 0.6, 0.5), ("knorm", 0.7, 0.9, 0.7, 1.1, 0.3)]
    table = pd.concat([metrics(rows, dataset=d) for d in ("pg19", "wikitext")])
    frame = charts.memory_quality_frame(table)
    assert set(frame.loc[frame.frontier, "configuration"]) == {"snapkv at ratio 0.5", "knorm at ratio 0.7"}
    spec = charts.memory_quality_chart(table).to_dict()
    text = json.dumps(spec)
    assert '"bind": "legend"' in text and '"symlog"' in text


def test_explorable_table_keeps_numbers_numeric_and_shows_flags_and_intervals():
    table = metrics([("snapkv", 0.5, 0.3, 0.2, 0.4, 0.5)], timing_flag=["", "busy machine (0.41 other cores)"])
    frame = report.explorable_frame(table)
    assert frame["method"].tolist() == ["none", "snapkv"]
    assert frame["Δ 95% CI low"].tolist() == [0.0, 0.2] and frame["KV cache %"].tolist() == [100.0, 50.0]
    assert frame["timing flag"].iloc[1].startswith("busy machine")
    html = report.explorable_table(table).data
    assert report.external_references(html) == [] and "itables" in html


# ------------------------------------------------------------------------------------------------ progress


def write_cells(folder: Path, walls: list[float]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, wall in enumerate(walls):
        path = folder / f"c{i}.json"
        path.write_text(json.dumps({"group_wall_time": wall}))


def test_stored_cells_give_seconds_per_cell_across_groups(tmp_path):
    # Two groups stored as they ended: 3 cells in 30 s, then 2 cells in 20 s.
    write_cells(tmp_path / "cells" / "m_wikitext" / "ppl", [30.0, 30.2, 29.9, 20.0, 20.1])
    # Without `created_at` a group is the cells stored in the same second, and its time its last cell's.
    assert stored_seconds_per_cell(tmp_path / "cells" / "m_wikitext" / "ppl") == pytest.approx((30.2 + 20.1) / 5)


def test_a_group_that_stores_its_cells_as_they_come_counts_once_at_its_last_cell(tmp_path):
    folder = tmp_path / "cells" / "m_pg19" / "streaming"
    folder.mkdir(parents=True)
    for i, (wall, created) in enumerate([(100.0, "t1"), (220.0, "t1"), (340.0, "t1"), (50.0, "t2")]):
        cell = {"group_wall_time": wall, "provenance": {"created_at": created}}
        (folder / f"c{i}.json").write_text(json.dumps(cell))
    assert sorted(group_seconds(folder)[0]) == [50.0, 340.0] and group_seconds(folder)[1] == 4
    assert stored_seconds_per_cell(folder) == pytest.approx(390.0 / 4)


def test_progress_estimates_the_time_left_from_an_earlier_run_then_counts_new_cells(tmp_path):
    cells = tmp_path / "cells"
    write_cells(cells / "m_wikitext" / "ppl", [30.0, 30.0, 30.0])
    progress = StudyProgress({"ppl": 4, "latency": 0}, cells)
    assert progress.total == 4
    assert progress.eta() == pytest.approx(40.0)  # 4 cells x 10 s from the stored run
    write_cells(cells / "m_pg19" / "ppl", [5.0])  # one new cell appears
    progress.refresh()
    assert progress._done == {"ppl": 1}
    fresh = StudyProgress({"latency": 2}, tmp_path / "none")
    assert fresh.eta() is None  # nothing measured, nothing stored: no estimate


def test_the_progress_display_prints_stage_cells_and_eta(tmp_path):
    from rich.console import Console

    console = Console(file=(tmp_path / "out.txt").open("w"), width=160, force_terminal=False)
    write_cells(tmp_path / "cells" / "m_wikitext" / "ppl", [10.0, 20.0])
    with StudyProgress({"ppl": 3}, tmp_path / "cells", console=console) as progress:
        progress.stage("measuring", "wikitext: 02_ppl.ipynb", "ppl")
        progress.log("a log line")
    console.file.close()
    text = (tmp_path / "out.txt").read_text()
    assert "a log line" in text and "0/3" in text and "ETA" in text, text


def test_notebooks_get_only_the_parameters_they_declare():
    from kvlib.pipeline import NOTEBOOKS, declared_parameters

    chosen = declared_parameters(NOTEBOOKS / "04_analysis.ipynb", {"results_dir": "r", "n_ppl": 3, "explore": False})
    assert chosen == {"results_dir": "r", "explore": False}


# --------------------------------------------------------------------------------------------- the command


def test_report_command_names_a_folder_without_results(tmp_path, capsys):
    from kvlib import cli

    assert cli.main(["report", "--results_dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no *_kv_metrics.csv files in" in error[0], error


@pytest.mark.slow
def test_report_command_builds_the_report_from_stored_results(tmp_path, capsys):
    from test_browser import write_results

    from kvlib import cli

    results = write_results(tmp_path / "results")
    assert cli.main(["report", "--results_dir", str(results)]) == 0
    out, err = capsys.readouterr()
    for name in ("report.html", "summary.md", "plots/memory_quality.png", "notebooks/04_analysis.ipynb"):
        assert (results / name).is_file() and str(results / name) in out, name
    assert f"report: {results / 'report.html'}" in err and "At half the KV cache, best measured:" in err
    assert "Executing Cell" not in err and "Passed unknown parameter" not in err
    assert "| ≤ 50% |" in (results / "summary.md").read_text()
    html = (results / "report.html").read_text()
    assert html.index("The answer") < html.index("Memory against quality") < html.index("Full table")


def test_a_first_report_follows_the_quality_results_when_timing_is_still_to_measure(tmp_path, monkeypatch):
    from kvlib import pipeline

    calls: list[str] = []

    def run(jobs, log, started, progress=None, times=None):
        calls.extend(job.label for job in jobs)
        return []

    monkeypatch.setattr(pipeline, "run_sequentially", run)
    monkeypatch.setattr(pipeline, "write_report_files", lambda *args, **kwargs: calls.append("report files") or [])
    monkeypatch.setattr(pipeline, "model_runs", lambda preset, settings: [])

    def job(notebook: str, pending: int) -> pipeline.NotebookJob:
        return pipeline.NotebookJob(notebook, tmp_path / notebook, {}, pending, notebook.split(".")[0])

    def stages(latency_pending: int):
        return ([job("01_data_prep.ipynb", 1)], [job("02_ppl.ipynb", 3), job("03_latency.ipynb", latency_pending)],
                [job("04_analysis.ipynb", 1)])  # fmt: skip

    pipeline._run_stages("x", None, None, tmp_path, lambda m: None, "sequential", 0.0, None, stages(2))
    assert calls == ["01_data_prep", "02_ppl", "04_analysis", "report files", "03_latency", "04_analysis",
                     "report files"]  # fmt: skip
    calls.clear()
    pipeline._run_stages("x", None, None, tmp_path, lambda m: None, "sequential", 0.0, None, stages(0))
    assert calls == ["01_data_prep", "02_ppl", "03_latency", "04_analysis", "report files"]


def test_a_run_writes_the_minutes_of_each_step_and_reports_after_the_first_models_perplexity(tmp_path, monkeypatch):
    from kvlib import pipeline

    executed: list[str] = []
    monkeypatch.setattr(pipeline, "_execute", lambda notebook, target, parameters, log: executed.append(target.name)
                        or target)  # fmt: skip
    monkeypatch.setattr(pipeline, "write_report_files", lambda *args, **kwargs: executed.append("report files") or [])
    monkeypatch.setattr(pipeline, "model_runs", lambda preset, settings: [])

    def job(model: str, notebook: str, name: str | None = None) -> pipeline.NotebookJob:
        target = tmp_path / model / (name or notebook)
        return pipeline.NotebookJob(notebook, target, {}, 2, f"{model}/pg19: {target.name}")

    prepare = [job("smollm2", "01_data_prep.ipynb"), job("gemma", "01_data_prep.ipynb")]
    measure = [job("smollm2", "02_ppl.ipynb"), job("smollm2", "03_latency.ipynb"),
               job("smollm2", "02_ppl.ipynb", "variant1_02_ppl.ipynb"), job("gemma", "02_ppl.ipynb")]  # fmt: skip
    analysis = [pipeline.NotebookJob("04_analysis.ipynb", tmp_path / "04_analysis.ipynb", {}, 1, "analysis")]
    lines: list[str] = []
    pipeline._run_stages("x", None, None, tmp_path, lines.append, "sequential", 0.0, None, (prepare, measure, analysis))

    # The first report follows the first model's perplexity alone, not every perplexity notebook of the run.
    assert executed[:5] == ["01_data_prep.ipynb", "01_data_prep.ipynb", "02_ppl.ipynb", "04_analysis.ipynb",
                            "report files"]  # fmt: skip
    (path,) = (tmp_path / "logs").glob("run-times-*.csv")
    times = pd.read_csv(path)
    assert list(times["step"]) == ["smollm2 text", "gemma text", "smollm2 ppl", "first report", "smollm2 latency",
                                   "smollm2 ppl (variants)", "gemma ppl", "report"]  # fmt: skip
    assert list(times["cells"])[:3] == [2, 2, 2] and (times["seconds"] >= 0).all()
    assert times["elapsed"].is_monotonic_increasing
    assert lines[-9].startswith("study 'x' finished in") and str(path) in lines[-9]
    assert lines[-8] == "  smollm2 text: 0.0 min (1 run(s), 2 cells)" and lines[-1].startswith("  report: ")
