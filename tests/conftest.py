import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# float32 on every CPU, whether or not it has native bf16 (detectors.config.auto_precision): the tests'
# numbers and thresholds do not depend on the machine; train.py and evaluate.py runs inherit it
os.environ["DETECTORS_CPU_PRECISION"] = "32-true"
sys.path.insert(0, str(ROOT))

BCCD = Path(os.environ.get("BCCD_ROOT", ROOT.parent / "shared" / "datasets" / "BCCD"))


@pytest.fixture
def bccd_root() -> Path:
    if not (BCCD / "Annotations").is_dir():
        pytest.skip(f"BCCD not found at {BCCD} (set BCCD_ROOT)")
    return BCCD


@pytest.fixture(scope="session")
def bccd_as(tmp_path_factory):
    """BCCD converted to another format (images symlinked), made once per test session."""
    made = {}

    def get(fmt: str) -> Path:
        if not (BCCD / "Annotations").is_dir():
            pytest.skip(f"BCCD not found at {BCCD} (set BCCD_ROOT)")
        if fmt not in made:
            from detectors.data.convert import convert

            made[fmt] = tmp_path_factory.mktemp(f"bccd_{fmt}") / fmt
            convert([BCCD], made[fmt], "voc", fmt, images="symlink")
        return made[fmt]

    return get
