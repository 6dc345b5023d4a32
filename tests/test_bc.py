"""``--model_type bc``: the MLP, its trainer, the experiment.py run and where BC checkpoints are refused."""
import json

import numpy as np
import pytest
import torch

import experiment
from decision_transformer.data import TrajectoryDataset
from decision_transformer.errors import UserError
from decision_transformer.evaluation import evaluate_episodes, evaluate_episodes_sequential
from decision_transformer.models.mlp_bc import MLPBCConfig, MLPBCModel
from decision_transformer.training import ActTrainer, make_optimizer, warmup_schedule

TINY = ["--embed_dim", "32", "--n_layer", "2", "--K", "5", "--batch_size", "8", "--warmup_steps", "10",
        "--num_eval_episodes", "2"]


def test_mlp_layers_and_forward():
    cfg = MLPBCConfig(state_dim=3, act_dim=2, hidden_size=8, n_layer=2, max_length=4)
    m = MLPBCModel(cfg, seed=0).eval()
    # Linear(K*ds, H), ReLU, Dropout, Linear(H, H), ReLU, Dropout, Linear(H, da), Tanh
    assert [n for n, _ in m.named_parameters()] == [f"model.{i}.{w}" for i in (0, 3, 6) for w in ("weight", "bias")]
    assert m.model[2].p == 0.1 and m.model[0].in_features == 12
    s = torch.randn(5, 6, 3)
    x = s[:, -4:].reshape(5, 12)
    h = torch.relu(x @ m.model[0].weight.T + m.model[0].bias)
    h = torch.relu(h @ m.model[3].weight.T + m.model[3].bias)
    want = torch.tanh(h @ m.model[6].weight.T + m.model[6].bias)
    torch.testing.assert_close(m(s), want)
    # fewer than K states: left-padded with zeros
    short = s[:, :2]
    padded = torch.cat([torch.zeros(5, 2, 3), short], dim=1)
    torch.testing.assert_close(m.get_action(short, None, None, None), m(padded))
    assert MLPBCConfig.from_dict(cfg.to_dict()) == cfg


def test_act_trainer_fits_a_deterministic_policy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(11, 3)) * 0.5
    trajs = []
    for _ in range(20):
        obs = rng.normal(size=(50, 11)).astype(np.float32)
        act = np.tanh(obs @ w).astype(np.float32)
        trajs.append({"observations": obs, "actions": act, "rewards": np.ones(50, np.float32),
                      "terminals": np.zeros(50, bool)})
    data = TrajectoryDataset(trajs, "hopper")
    model = MLPBCModel(MLPBCConfig(11, 3, hidden_size=64, n_layer=2, max_length=3), seed=0)
    opt = make_optimizer(model, lr=1e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    trainer = ActTrainer(model, opt, warmup_schedule(opt, 10), data, batch_size=64, K=3, generator=gen,
                         grad_clip=None)
    batch = data.sample_batch(64, 3, torch.Generator().manual_seed(1))
    model.eval()  # no dropout: the loss is the MSE against the last action of each window (always a real step)
    loss, total = trainer._loss(batch)
    assert total is loss and float(batch.mask[:, -1].min()) == 1.0
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(model(batch.states), batch.actions[:, -1]))
    first = trainer.train_iteration(20, 1)["training/train_loss_mean"]
    last = trainer.train_iteration(400, 2)["training/train_loss_mean"]
    assert last < 0.2 * first, (first, last)


def test_bc_run_of_experiment_py(tmp_path, monkeypatch, hopper_data):
    monkeypatch.chdir(tmp_path)
    experiment.main(["--data_path", str(hopper_data), *TINY, "--model_type", "bc", "--max_iters", "2",
                     "--num_steps_per_iter", "5", "--save_model"])
    rd = tmp_path / "checkpoints" / "bc_medium_hopper_666_K5"
    assert sorted(p.name for p in rd.glob("model_*.pt")) == ["model_0.pt", "model_1.pt", "model_2.pt"]
    ckpt = torch.load(rd / "model_2.pt", weights_only=True)
    assert ckpt["config"]["model_config"]["model_class"] == "mlp_bc"
    assert set(ckpt["state_dict"]) == {f"model.{i}.{w}" for i in (0, 3, 6) for w in ("weight", "bias")}
    rows = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    # one evaluation: the first target only
    assert "evaluation/target_3600_return_mean" in rows[0]
    assert not any("target_1800" in k for k in rows[0])
    assert list((tmp_path / "models" / "hopper").glob("bc_gym-experiment-hopper-medium-*.pt"))
    # BC checkpoints are refused where Decision Transformers are expected
    from decision_transformer.legacy_import import load_model_file

    with pytest.raises(UserError, match="MLP behaviour-cloning checkpoint"):
        load_model_file(rd / "model_2.pt")
    # ... and load_model gives them back as the MLP, for evaluate_episodes (it used to refuse them)
    from decision_transformer.checkpoint import load_model

    for path in (rd / "model_2.pt", *(tmp_path / "models" / "hopper").glob("bc_*.pt")):
        model, mf = load_model(path)
        assert isinstance(model, MLPBCModel) and not model.training and mf.env == "hopper"
        assert model.config == MLPBCConfig.from_dict(ckpt["config"]["model_config"])
        assert all(torch.equal(v, ckpt["state_dict"][k]) for k, v in model.state_dict().items())
    from decision_transformer.evaluation import evaluate_episodes

    model, mf = load_model(rd / "model_2.pt")     # it evaluates as the run did (the run's seed and statistics)
    result = evaluate_episodes(model, "hopper", 3600, 2, mf.raw["state_mean"], mf.raw["state_std"], seed=666)
    assert float(result.returns.mean()) == pytest.approx(rows[-1]["evaluation/target_3600_return_mean"], rel=1e-6)
    bad = dict(ckpt, config=dict(ckpt["config"], model_config=dict(ckpt["config"]["model_config"], state_dim=17)))
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"bad.pt: state/action dims 17/3, its recorded env hopper needs 11/3"):
        load_model(tmp_path / "bad.pt")
    del bad["config"]["env"]                     # (no env to check the sizes against: the weights do not fit them)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"bad.pt: the weights do not fit the MLP its config records"):
        load_model(tmp_path / "bad.pt")


