"""The toolkit used as a Python library: the README's example runs as written, and the library calls make the checks
the scripts make (an env pool of another env, a model of another dtype, an existing dataset file, a context length
that differs from the model's) and leave the model in the mode they found it in."""
import re
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from decision_transformer.analysis.activations import get_activations
from decision_transformer.analysis.grads import full_batch_param_norms, per_sample_grad_stats
from decision_transformer.checkpoint import atomic_save, load_model, make_checkpoint
from decision_transformer.data import TrajectoryDataset, load_dataset, validate_trajectories
from decision_transformer.envs import get_env_spec
from decision_transformer.errors import UserError
from decision_transformer.evaluation import EnvPool, evaluate_episodes, evaluate_episodes_sequential
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig
from decision_transformer.synthetic import make_dataset
from decision_transformer.training import Trainer, make_optimizer, warmup_schedule

README = Path(__file__).resolve().parents[1] / "README.md"
K = 5


def _model(env="hopper", max_length=K, n_head=1, activation="relu", seed=0):
    spec = get_env_spec(env)
    return DecisionTransformer(DTConfig(spec.state_dim, spec.act_dim, max_length=max_length,
                                        max_ep_len=spec.max_ep_len,
                                        backbone=BackboneConfig(n_embd=16, n_layer=1, n_head=n_head,
                                                                activation_function=activation)), seed=seed)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    make_dataset(d, "hopper", "random", 1500)
    return TrajectoryDataset(load_dataset(d, "hopper", "random")[1], "hopper")


def _trainer(model, data, K=K):
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0)
    return Trainer(model, opt, warmup_schedule(opt, 1), data, batch_size=4, K=K,
                   generator=torch.Generator().manual_seed(0))


# ---- the README's example ------------------------------------------------------------------------------------------

def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    section = text[text.index("## Using the toolkit from Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out.splitlines()
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})   # again, in the same folder
    assert capsys.readouterr().out.splitlines() == out
    assert out[0].count(" ") == 1 and all(float(x) > 0 for x in out[0].split())   # two action errors
    assert out[2].startswith("mean [") and out[3].startswith("fisher [")
    cka = re.search(r"\[\[(.*)\]\]", out[4]).group(1)
    values = [float(x) for x in re.findall(r"-?\d+\.\d+", cka)]
    assert len(values) == 4 and all(0 <= v <= 1.0001 for v in values)             # 2 blocks x 2 blocks
    assert out[5].startswith("gradient norm ")
    assert (tmp_path / "m1.pt").is_file() and (tmp_path / "data" / "hopper-random-v2.pkl").is_file()


# ---- evaluation ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("evaluate", [evaluate_episodes, evaluate_episodes_sequential])
def test_a_pool_of_another_env_is_refused(evaluate):
    """walker2d and halfcheetah share their state and action sizes: another env's pool would run the wrong
    simulator without an error, and its returns would be scored against the wrong reference."""
    model = _model("halfcheetah")
    pool = EnvPool("walker2d")
    try:
        with pytest.raises(UserError, match="the env pool holds walker2d v4 envs; this evaluation is of halfcheetah"):
            evaluate(model, "halfcheetah", 6000, 1, np.zeros(17), np.ones(17), pool=pool)
        with pytest.raises(UserError, match="holds walker2d v4 envs; this evaluation is of walker2d v5"):
            evaluate(model, "walker2d", 5000, 1, np.zeros(17), np.ones(17), pool=pool, env_version="v5")
        assert pool.envs == []      # refused before any env was made
    finally:
        pool.close()


def test_the_pool_sets_the_version_and_the_device_defaults_to_the_models():
    model = _model()
    pool = EnvPool("hopper", "v5")
    try:
        res = evaluate_episodes(model, "hopper", 3600, 2, np.zeros(11), np.ones(11), pool=pool)
        assert pool.envs[0].spec.id == "Hopper-v5"
        same = evaluate_episodes(model, "hopper", 3600, 2, np.zeros(11), np.ones(11), pool=pool, device="cpu",
                                 env_version="v5")
        np.testing.assert_array_equal(res.returns, same.returns)
    finally:
        pool.close()


