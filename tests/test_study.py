"""The study end to end: papermill -> result files -> report, checked in headless Chromium with no network."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kvlib import pipeline
from kvlib.analysis import report

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def requirement_lines(text: str) -> list[str]:
    return sorted(line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip())


def test_environment_yml_agrees_with_requirements():
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in environment["dependencies"] if isinstance(item, dict))
    requirements = requirement_lines((REPO / "requirements.txt").read_text())
    requirements += requirement_lines((REPO / "requirements-dev.txt").read_text())
    assert sorted(pip_section) == sorted(requirements + ["-e ."])


@pytest.mark.parametrize("notebook", sorted((REPO / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_in_git_carry_no_outputs_and_one_parameters_cell(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert sum("parameters" in c["metadata"].get("tags", []) for c in cells) == 1


def test_default_preset_names_the_offline_preset_when_the_hub_is_unreachable(monkeypatch):
    def unreachable(model, timeout=5.0):
        raise pipeline.HubUnreachable("cannot reach the Hugging Face hub ... --preset offline")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(pipeline, "check_hub", unreachable)
    from kvlib import cli

    assert cli.main(["study", "--preset", "default"]) == 3


def test_check_hub_fails_fast_without_network():
    started = time.perf_counter()
    try:
        pipeline.check_hub("EleutherAI/pythia-70m", timeout=5)
    except pipeline.HubUnreachable as error:
        assert "--preset offline" in str(error)
        assert time.perf_counter() - started < 30
    # With network the call succeeds, which is fine too.


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose one of default, offline, smoke"):
        pipeline.run_preset("huge")


def render_in_chromium(html: Path, tmp_path: Path) -> str:
    """The page's DOM after scripts ran, with every network request refused."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--proxy-server=127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'chromium'}",
        "--virtual-time-budget=20000", "--dump-dom", html.resolve().as_uri(),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path, smoke_study):
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    output, completed, wall = smoke_study  # python -m kvlib study --preset smoke, run once per session
    assert completed.returncode == 0, completed.stderr[-3000:]
    print(f"smoke preset: {wall:.0f} s")
    # One progress display, not papermill's logs: those go to the log file named first; the run ends with the
    # report's path and its one-line answer.
    print("progress display, first and last lines:", completed.stderr.splitlines()[:2], completed.stderr[-600:])
    assert "Executing Cell" not in completed.stderr and "Passed unknown parameter" not in completed.stderr
    log_file = Path(re.search(r"^log: (\S+)", completed.stderr, re.M).group(1))
    assert "Executing Cell" in log_file.read_text() and "Passed unknown parameter" not in log_file.read_text()
    assert f"report: {output / 'report.html'}" in completed.stderr
    assert "At half the KV cache, best measured: tiny-gpt-neox / pg19:" in completed.stderr
    assert (output / "summary.md").is_file() and (output / "plots" / "memory_quality.png").is_file()

    for dataset in ("wikitext", "pg19"):
        assert (output / f"tiny-gpt-neox_{dataset}_kv_metrics.csv").exists()
        assert (output / "plots" / dataset / f"tiny-gpt-neox_{dataset}_tpot_vs_compression.png").exists()
        executed = sorted(p.name for p in (output / "notebooks" / dataset).glob("*.ipynb"))
        pg19_only = ["05_scaling.ipynb"] if dataset == "pg19" else []  # the smoke sweeps run on PG-19 only
        streaming = ["07_streaming.ipynb"] if dataset == "pg19" else []
        assert executed == ["01_data_prep.ipynb", "02_ppl.ipynb", "03_latency.ipynb", *pg19_only,
                            "06_retrieval.ipynb", *streaming]  # fmt: skip
        retrieval = pd.read_csv(output / f"tiny-gpt-neox_{dataset}_kv_retrieval.csv", dtype={"length": str})
        assert list(zip(retrieval.method, retrieval.length, strict=True)) == [
            (m, length) for m in ("none", "knorm", "snapkv") for length in ("640", "all")
        ]
        assert (retrieval.ci_low <= retrieval.accuracy).all() and (retrieval.accuracy <= retrieval.ci_high).all()
        assert (output / f"tiny-gpt-neox_{dataset}_kv_retrieval_records.csv").exists()
    # The context-length sweep: baseline + knorm 0.5 at 256 and 512 tokens, with its fit and bound.
    sweep_table = pd.read_csv(output / "tiny-gpt-neox_pg19_kv_scaling.csv")
    assert sorted(zip(sweep_table.method, sweep_table.context_length, strict=True)) == [
        ("knorm", 256), ("knorm", 512), ("none", 256), ("none", 512)]  # fmt: skip
    assert sweep_table.bound_speedup.notna().all() and (sweep_table.peak_memory >= 0).all()
    assert (output / "tiny-gpt-neox_pg19_kv_scaling_records.csv").exists()

    # Streaming perplexity: the references and the press at both position modes, on 1536 tokens.
    stream = pd.read_csv(output / "tiny-gpt-neox_pg19_kv_streaming.csv")
    assert sorted(zip(stream.method, stream.positions, strict=True)) == [
        ("none", "original"), ("recompute", "original"), ("streaming_llm", "original"), ("streaming_llm", "rerotate"),
        ("window", "original"), ("window", "rerotate")]  # fmt: skip
    assert (stream.tokens == 1536).all() and (stream.kv_budget.dropna() == 128).all()

    html_path = output / "report.html"
    html = html_path.read_text()
    assert report.external_references(html) == []
    assert "def " not in html and "import " not in html.split("<script")[0], "code cells must not be in the report"
    assert "Explore (JupyterLab only)" not in html
    assert "Observations" in html and "ratio 0.7: best" in html
    assert "Where compression pays" in html and "least squares over 2 lengths" in html
    assert "Needle retrieval: accuracy after compression" in html and "Retrieval vs perplexity" in html
    assert "Reading past the trained context" in html and "Streaming perplexity" in html

    dom = render_in_chromium(html_path, tmp_path)
    charts = re.findall(r'<svg[^>]*class="marks"[^>]*width="(\d+)"', dom)
    assert charts, "the report's chart did not render with the network off"
    assert int(charts[0]) <= 1400, "the chart should fit a laptop screen"
    assert dom.count('class="mark-line') >= 2 and "time metric" in dom
    assert "Decode: TPOT speedup vs context length" in dom and "Memory vs context length" in dom

    # Rerunning resumes: every measurement cell is skipped, no cell file is rewritten.
    cells = {p: p.stat().st_mtime_ns for p in (output / "cells").rglob("*.json")}
    methods = len(pipeline.presets()["smoke"].methods)
    retrieval_cells = 1 + 2  # the baseline, knorm and snapkv at one ratio and one length
    # datasets x kinds x (baseline + methods x ratios), the sweep's 2 lengths x (baseline + knorm 0.5), retrieval,
    # streaming on PG-19 (the references' cell and streaming_llm's)
    assert len(cells) == 2 * 2 * (1 + methods * 2) + 2 * 2 + 2 * retrieval_cells + 2
    again = subprocess.run(
        [sys.executable, "-m", "kvlib", "study", "--preset", "smoke", "--output_dir", str(output)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert again.returncode == 0
    # Every notebook of both datasets is skipped: its executed copy is the one that measured the cells.
    log_text = Path(re.search(r"^log: (\S+)", again.stderr, re.M).group(1)).read_text()
    assert log_text.count("skipped: every cell is stored") == 10, log_text[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (output / "cells").rglob("*.json")} == cells
