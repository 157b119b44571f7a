"""The whole study as executed notebooks: presets, papermill runs for each dataset and ratio, the report.

`run_all.sh` calls `python -m kvlib study --preset NAME`. Every number in the report traces to an executed copy
of a notebook kept under `<output_dir>/notebooks/`; finished cells are skipped on a rerun (the measuring code
resumes), so an interrupted study picks up where it stopped.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from kvlib import models, study
from kvlib.analysis import charts, tables
from kvlib.data import DATASETS
from kvlib.files import TMP_SUFFIX, slug
from kvlib.study import executors

if TYPE_CHECKING:
    from kvlib.progress import StudyProgress

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
# Where papermill's per-cell log goes while a run shows its progress display (None: stderr).
_NOTEBOOK_OUTPUT: Callable[[str], None] | None = None


@dataclass
class ModelShare:
    """One model of a study and its share of the protocol: `grid` overrides the preset's grid fields (datasets,
    methods, latency_methods, ratios, sweeps), `settings` its protocol settings (n_ppl, n_timing, ...). Adding a
    model to a study is adding one of these to its preset's `models`."""

    model: str
    grid: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)


@dataclass
class Preset:
    """A named study: the model(s), the text, the protocol settings, the grid."""

    settings: study.Settings
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    methods: list[str] = field(default_factory=lambda: list(study.DEFAULT_METHODS))
    # Methods whose latency is measured (None: all of `methods`); timing every press may not fit a time budget.
    latency_methods: list[str] | None = None
    ratios: list[float] = field(default_factory=lambda: list(study.DEFAULT_RATIOS))
    # Kinds that sweep context lengths, each with its own grid and protocol: kind -> parameters of its notebook
    # that differ from the preset's (e.g. methods, ratios, lengths, datasets, n_timing). An entry for "ppl" or
    # "latency" narrows that kind's grid the same way (a model's smaller share of the timing, say); None leaves
    # the kind out.
    sweeps: dict[str, dict | None] = field(default_factory=dict)
    # Extra jobs of a kind with a grid and settings of their own: cache precisions ({"kind": ..., "kv_quant": [...],
    # grid fields}) or reading modes ({"kind": "ppl", "prefill_chunk": 128, ...}), each run by the kind's notebook
    # (executed copy `variant<i>_<notebook>`); their cells join the kind's table, labelled by precision and reading.
    variants: list[dict] = field(default_factory=list)
    needs_hub: bool = False
    tiny_model: bool = False
    # The study's models, each with its share (empty: the one model of `settings.model` with the whole grid). Each
    # model's tables, cells and executed notebooks are kept apart by its name; the analysis compares them.
    models: list[ModelShare] = field(default_factory=list)


def model_runs(preset: Preset, settings: study.Settings) -> list[tuple[Preset, study.Settings]]:
    """Each model of a preset as a single-model preset and its settings (its share applied)."""
    if not preset.models:
        return [(preset, settings)]
    return [
        (replace(preset, models=[], **share.grid), replace(settings, model=share.model, **share.settings))
        for share in preset.models
    ]


@dataclass
class NotebookJob:
    """One notebook of a study: what to run, where its executed copy goes, and how many cells it still has to
    measure (a job whose cells are all stored and whose executed copy exists is skipped)."""

    notebook: str
    target: Path
    parameters: dict
    pending: int
    label: str


# The study's original presses; the offline preset times these and scores every press for perplexity.
ORIGINAL_METHODS = ("knorm", "snapkv", "streaming_llm", "lagkv", "random")


# Needle retrieval in the offline preset: 40 trials per cell (5 depths x 8), so that the baseline's Wilson interval
# is informative (40/40 gives [0.91, 1]); PG-19 only, because both datasets do not fit ~8 minutes on the 2-core
# machine. Measured per trial on SmolLM2 at 1024 tokens (a sizing script, its one repetition on a quiet machine):
# the shared prefill for the baseline and these five presses 2.69 s (a plain prefill 2.40 s); per press, prune +
# 22-token question + 8 greedy tokens 0.80 s (median; 0.74 min); KVzip's re-reading adds 9.4 s per ratio, so
# KVzip and the other presses of DEFAULT_METHODS are left out. 2.69 + 11 presses x 0.80 = 11.5 s per trial,
# x 40 trials = 7.7 min (+ model load and tokenising); both datasets would take ~15 min.
OFFLINE_RETRIEVAL = {
    "datasets": ["pg19"],
    "methods": ["snapkv", "knorm", "streaming_llm", "tova", "expected_attention"],
    "ratios": [0.5, 0.7],
    "lengths": [1024],
    "depths": [0.1, 0.3, 0.5, 0.7, 0.9],
    "trials": 8,
}


# Streaming perplexity on SmolLM2 (07_streaming): the first 32,768 PG-19 tokens (4x its trained context of 8192),
# chunks of 512 into 1024 positions per layer. Measured on this machine (the cells' wall times, alone): the
# references 15.8 min (dense 514 s: its attention grows with the text; recompute 213 s; a plain window 111 s and
# 107 s at the two position modes), each press ~3.7 min (both position modes). StreamingLLM (sinks + window) is the
# press the question is about, SnapKV the score-based one: ~23 min in all.
OFFLINE_STREAMING = {
    "datasets": ["pg19"],
    "methods": ["streaming_llm", "snapkv"],
    "ratios": [0.5],
    "stream_tokens": 32768,
    "kv_budget": 1024,
    "prefill_chunk": 512,
    "max_samples": 32,
}


