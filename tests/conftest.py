import contextlib
import io
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # for hf_models and test helper modules
# under pytest-xdist (`make test`: two workers on two cores) each worker takes one core
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


def leftovers(folder: Path) -> list[str]:
    """Everything a failed command left in `folder` (nothing is expected)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# the tests that read the demo run share one worker (xdist_group "demo"), so it runs once
@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    """One `edgeport demo --runs 20 --json` through the real entry point, shared by the tests
    that read its output (it takes about two minutes): its folder and what it printed on stdout."""
    from edgeport.cli import main

    out, printed = tmp_path_factory.mktemp("demo") / "demo", io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "-o", str(out), "--runs", "20", "--json"]) == 0
    return out, printed.getvalue()
