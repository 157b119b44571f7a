"""The answer first: per model and dataset, which measured configuration to pick at each memory budget, what it
costs in perplexity (with its interval), what it keeps of needle retrieval, what it buys in decode time, and
which other configurations this run cannot tell from it. Everything is read off the stored tables; nothing here
is typed by hand. No torch, no altair: the run's last line and the README use it too.

A configuration is a row of the metrics table: (method, compression_ratio, kv_quant) and, where the tables have
them, further axes such as `prefill_chunk`. Tables written before the precision axis existed have no `kv_quant`
column: their rows are float caches (`none`).

Memory is `kv_bytes_ratio`, the cache's bytes after the prefix against the uncompressed float baseline's. Rows
stored before the perplexity cells recorded bytes have it only where latency was timed; for the others (float
caches only) it is estimated as their mean cache length over the baseline's, and marked as estimated.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kvlib.analysis import charts, tables
from kvlib.files import slug

BUDGETS = (0.75, 0.50, 0.25, 0.15)  # fractions of the baseline's KV bytes
FLOAT = "none"  # kv_quant of a float (unquantised) cache
TOLERANCE = 1e-9  # a cache of exactly 75% fits the 75% budget despite float rounding
MAX_TIED = 6  # configurations named as not separable; the rest are counted
SUMMARY_FILE = "summary.md"
ESTIMATED_NOTE = "* estimated from the cache's length (this row's bytes were not recorded)."
README_START, README_END = "<!-- summary:start -->", "<!-- summary:end -->"
# Extra configuration axes other modules may add to the metrics table: column -> how a label names a value.
EXTRA_AXES = {
    "prefill_chunk": lambda v: f"prefill in chunks of {int(v)}",
    "kv_budget": lambda v: f"{int(v)} positions kept",
}


# ------------------------------------------------------------------------------------------------ the rows


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def configurations(metrics: pd.DataFrame) -> pd.DataFrame:
    """The metrics rows with the configuration axes filled in (`kv_quant` = `none` where absent), the model named
    by its slug, `kv_bytes_ratio` estimated from cache lengths where it was not measured (`memory_estimated`),
    and a readable `configuration` label."""
    rows = metrics.copy()
    rows["model"] = rows["model"].map(lambda m: slug(str(m)))
    rows["kv_quant"] = rows["kv_quant"].fillna(FLOAT).astype(str) if "kv_quant" in rows else FLOAT
    if "kv_bytes_ratio" not in rows:
        rows["kv_bytes_ratio"] = math.nan
    rows["kv_bytes_ratio"] = rows["kv_bytes_ratio"].astype(float)
    rows["memory_estimated"] = False
    if "cache_length" in rows:
        for _, part in rows.groupby(["model", "dataset"], sort=False):
            base = part[is_baseline(part)]
            if base.empty or _missing(base["cache_length"].iloc[0]) or not base["cache_length"].iloc[0]:
                continue
            estimate = part["cache_length"].astype(float) / float(base["cache_length"].iloc[0])
            fill = part.index[part["kv_bytes_ratio"].isna() & (part["kv_quant"] == FLOAT) & estimate.notna()]
            rows.loc[fill, "kv_bytes_ratio"] = estimate[fill]
            rows.loc[fill, "memory_estimated"] = True
    rows["configuration"] = rows.apply(label, axis=1)
    return rows


def is_baseline(rows: pd.DataFrame) -> pd.Series:
    """The uncompressed float cache with a plain prefill."""
    quant = rows["kv_quant"] if "kv_quant" in rows else pd.Series(FLOAT, index=rows.index)
    plain = pd.Series(True, index=rows.index)
    for column in EXTRA_AXES:
        if column in rows:
            plain &= rows[column].isna() | (rows[column] == 0)
    return (rows["method"] == "none") & (rows["compression_ratio"].astype(float) == 0) & (quant == FLOAT) & plain


def label(row: pd.Series) -> str:
    """e.g. `snapkv at ratio 0.5`, `knorm at ratio 0.3 + fp8 cache`, `fp8 cache (no eviction)`: no commas, so a
    comma-separated list of labels reads unambiguously."""
    quant = row.get("kv_quant", FLOAT)
    quant = FLOAT if _missing(quant) else str(quant)
    parts = []
    if row["method"] != "none":
        parts.append(f"{row['method']} at ratio {float(row['compression_ratio']):g}")
    if quant != FLOAT:
        parts.append(f"{quant} cache")
    for column, name in EXTRA_AXES.items():
        value = row.get(column)
        if not _missing(value) and value:
            parts.append(name(value))
    if row.get("positions") == "rerotate":
        parts.append("re-rotated positions")
    text = " + ".join(parts) or "no compression"
    return f"{text} (no eviction)" if row["method"] == "none" and quant != FLOAT else text


def pareto_frontier(rows: pd.DataFrame, x: str = "kv_bytes_ratio", y: str = "ppl_delta") -> pd.DataFrame:
    """The rows no other row beats on both `x` and `y` (lower is better on both), sorted by `x`: the
    configurations worth considering when trading memory for quality."""
    known = rows.dropna(subset=[x, y]).sort_values([x, y], kind="stable")
    keep, best = [], math.inf
    for index, value in known[y].items():
        if value < best:
            keep.append(index)
            best = value
    return known.loc[keep]


# ------------------------------------------------------------------------------------------------ the answer


@dataclass
class Choice:
    """The best measured configuration within one memory budget."""

    budget: float
    row: pd.Series | None  # None: nothing measured fits the budget
    tied: list[str] = field(default_factory=list)  # configurations whose interval overlaps the best's
    tied_more: int = 0  # how many more than listed
    accuracy: tuple[float, float, float] | None = None  # retrieval accuracy, 95% interval


@dataclass
class Answer:
    """What one model and dataset's results say."""

    model: str
    dataset: str
    baseline_ppl: float
    choices: list[Choice]
    speed: str  # where speed pays, one sentence
    unmeasured: str  # what the run did not measure, one sentence
    run: str  # date, machine, preset or settings of the run
    estimated_memory: bool  # some budgets use memory estimated from cache lengths


