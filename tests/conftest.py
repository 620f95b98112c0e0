import os
from pathlib import Path

import pytest
import torch

# Tests are small: one thread each avoids oversubscribing the two CI cores when pytest forks helpers.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA} (only present in the project workspace)")
    return SHARED_DATA
