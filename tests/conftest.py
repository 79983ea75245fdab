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


@pytest.fixture(scope="session")
def inception_weights_path(tmp_path_factory):
    """Random He-initialised inception-v3-compat weights (tests/inception_utils.py): FID plumbing without a download."""
    from inception_utils import save_random_inception_weights

    return save_random_inception_weights(tmp_path_factory.mktemp("inception") / "inception_random.pth")