def _overlaps(row: pd.Series, best: pd.Series) -> bool:
    low, high = row.get("ppl_delta_ci_low"), row.get("ppl_delta_ci_high")
    best_low, best_high = best.get("ppl_delta_ci_low"), best.get("ppl_delta_ci_high")
    if any(_missing(v) for v in (low, high, best_low, best_high)):
        return False
    return low <= best_high and best_low <= high


def best_at_budget(rows: pd.DataFrame, budget: float) -> Choice:
    """The lowest Δppl among compressed rows whose cache is at most `budget` of the baseline's, and those whose
    95% interval overlaps its own (this run cannot separate them from it)."""
    fitting = rows[~is_baseline(rows) & rows["ppl_delta"].notna() & (rows["kv_bytes_ratio"] <= budget + TOLERANCE)]
    if fitting.empty:
        return Choice(budget, None)
    ordered = fitting.sort_values(["ppl_delta", "kv_bytes_ratio"], kind="stable")
    best = ordered.iloc[0]
    tied = [r["configuration"] for _, r in ordered.iloc[1:].iterrows() if _overlaps(r, best)]
    return Choice(budget, best, tied[:MAX_TIED], max(0, len(tied) - MAX_TIED))


def _retrieval_accuracy(retrieval: pd.DataFrame, row: pd.Series) -> tuple[float, float, float] | None:
    """Accuracy over every length and depth, with its interval, of the same configuration where measured."""
    if retrieval.empty:
        return None
    part = retrieval[
        (retrieval["model"].map(lambda m: slug(str(m))) == row["model"])
        & (retrieval["dataset"] == row["dataset"])
        & (retrieval["method"] == row["method"])
        & np.isclose(retrieval["compression_ratio"].astype(float), float(row["compression_ratio"]))
        & (retrieval["length"].astype(str) == "all")
    ]
    if "kv_quant" in part:
        part = part[part["kv_quant"].fillna(FLOAT).astype(str) == row["kv_quant"]]
    elif row["kv_quant"] != FLOAT:
        return None
    if part.empty:
        return None
    first = part.iloc[0]
    return float(first["accuracy"]), float(first["ci_low"]), float(first["ci_high"])


