import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mind_samples() -> Path:
    """Real MIND rows kept beside the checkout (../shared/data/mind-samples)."""
    path = Path(os.environ.get("MMNEWSREC_SAMPLES", REPO.parent / "shared/data/mind-samples"))
    if not path.is_dir():
        pytest.skip(f"real MIND samples not found at {path}")
    return path
