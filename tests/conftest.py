import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The user's own D4RL downloads and Hugging Face cache must not change what the tests find: both point at empty
# folders (tests that need them set their own).
_EMPTY = tempfile.mkdtemp(prefix="dt-tests-empty-")
atexit.register(shutil.rmtree, _EMPTY, True)
os.environ["D4RL_DATASET_DIR"] = os.path.join(_EMPTY, "d4rl")
os.environ["HF_HOME"] = os.path.join(_EMPTY, "hf")
os.environ.pop("HF_HUB_CACHE", None)
# Nor the user's WandB settings: a mode, key, server or netrc would log test runs to the user's account, a WANDB_DIR
# moves the offline runs tests look for, a sweep agent's WANDB_RUN_ID gives every run its id. All WANDB_* variables
# go, WandB is disabled, and its settings folder and netrc file are empty ones (tests that need others set them).
for _name in [k for k in os.environ if k.startswith("WANDB_")]:
    del os.environ[_name]
os.environ["WANDB_MODE"] = "disabled"
os.environ["WANDB_CONFIG_DIR"] = os.path.join(_EMPTY, "wandb-config")
os.makedirs(os.environ["WANDB_CONFIG_DIR"])
os.environ["NETRC"] = os.path.join(_EMPTY, "netrc")   # (no such file: no credentials)

# Scripts the tests start as processes get one thread too (the user's own setting wins).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# The tests run many tiny forwards: on two cores one intra-op thread is faster, and much faster when the machine is
# shared (OpenMP threads spin against each other). Benchmarks and real runs keep torch's default.
torch.set_num_threads(1)

