"""Files that are complete or absent: atomic writes of files and directories, JSON that names its file when it is
unreadable, content fingerprints, and readable file names. No torch here: the analysis side uses it too."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

TMP_SUFFIX = ".tmp"  # every temporary file or directory kvlib writes ends so, and starts with "."


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Write to a temporary file beside `path` and move it into place only once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; results are meant to be shared
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Fill a temporary directory beside `path`; it becomes `path` only once the block finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files and directories a killed run left under `folder` (call only while holding its
    lock: a running writer's temporary files look the same)."""
    removed = []
    for path in sorted(Path(folder).rglob(f".*{TMP_SUFFIX}"), key=lambda p: -len(p.parts)):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_write(path) as handle:
        json.dump(jsonable(data), handle, indent=2, allow_nan=True)


class UnreadableFile(ValueError):
    """A file kvlib wrote (or expected to have written) that is not what it should be."""


def read_json(path: str | os.PathLike) -> Any:
    """The file's JSON; UnreadableFile naming the file when it is not UTF-8 JSON. FileNotFoundError as usual."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnreadableFile(f"{path} is not readable JSON ({type(error).__name__}: {error})") from error


def canonical_hash(data: Any) -> str:
    """sha256 of a JSON-able value, independent of key order."""
    text = json.dumps(jsonable(data), sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def array_hash(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def slug(model: str) -> str:
    """File-name form of a model name: a hub id with '/' replaced by '_'; a local directory or GGUF file by its
    own name (an absolute path would make unreadable file names)."""
    path = Path(model)
    if model.endswith(".gguf"):
        return path.stem
    if path.is_dir():
        return path.resolve().name
    return model.replace("/", "_")


REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_path(path: str | os.PathLike | None) -> Path | None:
    """`path` with a relative path read from the repository root rather than the working directory: the
    notebooks' `output_dir`/`results_dir` mean the same folder whether papermill runs them from the root or
    JupyterLab starts their kernel in notebooks/. An absolute path (and None) is returned as is. When kvlib is
    installed without its repository (no notebooks/ beside it), relative paths stay relative to the working
    directory."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.is_absolute() or not (REPO_ROOT / "notebooks").is_dir():
        return path
    return REPO_ROOT / path