# Gemma-3-270M's share of the offline study. Measured on this 2-core VM while other jobs ran (wall), and as CPU
# time / 2 (what two threads take on a quiet machine; the wall times were up to twice that): a 512-token prefill
# 5.4 s wall (2.8 s), a 511-token suffix pass from its cache 13.6-14.6 s wall (4.5-5.0 s), a 1024-token forward
# 12.6-15.1 s (6.4-7.6 s), one decoded token at 1024 0.6-1.5 s wall (0.20-0.43 s); about 2.5-3.7x SmolLM2 (a
# 1024-token prefill 2.4 s, a suffix pass with pruning 1.9 s, a token 70-90 ms), mostly its 262k-entry vocabulary
# (the output layer is 168M of its 270M weights). Quiet-machine arithmetic:
# - perplexity, both datasets, every press, ratio 0.5 (where the issue saw the order change): per window one shared
#   prefill 2.8 s + KVzip's re-reading ~2.8 s + 12 cells (baseline + 11 presses) x ~5 s = 66 s; x 8 windows x 2
#   datasets = ~17 min (ratio 0.7 as well: 33 min; the whole 4-ratio grid 62 min);
# - retrieval, PG-19, 3 presses at 0.5, 5 depths x 4 trials: per trial a 1024-token prefill 7 s + 4 cells x
#   (question + 8 tokens, ~2.8 s) = 18 s; x 20 trials = 6 min;
# - no latency rows and no context-length sweep: a press prunes only Gemma's 3 global layers of 18, so its decode
#   time can move by a few percent at most, inside the ±10% timing noise of this machine, and an 8192-token prefill
#   would take ~3 x SmolLM2's 43 s (the sweep's 40 cells over 1.5 h).
# Gemma: ~24 min + its first conversion (1 min).
#
# The offline preset in all, timed from an empty folder alone on this machine (benchmarks/offline_budget.py --run,
# README "The whole offline run, timed"): 116 min, of which SmolLM2's perplexity 18.7, latency 10.6, retrieval 7.2,
# streaming 29.4, the context-length sweep 11.0, its precision and reading-mode variants 17.7; Gemma's perplexity
# 12.1, retrieval 2.3 and its decode timing 5.3, which its share now leaves out (as designed above): ~111 min;
# with the chunked context-length sweep added since (SMOLLM2_CHUNKED_SCALING, ~3 min): ~114 min.
GEMMA3_SHARE = ModelShare(
    "gemma3-270m",
    grid={
        "ratios": [0.5],
        "sweeps": {
            "latency": None,  # the preset's latency grid would otherwise time Gemma on both datasets (~5 min)
            "retrieval": {
                **OFFLINE_RETRIEVAL,
                "methods": ["snapkv", "knorm", "streaming_llm"],
                "ratios": [0.5],
                "trials": 4,
            },
        },
    },
    settings={"n_timing": 3},
)


# Cache precision on SmolLM2 (issue: quantize, evict, or both). With no press on both datasets every precision
# but HQQ's 1- and 3-bit: fp8, quanto-int4, quanto-int2, hqq-int8, hqq-int4, hqq-int2; fp8 and quanto-int4 (the
# better 4-bit backend on SmolLM2: +2.0% against HQQ's +8.6%, benchmarks/kv_quant_parity.py) combined with the two
# best presses of the committed report (mean Δppl over ratios and datasets: expected_attention and
# observed_attention, 1.26 each; KVzip is as good on wikitext but re-reads the prefix) at every ratio. Measured
# (cells' group_wall_time, this machine): hqq-int8 alone 38 s and 35 s for the 8 windows of each dataset (HQQ's
# iterative quantizer: ~4.5 s per window and cell); the other 19 cells took 23 min while other jobs shared the
# machine (roughly 2 s per window and cell alone: ~10 min). Timed: the uncompressed cache at fp8 and quanto-int4
# against the float baseline on PG-19 (dequantizing at every decoded token is the cost to show): 3 configurations
# x 6 rounds x ~6 s = ~2 min. Retrieval: SnapKV at 0.5 and the uncompressed cache at fp8 and quanto-int4, PG-19,
# the main retrieval protocol (a table holds one protocol: fewer trials would be a variant with a table of its
# own): 40 trials x (2.7 s + 5 x 0.8 s) = ~4.5 min. In all ~20 min.
# Round 3's streaming share (below) left no room in the 2-hour budget for the 2-bit rows, which collapse (+410% and
# +349% perplexity, benchmarks/kv_quant_parity.py, and the committed rows measured before; ~10 min here), nor for
# the presses combined with fp8 (~6 min): quanto-int4 holds less and is the one on the committed frontier.
SMOLLM2_PRECISIONS = [
    {"kind": "ppl", "methods": [], "ratios": [], "kv_quant": ["fp8", "quanto-int4"]},
    {"kind": "ppl", "methods": ["expected_attention", "observed_attention"], "ratios": [0.1, 0.3, 0.5, 0.7],
     "kv_quant": ["quanto-int4"]},
    {"kind": "ppl", "methods": [], "ratios": [], "kv_quant": ["hqq-int8", "hqq-int4"]},
    {"kind": "latency", "datasets": ["pg19"], "methods": [], "ratios": [], "kv_quant": ["fp8", "quanto-int4"]},
    {"kind": "retrieval", **OFFLINE_RETRIEVAL, "methods": ["snapkv"], "ratios": [0.5],
     "kv_quant": ["fp8", "quanto-int4"]},
]  # fmt: skip


