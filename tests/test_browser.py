"""The analysis as a person sees it, in Debian's Chromium driven by Playwright: notebooks/04_analysis.ipynb run in
JupyterLab (every chart draws, the explorer redraws, no script error, saving keeps outputs out of git), and the
exported report opened from file:// with the network refused.

Results: a small metrics table written here (two datasets, five methods, flagged timing cells), or the
results folder named by $KVLIB_BROWSER_RESULTS (e.g. a smoke study's). Screenshots go to $KVLIB_SCREENSHOTS
when set, else to the test's temporary folder; their paths are printed (pytest -s).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "04_analysis.ipynb"
CHROMIUM = shutil.which("chromium")
JUPYTER = Path(sys.executable).with_name("jupyter")
MARKS = "g.mark-symbol path, g.mark-line path, g.mark-rule line, g.mark-rect path, g.mark-text text"
LAB_DEADLINE_S = 240  # the whole JupyterLab session, start to shutdown
# Console lines that are no script error of the page: resources JupyterLab asks its server for and may not find,
# and JupyterLab's debugger panel noting that a kernel restart cut its state request short.
NOT_SCRIPT_ERRORS = re.compile(r"Failed to load resource|favicon|net::ERR_|Could not restore the debugger state")


def test_analysis_imports_without_torch():
    code = "import kvlib.analysis.charts, kvlib.analysis.report, sys; assert 'torch' not in sys.modules, 'torch'"
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    elapsed = time.perf_counter() - started
    assert completed.returncode == 0, completed.stderr[-2000:]
    print(f"import kvlib.analysis.charts, kvlib.analysis.report in a fresh interpreter: {elapsed:.2f} s")


def test_repo_path_reads_relative_paths_from_the_repository_root(tmp_path):
    code = "from kvlib.files import repo_path; print(repo_path('results')); print(repo_path('/abs/x'))"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert completed.stdout.split() == [str(REPO / "results"), "/abs/x"], completed.stderr


def test_a_missing_results_folder_is_named_absolutely(tmp_path, monkeypatch):
    from kvlib.analysis import tables
    from kvlib.files import repo_path

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(REPO / "no-such-results"))):
        tables.read_tables(repo_path("no-such-results"))


# ------------------------------------------------------------------------------------------------- fixtures


def write_results(folder: Path) -> Path:
    """Two datasets' metrics tables as the study writes them: baseline, five methods x four ratios, one busy and
    one wide-spread timing cell, Δ perplexities from 0.05 to 250 (some intervals containing 0)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    methods = {"knorm": 3.0, "snapkv": 1.5, "streaming_llm": 2.0, "lagkv": 12.0, "random": 60.0}
    for dataset, base_ppl in (("wikitext", 19.6), ("pg19", 20.3)):
        rows = []
        for method, ratio in [("none", 0.0)] + [(m, r) for m in methods for r in (0.1, 0.3, 0.5, 0.7)]:
            delta = 0.0 if method == "none" else methods[method] * ratio**2 * rng.uniform(0.5, 1.5)
            half = 0.0 if method == "none" else abs(delta) * rng.uniform(0.3, 1.3) + 0.02
            tpot = 0.058 * (1 - 0.03 * ratio) * rng.uniform(0.97, 1.03)
            prefill = 1.18 * (1 + 0.05 * ratio) * rng.uniform(0.95, 1.05)
            row = {
                "method": method, "compression_ratio": ratio, "model": "tiny-gpt-neox", "dataset": dataset,
                "ppl": base_ppl + delta, "ppl_delta": delta,
                "ppl_delta_ci_low": delta - half, "ppl_delta_ci_high": delta + half,
                "prefill_time": prefill, "ttft": prefill + 0.001, "tpot": tpot, "decode_time": 15 * tpot,
            }  # fmt: skip
            row["total_generation_time"] = row["ttft"] + row["decode_time"]
            row["throughput"] = 16 / row["total_generation_time"]
            for field in ("prefill_time", "ttft", "tpot", "throughput", "decode_time", "total_generation_time"):
                row[f"{field}_iqr"] = row[field] * rng.uniform(0.005, 0.04)
            row["kv_bytes_ratio"] = 1 - ratio
            row["other_cpu"] = round(float(rng.uniform(0, 0.2)), 2)
            row["timing_flag"] = ""
            rows.append(row)
        table = pd.DataFrame(rows)
        base = table.iloc[0]
        for field in ("prefill_time", "ttft", "tpot", "throughput", "decode_time", "total_generation_time"):
            table[f"baseline_{field}"] = base[field]
        table["prefill_speedup"] = base.prefill_time / table.prefill_time
        table["ttft_speedup"] = base.ttft / table.ttft
        table["tpot_speedup"] = base.tpot / table.tpot
        table["throughput_ratio"] = table.throughput / base.throughput
        table.loc[3, ["other_cpu", "timing_flag"]] = [0.41, "busy machine (0.41 other cores)"]
        table.loc[9, "timing_flag"] = "spread 14%"
        table.loc[table.method == "none", ["ppl_delta_ci_low", "ppl_delta_ci_high"]] = 0.0
        table.to_csv(folder / f"tiny-gpt-neox_{dataset}_kv_metrics.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    if os.environ.get("KVLIB_BROWSER_RESULTS"):
        return Path(os.environ["KVLIB_BROWSER_RESULTS"]).resolve()
    return write_results(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("KVLIB_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def chromium():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()


class Console:
    """Script errors a page reports: uncaught exceptions and console.error lines (resource loads excepted)."""

    def __init__(self, page):
        self.errors: list[str] = []
        self.ignored: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("console", self._console)

    def _console(self, message) -> None:
        if message.type == "error":
            (self.ignored if NOT_SCRIPT_ERRORS.search(message.text) else self.errors).append(message.text)


def chart_marks(scope) -> list[int]:
    """Drawn marks (SVG elements, or canvas pixels' worth: 1 per non-empty canvas) in each chart under `scope`."""
    return scope.locator(".kvlib-chart").evaluate_all(
        f"""charts => charts.map(chart => chart.querySelectorAll({json.dumps(MARKS)}).length
                                         + chart.querySelectorAll("canvas").length)"""
    )


# --------------------------------------------------------------------------------------------------- report


def execute_analysis(results_dir: Path, folder: Path) -> Path:
    """notebooks/04_analysis.ipynb as the study runs it (papermill, explore=False), from a folder that is not
    the repository, and its export to HTML."""
    import papermill

    from kvlib.analysis.report import export_html

    executed = folder / "04_analysis.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK), str(executed), parameters={"results_dir": str(results_dir), "explore": False},
        cwd=str(folder), kernel_name="python3", progress_bar=False, start_timeout=120, execution_timeout=300,
    )  # fmt: skip
    return export_html(executed, folder / "report.html")


@pytest.mark.slow
def test_report_draws_every_chart_offline(chromium, results_dir, screenshots, tmp_path):
    from kvlib.analysis.report import external_references, page_title

    started = time.perf_counter()
    html_path = execute_analysis(results_dir, tmp_path)
    html = html_path.read_text()
    print(f"report executed and exported in {time.perf_counter() - started:.1f} s, {len(html) / 1e6:.2f} MB")
    assert external_references(html) == []
    assert page_title(html) and page_title(html) != "Notebook", page_title(html)
    assert html.count("data-kvlib-vega-bundle") == 1, "the report should carry the Vega bundle once"
    assert "Explore (JupyterLab only)" not in html

    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    console = Console(page)
    refused = []

    def offline(route) -> None:
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    page.route("**/*", offline)
    try:
        page.goto(html_path.as_uri(), wait_until="load", timeout=60_000)
        page.wait_for_function(
            "[...document.querySelectorAll('.kvlib-chart')].every(c => c.querySelector('svg.marks, canvas'))",
            timeout=60_000,
        )
        marks = chart_marks(page)
        print(f"report: {len(marks)} charts, marks per chart {marks}; requests refused: {refused}")
        # memory-quality, quality, quality cost, speed (and the sweep's and retrieval's where the results have them)
        expected = 4 if not os.environ.get("KVLIB_BROWSER_RESULTS") else len(marks)
        assert len(marks) == expected >= 4 and all(n > 0 for n in marks), marks
        page.screenshot(path=str(screenshots / "report_first_screen.png"))
        check_summary_first(page)
        check_legend_isolates(page)
        check_table_sorts_and_filters(page)
        page.screenshot(path=str(screenshots / "report.png"), full_page=True)
        for name in ("report_first_screen.png", "frontier.png", "report.png"):
            print(f"screenshot: {screenshots / name}")
        page.locator(".kvlib-chart").first.screenshot(path=str(screenshots / "frontier.png"))
    finally:
        page.close()
    assert not console.errors, console.errors


def check_summary_first(page) -> None:
    """The first section is the answer; the model and dataset menus show one answer at a time."""
    headings = page.locator("h2").all_inner_texts()
    assert headings[0].startswith("The answer"), headings
    assert headings[-1].startswith("Full table"), headings
    summary = page.locator(".kvlib-summary")
    visible = summary.locator(".kvlib-answer:visible")
    assert visible.count() == 1
    first = visible.first.get_attribute("data-dataset")
    assert "best measured configuration" in visible.first.inner_text()
    menu = summary.locator('select[data-kvlib-axis="dataset"]')
    others = [o for o in menu.locator("option").all_inner_texts() if o != first]
    if others:
        menu.select_option(others[0])
        assert visible.count() == 1 and visible.first.get_attribute("data-dataset") == others[0]
        menu.select_option(first)
    print(f"summary: headings {headings[:3]}..., datasets {[first, *others]}")


def check_legend_isolates(page) -> None:
    """Clicking a method in a chart's legend dims every other method's marks in that chart."""
    chart = page.locator(".kvlib-chart").first
    dimmed = 'g.mark-symbol path[opacity="0.12"], g.mark-symbol path[fill-opacity="0.12"]'
    before = chart.locator(dimmed).count()
    label = chart.locator("g.role-legend-label text").first
    name = label.text_content()
    label.click()
    page.wait_for_timeout(300)
    after = chart.locator(dimmed).count()
    assert after > before, (before, after)
    label.click(modifiers=["Shift"])  # the selection emptied: every method shows again
    print(f"legend: clicking {name!r} dimmed {after} marks of the others")


def check_table_sorts_and_filters(page) -> None:
    """The full table (itables, bundled): sorted by a header click, filtered by the search box."""
    table = page.locator(".kvlib-table table.dataTable[id]")  # the body (scrolling splits off the header)
    table.wait_for(timeout=30_000)
    head = page.locator(".kvlib-table .dt-scroll-head thead th")
    headers = head.all_inner_texts()
    assert table.locator("tbody tr").first.locator("td").nth(headers.index("method")).inner_text() == "none"
    delta = headers.index("Δ perplexity")
    order = head.nth(delta).locator(".dt-column-order")  # itables keeps header text selectable: sort by the icon
    cells = table.locator(f"tbody tr td:nth-child({delta + 1})")

    def column() -> list[float]:
        return [float(v) for v in cells.all_inner_texts() if v.strip() and v.strip().lower() != "nan"]

    for _ in range(2):  # ascending, then descending
        order.click()
        page.wait_for_timeout(300)
        direction = head.nth(delta).get_attribute("aria-sort")
        values = column()
        assert direction in ("ascending", "descending") and values, (direction, values[:5])
        assert values == sorted(values, reverse=direction == "descending"), (direction, values[:5])
    assert direction == "descending"
    if not os.environ.get("KVLIB_BROWSER_RESULTS"):  # the search finds the fixture's flagged cell
        page.locator("div.dt-search input").fill("busy machine")
        page.wait_for_timeout(300)
        assert "busy machine (0.41 other cores)" in table.inner_text()
    method_cells = f"tbody tr td:nth-child({headers.index('method') + 1})"
    chosen = next(m for m in table.locator(method_cells).all_inner_texts() if m != "none")
    page.locator("div.dt-search input").fill(chosen)
    page.wait_for_timeout(300)
    shown = table.locator(method_cells).all_inner_texts()
    assert shown and set(shown) == {chosen}, shown
    print(f"table: sorted by Δ perplexity (largest {values[0]}), filtered to {chosen}: {len(shown)} rows")


# ----------------------------------------------------------------------------------------------- JupyterLab


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def lab_root(folder: Path, results_dir: Path) -> Path:
    """A git repository holding a copy of the analysis notebook pointed at `results_dir`, with the notebook
    filter that setup.sh installs (scripts/notebook_filter.sh)."""
    root = folder / "lab"
    (root / "notebooks").mkdir(parents=True)
    notebook = json.loads(NOTEBOOK.read_text())
    parameters = next(c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", []))
    source = "".join(parameters["source"])
    parameters["source"] = re.sub(r"^results_dir = .*$", f"results_dir = {str(results_dir)!r}", source, flags=re.M)
    (root / "notebooks" / NOTEBOOK.name).write_text(json.dumps(notebook, indent=1) + "\n")
    (root / ".venv").symlink_to(Path(sys.executable).parents[1])
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, timeout=30)
    subprocess.run(["bash", str(REPO / "scripts" / "notebook_filter.sh")], cwd=root, check=True, timeout=60)
    return root


class Lab:
    """`jupyter lab` on 127.0.0.1 in its own process group, with throw-away settings; stop() ends it and its
    kernels (they run in sessions of their own)."""

    def __init__(self, root: Path, folder: Path):
        self.port, self.token = free_port(), uuid.uuid4().hex
        self.log = folder / "jupyterlab.log"
        env = {**os.environ, "JUPYTER_CONFIG_DIR": str(folder / "config"), "JUPYTER_RUNTIME_DIR": str(folder / "rt"),
               "IPYTHONDIR": str(folder / "ipython"), "JUPYTER_PLATFORM_DIRS": "1"}  # fmt: skip
        settings = folder / "settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True)
        (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
        command = [
            str(JUPYTER), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}",
            f"--LabApp.user_settings_dir={folder / 'settings'}", f"--LabApp.workspaces_dir={folder / 'workspaces'}",
            "--LabApp.extension_manager=readonly", *(["--allow-root"] if os.geteuid() == 0 else []),  # CI: root
        ]  # fmt: skip
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"jupyter lab did not answer in {timeout:.0f} s: {self.log.read_text()[-3000:]}")

    def api(self, path: str):
        request = urllib.request.Request(f"{self.url}{path}", headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def wait_kernel_idle(self, timeout: float) -> None:
        """Until the notebook's kernel has started and is idle (the page shows "Idle" a little earlier, and a
        restart asked for then fails with "No kernel to restart")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sessions = self.api("/api/sessions")
            if any((s.get("kernel") or {}).get("execution_state") == "idle" for s in sessions):
                return
            time.sleep(0.5)
        raise TimeoutError(f"no idle kernel after {timeout:.0f} s")

    def _tree(self) -> list[int]:
        try:
            import psutil

            return [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)]
        except Exception:  # psutil missing or the server already gone
            return []

    def stop(self) -> None:
        descendants = self._tree()
        request = urllib.request.Request(f"{self.url}/api/shutdown", method="POST",
                                         headers={"Authorization": f"token {self.token}"})  # fmt: skip
        try:
            urllib.request.urlopen(request, timeout=10).close()
            self.process.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                break
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for pid in descendants:  # kernels: their own sessions, outside the server's process group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


PROMPTS = "[...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')].map(p => p.textContent)"


def restart_and_run_all(page, deadline: float, tries: int = 3) -> int:
    """Kernel > Restart Kernel and Run All Cells..., confirmed, as a person would; clicked again when no cell
    started within 30 s (a kernel still settling right after the page opened can drop the request)."""
    for attempt in range(1, tries + 1):
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Kernel$")).click()
        page.locator("li.lm-Menu-item[data-command='runmenu:restart-and-run-all']").click()
        page.locator(".jp-Dialog .jp-mod-accept").click()
        try:
            page.wait_for_function(
                f"() => ({PROMPTS}).some(text => /\\[(\\*|\\d+)\\]/.test(text))",
                timeout=min(30_000, remaining(deadline)),
            )
            return attempt
        except Exception as error:  # playwright's TimeoutError
            if attempt == tries or "Timeout" not in str(error):
                raise
    return tries


def remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"the JupyterLab session took longer than {LAB_DEADLINE_S} s")
    return left * 1000


@pytest.mark.slow
def test_analysis_notebook_in_jupyterlab(chromium, results_dir, screenshots, tmp_path):
    if not JUPYTER.exists():
        pytest.skip(f"jupyter is not installed beside {sys.executable}")
    started = time.monotonic()
    deadline = started + LAB_DEADLINE_S
    root = lab_root(tmp_path, results_dir)
    lab = Lab(root, tmp_path)
    page = console = None
    try:
        lab.wait_ready()
        print(f"JupyterLab answered after {time.monotonic() - started:.1f} s")
        page = chromium.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        console = Console(page)
        page.goto(f"{lab.url}/lab/tree/notebooks/{NOTEBOOK.name}?token={lab.token}", timeout=remaining(deadline))
        page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=remaining(deadline))
        page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=remaining(deadline))
        lab.wait_kernel_idle(remaining(deadline) / 1000)

        attempts = restart_and_run_all(page, deadline)
        code_cells = page.locator(".jp-Notebook .jp-CodeCell").count()
        page.wait_for_function(
            """n => { const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
                      return prompts.length === n && prompts.every(p => /\\[\\d+\\]/.test(p.textContent)); }""",
            arg=code_cells, timeout=remaining(deadline),
        )  # fmt: skip
        print(f"Restart Kernel and Run All ({attempts} tries): {code_cells} code cells ran by "
              f"{time.monotonic() - started:.1f} s")  # fmt: skip
        assert page.locator(".jp-Notebook .jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
                            ).filter(has_text="Error").count() == 0  # fmt: skip
        expected = 5  # memory-quality, quality, quality cost, speed, and the explorer's
        page.wait_for_function(
            """n => { const charts = [...document.querySelectorAll('.jp-Notebook .kvlib-chart')];
                      return charts.length === n && charts.every(c => c.querySelector('svg.marks, canvas')); }""",
            arg=expected, timeout=remaining(deadline),
        )  # fmt: skip
        marks = chart_marks(page.locator(".jp-Notebook"))
        print(f"JupyterLab: {len(marks)} charts, marks per chart {marks}")
        assert len(marks) == expected and all(n > 0 for n in marks), marks

        # Re-run a chart's cell (Shift+Enter in it): the new output draws too, the page keeps no stale script.
        cell = page.locator(".jp-Notebook .jp-CodeCell").filter(has_text="charts.ppl_chart(table)")
        old_id = cell.locator(".kvlib-chart").get_attribute("id")
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        page.wait_for_function(
            """([cell, id]) => { const c = cell.querySelector('.kvlib-chart');
                                 return c && c.id !== id && c.querySelector('svg.marks g.mark-line path'); }""",
            arg=[cell.element_handle(), old_id], timeout=remaining(deadline),
        )  # fmt: skip
        print(f"re-ran the perplexity chart's cell: redrawn, marks {chart_marks(cell)}")

        # The explorer: change the view, then the dataset; its chart must be redrawn each time.
        explorer = page.locator(".jp-Notebook .widget-vbox").filter(has=page.locator(".widget-dropdown")).first
        explorer.scroll_into_view_if_needed()
        chart = explorer.locator(".kvlib-chart")

        def state() -> tuple[str, str, int]:
            return (
                chart.get_attribute("id"),
                " | ".join(chart.locator("g.role-title-text text").all_text_contents()),
                chart_marks(explorer)[0],
            )

        before = state()
        explorer.screenshot(path=str(screenshots / "explorer_before.png"))
        view_menu = explorer.locator(".widget-dropdown").filter(has_text="view").locator("select")
        tpot = next(o for o in view_menu.locator("option").all_inner_texts() if "TPOT" in o)
        view_menu.select_option(label=tpot)
        page.wait_for_function(
            """([box, id]) => { const c = box.querySelector('.kvlib-chart');
                                return c && c.id !== id && c.querySelector('svg.marks g.mark-line path'); }""",
            arg=[explorer.element_handle(), before[0]], timeout=remaining(deadline),
        )  # fmt: skip
        after_view = state()
        assert "TPOT" in after_view[1] and after_view[2] > 0, after_view
        explorer.screenshot(path=str(screenshots / "explorer_after_view.png"))
        dataset_menu = explorer.locator(".widget-dropdown").filter(has_text="dataset").locator("select")
        options = dataset_menu.locator("option").all_inner_texts()
        if len(options) > 1:
            dataset_menu.select_option(label=next(o for o in options if o != dataset_menu.input_value()))
            page.wait_for_function(
                """([box, id]) => { const c = box.querySelector('.kvlib-chart');
                                    return c && c.id !== id && c.querySelector('svg.marks'); }""",
                arg=[explorer.element_handle(), after_view[0]], timeout=remaining(deadline),
            )  # fmt: skip
            assert state()[2] > 0
        print(
            f"explorer: {before[1]!r} -> {after_view[1]!r} -> dataset {dataset_menu.input_value()}, marks {state()[2]}"
        )
        page.screenshot(path=str(screenshots / "jupyterlab.png"))
        for name in ("explorer_before.png", "explorer_after_view.png", "jupyterlab.png"):
            print(f"screenshot: {screenshots / name}")

        # Save (as a person would, Ctrl+S): the file on disk gets the outputs, the git filter keeps them out.
        saved = root / "notebooks" / NOTEBOOK.name
        page.locator(".jp-Notebook").first.click(position={"x": 5, "y": 5})
        page.keyboard.press("Control+s")
        wait_until(lambda: has_outputs(saved), remaining(deadline))
        subprocess.run(["git", "add", f"notebooks/{NOTEBOOK.name}"], cwd=root, check=True, timeout=60)
        staged = json.loads(subprocess.run(["git", "show", f":notebooks/{NOTEBOOK.name}"], cwd=root, check=True,
                                           capture_output=True, text=True, timeout=60).stdout)  # fmt: skip
        code = [c for c in staged["cells"] if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), "outputs reached git"
        print(f"saved notebook: {saved.stat().st_size / 1e6:.1f} MB on disk, staged without outputs")
    except Exception:
        if page is not None:  # what the page showed, for the failure report
            page.screenshot(path=str(screenshots / "jupyterlab_failure.png"))
            prompts = page.evaluate(PROMPTS)
            print(f"at failure: prompts {prompts}, screenshot {screenshots / 'jupyterlab_failure.png'}")
        raise
    finally:
        if page is not None:
            page.close()
        lab.stop()
        print(f"JupyterLab session: {time.monotonic() - started:.1f} s, server exit code {lab.process.poll()}")
    if console and console.ignored:
        print(f"console lines that are not script errors: {console.ignored}")
    assert not console.errors, console.errors


def has_outputs(path: Path) -> bool:
    """Whether the saved notebook holds outputs; False while JupyterLab is still writing it (empty or partial)."""
    try:
        return any(c.get("outputs") for c in json.loads(path.read_text())["cells"])
    except json.JSONDecodeError:
        return False


def wait_until(condition, timeout_ms: float, step: float = 0.25) -> None:
    deadline = time.monotonic() + timeout_ms / 1000
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(step)


def test_fixture_tables_read_as_kvlib_tables(tmp_path):
    from kvlib.analysis import tables

    table = tables.read_tables(write_results(tmp_path))
    assert len(table) == 2 * 21 and not math.isnan(table.tpot_iqr.iloc[1])
    assert (table.timing_flag.fillna("") != "").sum() == 4
