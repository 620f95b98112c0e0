from pathlib import Path

import pytest
import torch

from llmkit.sandbox import isolation as sandbox_isolation

# Test models are tiny: a second intra-op thread gains nothing on their matrices and, on a busy
# machine, its spin-waiting slows training loops several times over. One thread for every test.
torch.set_num_threads(1)

# Model-written code runs under bubblewrap (.ci/run installs it). On a machine without it, the tests
# of everything that runs code still run, unisolated; the isolation tests themselves skip.
if sandbox_isolation._bubblewrap_problem() is not None:
    sandbox_isolation.allow_unisolated()

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA} (only present in the project workspace)")
    return SHARED_DATA
