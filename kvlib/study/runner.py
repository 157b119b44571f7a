"""Running a grid: resolve identities, measure what is not stored yet (one measurement-kind module per kind),
store each result atomically, and rebuild the tables from exactly the results of this run's settings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from kvlib import data, models
from kvlib.analysis import tables
from kvlib.cache import CachePolicy
from kvlib.cache.positions import config_has_rotary
from kvlib.cache.storage import FLOAT
from kvlib.files import array_hash, atomic_write, slug, write_json
from kvlib.measure import KINDS
from kvlib.study import cells as store
from kvlib.study.provenance import provenance
from kvlib.study.settings import DEFAULT_METHODS, DEFAULT_RATIOS, Settings, build_press, cells, storage, validate


def check_context(settings: Settings) -> int | None:
    """max_length, and every length asked for with `lengths`, against the model's context, from its config alone
    (no weights). Lengths asked for explicitly are refused beyond it; a kind's default sweep is capped instead.
    Returns that context (None when the config does not say), so the config is read once per plan."""
    config = models.load_config(settings.model)
    limit = models.context_length(config)
    text_config = config.get_text_config()
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    for precision in settings.kv_quant:
        storage(settings, precision).check_head_dim(head_dim)
    if settings.positions == "rerotate" and not config_has_rotary(config):
        raise ValueError(
            f"positions 'rerotate' re-rotates keys with the model's rotary embedding; {settings.model} has no rotary "
            "positions (use positions 'original')"
        )
    if limit is not None and settings.max_length > limit:
        raise ValueError(f"max_length {settings.max_length} exceeds {settings.model}'s context of {limit} tokens")
    beyond = [length for length in settings.lengths or [] if limit is not None and length > limit]
    if beyond:
        raise ValueError(
            f"lengths {beyond} exceed {settings.model}'s context of {limit} tokens; ask for lengths up to {limit}"
        )
    return limit


@dataclass
class DatasetPlan:
    """One dataset at one context length of a run: its windows, their identity, and what is still to measure."""

    dataset: str
    length: int  # tokens per window: max_length, or one length of a kind that sweeps it
    windows: np.ndarray
    text: dict
    # kind -> (method, ratio, kv_quant, identity) of every cell still to measure
    pending: dict[str, list[tuple[str, float, str, dict]]] = field(default_factory=dict)


def context_lengths(settings: Settings, kind: str, limit: int | None) -> list[int]:
    """The context lengths a kind measures at: `settings.lengths` (else the kind's default sweep) for a kind that
    sweeps them, capped at the model's context; `max_length` for the others."""
    if not hasattr(KINDS[kind], "LENGTHS"):
        return [settings.max_length]
    wanted = list(settings.lengths or KINDS[kind].LENGTHS)
    kept = [length for length in wanted if limit is None or length <= limit]
    if not kept:
        raise ValueError(f"every length of {kind} ({wanted}) exceeds the model's context of {limit} tokens")
    return kept


def at_length(settings: Settings, length: int) -> Settings:
    """The settings of one context length: a sweep's cells are identified by their `max_length`."""
    return settings if length == settings.max_length else replace(settings, max_length=length)


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


def policy(settings: Settings, method: str, ratio: float, precision: str) -> CachePolicy:
    """The cache policy of one cell: its press, stored at its precision, read as the settings say (the uncompressed
    cache is always read in one pass at its own positions: the reference every row is compared with)."""
    press = build_press(settings, method, ratio)
    if method == "none":
        return CachePolicy(press, storage(settings, precision))
    return CachePolicy(
        press,
        storage(settings, precision),
        prefill_chunk=settings.prefill_chunk,
        kv_budget=settings.kv_budget,
        positions=settings.positions,
    )


def wanted_identity(
    settings: Settings, model_id: dict, text: dict, kind: str, method: str, ratio: float, precision: str = FLOAT
) -> dict:
    cell_policy = policy(settings, method, ratio, precision)
    return store.identity(
        kind,
        model_id,
        text,
        settings.for_kind(kind),
        method,
        ratio,
        cell_policy.press.options(),
        cell_policy.identity(),
    )


def min_windows(settings: Settings, kinds: list[str]) -> int:
    return max((getattr(KINDS[kind], "min_windows", lambda _: 1)(settings) for kind in kinds), default=1)


def plan_dataset(settings, dataset, tokenizer, model_id, methods, ratios, kinds) -> DatasetPlan:
    windows = data.load_windows(
        dataset, tokenizer, settings.max_length, settings.max_samples, settings.data_dir, settings.pg19_max_chars,
        min_windows=min_windows(settings, kinds),
    )  # fmt: skip
    plan = DatasetPlan(dataset, settings.max_length, windows, text_identity(dataset, settings, windows))
    plan.pending = pending_cells(settings, plan, model_id, methods, ratios, kinds)
    return plan


def pending_cells(settings, plan: DatasetPlan, model_id: dict, methods, ratios, kinds) -> dict[str, list]:
    """kind -> (method, ratio, kv_quant, identity) of every cell of `plan` not stored yet."""
    pending: dict[str, list] = {}
    for kind in kinds:
        pending[kind] = []
        for method, ratio, precision in cells(methods, ratios, settings.kv_quant):
            wanted = wanted_identity(settings, model_id, plan.text, kind, method, ratio, precision)
            if store.read_cell(store.cell_path(settings.output_dir, settings.model, plan.dataset, wanted)) is None:
                pending[kind].append((method, ratio, precision, wanted))
    return pending


def table_cells(
    settings: Settings, model_id: dict, plan: DatasetPlan, kinds: tuple[str, ...], any_reading: bool = False
) -> list[dict]:
    """Every stored result of `kinds` whose identity is what this run's settings give for its method, ratio and
    precision (each cell's own, like the ratio) and, with `any_reading`, its own reading mode (prefill_chunk,
    positions, kv_budget): the metrics table lists one-shot and chunked rows side by side."""
    chosen = []
    for kind in kinds:
        for cell in store.stored_cells(settings.output_dir, settings.model, plan.dataset, kind):
            own = settings
            if any_reading:
                chunk, positions, budget = tables.reading_of(cell)
                own = replace(settings, prefill_chunk=chunk, positions=positions, kv_budget=budget)
            try:
                wanted = wanted_identity(
                    own, model_id, plan.text, kind, cell["method"], cell["compression_ratio"],
                    cell.get("kv_quant", FLOAT),
                )  # fmt: skip
            except ValueError:
                continue  # a press this kvlib no longer has, or options it no longer accepts
            if cell["identity"] == wanted:
                chosen.append(cell)
    return chosen


def write_tables(settings: Settings, model_id: dict, plans: list[DatasetPlan], kinds: list[str]) -> list[Path]:
    """The metrics table (perplexity and latency at `max_length`) when the run has those kinds, and one table per
    swept kind over all its lengths; each from exactly the stored results of this run's settings."""
    written, frames = [], []
    metric_kinds = tuple(kind for kind in tables.METRIC_KINDS if kind in kinds)
    for plan in plans:
        if not metric_kinds or plan.length != settings.max_length:
            continue
        chosen = table_cells(settings, model_id, plan, tables.METRIC_KINDS, any_reading=True)
        table = tables.metrics_table(chosen)
        paths = tables.table_paths(settings.output_dir, settings.model, plan.dataset)
        written += tables.write_table(table, paths["csv"], paths["json"])
        with atomic_write(paths["windows"]) as handle:
            tables.window_records(chosen).to_csv(handle, index=False)
        written.append(paths["windows"])
        frames.append(table)
    if len(frames) > 1:
        paths = tables.table_paths(settings.output_dir, settings.model, "all")
        written += tables.write_table(pd.concat(frames, ignore_index=True), paths["csv"], paths["json"])
    for kind in kinds:
        if kind in tables.METRIC_KINDS:
            continue
        side_by_side = getattr(KINDS[kind], "READINGS_SIDE_BY_SIDE", False)
        for dataset in dict.fromkeys(plan.dataset for plan in plans):
            chosen = []
            for plan in plans:
                if plan.dataset == dataset and kind in plan.pending:
                    chosen += table_cells(at_length(settings, plan.length), model_id, plan, (kind,), side_by_side)
            paths = tables.table_paths(settings.output_dir, settings.model, dataset, kind)
            written += tables.write_table(tables.kind_table(kind, chosen), paths["csv"], paths["json"])
            with atomic_write(paths["records"]) as handle:
                tables.kind_records(kind, chosen).to_csv(handle, index=False)
            written.append(paths["records"])
    return written


@dataclass
class RunPlan:
    model_id: dict
    tokenizer: object
    datasets: list[DatasetPlan]
    settings: Settings  # the run's settings, device and dtype resolved (the caller's are left as they were)

    def refresh_pending(self, methods: list[str], ratios: list[float]) -> None:
        """What is still to measure, again: called once the run holds the output lock (planned before it, so
        that a rejected run leaves nothing behind), so that a cell another run stored meanwhile is not redone."""
        for plan in self.datasets:
            plan_settings = at_length(self.settings, plan.length)
            plan.pending = pending_cells(plan_settings, plan, self.model_id, methods, ratios, list(plan.pending))


def plan_run(settings: Settings, methods: list[str], ratios: list[float], kinds: list[str]) -> RunPlan:
    """Everything a run decides before loading weights: checked settings, the model's identity, the windows of
    every dataset at every context length (all read and checked before the first measurement) and what is still
    to measure. Reads the output directory, writes nothing; returns the settings it resolved in the plan."""
    validate(settings, methods, ratios, kinds)
    device = settings.device or models.default_device()
    settings = replace(settings, device=device, dtype=settings.dtype or models.default_dtype(device))
    limit = check_context(settings)
    for kind in kinds:  # settings a kind fills in from the model's config (the streaming kind's text length)
        settings = getattr(KINDS[kind], "resolve", lambda settings, _: settings)(settings, limit)
    model_id = models.fingerprint(settings.model)
    tokenizer = models.load_tokenizer(settings.model)
    kinds_at: dict[int, list[str]] = {}
    for kind in kinds:
        for length in context_lengths(settings, kind, limit):
            kinds_at.setdefault(length, []).append(kind)
    plans = [
        plan_dataset(at_length(settings, length), dataset, tokenizer, model_id, methods, ratios, length_kinds)
        for dataset in settings.datasets()
        for length, length_kinds in sorted(kinds_at.items())
    ]
    return RunPlan(model_id, tokenizer, plans, settings)


def run(
    settings: Settings,
    methods: list[str] | None = None,
    ratios: list[float] | None = None,
    kinds: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Measure every result of `settings` x methods x ratios x kinds (default: perplexity and latency) not stored
    yet, then rewrite the tables.

    Checks everything that needs no weights first (settings, presses, the text of every dataset), then loads the
    model once. Each finished result is written atomically; returns the paths written.
    """
    methods = list(methods or DEFAULT_METHODS)
    ratios = [float(r) for r in (ratios if ratios is not None else DEFAULT_RATIOS)]
    kinds = list(kinds or tables.METRIC_KINDS)  # kinds that sweep context lengths run only when asked for
    # Every check that can reject the run (settings, the model's context, the text of every dataset) happens before
    # the output directory is created or locked: a rejected run leaves the file system as it found it.
    planned = plan_run(settings, methods, ratios, kinds)
    settings = planned.settings
    with store.output_lock(settings.output_dir):
        planned.refresh_pending(methods, ratios)
        model = None
        written: list[Path] = []
        for plan in planned.datasets:
            todo = sum(len(p) for p in plan.pending.values())
            done = len(plan.pending) * len(cells(methods, ratios, settings.kv_quant)) - todo
            where = f"{plan.dataset}" + (f" at {plan.length} tokens" if plan.length != settings.max_length else "")
            log(f"{settings.model} on {where}: {todo} cell(s) to run, {done} already done")
            if not todo:
                continue
            written.append(windows_file(settings.output_dir, settings.model, plan.dataset, plan.windows,
                                        plan.text["windows_sha256"]))  # fmt: skip
            length_settings = at_length(settings, plan.length)
            if model is None:
                log(f"loading {settings.model} on {settings.device} ({settings.dtype})")
                model = models.load_weights(settings.model, settings.device, settings.dtype)
            for kind, pending in plan.pending.items():
                if pending:
                    written += measure_kind(length_settings, model, planned, plan, kind, pending, log)
        return written + write_tables(settings, planned.model_id, planned.datasets, kinds)


def measure_kind(settings, model, planned: RunPlan, plan: DatasetPlan, kind: str, pending, log) -> list[Path]:
    """Measure the pending cells of one kind together (one shared prefill per window, interleaved timing), and
    store each result as it arrives."""
    labelled = {
        f"{method} {ratio!r}" + ("" if precision == FLOAT else f" {precision}"): (method, ratio, precision, wanted)
        for method, ratio, precision, wanted in pending
    }
    policies = {label: policy(settings, *cell[:3]) for label, cell in labelled.items()}
    log(f"[{plan.dataset} {kind} {plan.length}] {len(policies)} cell(s): {', '.join(labelled)}")
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
    for label, result in KINDS[kind].measure(model, planned.tokenizer, plan.windows, policies, settings, log):
        method, ratio, precision, wanted = labelled[label]
        cell = {
            "identity": wanted,
            "kind": kind,
            "method": method,
            "compression_ratio": ratio,
            "kv_quant": precision,
            "prefill_chunk": policies[label].prefill_chunk,
            "positions": policies[label].positions,
            "kv_budget": policies[label].kv_budget,
            "options": policies[label].press.options(),
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
