"""The study's settings and every check that needs no model weights, so that bad input fails in seconds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from kvlib import data
from kvlib.cache.chunked import check_policy
from kvlib.cache.storage import FLOAT, Storage
from kvlib.measure import KINDS
from kvlib.presses import PRESSES, check_press_name, load_press
from kvlib.presses.base import check_ratio

DEFAULT_RATIOS = (0.1, 0.3, 0.5, 0.7)
DEFAULT_METHODS = tuple(name for name in PRESSES if name != "none")
# Settings that identify every result, whatever its kind (each kind adds its own protocol settings).
COMMON_SETTINGS = ("max_length", "max_samples", "pg19_max_chars", "seed", "device", "dtype")


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
    # Context lengths of the kinds that sweep them (scaling, retrieval); None: each kind's default sweep. A result
    # of such a kind is identified by its own length (`max_length` of that result), never by this list.
    lengths: list[int] | None = None
    # Needle retrieval (kind `retrieval`): where the needle goes (fraction of the context before it), trials per
    # (length, depth), whether the question is inside the compressed context, and tokens decoded per answer.
    depths: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    trials: int = 4
    question_aware: bool = False
    answer_tokens: int = 8
    # Cache precision (an axis like the ratios): how the kept prefix is stored, `none` (float) first. Every press
    # runs at every precision; the none press at a quantized precision is a row of its own. The options (group
    # size, axes, residual length) apply to every group-wise backend and identify its results.
    kv_quant: list[str] = field(default_factory=lambda: [FLOAT])
    kv_quant_options: dict = field(default_factory=dict)
    # How a compressed prefix is read (kvlib.cache.chunked): `prefill_chunk` tokens at a time, the press pruning after
    # each chunk (None: one forward pass), and which positions the kept keys claim ("original" or "rerotate"). They
    # apply to the pressed cells; the baseline stays the plain one-shot prefill every row is compared with.
    prefill_chunk: int | None = None
    positions: str = "original"
    # Positions each full-attention layer keeps, instead of a ratio of the context (pressed cells; one ratio only).
    # The streaming kind compares every press at this budget (None there: max_length positions).
    kv_budget: int | None = None
    # Streaming perplexity (kind `streaming`): tokens read from the start of the dataset's token stream (None: 4x
    # the model's trained context, resolved when its config is read).
    stream_tokens: int | None = None

    def datasets(self) -> list[str]:
        return list(data.DATASETS) if self.dataset == "all" else [self.dataset]

    def for_kind(self, kind: str) -> dict:
        """The protocol settings a result of `kind` is identified by."""
        return {name: getattr(self, name) for name in COMMON_SETTINGS + KINDS[kind].SETTINGS}


def cells(methods: list[str], ratios: list[float], precisions: list[str] = (FLOAT,)) -> list[tuple[str, float, str]]:
    """The float baseline first, then per precision the uncompressed cache stored at it and every method x ratio
    (each once): (method, ratio, kv_quant)."""
    grid = [("none", 0.0, FLOAT)]
    for precision in precisions:
        grid += [("none", 0.0, precision)] + [(m, float(r), precision) for m in methods if m != "none" for r in ratios]
    return list(dict.fromkeys(grid))


def storage(settings: Settings, precision: str) -> Storage:
    """The storage of one precision with the run's options (validated as it is built)."""
    return Storage.parse(precision, settings.kv_quant_options)


def _integer(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def validate(settings: Settings, methods: list[str], ratios: list[float], kinds: list[str]) -> None:
    """Every check that needs no model weights and no text, so bad input fails in seconds."""
    if settings.dataset != "all":
        data.check_dataset(settings.dataset)
    for method in methods:
        check_press_name(method)
    for ratio in ratios:
        check_ratio(ratio)
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown measurement {kind!r}; choose from {', '.join(KINDS)}")
    if not isinstance(settings.prefix_ratio, (int, float)) or math.isnan(settings.prefix_ratio):
        raise ValueError(f"prefix_ratio must be in (0, 1); got {settings.prefix_ratio!r}")
    if not 0 < settings.prefix_ratio < 1:
        raise ValueError(f"prefix_ratio must be in (0, 1); got {settings.prefix_ratio!r}")
    for name in ("max_length", "n_ppl", "n_timing"):
        _integer(name, getattr(settings, name), 1)
    if settings.max_samples is not None:
        _integer("max_samples", settings.max_samples, 1)
    _integer("warmup_times", settings.warmup_times, 0)
    _integer("gen_tokens", settings.gen_tokens, 2)
    _integer("pg19_max_chars", settings.pg19_max_chars, 1)
    if settings.max_samples is not None and "ppl" in kinds and settings.n_ppl > settings.max_samples:
        raise ValueError(f"n_ppl ({settings.n_ppl}) exceeds max_samples ({settings.max_samples})")
    if not isinstance(settings.press_options, dict):
        raise ValueError(f"press_options must map press names to options; got {settings.press_options!r}")
    for name, options in settings.press_options.items():
        check_press_name(name)
        if not isinstance(options, dict):
            raise ValueError(f"press_options for {name!r} must be an object of options; got {options!r}")
    if settings.lengths is not None:
        if not isinstance(settings.lengths, (list, tuple)) or not settings.lengths:
            raise ValueError(f"lengths must be a non-empty list of token counts; got {settings.lengths!r}")
        for length in settings.lengths:
            _integer("every length", length, 2)
    if not isinstance(settings.kv_quant, (list, tuple)) or not settings.kv_quant:
        raise ValueError(f"kv_quant must be a non-empty list of precisions; got {settings.kv_quant!r}")
    if not isinstance(settings.kv_quant_options, dict):
        raise ValueError(f"kv_quant_options must be an object of options; got {settings.kv_quant_options!r}")
    for precision in settings.kv_quant:
        storage(settings, precision).check_backend()
    presses = [build_press(settings, method, ratio) for method, ratio, _ in cells(methods, ratios)]
    if settings.kv_budget is not None and len({ratio for ratio in ratios}) > 1:
        raise ValueError(
            f"kv_budget {settings.kv_budget} replaces the compression ratio (every press keeps that many positions); "
            f"give one ratio, not {sorted(set(ratios))}"
        )
    for press in presses:
        pressed = press.name != "none"
        check_policy(press, settings.prefill_chunk, settings.kv_budget if pressed else None, settings.positions)
    for kind in kinds:
        swept = hasattr(KINDS[kind], "LENGTHS")
        for length in (settings.lengths or KINDS[kind].LENGTHS) if swept else [settings.max_length]:
            KINDS[kind].check(replace(settings, max_length=length), presses)
    if settings.device is not None:
        from kvlib.models import check_device

        check_device(settings.device)
    data.resolve_data_dir(settings.data_dir)  # raises if data_dir is not a directory


def build_press(settings: Settings, method: str, ratio: float):
    """The press of one cell, its options from `settings.press_options` (validated as the press is built)."""
    return load_press(method, ratio, **settings.press_options.get(method, {}))
