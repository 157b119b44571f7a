"""Running a grid: resolve identities, measure what is not stored yet (one measurement-kind module per kind),
store each result atomically, and rebuild the tables from exactly the results of this run's settings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kvlib import data, models
from kvlib.analysis import tables
from kvlib.files import array_hash, atomic_write, slug, write_json
from kvlib.measure import KINDS
from kvlib.study import cells as store
from kvlib.study.provenance import provenance
from kvlib.study.settings import DEFAULT_METHODS, DEFAULT_RATIOS, Settings, build_press, cells, validate


def check_context(settings: Settings) -> None:
    """max_length against the model's context, from its config alone (no weights)."""
    limit = models.context_length(models.load_config(settings.model))
    if limit is not None and settings.max_length > limit:
        raise ValueError(f"max_length {settings.max_length} exceeds {settings.model}'s context of {limit} tokens")


@dataclass
class DatasetPlan:
    """One dataset of a run: its windows, their identity, and what is still to measure."""

    dataset: str
    windows: np.ndarray
    text: dict
    pending: dict[str, list[tuple[str, float, dict]]] = field(default_factory=dict)  # kind -> (method, ratio, id)


def windows_file(output_dir: str, model: str, dataset: str, windows: np.ndarray, digest: str) -> Path:
    """Where a run's token windows are kept: the name carries their hash, so variants never overwrite each other,
    and a file whose content does not match its name (corrupt) is written again."""
    path = Path(output_dir) / "windows" / f"{slug(model)}_{dataset}_{windows.shape[1]}-{digest[:12]}.npy"
    try:
        if array_hash(np.load(path)) == digest:
            return path
    except (OSError, ValueError):
        pass
    return data.save_windows(windows, path)


def text_identity(dataset: str, settings: Settings, windows: np.ndarray) -> dict:
    source = data.resolve_data_dir(settings.data_dir)
    origin = "local" if source else "huggingface-hub"
    return {"dataset": dataset, "source": origin, "windows_sha256": array_hash(windows)}


def wanted_identity(settings: Settings, model_id: dict, text: dict, kind: str, method: str, ratio: float) -> dict:
    options = build_press(settings, method, ratio).options()
    return store.identity(kind, model_id, text, settings.for_kind(kind), method, ratio, options)


def plan_dataset(settings, dataset, tokenizer, model_id, methods, ratios, kinds) -> DatasetPlan:
    windows = data.load_windows(
        dataset, tokenizer, settings.max_length, settings.max_samples, settings.data_dir, settings.pg19_max_chars,
        min_windows=settings.n_ppl if "ppl" in kinds else 1,
    )  # fmt: skip
    plan = DatasetPlan(dataset, windows, text_identity(dataset, settings, windows))
    for kind in kinds:
        plan.pending[kind] = []
        for method, ratio in cells(methods, ratios):
            wanted = wanted_identity(settings, model_id, plan.text, kind, method, ratio)
            if store.read_cell(store.cell_path(settings.output_dir, settings.model, dataset, wanted)) is None:
                plan.pending[kind].append((method, ratio, wanted))
    return plan


def table_cells(settings: Settings, model_id: dict, plan: DatasetPlan) -> list[dict]:
    """Every stored result whose identity is what this run's settings give for its method and ratio."""
    chosen = []
    for kind in ("ppl", "latency"):
        for cell in store.stored_cells(settings.output_dir, settings.model, plan.dataset, kind):
            try:
                wanted = wanted_identity(settings, model_id, plan.text, kind, cell["method"], cell["compression_ratio"])
            except ValueError:
                continue  # a press this kvlib no longer has, or options it no longer accepts
            if cell["identity"] == wanted:
                chosen.append(cell)
    return chosen


def write_tables(settings: Settings, model_id: dict, plans: list[DatasetPlan]) -> list[Path]:
    written, frames = [], []
    for plan in plans:
        chosen = table_cells(settings, model_id, plan)
        table = tables.metrics_table(chosen)
        paths = tables.table_paths(settings.output_dir, settings.model, plan.dataset)
        written += tables.write_table(table, paths["csv"], paths["json"])
        with atomic_write(paths["windows"]) as handle:
            tables.window_records(chosen).to_csv(handle, index=False)
        written.append(paths["windows"])
        frames.append(table)
    if len(plans) > 1:
        paths = tables.table_paths(settings.output_dir, settings.model, "all")
        written += tables.write_table(pd.concat(frames, ignore_index=True), paths["csv"], paths["json"])
    return written


