"""Stored results ("cells"): what identifies one, where it lives, and the lock that keeps two runs apart.

A cell's identity is everything that determines its numbers: the measurement kind, the model (hub id and
revision, or a content hash of a local directory or GGUF file), the text (dataset, source, and a hash of the exact
token windows), every protocol setting of its kind, the press with its options, and the exact ratio. Its file
name is readable and ends with a hash of that identity, so results of different settings coexist in one output
directory and nothing is overwritten except by a result of the same identity:

    cells/<model>_<dataset>/<kind>/<method>_<ratio>-<identity hash>.json
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from kvlib.files import UnreadableFile, canonical_hash, read_json, remove_leftovers, slug

ID_LENGTH = 16
LOCK_FILE = ".kvlib.lock"
LOCK_ENV = "KVLIB_HELD_LOCK"  # set for child processes (the study's notebooks) of a run that holds the lock
REQUIRED_KEYS = ("identity", "kind", "method", "compression_ratio", "options", "settings", "provenance")


class CellError(ValueError):
    """A file under cells/ that is not a kvlib result (corrupt, foreign, or edited by hand)."""


def identity(
    kind: str,
    model: dict,
    text: dict,
    settings: dict,
    method: str,
    ratio: float,
    options: dict,
    cache: dict | None = None,
) -> dict:
    """`cache`: what the cache policy adds beyond the press (its precision; empty for the default policy, so that
    results stored before policies existed keep their identity)."""
    extra = {"cache": cache} if cache else {}
    return {
        "kind": kind,
        "model": model,
        "text": text,
        "settings": settings,
        "method": method,
        "options": options,
        "compression_ratio": repr(float(ratio)),  # exact: 0.5 and 0.5000001 are different cells
        **extra,
    }


def cell_id(cell_identity: dict) -> str:
    return canonical_hash(cell_identity)[:ID_LENGTH]


def cell_folder(output_dir: str | os.PathLike, model: str, dataset: str, kind: str) -> Path:
    return Path(output_dir) / "cells" / f"{slug(model)}_{dataset}" / kind


def cell_path(output_dir: str | os.PathLike, model: str, dataset: str, cell_identity: dict) -> Path:
    ratio = float(cell_identity["compression_ratio"])
    precision = cell_identity.get("cache", {}).get("kv_quant")
    variant = f"_{precision}" if precision else ""
    name = f"{cell_identity['method']}_{ratio:g}{variant}-{cell_id(cell_identity)}.json"
    return cell_folder(output_dir, model, dataset, cell_identity["kind"]) / name


def read_cell(path: Path) -> dict | None:
    """The stored cell, None when absent; CellError naming the file when it is not a kvlib cell."""
    try:
        cell = read_json(path)
    except FileNotFoundError:
        return None
    except UnreadableFile as error:
        raise CellError(f"{error}; delete it to measure that cell again") from error
    if not isinstance(cell, dict) or any(key not in cell for key in REQUIRED_KEYS):
        raise CellError(
            f"{path} is not a kvlib result (expected a JSON object with {', '.join(REQUIRED_KEYS)}); "
            "delete it to measure that cell again"
        )
    if path.stem.rpartition("-")[2] != cell_id(cell["identity"]):
        raise CellError(f"{path} does not hold the result its name says (edited by hand?); delete it to measure again")
    return cell


def stored_cells(output_dir: str | os.PathLike, model: str, dataset: str, kind: str) -> Iterator[dict]:
    """Every cell stored for this model, dataset and kind. Files named without an identity hash (kvlib 0.1 wrote
    `<method>_<ratio>.json`) cannot be told apart by settings and are left alone, never read into a table."""
    for path in sorted(cell_folder(output_dir, model, dataset, kind).glob(f"*-{'[0-9a-f]' * ID_LENGTH}.json")):
        cell = read_cell(path)
        if cell is not None:
            yield cell


@contextmanager
def output_lock(output_dir: str | os.PathLike) -> Iterator[None]:
    """One run at a time per output directory: an exclusive lock (released by the system if the run dies, so
    it never goes stale). Holding it, the run first removes temporary files a killed run left behind. A run that
    fails inside removes the lock file and the folders it created, when it left nothing else in them: a rejected
    run leaves the file system as it found it."""
    folder = Path(output_dir).resolve()
    created = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    if os.environ.get(LOCK_ENV) == str(folder):
        yield  # the study pipeline that started this notebook holds it
        return
    lock_path = folder / LOCK_FILE
    new_lock = not lock_path.exists()
    handle = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ValueError(
                f"another kvlib run is writing to {folder} ({holder}); wait for it or choose another --output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
        handle.flush()
        previous = os.environ.get(LOCK_ENV)
        os.environ[LOCK_ENV] = str(folder)
        try:
            remove_leftovers(folder)
            yield
        except Exception:
            _undo_creation(lock_path if new_lock else None, created)  # while the lock is still held
            raise
        finally:
            if previous is None:
                os.environ.pop(LOCK_ENV, None)
            else:
                os.environ[LOCK_ENV] = previous
    finally:
        handle.close()  # closing releases the lock


def _undo_creation(lock_path: Path | None, created: list[Path]) -> None:
    """Remove the lock file this run created, then each folder it created that is left empty (deepest first)."""
    if lock_path is not None:
        lock_path.unlink(missing_ok=True)
    for path in created:
        try:
            path.rmdir()
        except OSError:  # the run left something there: keep it, and the folders above it
            return