def test_a_model_of_another_envs_dimensions_is_refused():
    """A hopper model (11 / 3) in walker2d (17 / 6): one line, not a matrix-shape error from inside the forward."""
    with pytest.raises(UserError, match="the model's states and actions have 11 and 3 dimensions; walker2d's have 17 "
                                        "and 6"):
        evaluate_episodes(_model("hopper"), "walker2d", 5000, 1, np.zeros(17), np.ones(17))


def test_a_model_that_is_not_float32_is_refused():
    model = _model().double()
    with pytest.raises(UserError, match="evaluation runs float32 models; this one's parameters are torch.float64"):
        evaluate_episodes(model, "hopper", 3600, 1, np.zeros(11), np.ones(11))


@pytest.mark.parametrize("training", [True, False])
def test_library_calls_leave_the_model_in_its_mode(data, training):
    """Evaluation, activations and per-sample gradients switch dropout as they need, then put the model back: a
    training loop that evaluates in between keeps training with dropout."""
    model = _model()
    model.train(training)
    batch = data.sample_batch(4, K, torch.Generator().manual_seed(0))
    evaluate_episodes(model, "hopper", 3600, 1, data.state_mean, data.state_std)
    assert model.training is training
    get_activations(model, batch)
    assert model.training is training
    per_sample_grad_stats(model, batch, train_mode=not training)
    assert model.training is training
    full_batch_param_norms(model, batch, train_mode=not training)
    assert model.training is training and all(m.training is training for m in model.modules())


def test_train_step_trains_with_dropout_after_an_evaluation_left_it_in_eval_mode(data):
    model = _model()
    trainer = _trainer(model, data)
    model.eval()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    trainer.train_step()
    assert seen == [True] and model.training


# ---- the trainer's context length ----------------------------------------------------------------------------------

def test_a_trainer_k_other_than_the_models_context_is_warned_about(data):
    with pytest.warns(UserWarning, match=r"training on windows of K=8 steps a model whose context \(config.max_length, "
                                         r"used by evaluation\) is 5"):
        _trainer(_model(max_length=5), data, K=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _trainer(_model(max_length=5), data, K=5)


def test_a_generator_on_another_device_than_the_data_is_refused():
    """The sampler draws its indices on the dataset's device: a CPU generator for data on a GPU would fail in the
    first step with torch's own message; the trainer says what to pass (a stand-in for data on the GPU)."""
    model = _model()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda"))
    with pytest.raises(ValueError, match=r"the batch generator is on cpu, the dataset on cuda: make it with "
                                         r"torch.Generator\(device=dataset.device\)"):
        Trainer(model, opt, warmup_schedule(opt, 1), on_gpu, batch_size=4, K=K, generator=torch.Generator())


@pytest.mark.parametrize("size", [dict(batch_size=0), dict(batch_size=-2), dict(batch_size=4.0), dict(batch_size=True),
                                  dict(K=0), dict(K=None)])
def test_a_trainer_batch_of_no_rows_or_steps_is_refused(data, size):
    """batch_size=0 used to train on an empty batch and stop with "loss became NaN or inf": a divergence, not a
    bad argument."""
    from decision_transformer.multi_run import MultiTrainer

    model = _model()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0)
    kw = dict(dict(batch_size=4, K=K), **size)
    name, value = next(iter(size.items()))
    with pytest.raises(ValueError, match=rf"^{name} must be a positive integer, got {value!r}$"):
        Trainer(model, opt, warmup_schedule(opt, 1), data, generator=torch.Generator(), **kw)
    with pytest.raises(ValueError, match=rf"^{name} must be a positive integer, got {value!r}$"):
        MultiTrainer(model, opt, warmup_schedule(opt, 1), None, [], generator=torch.Generator(), **kw)