# Reading mode on SmolLM2 (issue: compress while reading): every press that can prune chunk by chunk at ratio 0.5,
# its 512-token prefix read 128 tokens at a time, beside the same presses read in one pass (the report compares
# them). Each chunked cell prefills on its own: measured 3.4 min on PG-19 and 3.1 on wikitext (the committed
# results hold both); the preset reads PG-19 only.
SMOLLM2_CHUNKED = {
    "kind": "ppl",
    "datasets": ["pg19"],
    "methods": ["knorm", "keydiff", "random", "streaming_llm", "tova", "snapkv", "pyramidkv", "observed_attention",
                "expected_attention"],
    "ratios": [0.5],
    "prefill_chunk": 128,
}  # fmt: skip
# The context-length sweep (05_scaling) of the offline preset; sized in `presets()`.
OFFLINE_SCALING = {
    "datasets": ["pg19"],
    "methods": ["streaming_llm", "snapkv", "knorm"],
    "ratios": [0.5, 0.7, 0.9],
    "lengths": [1024, 2048, 4096, 8192],
    "gen_tokens": 16,
    "warmup_times": 0,
    "n_timing": 1,
}
# Peak memory against context length, read in one pass and compressed as it reads: the sweep's two position- and
# score-based presses at ratio 0.7 read 512 tokens at a time, beside their one-pass rows (the report's memory
# chart draws both). Each length times the baseline again (interleaving) and both presses once. Measured alone on
# this machine: 10, 17, 36 and 93 s of cells at 1024..8192 tokens, 2.6 min (3 min with the model's load).
SMOLLM2_CHUNKED_SCALING = {
    "kind": "scaling",
    **OFFLINE_SCALING,
    "methods": ["streaming_llm", "snapkv"],
    "ratios": [0.7],
    "prefill_chunk": 512,
}
SMOLLM2_VARIANTS = [*SMOLLM2_PRECISIONS, SMOLLM2_CHUNKED, SMOLLM2_CHUNKED_SCALING]


def local_data_dir() -> str:
    return os.environ.get("KVLIB_DATA_DIR") or str(REPO.parent / "shared" / "data")


def presets() -> dict[str, Preset]:
    return {
        # The original study: pythia-70m, wikitext and PG-19 from the hub.
        "default": Preset(study.Settings(), needs_hub=True),
        # The bundled SmolLM2-135M and Gemma-3-270M and local text, at the original protocol where it matters
        # (1024-token windows, prefix_ratio 0.5, 32 generated tokens). SmolLM2 runs the whole grid: about 67 min on
        # 2 CPU cores (perplexity and latency alone need at least 43: benchmarks/offline_budget.py); Gemma a share
        # sized above GEMMA3_SHARE (~42 min), so that the ranking of presses can be compared across models.
        "offline": Preset(
            study.Settings(
                model="smollm2",
                data_dir=local_data_dir(),
                max_length=1024,
                max_samples=20,
                n_ppl=8,
                n_timing=5,
                warmup_times=1,
                gen_tokens=32,
                pg19_max_chars=400_000,
            ),
            latency_methods=list(ORIGINAL_METHODS),
            # Where compression pays (05_scaling, PG-19: one book gives 8192-token contexts). Sized from single
            # measurements on this VM while other jobs ran (so slower than alone): SmolLM2's plain prefill of 1024,
            # 2048, 4096, 8192 tokens took 2.4, 13.5, 37.7, 61 s (SnapKV at 0.5: 87 s at 8192); TPOT at 8192 was
            # 0.35 s (0.08 s at 1024 alone, the committed latency run). Prefill dominates: one round of the 10 cells
            # (baseline + 3 presses x 3 ratios) over the four lengths is 10 x ~115 s + 10 x 15 decoded tokens x
            # (0.08..0.35) s, about 20 min on the busy machine and, at about twice the speed alone, 10 min (measured
            # alone since: 739 s). So one timed round and no warm-up round; each further round adds as much again.
            sweeps={
                # Decode time depends on lengths, not on the text: timed on PG-19 only (wikitext's timing took 10 min).
                "latency": {"datasets": ["pg19"], "methods": list(ORIGINAL_METHODS)},
                "retrieval": OFFLINE_RETRIEVAL,
                "streaming": OFFLINE_STREAMING,
                "scaling": OFFLINE_SCALING,
            },
            models=[ModelShare("smollm2", grid={"variants": SMOLLM2_VARIANTS}), GEMMA3_SHARE],
        ),
        # A tiny random model through every step in about a minute: plumbing, not numbers. Used by CI.
        "smoke": Preset(
            study.Settings(
                model="",
                data_dir=local_data_dir(),
                max_length=640,
                max_samples=4,
                n_ppl=2,
                n_timing=2,
                warmup_times=1,
                gen_tokens=4,
                pg19_max_chars=100_000,
            ),
            ratios=[0.3, 0.7],
            # The context-length sweep's plumbing: two short lengths, one press, one ratio.
            # Needle retrieval through every step, at the least that exercises it: one length, depth and ratio (a
            # ratio of the perplexity grid, so the report's ranking comparison runs too).
            sweeps={
                "scaling": {"datasets": ["pg19"], "methods": ["knorm"], "ratios": [0.5], "lengths": [256, 512]},
                "retrieval": {
                    "methods": ["knorm", "snapkv"],
                    "ratios": [0.7],
                    "lengths": [640],
                    "depths": [0.5],
                    "trials": 2,
                    "answer_tokens": 4,
                },
                # Streaming perplexity's plumbing: 1536 tokens in chunks of 128 into 128 positions, one press.
                "streaming": {
                    "datasets": ["pg19"],
                    "methods": ["streaming_llm"],
                    "ratios": [0.5],
                    "stream_tokens": 1536,
                    "kv_budget": 128,
                    "prefill_chunk": 128,
                },
            },
            tiny_model=True,
        ),
    }


