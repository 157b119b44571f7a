"""Provenance of every stored result: versions, commit, device."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

# Paths whose changes can change a number; edits elsewhere (docs, tests) do not make a run "dirty".
RESULT_AFFECTING_PATHS = ("kvlib", "notebooks", "pyproject.toml", "requirements.txt")


def git_commit() -> str:
    """HEAD's commit, with "-dirty" when code or notebooks differ from it."""
    repo = Path(__file__).resolve().parents[2]
    git = ["git", "-C", str(repo)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no", "--", *RESULT_AFFECTING_PATHS],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return (
        f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    )


def provenance(device: str, dtype: str) -> dict[str, str]:
    import torch
    import transformers

    import kvlib

    return {
        "kvlib_version": kvlib.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "git_commit": git_commit(),
        "device": device,
        "device_name": device_name(device),
        "dtype": dtype,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