def test_a_trainer_takes_numpy_integer_sizes(data):
    model = _model()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0)
    trainer = Trainer(model, opt, warmup_schedule(opt, 1), data, batch_size=np.int64(4), K=np.int64(K),
                      generator=torch.Generator().manual_seed(0))
    assert np.isfinite(trainer.train_iteration(2, iteration=1)["training/train_loss_mean"])


# ---- datasets ------------------------------------------------------------------------------------------------------

def test_trajectories_of_another_env_are_refused(tmp_path):
    make_dataset(tmp_path, "hopper", "medium", 1500)
    trajs = load_dataset(tmp_path, "hopper", "medium")[1]
    with pytest.raises(UserError, match=r"trajectory 0 has observations of shape \[\d+, 11\] and actions of shape "
                                        r"\[\d+, 3\]; walker2d has 17 state and 6 action dimensions"):
        TrajectoryDataset(trajs, "walker2d")


def test_trajectories_built_by_hand_are_checked_and_converted_as_load_dataset_does(capsys):
    """float64 arrays (D4RL's medium-replay, the originals' pickles), the originals' ``dones`` or no terminals at all,
    (T, 1) rewards: converted as load_dataset converts them, so a Trainer trains on them; an empty trajectory or a NaN
    is one line. Trajectories load_dataset checked for the env are not checked again (no warning twice)."""
    rng = np.random.default_rng(0)

    def traj(T=30, **kw):
        return {"observations": rng.random((T, 11)), "actions": rng.random((T, 3)) * 2 - 1,
                "rewards": rng.random(T), **kw}

    trajs = [traj(dones=np.zeros(30, bool)), traj(rewards=rng.random((30, 1))), traj(terminals=np.eye(30)[-1])]
    data = TrajectoryDataset(trajs, "hopper")
    model = _model()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0)
    trainer = Trainer(model, opt, warmup_schedule(opt, 1), data, batch_size=4, K=K,
                      generator=torch.Generator().manual_seed(0))
    assert np.isfinite(trainer.train_iteration(2, iteration=1)["training/train_loss_mean"])
    assert data.states.dtype == torch.float32 and int(data.dones.sum()) == 1
    with pytest.raises(UserError, match="^trajectories: trajectory 1 is empty$"):
        TrajectoryDataset([traj(), traj(T=0)], "hopper")
    bad = traj()
    bad["observations"][3, 2] = np.nan
    with pytest.raises(UserError, match="trajectory 0: 'observations' contains NaN or inf"):
        TrajectoryDataset([bad], "hopper")
    long = [traj(T=1200)]                       # (a warning load_dataset gives once)
    checked = validate_trajectories(long, get_env_spec("hopper"), "long.pkl")
    assert capsys.readouterr().err.count("longer than") == 1
    TrajectoryDataset(checked, "hopper")
    assert "longer than" not in capsys.readouterr().err


def test_make_dataset_keeps_an_existing_file(tmp_path):
    real = tmp_path / "hopper-medium-v2.pkl"
    real.write_bytes(b"a real dataset")
    with pytest.raises(UserError, match=r"hopper-medium-v2.pkl exists; make_dataset keeps it \(pass overwrite=True"):
        make_dataset(tmp_path, "hopper", "medium", 1500)
    assert real.read_bytes() == b"a real dataset"
    make_dataset(tmp_path, "hopper", "medium", 1500, overwrite=True)
    assert len(load_dataset(tmp_path, "hopper", "medium")[1]) >= 1


def test_make_dataset_marks_random_policy_data_under_another_name(tmp_path, capsys):
    """Random-policy data saved as hopper-medium is marked as a stand-in, so reading it says so (it trained and went
    into score tables as D4RL's hopper-medium without a word); under the name random it is what the name says."""
    from decision_transformer.data import stand_in_mark_path

    medium = make_dataset(tmp_path, "hopper", "medium", 1500)
    random = make_dataset(tmp_path, "hopper", "random", 1500)
    assert stand_in_mark_path(medium).is_file() and not stand_in_mark_path(random).exists()
    capsys.readouterr()
    load_dataset(tmp_path, "hopper", "medium")
    assert (f"warning: {medium} is a smoke-test stand-in (random-policy data made by make_dataset, 1500 steps), not "
            f"D4RL's hopper-medium") in capsys.readouterr().err
    load_dataset(tmp_path, "hopper", "random")
    assert "stand-in" not in capsys.readouterr().err