class HubUnreachable(RuntimeError):
    pass


def check_hub(model: str, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the offline preset, when the Hugging Face hub cannot be reached."""
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(model, timeout=timeout)
    except Exception as error:  # any failure here means the hub-based study cannot run
        raise HubUnreachable(
            f"cannot reach the Hugging Face hub for {model!r} ({type(error).__name__}). This preset downloads the "
            "model and the datasets; without network use the bundled model and local text instead:\n"
            "  bash run_all.sh --preset offline      (text from $KVLIB_DATA_DIR, default ../shared/data)"
        ) from error


class _LineHandler(logging.Handler):
    """papermill's log records as lines to a function (a log file, or the progress display's console)."""

    def __init__(self, write: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.write = write

    def emit(self, record: logging.LogRecord) -> None:
        self.write(f"    {record.getMessage()}")


def _show_notebook_output(write: Callable[[str], None] | None = None) -> None:
    """papermill reports what the executing notebook prints through its logger: to `write` when given (the run's
    log file), else to stderr. The handler is this module's own: a later call replaces it."""
    logger = logging.getLogger("papermill")
    for handler in [h for h in logger.handlers if getattr(h, "kvlib", False)]:
        logger.removeHandler(handler)
    if write is None and logger.handlers:
        return
    handler = _LineHandler(write) if write is not None else logging.StreamHandler()
    if write is None:
        handler.setFormatter(logging.Formatter("    %(message)s"))
    handler.kvlib = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def declared_parameters(notebook: str | os.PathLike, parameters: dict) -> dict:
    """The parameters the notebook's `parameters` cell declares: papermill warns about any other, and each
    notebook takes only its own from the study's common set."""
    import papermill

    declared = papermill.inspect_notebook(str(notebook))
    return {name: value for name, value in parameters.items() if name in declared}


def _execute(notebook: str, output: Path, parameters: dict, log: Callable[[str], None]) -> Path:
    """Run one notebook with papermill; the executed copy appears only once it ran to the end."""
    import papermill

    _show_notebook_output(_NOTEBOOK_OUTPUT)
    output.parent.mkdir(parents=True, exist_ok=True)
    # A temporary folder (removed by the next run if this one is killed) holding a file papermill accepts by name.
    scratch = output.with_name(f".{output.name}{TMP_SUFFIX}")
    scratch.mkdir(exist_ok=True)
    partial = scratch / output.name
    log(f"papermill {notebook} -> {output}")
    started = time.perf_counter()
    # An absolute `notebook` (a Ray task's shipped copy) is taken as is by the join below.
    source = NOTEBOOKS / notebook
    papermill.execute_notebook(
        str(source), str(partial), parameters=declared_parameters(source, parameters), progress_bar=False,
        log_output=True, cwd=str(REPO), kernel_name="python3", kernel_manager_class=_local_kernel_manager(),
    )  # fmt: skip
    partial.replace(output)
    scratch.rmdir()
    log(f"  done in {time.perf_counter() - started:.1f} s")
    return output


@functools.cache
def _local_kernel_manager() -> type:
    """The notebook's kernel talks to papermill over local (IPC) sockets: both run on one machine, and over TCP,
    jupyter's default, ipykernel warns at every start that its traffic travels unencrypted."""
    import tempfile
    import uuid

    from jupyter_client import AsyncKernelManager

    class LocalKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs) -> None:
            # The sockets are named after the connection file: a unique one in the temporary folder (without it
            # they would be `kernel-ipc-<n>` in the working directory, shared by concurrent runs).
            connection = Path(tempfile.gettempdir()) / f"kvlib-kernel-{uuid.uuid4().hex[:12]}.json"
            super().__init__(transport="ipc", connection_file=str(connection), **kwargs)

    return LocalKernelManager


def _protocol_parameters(settings: study.Settings) -> dict:
    return {
        "model": settings.model,
        "max_length": settings.max_length,
        "max_samples": settings.max_samples,
        "data_dir": settings.data_dir,
        "pg19_max_chars": settings.pg19_max_chars,
        "seed": settings.seed,
        "device": settings.device,
        "dtype": settings.dtype,
        "output_dir": settings.output_dir,
        "press_options": settings.press_options,
    }


