"""The study protocol: settings, their validation, and running cells (kind x method x ratio) resumably."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kvlib import data, measure, models, results
from kvlib.presses import PRESSES, check_press_name, load_press
from kvlib.presses.base import check_ratio

KINDS = ("ppl", "latency")
DEFAULT_RATIOS = (0.1, 0.3, 0.5, 0.7)
DEFAULT_METHODS = tuple(name for name in PRESSES if name != "none")
# Which settings make two cells of a kind comparable; a stored cell is reused only if these match.
COMMON_SETTINGS = (
    "model",
    "dataset",
    "max_length",
    "max_samples",
    "data_source",
    "pg19_max_chars",
    "seed",
    "device",
    "dtype",
)
KIND_SETTINGS = {
    "ppl": COMMON_SETTINGS + ("prefix_ratio", "n_ppl"),
    "latency": COMMON_SETTINGS + ("gen_tokens", "warmup_times", "n_timing"),
}


@dataclass
class Settings:
    """Everything that defines one comparable set of rows. Defaults are the original study's."""

    model: str = "EleutherAI/pythia-70m"
    dataset: str = "wikitext"
    max_length: int = 1024
    prefix_ratio: float = 0.5
    max_samples: int | None = 100
    n_ppl: int = 20
    n_timing: int = 20
    gen_tokens: int = 32
    warmup_times: int = 4
    data_dir: str | None = None
    pg19_max_chars: int = data.PG19_MAX_CHARS
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    output_dir: str = "results"
    press_options: dict[str, dict] = field(default_factory=dict)

    @property
    def data_source(self) -> str:
        local = data.resolve_data_dir(self.data_dir)
        return str(local.resolve()) if local else "huggingface-hub"

    def datasets(self) -> list[str]:
        return list(data.DATASETS) if self.dataset == "all" else [self.dataset]

    def for_kind(self, kind: str, dataset: str) -> dict:
        """The settings a cell of `kind` is stored with (device and dtype resolved as a run resolves them)."""
        device = self.device or models.default_device()
        values = {**asdict(self), "dataset": dataset, "data_source": self.data_source, "device": device}
        values["dtype"] = self.dtype or models.default_dtype(device)
        return {name: values[name] for name in KIND_SETTINGS[kind]}