@pytest.mark.parametrize("env, dataset, msg", [("hopper", "mediumm", "unknown dataset 'mediumm'"),
                                               ("hoper", "medium", "unknown env 'hoper'")])
def test_make_dataset_refuses_names_the_scripts_cannot_read(tmp_path, env, dataset, msg):
    with pytest.raises(UserError, match=msg):
        make_dataset(tmp_path, env, dataset, 1500)
    assert list(tmp_path.iterdir()) == []


# ---- loading a saved model -----------------------------------------------------------------------------------------

def test_load_model_rebuilds_the_recorded_architecture(tmp_path, data):
    """A model saved with 2 heads and gelu comes back with them (a model of 1 head and relu has the same shapes and
    would take the weights, computing something else)."""
    model = _model(n_head=2, activation="gelu", seed=3)
    atomic_save(make_checkpoint(model.state_dict(), {"model_config": model.config.to_dict(), "env": "hopper"},
                                data.state_mean, data.state_std), tmp_path / "m.pt")
    loaded, mf = load_model(tmp_path / "m.pt")
    assert loaded.config.backbone.n_head == 2 and loaded.config.backbone.activation_function == "gelu"
    assert mf.env == "hopper"
    assert not loaded.training                       # eval mode, as from_pretrained: dropout off for analyses
    np.testing.assert_array_equal(mf.raw["state_mean"], data.state_mean)
    batch = data.sample_batch(4, K, torch.Generator().manual_seed(1))
    model.eval()
    inputs = (batch.states, batch.actions, batch.rtg[:, :-1], batch.timesteps)
    torch.testing.assert_close(loaded(*inputs, attention_mask=batch.mask).action_preds,
                               model(*inputs, attention_mask=batch.mask).action_preds, rtol=0, atol=0)