def _relative_noise(part: pd.DataFrame) -> float:
    """The decode-time noise of a context-length sweep, as a fraction of TPOT: the timed runs' spread (IQR /
    median) where there were enough runs for one, else the baseline's scatter about its fitted line."""
    noise = []
    if "tpot_iqr" in part and "n_timing_runs" in part:
        timed = part[part["n_timing_runs"] >= 3]
        if not timed.empty:
            noise.append(float((timed["tpot_iqr"] / timed["tpot"]).max()))
    fitted = part["fit_points"].max() if "fit_points" in part else math.inf
    if "fit_rms" in part and part["fit_rms"].notna().any() and fitted > 2:  # a line through 2 points has no scatter
        base_tpot = part.loc[part["method"] == "none", "tpot"].median()
        if base_tpot:
            noise.append(float(part["fit_rms"].dropna().iloc[0] / base_tpot))
    return max(noise) if noise else math.nan


def where_speed_pays(scaling: pd.DataFrame, model: str, dataset: str) -> str:
    """One sentence: the context length from which a press's measured decode-time gain exceeds the noise at every
    longer length measured, from the context-length sweep."""
    if scaling.empty:
        return "Where speed pays: not measured (no context-length sweep in these results)."
    part = scaling[(scaling["model"].map(lambda m: slug(str(m))) == model) & (scaling["dataset"] == dataset)]
    if part.empty:
        swept = scaling["model"].map(lambda m: slug(str(m)))
        if not (swept == model).any():
            names = ", ".join(sorted(set(swept)))
            return f"Where speed pays: not measured for {model} (the context-length sweep ran on {names})."
        return f"Where speed pays: not measured on {dataset} (the context-length sweep ran on other text)."
    noise = _relative_noise(part)
    lengths = sorted(int(n) for n in part["context_length"].unique())
    part = charts.chart_series(part)  # a press read in chunks is a series of its own, not more rows of the press
    pressed = part[(part["method"] != "none") & part["tpot_speedup"].notna()]
    margin = 0.0 if math.isnan(noise) else noise
    found = []  # (from length, -speedup at the longest, label, speedup at the longest)
    for (method, ratio), rows in pressed.groupby(["method", "compression_ratio"]):
        rows = rows.sort_values("context_length")
        gains = (rows["tpot_speedup"].astype(float) - 1.0 > margin).tolist()
        if not gains[-1]:
            continue
        start = len(gains) - 1
        while start > 0 and gains[start - 1]:
            start -= 1
        longest = float(rows["tpot_speedup"].iloc[-1])
        found.append((int(rows["context_length"].iloc[start]), -longest, f"{method} at ratio {ratio:g}", longest))
    noise_text = "noise not measured" if math.isnan(noise) else f"noise ±{100 * noise:.0f}% of TPOT"
    span = f"{lengths[0]}–{lengths[-1]} tokens"
    if not found:
        return f"Where speed pays: no press decoded faster by more than the noise ({noise_text}) over {span}."
    start, _, name, speedup = min(found)
    return (
        f"Where speed pays: from {start} tokens on, {name} decodes faster by more than the noise ({noise_text}); "
        f"{speedup:.2f}× the baseline's decode speed at {lengths[-1]} tokens (sweep over {span})."
    )


