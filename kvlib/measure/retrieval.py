"""Needle retrieval: can the model still answer a question about one fact far back in a compressed context?

Suffix perplexity mostly rewards keeping recent context; it hardly notices a press that drops a single fact a
later question needs. Here a needle (a random 5-7 digit pass key sentence) is inserted at a chosen depth into a
real-text haystack (a token window of the run's dataset), the context is prefilled under the press, then the
question follows and a few tokens are decoded greedily. A trial is correct when the pass key's digits appear in
the decoded text.

Prompt, at token level (`build_trial`): with `available = length - len(needle) - len(question)` haystack tokens,
the context is `haystack[:d] + needle + haystack[d:available]`, `d = int(depth * available)` (the true token
position is recorded; no snapping), so context plus question is exactly `length` tokens.

- Question-agnostic (default): compression cannot know the question. The context is prefilled (and pruned)
  alone, then the question is fed with `kvlib.cache.extend` at its true positions (continuing from the
  uncompressed context length) and decoding starts after it.
- Question-aware (`question_aware=True`): the question is the end of the compressed context itself, and decoding
  starts right after the prefill.

Format (`NEEDLE`, `QUESTION`): the needle on a line of its own, then the plain-text question
"\\n\\nQuestion: What is the pass key mentioned in the text above?\\nAnswer: The pass key is" (no chat template).
Checked when this kind was written, SmolLM2-135M-Instruct uncompressed at 1024 tokens, greedy, 8 tokens: with an
inline needle and "\\n\\nWhat is the pass key? The pass key is" it answered 0/6 (3 wikitext, 3 PG-19 haystacks;
in real text, unlike repeated filler, it took "pass key" for a term of the surrounding text); the same inside
SmolLM2's chat template 0/6 and with a pass-key instruction before the haystack 1/6 (6 wikitext trials). On 6 mixed
trials (wikitext and PG-19, depths 0.1-0.9): "Question: ... Answer: The pass key is" after an inline needle 4/6,
a longer instruction first 4/6, the needle on its own line with the short question 5/6, with this question 6/6.
Ending on "The pass key is" makes the first decoded tokens the digits, so a few tokens (`answer_tokens`, default 8)
suffice and scoring needs no parsing of free-form answers. The format is the same for every model (tiny test models
included): none gets a template the others lack.

One trial is prefilled once for every press of the run (`SharedPrefill`), each press pruning its own copy:
bit-identical to prefilling under each press (`trial_answer` does that; a test compares them).

Trials are seeded by `settings.seed` and the trial index: the same seed gives the same needles, depths and
haystacks. Trial `t` (over depths x `trials`) uses window `t % n_windows` as its haystack.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kvlib.cache import CachePolicy, as_policy, cache_length, extend, kv_bytes
from kvlib.presses import Press, SharedPrefill

SETTINGS = ("depths", "trials", "question_aware", "answer_tokens")
LENGTHS = (1024, 2048)
QUESTION = "\n\nQuestion: What is the pass key mentioned in the text above?\nAnswer: The pass key is"
NEEDLE = "\nThe pass key is {value}. Remember it. {value} is the pass key.\n"
DIGITS = (5, 7)  # a pass key has 5 to 7 digits
# No tokenizer is at hand in `check`: a token spans at least one byte for the byte-level and byte-fallback
# tokenizers kvlib loads, so the needle's and question's UTF-8 bytes (+ one for a leading-space marker each)
# bound their token counts from above. `build_trial` checks the exact counts again once the tokenizer is loaded.
MAX_NEEDLE_TOKENS = len(NEEDLE.format(value="9" * DIGITS[1]).encode()) + 1
MAX_QUESTION_TOKENS = len(QUESTION.encode()) + 1
MIN_HAYSTACK = 16  # fewer haystack tokens than this is no haystack


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check(settings, presses: list[Press]) -> None:
    """Depths, trials, decoding length, and whether `max_length` (one length of the sweep) holds the haystack, the
    needle and the question, with the context long enough for every press."""
    depths = settings.depths
    if not isinstance(depths, (list, tuple)) or not depths:
        raise ValueError(f"depths must be a non-empty list of numbers in [0, 1]; got {depths!r}")
    for depth in depths:
        if not _number(depth) or not 0 <= depth <= 1:
            raise ValueError(f"every depth must be a number in [0, 1] (fraction of the context before the needle); "
                             f"got {depth!r}")  # fmt: skip
    for name, minimum in (("trials", 1), ("answer_tokens", 1)):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if not isinstance(settings.question_aware, bool):
        raise ValueError(f"question_aware must be true or false; got {settings.question_aware!r}")
    needed = MAX_NEEDLE_TOKENS + MAX_QUESTION_TOKENS + MIN_HAYSTACK
    if settings.max_length < needed:
        raise ValueError(
            f"retrieval context length {settings.max_length} is too short: the needle (up to {MAX_NEEDLE_TOKENS} "
            f"tokens), the question (up to {MAX_QUESTION_TOKENS}) and a haystack of at least {MIN_HAYSTACK} need "
            f"{needed} tokens"
        )
    compressed = settings.max_length - (0 if settings.question_aware else MAX_QUESTION_TOKENS)
    for press in presses:
        try:
            press.check_prefix_length(compressed)
        except ValueError as error:
            raise ValueError(f"retrieval context length {settings.max_length} compresses up to {compressed} tokens "
                             f"(the question after them): {error}") from None  # fmt: skip


# ------------------------------------------------------------------------------------------------------ trials


@dataclass
class Trial:
    """One prompt: the context (compressed), the question (fed after it, or inside it when question-aware)."""

    trial: int
    depth: float
    value: str  # the pass key, as decimal digits
    needle_position: int  # token index of the needle's first token in the context
    window: int  # the haystack's window index
    context: np.ndarray  # token ids: haystack with the needle (and the question when question-aware)
    question: np.ndarray  # token ids fed after the compressed context (empty when question-aware)


def trial_plan(settings) -> list[tuple[int, float]]:
    """(trial index, depth) of every trial at one length: each depth `trials` times, depth by depth."""
    return [(i * settings.trials + k, float(d)) for i, d in enumerate(settings.depths) for k in range(settings.trials)]


def needle_value(seed: int, trial: int) -> str:
    """The pass key of a trial: 5 to 7 random digits (no leading zero), from the seed and the trial index."""
    rng = np.random.default_rng([seed, trial])
    digits = int(rng.integers(DIGITS[0], DIGITS[1] + 1))
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def _tokens(tokenizer, text: str) -> np.ndarray:
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def build_trial(
    tokenizer, windows: np.ndarray, length: int, trial: int, depth: float, seed: int, question_aware: bool = False
) -> Trial:
    """The prompt of one trial: `length` tokens in all (context plus question), the needle at `depth`."""
    value = needle_value(seed, trial)
    needle = _tokens(tokenizer, NEEDLE.format(value=value))
    question = _tokens(tokenizer, QUESTION)
    available = length - len(needle) - len(question)
    if available < MIN_HAYSTACK:
        raise ValueError(
            f"retrieval context length {length} is too short: needle ({len(needle)} tokens) and question "
            f"({len(question)}) leave {available} haystack tokens; {MIN_HAYSTACK} are needed"
        )
    window = trial % len(windows)
    haystack = np.asarray(windows[window][:available], dtype=np.int64)
    if len(haystack) < available:
        raise ValueError(f"windows of {windows.shape[1]} tokens hold no {available}-token haystack")
    position = int(depth * available)
    context = np.concatenate([haystack[:position], needle, haystack[position:]])
    if question_aware:
        context, question = np.concatenate([context, question]), question[:0]
    return Trial(trial, float(depth), value, position, window, context, question)


def trials(tokenizer, windows: np.ndarray, settings) -> list[Trial]:
    """Every trial of one length (`settings.max_length`), in order."""
    return [
        build_trial(tokenizer, windows, settings.max_length, t, depth, settings.seed, settings.question_aware)
        for t, depth in trial_plan(settings)
    ]


def is_correct(value: str, answer: str) -> bool:
    """A trial is correct when the pass key's digits appear in the decoded answer."""
    return value in answer


