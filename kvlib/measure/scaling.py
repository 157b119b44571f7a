"""Where compression pays: the latency protocol repeated at several context lengths.

The study calls `measure` once per length of `settings.lengths` (default `LENGTHS`, capped at the model's
context) with `max_length` = that length and windows of that length; the prompt is the first window (PG-19 by
default: one book gives contexts of thousands of tokens). At each length every press runs exactly as in
`kvlib.measure.latency` (the same `time_generation` and `interleaved_runs`: `warmup_times` discarded rounds,
`n_timing` timed rounds interleaved with the baseline's, every run recording machine load and peak memory), so a
result holds, per timed run, the prefill time under the press, the TPOT over `gen_tokens` generated tokens, the
cache's bytes and positions after prefill, and the run's peak memory.

Decode time has a part that grows with the cache and a part that does not (the weights); the analysis
(`kvlib.analysis.scaling`) fits both from the baseline and says how much of the possible gain each press gets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from kvlib.measure import latency
from kvlib.presses import Press, load_press

SETTINGS = ("gen_tokens", "warmup_times", "n_timing")
# Its table lists a press read in one pass and in chunks side by side (`prefill_chunk`: the memory it saves as the
# context grows), as the metrics table does; the study's other swept kinds hold one reading mode per table.
READINGS_SIDE_BY_SIDE = True
LENGTHS = (1024, 2048, 4096, 8192)
PRIMER_TOKENS = 64


def check(settings, presses: list[Press]) -> None:
    """Called by the study once per context length (`settings.max_length` = that length): the latency checks, and
    that something about compression can be measured there: the prompt is longer than the tokens decoded after it
    (else those dominate the cache whose decoding is timed), and every press at its ratio removes at least one
    position (else its row is the baseline under another name)."""
    latency.check(settings, presses)
    length = settings.max_length
    if length <= settings.gen_tokens:
        raise ValueError(
            f"scaling context length {length} is too short: it must exceed gen_tokens ({settings.gen_tokens}), the "
            "tokens decoded after the prompt, so that the compressed prompt is most of the cache being timed"
        )
    for press in presses:
        ratio = press.compression_ratio
        if ratio > 0 and int(length * ratio) < 1:
            raise ValueError(
                f"scaling context length {length} is too short for {press.name} at ratio {ratio:g}: it removes no "
                f"position there (int({length} x {ratio:g}) = 0); use lengths of at least {math.ceil(1 / ratio)}"
            )


def measure(
    model: torch.nn.Module,
    tokenizer,
    windows: np.ndarray,
    policies: dict,
    settings,
    log: Callable[[str], None] = print,
) -> Iterator[tuple[str, dict]]:
    """The latency protocol on the first window of this length; each result also names its prompt length.

    First one short untimed generation (the prompt's first `PRIMER_TOKENS` tokens, 2 generated): a sweep sized
    with `warmup_times` 0 would otherwise charge the one-time costs of the process's first forward pass to its
    first timed run (the baseline at the shortest length), which would skew that row and the fit. It costs far
    less than a warm-up round."""
    device = next(model.parameters()).device
    primer = torch.as_tensor(windows[0][:PRIMER_TOKENS], device=device)[None]
    latency.time_generation(model, primer, load_press(latency.BASELINE), 2)
    for label, result in latency.measure(model, tokenizer, windows, policies, settings, log):
        yield label, {**result, "prompt_length": int(windows.shape[1])}