# run.py binds evaluation.evaluate_episodes when first imported: imported here, before any test patches that name,
# so that a test which imports it while evaluation is patched cannot leave the fake bound for the tests after it.
import decision_transformer.run  # noqa: E402,F401


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (the default: pyproject.toml's addopts): one worker per core this process may run on, and at most
    one per 4 GiB of memory (the largest tests train a GPT-2-sized model, a few GiB each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return cores
    return max(1, min(cores, int(memory_gib // 4)))


_SKIP = {".git", "__pycache__", ".pytest_cache", ".venv", ".whl"}


def _project_files() -> set[str]:
    """Every file under the project folder, bar git's, caches, virtual environments and installs."""
    found = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in _SKIP and not d.endswith(".egg-info")]
        found.update(os.path.relpath(os.path.join(folder, f), ROOT) for f in files)
    return found


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):   # (the main process; xdist's workers share its folder)
        session.config._project_files_before = _project_files()


def pytest_sessionfinish(session, exitstatus):
    """The tests write only under their temporary folders: a file they leave in the project folder (a default
    output path a test forgot to redirect) fails the run, named."""
    before = getattr(session.config, "_project_files_before", None)
    if before is None:
        return
    new = sorted(_project_files() - before)
    if new:
        shown = ", ".join(new[:5]) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
        print(f"\nerror: the tests wrote into the project folder {ROOT}: {shown}", file=sys.stderr)
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def load_script(relpath: str):
    """A script of the project (``data/...py``, ``benchmarks/...py``) as a module."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location("script_" + path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def listed(folder) -> list[Path]:
    """The entries of ``folder`` that ``ls`` shows (not the hidden run-lock files beside run folders), sorted."""
    return sorted(p for p in Path(folder).iterdir() if not p.name.startswith("."))


def merge_with_evaluations_recorded(monkeypatch, tmp_path, data, paths, *flags) -> list:
    """``experiment.py`` merging hopper's and walker2d's models (``--include attn --copy_model``, then ``flags``) from
    ``tmp_path``, with the merged model's evaluation before finetuning recorded instead of run: returns those calls."""
    import experiment
    from decision_transformer import merge_setup

    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(merge_setup, "_evaluate_before_finetuning", lambda *a: calls.append(a) or {})
    experiment.main(["--env", "hopper", "--data_path", str(data), "--pretrained_models", str(paths["hopper"]),
                     str(paths["walker2d"]), "--include", "attn", "--copy_model", *flags])
    return calls


def fails(main, argv, capsys) -> str:
    """Run an entry point that must reject its input: exit 2, one ``error:`` line, no traceback; returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def hopper_data(tmp_path_factory) -> Path:
    """A folder with ``hopper-medium-v2.pkl``: 2000 random-policy Hopper-v4 transitions (episodes capped at 100)."""
    from decision_transformer.synthetic import make_dataset

    d = tmp_path_factory.mktemp("data")
    make_dataset(d, "hopper", "medium", 2000, seed=0, max_ep_len=100)
    return d


@pytest.fixture(scope="session")
def multi_medium_data(tmp_path_factory) -> Path:
    """A folder with synthetic ``{env}-medium-v2.pkl`` datasets of hopper, halfcheetah and walker2d (300 steps each,
    episodes of at most 50), for multi-task runs."""
    from decision_transformer.models.multi_decision_transformer import MULTI_ENVS
    from decision_transformer.synthetic import make_dataset

    d = tmp_path_factory.mktemp("multi_medium_data")
    for i, env in enumerate(MULTI_ENVS):
        make_dataset(d, env, "medium", 300, seed=i, max_ep_len=50)
    return d


def write_source_models(root: Path, envs, *, n: int, max_ep_len: int, id_base: int) -> tuple[Path, Path, dict]:
    """``root/data`` with one medium dataset per env and
    ``root/models/{env}/dt_gym-experiment-{env}-medium-{id}_best.pt`` per env: tiny DTs (16 x 1) with a stored config,
    the same seeded init and blocks perturbed per env, so that merges and Fishers differ between them. Returns (root,
    data, {env: path})."""
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


def tiny_trajectories() -> list[dict]:
    """Four short hopper-shaped trajectories (7 to 40 steps), so that batches mix real and padded steps."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for n in (7, 25, 40, 13):
        out.append({"observations": rng.normal(size=(n, 11)).astype(np.float32),
                    "actions": rng.uniform(-1, 1, (n, 3)).astype(np.float32),
                    "rewards": rng.normal(size=n).astype(np.float32), "terminals": np.zeros(n, bool)})
    return out


def aux_losses(model):
    """The LM script's three auxiliary terms for a 16-wide model: k-means alignment (7 random centres), init_reg and
    LM co-training on a fixed random token corpus (the --joint text stream)."""
    from decision_transformer.model_factory import AuxLosses
    from decision_transformer.training.init_reg import InitReg
    from decision_transformer.training.kmeans import KMeansAlignment
    from decision_transformer.training.lm_cotrain import LMCotraining, TextBatches

    blocks = torch.randint(0, model.transformer.wte.num_embeddings, (9, 12), generator=torch.Generator().manual_seed(1))
    kmeans = KMeansAlignment(torch.randn(7, 16, generator=torch.Generator().manual_seed(2)), const=0.1,
                             normalize=False, anneal_steps=None)
    return AuxLosses(kmeans, InitReg(model, 1e-2), LMCotraining(TextBatches(blocks, seed=3), const=0.5))


#: Tensor methods that copy a value to the host: on a GPU each one waits for every queued kernel
HOST_SYNCS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu", "nonzero")


def forbid_host_sync(monkeypatch):
    """Make every host-syncing tensor call (and boolean-mask indexing, whose result size needs the mask's values)
    raise, so that a test can show a block of code runs without waiting for the device."""
    def trap(name):
        def f(*a, **k):
            raise AssertionError(f"host sync: Tensor.{name}")
        return f

    for name in HOST_SYNCS:
        monkeypatch.setattr(torch.Tensor, name, trap(name))
    for name in ("nonzero", "masked_select", "unique", "argwhere"):
        monkeypatch.setattr(torch, name, trap(name))
    getitem = torch.Tensor.__getitem__

    def checked_getitem(self, idx):
        for i in idx if isinstance(idx, tuple) else (idx,):
            if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                raise AssertionError("host sync: boolean-mask indexing")
        return getitem(self, idx)

    monkeypatch.setattr(torch.Tensor, "__getitem__", checked_getitem)
