import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

# The tests run many tiny forwards: on two cores one intra-op thread is faster, and much faster when the machine is
# shared (OpenMP threads spin against each other). Benchmarks and real runs keep torch's default.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def hopper_data(tmp_path_factory) -> Path:
    """A folder with ``hopper-medium-v2.pkl``: 2000 random-policy Hopper-v4 transitions (episodes capped at 100)."""
    from decision_transformer.synthetic import make_dataset

    d = tmp_path_factory.mktemp("data")
    make_dataset(d, "hopper", "medium", 2000, seed=0, max_ep_len=100)
    return d