def run_preset(
    name: str,
    output_dir: str | None = None,
    log: Callable[[str], None] = print,
    executor: str = "sequential",
    address: str | None = None,
    display: bool = False,
    verbose: bool = False,
    ray_timeout: float = executors.RAY_TIMEOUT_S,
) -> list[Path]:
    """Every notebook of the study for preset `name`, then the report and the PNG plots. Returns what it wrote.
    executor "ray": data preparation and the measuring notebooks run as Ray tasks (on the cluster at `address`,
    else a local instance; an address where nothing answers within `ray_timeout` seconds fails before the output
    directory is touched); raises executors.TasksFailed at the end, after the report, if a task still failed.
    display: one progress display for the run (stage, cells, elapsed, ETA) instead of log lines; the log lines and
    papermill's per-cell output go to `<output>/logs/study-<time>.log`, and to the screen too with `verbose`."""
    if executor not in executors.EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {', '.join(executors.EXECUTORS)}")
    available = presets()
    if name not in available:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(available)}")
    preset = available[name]
    output = Path(output_dir or ("results/smoke" if name == "smoke" else "results")).resolve()
    settings = replace(preset.settings, output_dir=str(output))
    kinds = list(tables.METRIC_KINDS)  # the sweeps' grids are checked as their jobs are planned
    if preset.tiny_model:
        settings.model = str(output / "model" / "tiny-gpt-neox")
    for model_preset, model_settings in model_runs(preset, settings):
        study.validate(model_settings, model_preset.methods, model_preset.ratios, kinds)
    if preset.needs_hub and not os.environ.get("HF_HUB_OFFLINE"):
        check_hub(settings.model)
    if executor == "ray" and address:
        executors.check_address(address, ray_timeout)

    with study.output_lock(output):  # the notebooks run under this lock (they see it held by their parent)
        if preset.tiny_model and not Path(settings.model).exists():
            from kvlib.models import write_tiny_model

            write_tiny_model(settings.model)  # complete or absent: written to a temporary directory first
        session = executors.ray_session(address, ray_timeout) if executor == "ray" else contextlib.nullcontext()
        with session:
            return _run_notebooks(name, preset, settings, output, kinds, log, executor, display, verbose)


# The notebook that measures each kind (executed once per dataset of its grid).
NOTEBOOK_OF = {
    "ppl": "02_ppl.ipynb",
    "latency": "03_latency.ipynb",
    "scaling": "05_scaling.ipynb",
    "retrieval": "06_retrieval.ipynb",
    "streaming": "07_streaming.ipynb",
}


def study_jobs(preset: Preset, settings: study.Settings, output: Path) -> list[list[NotebookJob]]:
    """The study's notebooks in stages: data preparation per model and dataset, then every measuring notebook
    (independent of each other), then the analysis. Reads and checks all text and every grid before anything is
    measured. One model keeps the single-model layout (notebooks/<dataset>/); several get a folder each
    (notebooks/<model>/<dataset>/), and their labels name the model."""
    runs = model_runs(preset, settings)
    prepare, measure = [], []
    for model_preset, model_settings in runs:
        several = len(runs) > 1
        executed = output / "notebooks" / (slug(model_settings.model) if several else "")
        label = f"{slug(model_settings.model)}/" if several else ""
        model_prepare, model_measure = _model_jobs(model_preset, model_settings, executed, label)
        prepare += model_prepare
        measure += model_measure
    analysis_parameters = {"results_dir": str(output), "time_metric": "tpot", "explore": False}
    executed = output / "notebooks"
    analysis = NotebookJob("04_analysis.ipynb", executed / "04_analysis.ipynb", analysis_parameters, 1, "analysis")
    return [prepare, measure, [analysis]]


def _model_jobs(
    preset: Preset, settings: study.Settings, executed: Path, label_prefix: str
) -> tuple[list[NotebookJob], list[NotebookJob]]:
    """One model's data preparation and measuring notebooks."""
    common = {**_protocol_parameters(settings), "methods": preset.methods, "ratios": preset.ratios}
    protocol = {"prefix_ratio": settings.prefix_ratio, "n_ppl": settings.n_ppl, "gen_tokens": settings.gen_tokens,
                "warmup_times": settings.warmup_times, "n_timing": settings.n_timing}  # fmt: skip
    common |= protocol  # every notebook gets the whole protocol, so each writes the tables of the whole run
    grids = {"ppl": {}, "latency": {"methods": preset.latency_methods or preset.methods}, **preset.sweeps}
    jobs = [(kind, grid, "") for kind, grid in grids.items() if grid is not None]
    jobs += [(grid["kind"], grid, f"variant{i}_") for i, grid in enumerate(preset.variants, start=1)]
    prepare, measure = [], []
    pending_of: dict[str, int] = {}
    counted: set[tuple[str, str]] = set()  # a cell two jobs plan (a variant's baseline) is measured once: count it once
    for kind, grid, prefix in jobs:
        parameters = {**common, **{name: value for name, value in grid.items() if name != "kind"}}
        datasets = parameters.pop("datasets", preset.datasets)
        for dataset in datasets:
            kind_settings = replace(settings, dataset=dataset, **_settings_overrides(parameters))
            plans = study.plan_run(kind_settings, parameters["methods"], parameters["ratios"], [kind]).datasets
            cells = {(plan.dataset, json.dumps(cell[-1], sort_keys=True, default=str)) for plan in plans
                     for cell in plan.pending[kind]}  # fmt: skip
            pending = len(cells - counted)
            counted |= cells
            pending_of[dataset] = pending_of.get(dataset, 0) + pending
            target = executed / dataset / f"{prefix}{NOTEBOOK_OF[kind]}"
            label = f"{label_prefix}{dataset}: {target.name}"
            measure.append(NotebookJob(NOTEBOOK_OF[kind], target, {**parameters, "dataset": dataset}, pending, label))
    for dataset in preset.datasets:
        target = executed / dataset / "01_data_prep.ipynb"
        parameters = {**common, "dataset": dataset}
        label = f"{label_prefix}{dataset}: {target.name}"
        prepare.append(NotebookJob(target.name, target, parameters, pending_of.get(dataset, 0), label))
    return prepare, measure


