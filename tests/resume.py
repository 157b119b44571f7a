"""Kill a grid run with SIGKILL once it starts measuring, resume it, and hand back both output folders."""

import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def killed_and_resumed(args: list[str], folder: Path, marker: str = "cell(s):") -> tuple[Path, Path]:
    """(clean, killed): `args` (a `python -m kvlib grid ...` command without --output_dir) run once uninterrupted,
    and once killed at the first stderr line containing `marker`, then rerun to completion."""
    clean, killed = folder / "clean", folder / "killed"
    subprocess.run([*args, "--output_dir", str(clean)], check=True, capture_output=True, cwd=REPO, timeout=300)
    process = subprocess.Popen([*args, "--output_dir", str(killed)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    for line in process.stderr:
        if marker in line or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    resumed = subprocess.run([*args, "--output_dir", str(killed)], capture_output=True, text=True, cwd=REPO,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return clean, killed