def cells(methods: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    """The baseline first, then every method x ratio."""
    return [("none", 0.0)] + [(m, float(r)) for m in methods if m != "none" for r in ratios]


def validate(settings: Settings, methods: list[str], ratios: list[float], kinds: list[str]) -> None:
    """Every check that needs no model weights, so bad input fails in seconds."""
    if settings.dataset != "all":
        data.check_dataset(settings.dataset)
    for method in methods:
        check_press_name(method)
    for ratio in ratios:
        check_ratio(ratio)
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown measurement {kind!r}; choose from {', '.join(KINDS)}")
    if not 0 < settings.prefix_ratio < 1 or math.isnan(settings.prefix_ratio):
        raise ValueError(f"prefix_ratio must be in (0, 1); got {settings.prefix_ratio!r}")
    positive = {"max_length": settings.max_length, "n_ppl": settings.n_ppl, "n_timing": settings.n_timing}
    if settings.max_samples is not None:
        positive["max_samples"] = settings.max_samples
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1; got {value}")
    if settings.warmup_times < 0:
        raise ValueError(f"warmup_times must be 0 or more; got {settings.warmup_times}")
    if settings.gen_tokens < 2:
        raise ValueError(
            f"gen_tokens must be at least 2 (TPOT needs a token after the first); got {settings.gen_tokens}"
        )
    if settings.max_samples is not None and "ppl" in kinds and settings.n_ppl > settings.max_samples:
        raise ValueError(f"n_ppl ({settings.n_ppl}) exceeds max_samples ({settings.max_samples})")
    for name in settings.press_options:
        check_press_name(name)
    prefix_len = measure.prefix_length(settings.max_length, settings.prefix_ratio)
    for method, ratio in cells(methods, ratios):
        press = load_press(method, ratio, **settings.press_options.get(method, {}))
        if "ppl" in kinds:
            press.check_prefix_length(prefix_len)
        if "latency" in kinds:
            press.check_prefix_length(settings.max_length)
    data.resolve_data_dir(settings.data_dir)  # raises if data_dir is not a directory


def check_context(settings: Settings) -> None:
    """max_length against the model's context, from its config alone (no weights)."""
    limit = models.context_length(models.load_config(settings.model))
    if limit is not None and settings.max_length > limit:
        raise ValueError(f"max_length {settings.max_length} exceeds {settings.model}'s context of {limit} tokens")


def pending_cells(
    settings: Settings, methods: list[str], ratios: list[float], kinds: list[str], dataset: str
) -> list[tuple[str, str, float]]:
    """(kind, method, ratio) cells not yet stored with these settings and press options."""
    pending = []
    for kind in kinds:
        wanted = settings.for_kind(kind, dataset)
        for method, ratio in cells(methods, ratios):
            options = load_press(method, ratio, **settings.press_options.get(method, {})).options()
            path = results.cell_path(settings.output_dir, settings.model, dataset, kind, method, ratio)
            stored = results.read_cell(path)
            if not (stored and stored["settings"] == wanted and stored["options"] == options):
                pending.append((kind, method, ratio))
    return pending


def run(
    settings: Settings,
    methods: list[str] | None = None,
    ratios: list[float] | None = None,
    kinds: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Run every pending cell for every dataset of `settings`, then rewrite the result tables.

    Cells already stored with the same settings are skipped; each finished cell is written atomically.
    Returns the paths written.
    """
    methods = list(methods or DEFAULT_METHODS)
    ratios = [float(r) for r in (ratios if ratios is not None else DEFAULT_RATIOS)]
    kinds = list(kinds or KINDS)
    validate(settings, methods, ratios, kinds)
    check_context(settings)
    settings.device = settings.device or models.default_device()
    settings.dtype = settings.dtype or models.default_dtype(settings.device)
    output_dir = Path(settings.output_dir)

    model = tokenizer = None
    written: list[Path] = []
    for dataset in settings.datasets():
        pending = pending_cells(settings, methods, ratios, kinds, dataset)
        done = len(kinds) * len(cells(methods, ratios)) - len(pending)
        log(f"{settings.model} on {dataset}: {len(pending)} cell(s) to run, {done} already done")
        if pending:
            if tokenizer is None:
                tokenizer = models.load_tokenizer(settings.model)
            windows = data.load_windows(
                dataset, tokenizer, settings.max_length, settings.max_samples, settings.data_dir,
                settings.pg19_max_chars, min_windows=settings.n_ppl if "ppl" in kinds else 1,
            )  # fmt: skip
            path = results.windows_path(output_dir, settings.model, dataset, settings.max_length)
            written.append(data.save_windows(windows, path))
            if model is None:
                log(f"loading {settings.model} on {settings.device} ({settings.dtype})")
                model = models.load_weights(settings.model, settings.device, settings.dtype)
            for index, (kind, method, ratio) in enumerate(pending, 1):
                log(f"[{index}/{len(pending)}] {dataset} {kind} {method} {ratio:g}")
                written.append(run_cell(settings, model, windows, dataset, kind, method, ratio, log))
    # Once, from the stored cells: per dataset, plus the combined table when several ran together.
    return written + results.write_tables(output_dir, settings.model, settings.datasets())


def run_cell(settings, model, windows: np.ndarray, dataset: str, kind: str, method: str, ratio: float, log) -> Path:
    """Measure one cell and store it atomically."""
    press = load_press(method, ratio, **settings.press_options.get(method, {}))
    started = time.perf_counter()
    cell = {
        "kind": kind,
        "method": method,
        "compression_ratio": ratio,
        "options": press.options(),
        "settings": settings.for_kind(kind, dataset),
    }
    if kind == "ppl":
        cell["records"] = measure.suffix_ppl(model, windows[: settings.n_ppl], press, settings.prefix_ratio, log)
        report = press.last_report
        cell["effective_ratio"] = report.effective_ratio if report else 0.0
        log(f"  ppl {measure.perplexity(cell['records']):.3f}")
    else:
        cell["runs"] = measure.latency_runs(
            model, windows[0], press, settings.gen_tokens, settings.warmup_times, settings.n_timing, log
        )
    cell["wall_time"] = time.perf_counter() - started
    cell["provenance"] = results.provenance(settings.device, settings.dtype)
    path = results.cell_path(settings.output_dir, settings.model, dataset, kind, method, ratio)
    results.write_json(path, cell)
    return path