def _settings_overrides(parameters: dict) -> dict:
    names = {f.name for f in fields(study.Settings)}
    return {name: value for name, value in parameters.items() if name in names and name != "dataset"}


def run_sequentially(
    jobs: list[NotebookJob],
    log: Callable[[str], None],
    started: float,
    progress: StudyProgress | None = None,
    times: RunTimes | None = None,
) -> list[Path]:
    """The default executor: one notebook after the other, in this process's machine; each notebook's wall time
    goes to `times`."""
    written = []
    for job in jobs:
        log(f"== {job.label} (elapsed {time.perf_counter() - started:.0f} s)")
        if progress is not None:
            progress.stage(_stage_of(job), job.label, _KIND_OF.get(job.notebook) if job.pending else None)
        if job.target.exists() and not job.pending:
            # Keep the executed copy that measured these cells rather than a run that only reads them back.
            log(f"  skipped: every cell is stored and {job.target} is the notebook that measured them")
            continue
        job_started = time.perf_counter()
        written.append(_execute(job.notebook, job.target, job.parameters, log))
        if times is not None:
            times.add(job_step(job), job.label, job.pending, time.perf_counter() - job_started)
    return written


def job_step(job: NotebookJob) -> str:
    """The step of the run a notebook belongs to, for the run's times: its model (when the study has several),
    what it does, and whether it is one of the preset's variants (precision or reading-mode jobs)."""
    model = job.label.split(":")[0].rpartition("/")[0]
    what = {"01_data_prep.ipynb": "text", "04_analysis.ipynb": "report"}.get(job.notebook) or _KIND_OF[job.notebook]
    variant = " (variants)" if job.target.name.startswith("variant") else ""
    return f"{model + ' ' if model else ''}{what}{variant}"


@dataclass
class RunTimes:
    """The wall time of each step of one run, written to `<output>/logs/run-times-<time>.csv` at its end (step,
    what, cells measured, seconds, elapsed at its end) and summed per step in the run's last lines; the first
    report's time is a step of its own. benchmarks/offline_budget.py reads the file."""

    started: float
    rows: list[dict] = field(default_factory=list)

    def add(self, step: str, what: str, cells: int, seconds: float) -> None:
        elapsed = time.perf_counter() - self.started
        self.rows.append({"step": step, "what": what, "cells": cells, "seconds": round(seconds, 1),
                          "elapsed": round(elapsed, 1)})  # fmt: skip

    def write(self, path: Path) -> Path:
        import csv

        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["step", "what", "cells", "seconds", "elapsed"])
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def summary(self) -> list[str]:
        """One line per step, in the order the steps first ran: minutes, notebooks, cells."""
        steps: dict[str, list[dict]] = {}
        for row in self.rows:
            steps.setdefault(row["step"], []).append(row)
        lines = []
        for step, rows in steps.items():
            minutes = sum(row["seconds"] for row in rows) / 60
            lines.append(f"  {step}: {minutes:.1f} min ({len(rows)} run(s), {sum(row['cells'] for row in rows)} cells)")
        return lines


_KIND_OF = {notebook: kind for kind, notebook in NOTEBOOK_OF.items()}


def _stage_of(job: NotebookJob) -> str:
    if job.notebook == "01_data_prep.ipynb":
        return "preparing text"
    if job.notebook == "04_analysis.ipynb":
        return "report"
    return "measuring"


@contextlib.contextmanager
def _run_display(output: Path, measure: list[NotebookJob], log, display: bool, verbose: bool):
    """(log, progress) for a run: without `display`, the caller's log and no display; with it, a log file (its
    path printed first) and the progress display, papermill's output to the file (and the screen if `verbose`)."""
    global _NOTEBOOK_OUTPUT
    if not display:
        yield log, None
        return
    from kvlib.progress import StudyProgress, file_logger

    log_path = output / "logs" / f"study-{time.strftime('%Y%m%d-%H%M%S')}.log"
    to_file = file_logger(log_path)
    pending: dict[str, int] = {}
    for job in measure:
        kind = _KIND_OF.get(job.notebook)
        if kind:
            pending[kind] = pending.get(kind, 0) + job.pending
    progress = StudyProgress(pending, output / "cells")
    progress.log(f"log: {log_path}" + ("" if verbose else " (notebook output goes there; --verbose shows it here)"))

    def both(message: str) -> None:
        to_file(message)
        progress.log(message)

    _NOTEBOOK_OUTPUT = both if verbose else to_file
    try:
        with progress:
            yield (both if verbose else to_file), progress
    finally:
        _NOTEBOOK_OUTPUT = None


