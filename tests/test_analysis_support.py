"""Fixtures of the analysis tests: tiny random-init checkpoint folders in the real run layout (no tests here).

A run folder gets ``model_{e}.pt`` for the given epochs (epoch 0 = the seeded initial weights, later epochs the
initial weights moved by a seeded perturbation that grows with the epoch), ``config.json`` and ``metrics.jsonl``
with the keys ``experiment.py`` writes. The model names (dt / gpt2 / igpt) are only names here: the analysis code
must not care how a checkpoint was initialised.
"""
import json
from pathlib import Path

import pytest
import torch

from decision_transformer.checkpoint import atomic_save, make_checkpoint, run_dir_name
from decision_transformer.envs import get_env_spec
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig

N_EMBD, N_LAYER, N_HEAD = 16, 2, 2
EPOCHS = (0, 1, 4, 40)


def tiny_config(env="hopper", K=20, n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD) -> DTConfig:
    spec = get_env_spec(env)
    return DTConfig(state_dim=spec.state_dim, act_dim=spec.act_dim, max_length=K, share_input_output_proj=True,
                    backbone=BackboneConfig(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_inner=4 * n_embd,
                                            resid_pdrop=0.2))


def write_run(root, model, *, env="hopper", dataset="medium", seed=666, K=20, epochs=EPOCHS, no_grad_clip=False,
              block=None, data_file=None, n_layer=N_LAYER, returns=None, step=0.05) -> Path:
    cfg = tiny_config(env, K, n_layer)
    init = DecisionTransformer(cfg, seed=seed + len(model)).state_dict()
    d = Path(root) / run_dir_name(model, dataset, env, seed, K, no_grad_clip, block)
    config = {"env": env, "dataset": dataset, "seed": seed, "K": K, "model_name": model, "pretrained_block": block,
              "remove_grad_clip": no_grad_clip,
              "data_file": str(data_file) if data_file else None, "model_config": cfg.to_dict()}
    g = torch.Generator().manual_seed(seed * 7 + K)
    direction = {k: torch.randn(v.shape, generator=g) for k, v in init.items()}
    for e in epochs:
        sd = {k: v + step * (e ** 0.5) * direction[k] for k, v in init.items()}
        atomic_save(make_checkpoint(sd, config, state_mean=[0.0] * cfg.state_dim, state_std=[1.0] * cfg.state_dim,
                                    iteration=e), d / f"model_{e}.pt")
    (d / "config.json").write_text(json.dumps(config))
    targets = [int(t) for t in get_env_spec(env).targets]
    if returns is None:
        returns = [100.0 * i + 10 * len(model) + seed % 7 for i in range(1, max(epochs) + 1)]
    rows = []
    for i, r in enumerate(returns, 1):
        row = {"iteration": i, "training/action_error": 1.0 / i, "training/train_loss_mean": 1.0 / i}
        for t in targets:
            row[f"evaluation/target_{t}_return_mean"] = r if t == targets[0] or r is None else r / 2
        if env == "halfcheetah":
            row["evaluation/target_6000_return_mean"] = r
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d




@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, hopper_data):
    """checkpoints/: gpt2, igpt (3 blocks) and dt runs, K=20 and K=1, seeds 666 and 42 (metrics only for 42)."""
    root = tmp_path_factory.mktemp("ckpts") / "checkpoints"
    data_file = hopper_data / "hopper-medium-v2.pkl"
    for m in ("gpt2", "igpt", "dt"):
        nl = 4 if m == "igpt" else N_LAYER
        write_run(root, m, data_file=data_file, n_layer=nl)
        write_run(root, m, K=1, data_file=data_file, n_layer=nl)
    write_run(root, "dt", seed=42, epochs=(1, 2), data_file=data_file)
    write_run(root, "gpt2", seed=42, epochs=(1, 2), data_file=data_file)
    write_run(root, "gpt2", no_grad_clip=True, epochs=(1, 2), data_file=data_file)
    for b in range(N_LAYER):
        write_run(root, "dt", K=1, block=b, epochs=(1, 2), data_file=data_file)
    return root


def load_script(relpath: str):
    """Import a script of analysis/ or mine/ (folder names with dashes) as a module, to call its ``main(argv)``."""
    import importlib.util

    from conftest import ROOT

    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location("script_" + path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    main = mod.main
    mod.main = lambda argv=None: main(None if argv is None else [str(a) for a in argv])  # paths -> str
    return mod


def expect_exit(capsys, main, argv, code=2) -> str:
    """Run a script's main expecting a one-line ``error: ...`` and exit ``code``; returns the line."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def fake_mine(monkeypatch, fake):
    """Stands ``fake(x, y, seed=..., **settings)`` in for every estimate run_mi_exp.py trains (its progress bar's
    title left out of the settings)."""
    from decision_transformer.analysis import mi

    def many(pairs, seeds, *, desc=None, **kw):
        return [fake(x, y, seed=s, **kw) for (x, y), s in zip(pairs, seeds)]

    monkeypatch.setattr(mi, "estimate_mi_many", many)