# ----------------------------------------------------------------------------------------------------- answers


@torch.no_grad()
def _answer(model, last_logits: torch.Tensor, cache, start: int, question: torch.Tensor, n: int) -> dict:
    """Feed the question (if any) after a (pruned) context cache at its true positions, then decode `n` tokens
    greedily (no early stop). Returns the tokens and the logits each was chosen from."""
    held, kept = kv_bytes(cache), cache_length(cache)
    position = start  # the uncompressed context length, or the cache's length after re-rotation
    if question.shape[1]:
        last_logits = extend(model, question, cache, position)[:, -1:]
        position += question.shape[1]
    tokens, logits = [], []
    for step in range(n):
        logits.append(last_logits[:, -1].float())
        token = last_logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens.append(int(token))
        if step + 1 < n:
            last_logits = extend(model, token, cache, position + step)
    return {"tokens": tokens, "logits": torch.cat(logits), "kv_bytes": held, "cache_length": kept}


def _ids(array: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(array, device=device)[None]


@torch.no_grad()
def trial_answer(model: torch.nn.Module, trial: Trial, policy: Press | CachePolicy, answer_tokens: int) -> dict:
    """The answer to one trial with the context prefilled under `policy` (the reference for the shared path)."""
    device = next(model.parameters()).device
    policy = as_policy(policy)
    logits, cache = policy.prefill(model, _ids(trial.context, device))
    start = policy.next_position(cache, len(trial.context))
    return _answer(model, logits, cache, start, _ids(trial.question, device), answer_tokens)


@torch.no_grad()
def shared_trial_answers(
    model: torch.nn.Module, trial: Trial, policies: dict[str, Press | CachePolicy], answer_tokens: int
) -> dict[str, dict]:
    """`trial_answer` of every policy (label -> policy or press) from one shared prefill of the context."""
    device = next(model.parameters()).device
    policies = {label: as_policy(policy) for label, policy in policies.items()}
    shareable = [policy.press for policy in policies.values() if policy.shareable]
    shared = SharedPrefill.run(model, _ids(trial.context, device), shareable) if shareable else None
    question = _ids(trial.question, device)
    return {
        label: _answer(model, shared.logits, policy.from_shared(shared), len(trial.context), question, answer_tokens)
        if policy.shareable
        else trial_answer(model, trial, policy, answer_tokens)  # chunked or re-rotated: its own prefill
        for label, policy in policies.items()
    }


def measure(
    model: torch.nn.Module,
    tokenizer,
    windows: np.ndarray,
    policies: dict[str, CachePolicy],
    settings,
    log: Callable[[str], None] = print,
) -> Iterator[tuple[str, dict]]:
    """Per-trial records of every cache policy at one length (`settings.max_length`): depths x `trials` trials."""
    policies = {label: as_policy(policy) for label, policy in policies.items()}
    planned = trials(tokenizer, windows, settings)  # every prompt built (and checked) before the first prefill
    records: dict[str, list[dict]] = {label: [] for label in policies}
    effective: dict[str, float] = {}
    for i, trial in enumerate(planned):
        for label, answer in shared_trial_answers(model, trial, policies, settings.answer_tokens).items():
            text = tokenizer.decode(answer["tokens"], skip_special_tokens=True)
            records[label].append({
                "trial": trial.trial,
                "depth": trial.depth,
                "needle": trial.value,
                "needle_position": trial.needle_position,
                "window": trial.window,
                "context_length": len(trial.context),
                "question_length": len(trial.question),
                "answer": text,
                "correct": is_correct(trial.value, text),
                "kv_bytes": answer["kv_bytes"],
                "cache_length": answer["cache_length"],
            })  # fmt: skip
            report = policies[label].press.last_report
            effective[label] = report.effective_ratio if report else 0.0
        right = sum(r[-1]["correct"] for r in records.values())
        log(f"  trial {i + 1}/{len(planned)} (depth {trial.depth:g}): {right}/{len(policies)} cache policies correct")
    for label in policies:
        correct = sum(r["correct"] for r in records[label])
        log(f"  {label}: {correct}/{len(records[label])} correct")
        yield label, {"records": records[label], "effective_ratio": effective.get(label, 0.0)}