def not_measured(rows: pd.DataFrame, retrieval: pd.DataFrame, scaling: pd.DataFrame, choices: list[Choice]) -> str:
    """One sentence: what this model and dataset's results lack for the answer above."""
    gaps = []
    compressed = rows[~is_baseline(rows)]
    if "tpot" not in rows or rows["tpot"].isna().all():
        gaps.append("decode time")
    else:
        untimed = sorted(set(compressed["method"]) - set(compressed.dropna(subset=["tpot"])["method"]) - {"none"})
        if untimed:
            gaps.append(f"decode time of {len(untimed)} presses ({', '.join(untimed)})")
    model, dataset = rows["model"].iloc[0], rows["dataset"].iloc[0]
    here = pd.DataFrame()
    if not retrieval.empty:
        here = retrieval[(retrieval["model"].map(lambda m: slug(str(m))) == model) & (retrieval["dataset"] == dataset)]
    if here.empty:
        gaps.append("needle retrieval")
    else:
        chosen = {c.row["method"] for c in choices if c.row is not None}
        missing = sorted(chosen - set(here["method"]))
        if missing:
            gaps.append(f"needle retrieval of {', '.join(missing)}")
    if scaling.empty or scaling[(scaling["dataset"] == dataset)].empty:
        gaps.append("the context-length sweep")
    if set(rows["kv_quant"]) == {FLOAT}:
        gaps.append("quantised caches (kv_quant)")
    if not any(column in rows and rows[column].notna().any() for column in EXTRA_AXES):
        gaps.append("chunked prefill")
    empty = [f"≤ {100 * c.budget:.0f}%" for c in choices if c.row is None]
    if empty:
        gaps.append(f"any configuration within the budget(s) {', '.join(empty)}")
    if not gaps:
        return "Not measured: nothing the summary needs is missing."
    return "Not measured in this run: " + "; ".join(gaps) + "."


def _run_line(rows: pd.DataFrame) -> str:
    """When and where the run measured, from the provenance columns."""
    parts = []
    if "created_at" in rows and rows["created_at"].notna().any():
        parts.append(f"measured {str(rows['created_at'].dropna().max())[:10]}")
    if "device_name" in rows and rows["device_name"].notna().any():
        parts.append(f"on {rows['device_name'].dropna().iloc[0]}")
    if "max_length" in rows and rows["max_length"].notna().any():
        parts.append(f"{int(rows['max_length'].dropna().iloc[0])}-token windows")
    if "n_ppl_windows" in rows and rows["n_ppl_windows"].notna().any():
        parts.append(f"{int(rows['n_ppl_windows'].dropna().max())} scored windows")
    return ", ".join(parts)


def answers(metrics: pd.DataFrame, retrieval: pd.DataFrame | None = None, scaling: pd.DataFrame | None = None,
            budgets: tuple[float, ...] = BUDGETS) -> list[Answer]:  # fmt: skip
    """The summary of every model and dataset in `metrics`, the most informative first (`_lead`)."""
    retrieval = pd.DataFrame() if retrieval is None else retrieval
    scaling = pd.DataFrame() if scaling is None else scaling
    rows = configurations(metrics)
    result = []
    for (model, dataset), part in rows.groupby(["model", "dataset"], sort=True):
        base = part[is_baseline(part)]
        choices = [best_at_budget(part, budget) for budget in budgets]
        for choice in choices:
            if choice.row is not None:
                choice.accuracy = _retrieval_accuracy(retrieval, choice.row)
        estimated = any(c.row is not None and bool(c.row["memory_estimated"]) for c in choices)
        result.append(
            Answer(
                model=str(model),
                dataset=str(dataset),
                baseline_ppl=float(base["ppl"].iloc[0]) if not base.empty else math.nan,
                choices=choices,
                speed=where_speed_pays(scaling, str(model), str(dataset)),
                unmeasured=not_measured(part, retrieval, scaling, choices),
                run=_run_line(part),
                estimated_memory=estimated,
            )
        )
    return sorted(result, key=_lead)


def _lead(answer: Answer) -> tuple:
    """Answers that meet the most budgets first (names break ties): a model whose cache no press brings under any
    budget (Gemma-3's, pruned in 3 of its 18 layers) is not the first thing a reader sees."""
    return -sum(c.row is not None for c in answer.choices), answer.model, answer.dataset


def read_metrics(results_dir: str | os.PathLike) -> pd.DataFrame:
    """Every per-dataset metrics table under `results_dir`, stacked (tables written before the precision axis
    read as float caches)."""
    return tables.read_tables(results_dir)


def read(results_dir: str | os.PathLike) -> list[Answer]:
    """The summary of everything stored under `results_dir` (metrics tables required; retrieval and sweep tables
    used where present)."""
    from kvlib.analysis import retrieval as retrieval_tables
    from kvlib.analysis import scaling as scaling_tables

    metrics = read_metrics(results_dir)
    retrieval, _ = retrieval_tables.read_retrieval(results_dir)
    return answers(metrics, retrieval, scaling_tables.read_tables(results_dir))


