"""Library calls given values that used to give NaN, inf or an error deep inside torch: normalisation statistics and
return targets passed to an evaluation or a dataset, a model whose timestep table is shorter than the data's or
the env's episodes, and degenerate sizes (a context of 0, no MINE samples, one gradient)."""
import numpy as np
import pytest
import torch

from decision_transformer.analysis.grads import grad_confusion, mean_pairwise_cosine, per_sample_grad_stats
from decision_transformer.analysis.mine import estimate_mi
from decision_transformer.data import TrajectoryDataset, load_dataset
from decision_transformer.errors import UserError
from decision_transformer.evaluation import EvalResult, evaluate_episodes, evaluate_episodes_sequential
from decision_transformer.fisher import compute_fisher
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig
from decision_transformer.training import Trainer, make_optimizer, warmup_schedule


@pytest.fixture(scope="module")
def data(hopper_data):
    return TrajectoryDataset(load_dataset(hopper_data, "hopper", "medium")[1], "hopper")


def _model(max_ep_len=1000):
    return DecisionTransformer(DTConfig(11, 3, max_length=5, max_ep_len=max_ep_len,
                                        backbone=BackboneConfig(n_embd=16, n_layer=1, n_head=1)), seed=0)


def _bad_stats(data):
    zero = data.state_std.copy()
    zero[0] = 0
    nan = data.state_mean.copy()
    nan[2] = np.nan
    return [((data.state_mean, zero), "state_std has values <= 0"),
            ((nan, data.state_std), "state_mean contains NaN or inf"),
            ((data.state_mean, data.state_std[:3]), r"state_std has shape \(3,\), hopper states have 11 dims"),
            ((data.state_mean, "x"), "state_std is a str, not numbers")]


@pytest.mark.parametrize("evaluate", [evaluate_episodes, evaluate_episodes_sequential])
def test_an_evaluation_refuses_bad_statistics_and_targets(data, evaluate):
    """A zero std made every state inf (returns NaN, with only MuJoCo's warning), a NaN target NaN returns; a
    std of the wrong size failed inside torch."""
    model = _model()
    for (mean, std), why in _bad_stats(data):
        with pytest.raises(UserError, match=f"^evaluation: {why}"):
            evaluate(model, "hopper", 3600, 1, mean, std)
    for target in (float("nan"), float("inf"), "3600", None):
        with pytest.raises(UserError, match="the return target must be a finite number"):
            evaluate(model, "hopper", target, 1, data.state_mean, data.state_std)
    # the statistics may come as tensors (a checkpoint's) and the target as a numpy number
    res = evaluate(model, "hopper", np.float64(3600), 1, torch.as_tensor(data.state_mean),
                   torch.as_tensor(data.state_std))
    assert np.isfinite(res.returns).all() and "target_3600_return_mean" in res.metrics("hopper")


def test_targets_that_are_no_whole_numbers_keep_their_own_keys():
    """Both 0.5 and 0.7 were logged as target_0_..., one overwriting the other."""
    keys = [next(iter(EvalResult(t, np.ones(2), np.ones(2, dtype=np.int64)).metrics("hopper"))) for t in
            (0.5, 0.7, 3600, 3600.0, np.int64(12000))]
    assert keys == ["target_0.5_return_mean", "target_0.7_return_mean", "target_3600_return_mean",
                    "target_3600_return_mean", "target_12000_return_mean"]


def test_a_dataset_refuses_bad_given_statistics(data, hopper_data):
    trajs = load_dataset(hopper_data, "hopper", "medium")[1]
    for (mean, std), why in _bad_stats(data):
        with pytest.raises(UserError, match=f"^TrajectoryDataset: {why}"):
            TrajectoryDataset(trajs, "hopper", state_mean=mean, state_std=std)
    # one given: the other is the data's own, as before
    own = TrajectoryDataset(trajs, "hopper", state_mean=data.state_mean)
    np.testing.assert_array_equal(own.state_std, data.state_std)
    torch.testing.assert_close(own.states, data.states, rtol=0, atol=0)


def test_a_timestep_table_shorter_than_the_data_or_the_episodes_is_refused(data):
    """A model of max_ep_len 10 failed with an IndexError inside the embedding in evaluation, training, the Fisher
    and the batch analyses."""
    longest = int(max(data.traj_lens_all))
    small = _model(max_ep_len=10)
    with pytest.raises(UserError, match=r"^evaluation: the model embeds timesteps 0\.\.9 \(max_ep_len 10\), but "
                                        r"hopper's episodes reach timestep 999"):
        evaluate_episodes(small, "hopper", 3600, 1, data.state_mean, data.state_std)
    opt = make_optimizer(small, lr=1e-4, weight_decay=1e-4)
    with pytest.raises(UserError, match=f"^training: .*the dataset's windows reach timestep {longest - 1}; build it "
                                        f"with max_ep_len of at least {longest}"):
        Trainer(small, opt, warmup_schedule(opt, 10), data, batch_size=4, K=5, generator=torch.Generator())
    with pytest.raises(UserError, match="^compute_fisher: the model embeds timesteps"):
        compute_fisher(small, data, batch_size=4, num_batches=1, K=5)
    batch = data.sample_batch(8, 5, torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="^per_sample_grad_stats: the model embeds timesteps"):
        per_sample_grad_stats(small, batch)
    # a table just long enough for the data trains; the env's evaluation still needs 1000 rows
    enough = _model(max_ep_len=longest)
    opt = make_optimizer(enough, lr=1e-4, weight_decay=1e-4)
    Trainer(enough, opt, warmup_schedule(opt, 10), data, batch_size=4, K=5,
            generator=torch.Generator().manual_seed(0)).train_iteration(1, iteration=1)


def test_degenerate_sizes_are_refused_in_one_line(data):
    for K in (0, -1):
        with pytest.raises(ValueError, match="K must be a positive integer"):
            data.sample_batch(2, K)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        data.sample_batch(0, 5)
    with pytest.raises(UserError, match=r"MINE takes samples as rows; an array of shape \(0, 2\) holds none"):
        estimate_mi(np.zeros((0, 2)), np.zeros((0, 2)), iters=2)
    one = torch.ones(1, 1)
    for f in (grad_confusion, mean_pairwise_cosine):
        with pytest.raises(ValueError, match="at least 2 samples"):
            f(one)
    cos = torch.tensor([[1.0, -0.5], [-0.5, 1.0]])
    assert grad_confusion(cos) == -0.5 and mean_pairwise_cosine(cos) == -0.5