def _run_notebooks(
    name, preset: Preset, settings: study.Settings, output: Path, kinds, log, executor, display=False, verbose=False
) -> list[Path]:
    started = time.perf_counter()
    prepare, measure, analysis = study_jobs(preset, settings, output)
    with _run_display(output, measure, log, display, verbose) as (run_log, progress):
        return _run_stages(name, preset, settings, output, run_log, executor, started, progress,
                           (prepare, measure, analysis))  # fmt: skip


def _run_stages(name, preset, settings, output, log, executor, started, progress, stages) -> list[Path]:
    prepare, measure, analysis = stages
    failed: dict[str, str] = {}  # Ray tasks that still failed after their retries: reported at the end
    run_stage = functools.partial(run_sequentially, progress=progress)
    if executor == "ray":
        run_stage = functools.partial(run_on_ray, output=output, model=settings.model, failed=failed)
    times = RunTimes(started)
    if executor != "ray":
        run_stage = functools.partial(run_stage, times=times)
    written: list[Path] = []
    # Quality first, and a first report as soon as the first model's perplexity grid is stored, when anything is
    # still to measure: the answer's quality half comes long before the run ends (sequentially; Ray runs a stage's
    # notebooks at once). The first model's perplexity notebooks lead its jobs (study_jobs).
    leading_ppl = itertools.takewhile(lambda job: _KIND_OF.get(job.notebook) == "ppl", measure)
    quality = list(leading_ppl) if executor != "ray" else []
    rest = [job for job in measure if job not in quality]
    early = any(job.pending for job in quality) and any(job.pending for job in rest)
    for stage, jobs in (("preparing text", prepare), ("measuring", quality), ("measuring", rest)):
        if not jobs:
            continue
        if progress is not None and executor == "ray":
            progress.stage(stage, f"{len(jobs)} notebooks as Ray tasks")  # cells appear when the stage ends
        stage_started = time.perf_counter()
        written += run_stage(jobs, log, started)
        if executor == "ray":
            times.add(stage, f"{len(jobs)} notebooks as Ray tasks", sum(job.pending for job in jobs),
                      time.perf_counter() - stage_started)  # fmt: skip
        if early and jobs is quality:
            report_started = time.perf_counter()
            _first_report(output, analysis, log, started, progress)
            times.add("first report", "analysis notebook and report files", 0, time.perf_counter() - report_started)
    try:
        report_started = time.perf_counter()
        written += run_sequentially(analysis, log, started, progress)
        written += write_report_files(output, analysis[0].target, log, name)
        times.add("report", "analysis notebook and report files", 0, time.perf_counter() - report_started)
        for model_preset, model_settings in model_runs(preset, settings):
            for dataset in model_preset.datasets:
                written += charts.save_pngs(tables.table_paths(output, model_settings.model, dataset)["csv"], "tpot")
    except Exception as error:
        if not failed:
            raise
        failed["analysis"] = executors.error_line(error)  # likely a consequence of the failures above
    path = times.write(output / "logs" / f"run-times-{time.strftime('%Y%m%d-%H%M%S')}.csv")
    lines = [f"study '{name}' finished in {time.perf_counter() - started:.0f} s; minutes per step ({path}):",
             *times.summary()]  # fmt: skip
    for line in lines:
        log(line)
        if progress is not None:  # the log goes to a file while the display shows
            progress.log(line)
    if failed:
        raise executors.TasksFailed(failed, written)
    return written


def _first_report(output: Path, analysis: list[NotebookJob], log, started: float, progress) -> None:
    """The report from the quality results alone, while timing and the sweeps are still to measure; a failure
    here only delays the report to the end of the run."""
    try:
        run_sequentially(analysis, log, started, progress)
        write_report_files(output, analysis[0].target, log)
    except Exception as error:  # the final report is built again at the end, and fails loudly there
        log(f"first report not built: {executors.error_line(error)}")
        return
    message = f"first report (quality only) after {time.perf_counter() - started:.0f} s: {output / 'report.html'}"
    log(message)
    if progress is not None:
        progress.log(message)


def write_report_files(
    output: Path, executed: Path, log: Callable[[str], None] = print, preset: str | None = None
) -> list[Path]:
    """From the executed analysis notebook and the stored tables: report.html, summary.md, the memory-quality PNG,
    and, for the repository's own results folder, the README's summary."""
    from kvlib.analysis.report import export_html

    return [export_html(executed, output / "report.html"), *write_summary_files(output, log, preset)]


def write_summary_files(output: Path, log: Callable[[str], None] = print, preset: str | None = None) -> list[Path]:
    """summary.md, plots/memory_quality.png and, for the repository's own results folder, the README's summary
    between its markers: all generated from the stored tables."""
    from kvlib.analysis import summary

    written: list[Path] = []
    try:
        answers = summary.read(output)
    except (FileNotFoundError, ValueError) as error:  # no metrics table yet: the report says so itself
        log(f"  no summary: {error}")
        return written
    run = f"the `{preset}` preset's run" if preset else f"`{output.name}/`"
    header = f"Generated from {run} on {time.strftime('%Y-%m-%d')} ({_machine()})."
    written.append(summary.write_markdown(answers, output / summary.SUMMARY_FILE, header))
    metrics = summary.read_metrics(output)
    png = output / "plots" / "memory_quality.png"
    written.append(charts.save_memory_quality_png(metrics, png))
    if output.resolve() == (REPO / "results").resolve():
        picture = f"![memory against quality]({png.relative_to(REPO).as_posix()})"
        block = f"{header}\n\n{summary.to_markdown(answers, heading_level=4).strip()}\n\n{picture}\n"
        if summary.fill_readme(REPO / "README.md", block):
            written.append(REPO / "README.md")
    return written