# ------------------------------------------------------------------------------------------------ rendering


def _signed(value: float, spec: str = "+.2f") -> str:
    return "n/a" if _missing(value) else format(value + 0.0, spec)


def delta_text(row: pd.Series) -> str:
    """Δppl [low, high]."""
    text = _signed(row["ppl_delta"])
    if not (_missing(row.get("ppl_delta_ci_low")) or _missing(row.get("ppl_delta_ci_high"))):
        text += f" [{_signed(row['ppl_delta_ci_low'])}, {_signed(row['ppl_delta_ci_high'])}]"
    return text


def accuracy_text(choice: Choice) -> str:
    if choice.accuracy is None:
        return "not measured"
    accuracy, low, high = choice.accuracy
    return f"{100 * accuracy:.0f}% [{100 * low:.0f}, {100 * high:.0f}]"


def decode_text(row: pd.Series) -> str:
    """The TPOT speedup (baseline TPOT / this TPOT), flagged when the timing was."""
    speedup = row.get("tpot_speedup")
    if _missing(speedup):
        return "not measured"
    flag = row.get("timing_flag")
    return f"{speedup:.2f}×" + ("" if _missing(flag) or not str(flag).strip() else f" (⚠ {str(flag).strip()})")


def memory_text(row: pd.Series) -> str:
    return f"{100 * row['kv_bytes_ratio']:.0f}%" + ("*" if row.get("memory_estimated") else "")


def tied_text(choice: Choice) -> str:
    if not choice.tied:
        return "none"
    return ", ".join(choice.tied) + (f" and {choice.tied_more} more" if choice.tied_more else "")


HEADERS = ("KV budget", "best measured configuration", "Δ perplexity [95% CI]", "retrieval [95% CI]",
           "decode speed vs baseline", "KV cache", "not separable from it (intervals overlap)")  # fmt: skip


def _cells(choice: Choice) -> list[str]:
    budget = f"≤ {100 * choice.budget:.0f}%"
    if choice.row is None:
        return [budget, "nothing measured fits", "", "", "", "", ""]
    row = choice.row
    return [budget, row["configuration"], delta_text(row), accuracy_text(choice), decode_text(row), memory_text(row),
            tied_text(choice)]  # fmt: skip


def _heading(answer: Answer) -> str:
    return f"{answer.model} / {answer.dataset}"


def _baseline_line(answer: Answer) -> str:
    text = f"Uncompressed suffix perplexity {answer.baseline_ppl:.2f}" if not math.isnan(answer.baseline_ppl) else ""
    text = text or "No uncompressed baseline stored"
    return text + (f" ({answer.run})." if answer.run else ".")


def one_line(answer_list: list[Answer], budget: float = 0.5) -> str:
    """The run's one-line answer: per model and dataset, the best configuration at `budget`."""
    parts = []
    for answer in answer_list:
        choice = next((c for c in answer.choices if math.isclose(c.budget, budget)), None)
        if choice is None or choice.row is None:
            parts.append(f"{_heading(answer)}: nothing measured fits ≤ {100 * budget:.0f}% of the KV cache")
            continue
        parts.append(f"{_heading(answer)}: {choice.row['configuration']} (Δppl {delta_text(choice.row)})")
    if not parts:
        return "No results to summarise yet."
    return "At half the KV cache, best measured: " + "; ".join(parts) + "."


def to_markdown(answer_list: list[Answer], heading_level: int = 3) -> str:
    """The summary as Markdown (README, results/summary.md)."""
    hashes = "#" * heading_level
    lines = []
    for answer in answer_list:
        lines += [f"{hashes} {_heading(answer)}", "", _baseline_line(answer), ""]
        lines.append("| " + " | ".join(HEADERS) + " |")
        lines.append("|" + "---|" * len(HEADERS))
        for choice in answer.choices:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(choice)) + " |")
        lines.append("")
        if answer.estimated_memory:
            lines += ["\\" + ESTIMATED_NOTE, ""]
        lines += [f"- {answer.speed}", f"- {answer.unmeasured}", ""]
    if not lines:
        return "No results to summarise yet.\n"
    return "\n".join(lines)


