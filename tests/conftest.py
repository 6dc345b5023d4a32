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


def write_source_models(root: Path, envs, *, n: int, max_ep_len: int, id_base: int) -> tuple[Path, Path, dict]:
    """``root/data`` with one medium dataset per env and ``root/models/{env}/dt_gym-experiment-{env}-medium-{id}_best.pt``
    per env: tiny DTs (16 x 1) with a stored config, the same seeded init and blocks perturbed per env, so that merges
    and Fishers differ between them. Returns (root, data, {env: path})."""
    from decision_transformer.checkpoint import atomic_save, make_checkpoint
    from decision_transformer.envs import get_env_spec
    from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig
    from decision_transformer.synthetic import make_dataset

    data, paths = root / "data", {}
    for i, env in enumerate(envs):
        make_dataset(data, env, "medium", n, seed=i, max_ep_len=max_ep_len)
        spec = get_env_spec(env)
        cfg = DTConfig(spec.state_dim, spec.act_dim, max_length=5, backbone=BackboneConfig(n_embd=16, n_layer=1))
        model = DecisionTransformer(cfg, seed=666)
        with torch.no_grad():
            for p in model.transformer.h.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
        paths[env] = root / "models" / env / f"dt_gym-experiment-{env}-medium-{id_base + i}_best.pt"
        atomic_save(make_checkpoint(model.state_dict(), {"env": env, "dataset": "medium", "seed": 666,
                                                         "model_config": cfg.to_dict()}), paths[env])
    return root, data, paths