@pytest.mark.parametrize("flag", [["--pretrained_lm", "gpt2"], ["--frozen"], ["--pretrained_models", "a.pt"],
                                  ["--pretrained_block", "0"], ["--disable_attention"],
                                  ["--embed_order", "time_then_ln"], ["--custom_transformer_decay"]])
def test_bc_refuses_transformer_flags(tmp_path, monkeypatch, hopper_data, flag, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        experiment.main(["--data_path", str(hopper_data), *TINY, "--model_type", "bc", "--max_iters", "1",
                         "--num_steps_per_iter", "1", *flag])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1] == f"error: {flag[0]} applies to the Decision Transformer, not to " \
                                            f"--model_type bc"


def test_bc_rollouts_have_no_noise_mode(tmp_path, monkeypatch, hopper_data):
    """--mode noise perturbs a DT's first evaluation state; the originals' BC rollouts had no such branch, so a BC
    run in noise mode evaluates exactly as in normal mode (same data, same seeds)."""
    returns = {}
    for mode in ("normal", "noise"):
        work = tmp_path / mode
        work.mkdir()
        monkeypatch.chdir(work)
        experiment.main(["--data_path", str(hopper_data), *TINY, "--model_type", "bc", "--max_iters", "1",
                         "--num_steps_per_iter", "3", "--mode", mode, "--num_eval_episodes", "3"])
        row = json.loads((work / "checkpoints" / "bc_medium_hopper_666_K5" / "metrics.jsonl").read_text())
        returns[mode] = (row["evaluation/target_3600_return_mean"], row["evaluation/target_3600_return_std"])
    assert returns["noise"] == returns["normal"]


def test_unknown_model_type_exits_2(tmp_path, monkeypatch, hopper_data, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        experiment.main(["--data_path", str(hopper_data), "--model_type", "cql"])
    assert e.value.code == 2 and "invalid choice: 'cql'" in capsys.readouterr().err


def test_bc_batched_evaluation_equals_one_by_one():
    """Exactly, as the DT's: an episode's actions do not depend on how many episodes run beside it (the MLP's rows
    are padded as the DT's, CPU GEMM rounding a row by the number of rows below a threshold)."""
    model = MLPBCModel(MLPBCConfig(11, 3, hidden_size=128, n_layer=3, max_length=20), seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)   # (large actions: episodes that last, and differ at the first rounding difference)
    mean, std = np.zeros(11), np.ones(11)
    fast = evaluate_episodes(model, "hopper", 3600, 5, mean, std, seed=1)
    slow = evaluate_episodes_sequential(model, "hopper", 3600, 5, mean, std, seed=1)
    np.testing.assert_array_equal(fast.returns, slow.returns)
    np.testing.assert_array_equal(fast.lengths, slow.lengths)
    for n in (1, 2):
        np.testing.assert_array_equal(evaluate_episodes(model, "hopper", 3600, n, mean, std, seed=1).returns,
                                      slow.returns[:n])


def test_bc_says_that_dropout_does_not_reach_its_mlp(tmp_path, monkeypatch, hopper_data, capsys):
    """The MLP's dropout is fixed at 0.1 (as the originals'); --dropout 0.5 changed nothing without a word while the
    run's config.json recorded 0.5."""
    monkeypatch.chdir(tmp_path)
    base = ["--data_path", str(hopper_data), *TINY, "--model_type", "bc", "--max_iters", "1", "--num_steps_per_iter",
            "1", "--outdir", ""]
    experiment.main([*base, "--dropout", "0.5"])
    assert "warning: --dropout 0.5 has no effect with --model_type bc: its MLP's dropout is fixed at 0.1" in \
        capsys.readouterr().err
    experiment.main(base)
    assert "--dropout" not in capsys.readouterr().err
