import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # for hf_models and test helper modules
torch.set_num_threads(2)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


def leftovers(folder: Path) -> list[str]:
    """Everything a failed command left in `folder` (nothing is expected)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []
