import os
import sys
from pathlib import Path

# Tests never reach a hub or a tracker service.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each Trainer builds an Accelerator, whose state (mixed precision among it) is process-wide: every test
    starts from none, so a test of one precision is not refused after a test of another ran in the same process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def inception_weights_path(tmp_path_factory):
    """Random He-initialised inception-v3-compat weights (tests/inception_utils.py): FID plumbing without a download."""
    from inception_utils import save_random_inception_weights

    return save_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception_random.pth")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the 2 cores are shared (one thread is several times faster than two
    here) and float reductions become reproducible. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