def test_load_model_names_a_missing_or_damaged_file(tmp_path):
    with pytest.raises(UserError, match="nothing.pt: model file not found"):
        load_model(tmp_path / "nothing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="junk.pt: not a loadable checkpoint"):
        load_model(tmp_path / "junk.pt")


# ---- the rest of the library's mode keeping and multi-task models ---------------------------------------------------

def _multi(seed=0):
    from decision_transformer.models.multi_decision_transformer import MultiDecisionTransformer, MultiDTConfig

    return MultiDecisionTransformer(MultiDTConfig(max_length=K, backbone=BackboneConfig(n_embd=16, n_layer=1,
                                                                                           n_head=1)), seed=seed)


def test_a_multi_task_model_is_evaluated_only_with_the_envs_layers_selected():
    """walker2d and halfcheetah share their sizes: halfcheetah's embeddings and head would drive walker2d without an
    error."""
    model = _multi().toggle_env("halfcheetah")
    with pytest.raises(UserError, match=r"the multi-task model has halfcheetah's layers selected; select walker2d's "
                                        r"first \(model.toggle_env\('walker2d'\)\)"):
        evaluate_episodes(model, "walker2d", 5000, 1, np.zeros(17), np.ones(17))
    res = evaluate_episodes(model.toggle_env("walker2d"), "walker2d", 5000, 1, np.zeros(17), np.ones(17))
    assert res.lengths[0] >= 1


def test_load_model_selects_the_env_a_multi_task_model_was_specialised_on(tmp_path):
    from decision_transformer.models.multi_decision_transformer import MODEL_CLASS

    model = _multi(seed=4)
    for spec, expect in ((["walker2d"], "walker2d"), ([], "hopper")):
        path = tmp_path / f"multi_{len(spec)}.pt"
        atomic_save(make_checkpoint(model.state_dict(), {"model_class": MODEL_CLASS,
                                                         "model_config": model.config.to_dict()},
                                    specializations=spec), path)
        loaded, mf = load_model(path)
        assert loaded.config.envs[loaded.active] == expect and mf.is_multi


def test_the_other_library_calls_also_leave_the_model_in_its_mode(data):
    from decision_transformer.analysis.attention import model_attention_distances
    from decision_transformer.fisher import compute_fisher

    batch = data.sample_batch(4, K, torch.Generator().manual_seed(0))
    for training in (True, False):
        model = _model().train(training)
        model_attention_distances(model, batch)
        model_attention_distances(model, batch, legacy=True)
        compute_fisher(model, data, batch_size=2, num_batches=1, K=K)
        evaluate_episodes_sequential(model, "hopper", 3600, 1, data.state_mean, data.state_std)
        assert model.training is training and all(m.training is training for m in model.modules())


@pytest.mark.parametrize("kind", ["amp", "multi"])
def test_the_other_trainers_train_with_dropout_after_an_evaluation(data, kind):
    """The LM script's AmpTrainer and the multi-task trainer put the model back in train mode as Trainer does, and
    the multi-task trainer warns of a K other than the model's context as well."""
    if kind == "amp":
        from decision_transformer.training.lm_cotrain import AmpTrainer

        model = _model()
        opt = make_optimizer(model, lr=1e-3, weight_decay=0.0)
        trainer = AmpTrainer(model, opt, warmup_schedule(opt, 1), data, batch_size=4, K=K,
                             generator=torch.Generator().manual_seed(0))
    else:
        from decision_transformer.multi_run import MultiTrainer

        model = _multi()
        opt = make_optimizer(model, lr=1e-3, weight_decay=0.0)
        envdata = types.SimpleNamespace(get=lambda env: data)
        with pytest.warns(UserWarning, match="training on windows of K=6 steps a model whose context"):
            MultiTrainer(model, opt, warmup_schedule(opt, 1), envdata, ["hopper"], batch_size=4, K=6,
                         generator=torch.Generator().manual_seed(0))
        trainer = MultiTrainer(model, opt, warmup_schedule(opt, 1), envdata, ["hopper"], batch_size=4, K=K,
                               generator=torch.Generator().manual_seed(0))
    model.eval()
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    trainer.train_step()
    assert seen == [True] and model.training


# ---- wrong inputs a researcher could pass ---------------------------------------------------------------------------

def test_an_unknown_evaluation_mode_is_refused():
    """A misspelt mode would run as "normal" without a word."""
    model = _model()
    for call in (evaluate_episodes, evaluate_episodes_sequential):
        for mode in ("delay", None):
            with pytest.raises(UserError, match=f"unknown --mode {mode!r}; choose normal, delayed or noise"):
                call(model, "hopper", 3600, 1, np.zeros(11), np.ones(11), mode=mode)


def test_data_of_another_env_is_refused_by_training_fisher_and_the_analyses(data, tmp_path):
    """A hopper dataset with a halfcheetah model: one line naming both sizes, instead of a matmul error; a multi-task
    model with another env's layers selected (or asked for) is refused instead of computing through them."""
    from decision_transformer.fisher import compute_fisher

    cheetah = _model("halfcheetah")
    with pytest.raises(UserError, match="training: the model's states and actions have 17 and 6 dimensions; "
                                        "hopper's have 11 and 3"):
        _trainer(cheetah, data)
    with pytest.raises(UserError, match="compute_fisher: the model's states and actions have 17 and 6"):
        compute_fisher(cheetah, data, batch_size=2, num_batches=1, K=K)
    batch = data.sample_batch(3, K, torch.Generator().manual_seed(0))
    for call in (get_activations, per_sample_grad_stats, full_batch_param_norms):
        with pytest.raises(UserError, match=f"{call.__name__}: the model's states and actions have 17 and 6 "
                                            f"dimensions, the batch's 11 and 3"):
            call(cheetah, batch)
    multi = _multi().toggle_env("walker2d")
    with pytest.raises(UserError, match="compute_fisher: the multi-task model has walker2d's layers selected"):
        compute_fisher(multi, data, batch_size=2, num_batches=1, K=K)
    with pytest.raises(UserError, match="compute_fisher: the forward is asked for walker2d's layers, but the data "
                                        "are hopper's"):
        compute_fisher(multi, data, batch_size=2, num_batches=1, K=K, model_kwargs={"env": "walker2d"})
    assert compute_fisher(multi.toggle_env("hopper"), data, batch_size=2, num_batches=1, K=K)["_stats"]
    hopper = multi.env_index("hopper")   # (the forward takes an env's index too)
    assert compute_fisher(multi.toggle_env("walker2d"), data, batch_size=2, num_batches=1, K=K,
                          model_kwargs={"env": hopper})["_stats"]


def test_bc_models_misspelt_entries_and_token_types_are_refused(data):
    from decision_transformer.analysis.attention import model_attention_distances
    from decision_transformer.analysis.cka import token_features
    from decision_transformer.models.mlp_bc import MLPBCConfig, MLPBCModel

    batch = data.sample_batch(3, K, torch.Generator().manual_seed(0))
    bc = MLPBCModel(MLPBCConfig(11, 3, 16, 1, max_length=K))
    for call in (per_sample_grad_stats, full_batch_param_norms, model_attention_distances, get_activations):
        with pytest.raises(UserError, match="analyses Decision Transformers; a MLPBCModel has no transformer blocks"):
            call(bc, batch)
    with pytest.raises(UserError, match=r"no transformer block has a module 'mlp.droput'"):
        get_activations(_model(), batch, entries=("mlp.droput",))
    assert list(get_activations(_model(), batch, entries=("mlp.dropout",))) == ["0.mlp.dropout"]
    with pytest.raises(UserError, match="unknown token type 'states'; choose one of reward, state, action"):
        token_features(torch.zeros(2, 3, 4), "states")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_a_cuda_device_without_a_gpu_is_one_line(data, tmp_path):
    from decision_transformer.analysis.mine import estimate_mi

    msg = "device 'cuda': torch sees no CUDA GPU on this machine"
    with pytest.raises(UserError, match=msg):
        TrajectoryDataset(load_dataset_trajs(tmp_path), "hopper", device="cuda")
    with pytest.raises(UserError, match=msg):
        evaluate_episodes(_model(), "hopper", 3600, 1, np.zeros(11), np.ones(11), device="cuda")
    with pytest.raises(UserError, match=msg):
        estimate_mi(np.zeros((10, 2)), np.zeros((10, 2)), iters=1, device="cuda")
    path = tmp_path / "m.pt"
    model = _model()
    atomic_save(make_checkpoint(model.state_dict(), {"model_config": model.config.to_dict(), "env": "hopper"}), path)
    with pytest.raises(UserError, match=msg):
        load_model(path, device="cuda")
    with pytest.raises(UserError, match="device 'gpu0'"):
        evaluate_episodes(_model(), "hopper", 3600, 1, np.zeros(11), np.ones(11), device="gpu0")


def load_dataset_trajs(folder):
    make_dataset(folder, "hopper", "random", 300)
    return load_dataset(folder, "hopper", "random")[1]


def test_the_load_dataset_pair_and_a_missing_generator_are_named(tmp_path):
    make_dataset(tmp_path, "hopper", "random", 300)
    with pytest.raises(TypeError, match=r"load_dataset returns \(data file, trajectories\)"):
        TrajectoryDataset(load_dataset(tmp_path, "hopper", "random"), "hopper")
    ds = TrajectoryDataset(load_dataset(tmp_path, "hopper", "random")[1], "hopper")
    model = _model()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        Trainer(model, opt, warmup_schedule(opt, 1), ds, batch_size=4, K=K, generator=None)