def build_report(results_dir: str | os.PathLike, log: Callable[[str], None] = print) -> list[Path]:
    """The report from whatever is stored under `results_dir`, at any time (during a study too: it only reads
    the tables): the analysis notebook executed into `<results_dir>/notebooks/`, report.html, summary.md, the PNGs.
    What was not measured is said in the summary itself."""
    output = Path(results_dir).resolve()
    from kvlib.analysis import summary

    global _NOTEBOOK_OUTPUT
    from kvlib.progress import file_logger

    metrics = summary.read_metrics(output)  # fails first, naming the folder, when nothing is stored yet
    parameters = {"results_dir": str(output), "time_metric": "tpot", "explore": False}
    log_path = output / "logs" / f"report-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log(f"log: {log_path} (the analysis notebook's output)")
    _NOTEBOOK_OUTPUT = file_logger(log_path)
    try:
        executed = _execute("04_analysis.ipynb", output / "notebooks" / "04_analysis.ipynb", parameters, log)
    finally:
        _NOTEBOOK_OUTPUT = None
    written = [executed, *write_report_files(output, executed, log)]
    for (model, dataset), _ in metrics.groupby(["model", "dataset"]):
        csv = tables.table_paths(output, str(model), str(dataset))["csv"]
        if csv.is_file():
            written += charts.save_pngs(csv, "tpot")
    return written


def _machine() -> str:
    import platform

    return f"{platform.machine()}, {os.cpu_count()} CPUs"


def run_on_ray(jobs: list[NotebookJob], log, started: float, output: Path, model: str, failed: dict) -> list[Path]:
    """The Ray executor: the stage's notebooks as Ray tasks, each in a private output directory on its worker,
    their new files written here; then the tables of the measuring notebooks rebuilt from the stored cells.

    The tasks are the sequential run's notebooks, one per (dataset, kind) with all its ratios, not one per cell:
    the files are then identical, and one notebook shares its prefills (one per window for all presses) and its
    interleaved latency baseline across ratios, which a task per cell would lose."""
    kind_of = {notebook: kind for kind, notebook in NOTEBOOK_OF.items()}
    tasks, device = [], "cpu"
    for job in jobs:
        dataset = job.parameters.get("dataset")
        job_model = job.parameters.get("model", model)  # a study of several models: each job names its own
        local_model = job_model if Path(job_model).is_dir() else None
        if job.target.exists() and not job.pending:
            log(f"== {job.label}: skipped: every cell is stored and {job.target} is the notebook that measured them")
            continue
        if any(name.startswith(f"{job.label.rsplit(': ', 1)[0]}: 01_data_prep") for name in failed):
            failed[job.label] = "not run: its data preparation failed"
            continue
        parameters = dict(job.parameters)
        # Resolved here, so that the workers' cells have the identities this driver plans and tabulates with.
        parameters["device"] = device = parameters.get("device") or models.default_device()
        parameters["dtype"] = parameters.get("dtype") or models.default_dtype(device)
        target = job.target.relative_to(output).as_posix()
        kind = kind_of.get(job.notebook)
        inputs = {f".notebook/{job.notebook}": (NOTEBOOKS / job.notebook).read_bytes()}  # workers need no repo
        if kind:
            inputs |= executors.stored_cell_files(output, job_model, dataset, kind)
        work = functools.partial(_execute_privately, job.notebook, target, parameters)
        returns = ("cells/*/*/*.json", "windows/*.npy", target)
        tasks.append(executors.Task(job.label, work, inputs, returns, job.pending if kind else 0, local_model))
    written, stage_failed = executors.run_on_ray(tasks, output, device, log=log, started=started)
    failed |= stage_failed
    for job in jobs:
        kind = kind_of.get(job.notebook)
        if kind and any(task.name == job.label for task in tasks):  # what each notebook writes at its end
            parameters = {**job.parameters, "output_dir": str(output)}
            job_settings = study.Settings(**{k: v for k, v in parameters.items() if k in _SETTINGS_FIELDS})
            try:
                written += executors.rebuild_tables(job_settings, parameters["methods"], parameters["ratios"], [kind])
            except (ValueError, OSError) as error:  # reported with the failed tasks at the end, never dropped
                log(f"  tables of {job.label} not rebuilt: {error}")
                failed[f"tables of {job.label}"] = executors.error_line(error)
    return written


_SETTINGS_FIELDS = {f.name for f in fields(study.Settings)}


def _execute_privately(notebook: str, target: str, parameters: dict, private: Path) -> None:
    """A notebook as a Ray task runs it: from the shipped copy, into the task's private output directory. The task
    holds that directory's lock as the sequential pipeline holds the output's, so that the notebook's own run does
    not clear the executing notebook's temporary folder as a killed run's leftover."""
    with study.output_lock(private):
        notebook_path = str(private / ".notebook" / notebook)
        _execute(notebook_path, private / target, {**parameters, "output_dir": str(private)}, print)
