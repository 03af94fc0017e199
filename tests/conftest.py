import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "models"))

# Tests run many tiny ops, where a second thread costs more in synchronisation than it gains.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_root():
    """CIFAR-10 root from $MDAFX_DATA (the folder holding cifar10/); skips when absent."""
    root = os.environ.get("MDAFX_DATA")
    if not root or not (Path(root) / "cifar10").is_dir():
        pytest.skip("CIFAR-10 not available: set MDAFX_DATA to the folder that holds cifar10/ "
                    "(.ci/run sets it to ../shared/data)")
    return Path(root)