@dataclass
class RunPlan:
    model_id: dict
    tokenizer: object
    datasets: list[DatasetPlan]


def plan_run(settings: Settings, methods: list[str], ratios: list[float], kinds: list[str]) -> RunPlan:
    """Everything a run decides before loading weights: checked settings, the model's identity, every dataset's
    windows (all datasets are read and checked before the first measurement) and what is still to measure."""
    validate(settings, methods, ratios, kinds)
    settings.device = settings.device or models.default_device()
    settings.dtype = settings.dtype or models.default_dtype(settings.device)
    check_context(settings)
    model_id = models.fingerprint(settings.model)
    tokenizer = models.load_tokenizer(settings.model)
    plans = [
        plan_dataset(settings, dataset, tokenizer, model_id, methods, ratios, kinds) for dataset in settings.datasets()
    ]
    return RunPlan(model_id, tokenizer, plans)


def run(
    settings: Settings,
    methods: list[str] | None = None,
    ratios: list[float] | None = None,
    kinds: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Measure every result of `settings` x methods x ratios x kinds not stored yet, then rewrite the tables.

    Checks everything that needs no weights first (settings, presses, the text of every dataset), then loads the
    model once. Each finished result is written atomically; returns the paths written.
    """
    methods = list(methods or DEFAULT_METHODS)
    ratios = [float(r) for r in (ratios if ratios is not None else DEFAULT_RATIOS)]
    kinds = list(kinds or KINDS)
    validate(settings, methods, ratios, kinds)  # bad input fails before the output directory is touched
    with store.output_lock(settings.output_dir):
        planned = plan_run(settings, methods, ratios, kinds)
        model = None
        written: list[Path] = []
        for plan in planned.datasets:
            todo = sum(len(p) for p in plan.pending.values())
            done = len(kinds) * len(cells(methods, ratios)) - todo
            log(f"{settings.model} on {plan.dataset}: {todo} cell(s) to run, {done} already done")
            if not todo:
                continue
            written.append(windows_file(settings.output_dir, settings.model, plan.dataset, plan.windows,
                                        plan.text["windows_sha256"]))  # fmt: skip
            if model is None:
                log(f"loading {settings.model} on {settings.device} ({settings.dtype})")
                model = models.load_weights(settings.model, settings.device, settings.dtype)
            for kind, pending in plan.pending.items():
                if pending:
                    written += measure_kind(settings, model, planned, plan, kind, pending, log)
        return written + write_tables(settings, planned.model_id, planned.datasets)


def measure_kind(settings, model, planned: RunPlan, plan: DatasetPlan, kind: str, pending, log) -> list[Path]:
    """Measure the pending cells of one kind together (one shared prefill per window, interleaved timing), and
    store each result as it arrives."""
    labelled = {f"{method} {ratio!r}": (method, ratio, wanted) for method, ratio, wanted in pending}
    presses = {label: build_press(settings, method, ratio) for label, (method, ratio, _) in labelled.items()}
    log(f"[{plan.dataset} {kind}] {len(presses)} cell(s): {', '.join(labelled)}")
    identity_columns = {
        "model": settings.model,
        "dataset": plan.dataset,
        "data_source": str(data.resolve_data_dir(settings.data_dir) or "huggingface-hub"),
        "model_fingerprint": (planned.model_id.get("sha256") or planned.model_id.get("revision", ""))[:12],
        "windows_sha256": plan.text["windows_sha256"][:12],
    }
    origin = provenance(settings.device, settings.dtype)  # one git call per group, not per result
    started = time.perf_counter()
    written = []
    for label, result in KINDS[kind].measure(model, planned.tokenizer, plan.windows, presses, settings, log):
        method, ratio, wanted = labelled[label]
        cell = {
            "identity": wanted,
            "kind": kind,
            "method": method,
            "compression_ratio": ratio,
            "options": presses[label].options(),
            "settings": settings.for_kind(kind),
            "identity_columns": identity_columns,
            **result,
            "group_wall_time": time.perf_counter() - started,
            "provenance": origin,
        }
        path = store.cell_path(settings.output_dir, settings.model, plan.dataset, wanted)
        write_json(path, cell)
        written.append(path)
    return written