_STYLE = """<style>
.kvlib-summary table { border-collapse: collapse; margin: 6px 0; }
.kvlib-summary td, .kvlib-summary th { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: left !important;
  vertical-align: top; }
.kvlib-summary td:nth-child(2) { font-weight: bold; }
.kvlib-summary .kvlib-menus { margin: 4px 0 8px; font: 14px sans-serif; }
.kvlib-summary .kvlib-menus select { margin: 0 12px 0 4px; }
</style>"""

_MENU_SCRIPT = """<script type="text/javascript">
(function () {
  var root = document.currentScript && document.currentScript.parentNode;
  if (!root) { return; }
  var menus = root.querySelectorAll("select[data-kvlib-axis]");
  function show() {
    var chosen = {};
    menus.forEach(function (menu) { chosen[menu.getAttribute("data-kvlib-axis")] = menu.value; });
    var shown = 0;
    root.querySelectorAll(".kvlib-answer").forEach(function (block) {
      var match = block.getAttribute("data-model") === chosen.model
        && block.getAttribute("data-dataset") === chosen.dataset;
      block.style.display = match ? "" : "none";
      shown += match ? 1 : 0;
    });
    root.querySelector(".kvlib-none").style.display = shown ? "none" : "";
  }
  menus.forEach(function (menu) { menu.addEventListener("change", show); });
  show();
})();
</script>"""


def _options(values: list[str]) -> str:
    return "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values)


def to_html(answer_list: list[Answer]) -> str:
    """The summary as an HTML fragment for the report: a menu of models and one of datasets (one answer shown at
    a time; without scripts every answer shows)."""
    if not answer_list:
        return '<div class="kvlib-summary"><p>No results to summarise yet.</p></div>'
    escape = html.escape
    first = min(answer_list, key=_lead)  # the menus open on it
    models = [first.model, *sorted({a.model for a in answer_list} - {first.model})]
    datasets = [first.dataset, *sorted({a.dataset for a in answer_list} - {first.dataset})]
    parts = [_STYLE, '<div class="kvlib-summary">']
    parts.append(
        '<div class="kvlib-menus">'
        f'<label>model<select data-kvlib-axis="model">{_options(models)}</select></label>'
        f'<label>dataset<select data-kvlib-axis="dataset">{_options(datasets)}</select></label></div>'
    )
    parts.append('<p class="kvlib-none" style="display:none">No results for this model on this dataset.</p>')
    for answer in answer_list:
        parts.append(
            f'<div class="kvlib-answer" data-model="{escape(answer.model)}" data-dataset="{escape(answer.dataset)}">'
        )
        parts.append(f"<h3>{escape(_heading(answer))}</h3><p>{escape(_baseline_line(answer))}</p>")
        parts.append("<table><thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in HEADERS) + "</tr></thead><tbody>")
        for choice in answer.choices:
            parts.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in _cells(choice)) + "</tr>")
        parts.append("</tbody></table>")
        if answer.estimated_memory:
            parts.append(f"<p><small>{ESTIMATED_NOTE}</small></p>")
        parts.append(f"<ul><li>{escape(answer.speed)}</li><li>{escape(answer.unmeasured)}</li></ul></div>")
    parts.append(_MENU_SCRIPT)
    parts.append("</div>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ files


def write_markdown(answer_list: list[Answer], path: str | os.PathLike, header: str = "") -> Path:
    """results/summary.md: the header line (run, preset), then the summary."""
    from kvlib.files import atomic_write

    path = Path(path)
    with atomic_write(path) as handle:
        handle.write((header + "\n\n" if header else "") + to_markdown(answer_list))
    return path


def fill_readme(readme: str | os.PathLike, block: str) -> bool:
    """Replace what lies between the README's summary markers with `block`; False when the markers are absent."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    updated = text[: start + len(README_START)] + "\n" + block.strip() + "\n" + text[end:]
    if updated != text:
        from kvlib.files import atomic_write

        with atomic_write(readme) as handle:
            handle.write(updated)
    return True
