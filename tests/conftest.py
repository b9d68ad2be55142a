import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(ROOT))

BCCD = Path(os.environ.get("BCCD_ROOT", ROOT.parent / "shared" / "datasets" / "BCCD"))


@pytest.fixture
def bccd_root() -> Path:
    if not (BCCD / "Annotations").is_dir():
        pytest.skip(f"BCCD not found at {BCCD} (set BCCD_ROOT)")
    return BCCD
