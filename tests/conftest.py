import os
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
SMOLLM2_GGUF = SHARED_DATA / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA} (only present in the project workspace)")
    return SHARED_DATA


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """The tests of the real model run on one pytest-xdist worker (``--dist loadgroup``), which imports it once.
    The slow tests run first: pytest-xdist hands the tests out in this order as its workers free up, so the
    long ones start early and the short ones fill the end, instead of a worker waiting idle while the other
    finishes a test of a minute."""
    for item in items:
        if "smollm2_checkpoint" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("smollm2"))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="module")
def all_cores():
    """This worker's share of the cores for a module that runs the real 135M-parameter model, whose matrices
    do pay for a second thread (SmolLM2's scoring tests run 1.6x faster on 2 cores than on 1); back to one
    thread after it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct from ../shared imported once per session (about 7 s) by ``llmkit import``'s
    function, for every test of the real model (its import test included)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA} (only present in the project workspace)")
    from llmkit.interop import ImportConfig, import_checkpoint

    checkpoint = tmp_path_factory.mktemp("smollm2") / "checkpoint"
    import_checkpoint(ImportConfig(source=str(SMOLLM2_GGUF), out=str(checkpoint)))
    return checkpoint
