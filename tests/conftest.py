import os
import sys
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
