"""Evaluation text as token windows: wikitext-2-raw-v1 and PG-19, from the hub or from local copies.

Local copies are laid out like the upstream names: DIR/wikitext-2-raw-v1/wiki.test.raw (one dataset row per
line) and DIR/pg19/test/*.txt (Project Gutenberg books). DIR comes from `data_dir` or $KVLIB_DATA_DIR.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from kvlib.files import atomic_write

DATASETS = ("wikitext", "pg19")
PG19_MAX_CHARS = 2_000_000
WIKITEXT_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1")
# deepmind/pg19 is a loading-script dataset, which datasets>=4 no longer runs; emozilla/pg19 holds the same
# splits as Parquet (fields `text`, `short_book_title`, ...).
PG19_HUB = "emozilla/pg19"

_GUTENBERG_START = re.compile(r"\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)[^*]*\*\*\*", re.I)
_GUTENBERG_END = re.compile(r"\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)", re.I)


def check_dataset(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The local text directory, or None for the Hugging Face hub."""
    data_dir = data_dir or os.environ.get("KVLIB_DATA_DIR")
    if not data_dir:
        return None
    path = Path(data_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"data_dir {str(path)!r} is not a directory")
    return path


def strip_gutenberg(text: str) -> str:
    """A Project Gutenberg release without its header and licence footer (text without them is left as is)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


def wikitext_lines(data_dir: Path | None) -> list[str]:
    """Non-blank rows of the wikitext-2-raw-v1 test split, without their line endings."""
    if data_dir is None:
        from datasets import load_dataset

        rows = load_dataset(*WIKITEXT_HUB, split="test")["text"]
    else:
        path = data_dir / "wikitext-2-raw-v1" / "wiki.test.raw"
        if not path.is_file():
            raise FileNotFoundError(f"wikitext not found at {path}")
        rows = _read_text(path).splitlines()
    lines = [row.rstrip("\r\n") for row in rows if row.strip()]
    if not lines:
        raise ValueError(f"wikitext at {path if data_dir else WIKITEXT_HUB} holds no text")
    return lines


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from error


def _pg19_books(data_dir: Path | None) -> Iterator[str]:
    if data_dir is None:
        from datasets import load_dataset

        for row in load_dataset(PG19_HUB, split="test", streaming=True):
            yield row["text"]
        return
    files = sorted((data_dir / "pg19" / "test").glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no PG-19 books at {data_dir / 'pg19' / 'test'}/*.txt")
    for file in files:
        yield _read_text(file, "utf-8-sig")


def pg19_books(data_dir: Path | None, max_chars: int = PG19_MAX_CHARS) -> list[str]:
    """PG-19 test books in order, cleaned, until about `max_chars` characters: books are streamed one at a time
    and the last one is cut, so no more than that is held."""
    books, total = [], 0
    for raw in _pg19_books(data_dir):
        text = strip_gutenberg(raw.replace("\r\n", "\n"))
        books.append(text[: max_chars - total])
        total += len(books[-1])
        if total >= max_chars:
            break
    return books


def token_stream(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Texts tokenized without special tokens and joined with the tokenizer's EOS token as separator."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to separate texts with")
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    stream: list[int] = []
    for i, text_ids in enumerate(ids):
        if i:
            stream.append(tokenizer.eos_token_id)
        stream.extend(text_ids)
    return np.asarray(stream, dtype=np.int64)


def make_windows(stream: np.ndarray, max_length: int, max_samples: int | None = None) -> np.ndarray:
    """Consecutive, non-overlapping windows of `max_length` tokens, [n_windows, max_length]; the tail is dropped."""
    n = len(stream) // max_length
    if max_samples is not None:
        n = min(n, max_samples)
    return stream[: n * max_length].reshape(n, max_length)


def load_windows(
    dataset: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_samples: int | None = None,
    data_dir: str | os.PathLike | None = None,
    pg19_max_chars: int = PG19_MAX_CHARS,
    min_windows: int = 1,
) -> np.ndarray:
    """Token windows of a dataset; the same inputs give the same windows in the same order."""
    check_dataset(dataset)
    local = resolve_data_dir(data_dir)
    texts = wikitext_lines(local) if dataset == "wikitext" else pg19_books(local, pg19_max_chars)
    windows = make_windows(token_stream(texts, tokenizer), max_length, max_samples)
    if len(windows) < min_windows:
        source = local or "the Hugging Face hub"
        raise ValueError(
            f"{dataset} from {source} gives {len(windows)} windows of {max_length} tokens; {min_windows} are needed"
            + (" (raise --pg19_max_chars)" if dataset == "pg19" else "")
        )
    return windows


def token_statistics(windows: np.ndarray, tokenizer: PreTrainedTokenizerBase) -> dict[str, float]:
    """What a run scores: counts, vocabulary coverage, and how long a token is in characters."""
    first = windows[0] if len(windows) else np.zeros(0, dtype=np.int64)
    return {
        "windows": len(windows),
        "tokens_per_window": windows.shape[1] if windows.ndim == 2 else 0,
        "total_tokens": int(windows.size),
        "distinct_tokens": int(len(np.unique(windows))),
        "eos_separators": int((windows == tokenizer.eos_token_id).sum()),
        "chars_per_token_first_window": len(tokenizer.decode(first.tolist())) / max(len(first), 1),
    }


def save_windows(windows: np.ndarray, path: str | os.PathLike) -> Path:
    """Write windows as .npy, atomically, so anyone can re-score exactly the same tokens."""
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        np.save(handle, windows)
    return path
