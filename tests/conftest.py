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


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct from ../shared imported once per session (about 7 s), for the tests that
    use the real model rather than test its import."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA} (only present in the project workspace)")
    from llmkit.interop.gguf_import import import_gguf

    checkpoint = tmp_path_factory.mktemp("smollm2") / "checkpoint"
    import_gguf(SHARED_DATA / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf", checkpoint)
    return checkpoint
