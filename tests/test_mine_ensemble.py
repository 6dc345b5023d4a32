"""MINE estimators trained together as one batched network (MineEnsemble, estimate_mi_many): the same estimates as
training them one by one, up to float rounding, whatever the members' widths, sample counts and ensemble size."""
import math

import numpy as np
import pytest
import torch
from test_mine_grads_wiring import _mi_files, _run_mi

from decision_transformer.analysis import mine
from decision_transformer.analysis.mine import MineEnsemble, estimate_mi, estimate_mi_many
from decision_transformer.errors import UserError

SMALL = {"hidden": 16, "hidden_layers": 2, "lr": 1e-2, "batch_size": 32}


def _pairs(widths, n=100, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for dx, dy in widths:
        x = rng.standard_normal((n, dx)).astype(np.float32)
        y = rng.standard_normal((n, dy)).astype(np.float32)
        y[:, :min(dx, dy)] += x[:, :min(dx, dy)]
        out.append((x, y))
    return out


WIDTHS = [(1, 8), (3, 8), (2, 5), (3, 8)]


# MINE training is chaotic: a relative change of 1e-7 in one input moves an estimate by a few thousandths of a nat
# within 20 passes with the "mine" loss (hundredths within 30, depending on the CPU's float kernels) and within fewer
# with "mine_biased", in the one-by-one path alone. Their checks therefore stop before the rounding has grown.
@pytest.mark.parametrize("loss,iters", [("mine", 5), ("fdiv", 30), ("mine_biased", 1)])
@pytest.mark.parametrize("ensemble", [1, 2, 128])
def test_the_same_estimates_as_one_by_one(loss, iters, ensemble):
    pairs = _pairs(WIDTHS)
    seeds = [10 + i for i in range(len(pairs))]
    serial = [estimate_mi(x, y, seed=s, loss=loss, iters=iters, **SMALL) for (x, y), s in zip(pairs, seeds)]
    together = estimate_mi_many(pairs, seeds, loss=loss, iters=iters, ensemble=ensemble, **SMALL)
    assert len(set(serial)) == len(serial)                       # distinct seeds and data: distinct estimates
    np.testing.assert_allclose(together, serial, rtol=0, atol=1e-4)


def test_a_diverging_member_is_nan_and_the_others_go_on():
    pairs = _pairs(WIDTHS[:2])
    pairs.insert(1, (np.full((100, 2), np.nan, np.float32), pairs[0][1]))
    serial = [estimate_mi(x, y, seed=s, iters=5, **SMALL) for (x, y), s in zip(pairs, [1, 2, 3])]
    together = estimate_mi_many(pairs, [1, 2, 3], iters=5, **SMALL)
    assert math.isnan(serial[1]) and math.isnan(together[1])
    np.testing.assert_allclose([together[0], together[2]], [serial[0], serial[2]], rtol=0, atol=1e-4)


def test_members_with_different_sample_counts_and_held_out_pairs():
    """Pairs of 100 and of 60 samples (as --exclude_padding makes) train in separate groups; held-out pairs are
    scored as estimate_mi's eval_x / eval_y."""
    pairs = _pairs(WIDTHS[:2]) + _pairs(WIDTHS[2:], n=60, seed=1)
    held = _pairs(WIDTHS[:2], n=40, seed=2) + _pairs(WIDTHS[2:], n=40, seed=3)
    seeds = [5, 6, 7, 8]
    serial = [estimate_mi(x, y, seed=s, iters=8, eval_x=xe, eval_y=ye, **SMALL)
              for (x, y), (xe, ye), s in zip(pairs, held, seeds)]
    together = estimate_mi_many(pairs, seeds, iters=8, eval_pairs=held, **SMALL)
    np.testing.assert_allclose(together, serial, rtol=0, atol=1e-4)
    on_train = estimate_mi_many(pairs, seeds, iters=8, **SMALL)
    assert not np.allclose(on_train, together)


def test_padded_first_layer_weights_stay_zero():
    """A member narrower than the widest sees zero-padded inputs through weights that start and stay at zero."""
    pairs = _pairs([(1, 3), (4, 6)])
    ens = MineEnsemble([(1, 3), (4, 6)], [0, 1], hidden=8, hidden_layers=1, lr=1e-2)
    ens.fit([p[0] for p in pairs], [p[1] for p in pairs], iters=5, batch_size=32)
    first = ens.weights[0].detach()                               # [E, x_pad + y_pad, hidden]
    assert first.shape == (2, 4 + 6, 8)
    assert torch.count_nonzero(first[0, 1:4]) == 0 and torch.count_nonzero(first[0, 4 + 3:]) == 0
    assert torch.count_nonzero(first[0, :1]) > 0 and torch.count_nonzero(first[1]) == first[1].numel()
    assert len(ens.history) == 5 * (100 // 32) and ens.history[0].shape == (2,)


def test_the_progress_bar_counts_every_step(monkeypatch):
    from decision_transformer import runlog

    bars = []

    class Bar:
        def __init__(self, total, desc):
            self.total, self.desc, self.n = total, desc, 0
            bars.append(self)

        def update(self, k):
            self.n += k

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(runlog, "progress", Bar)
    pairs = _pairs(WIDTHS[:3]) + _pairs(WIDTHS[:1], n=40)
    estimate_mi_many(pairs, [0, 1, 2, 3], iters=3, ensemble=2, desc="MINE test", **SMALL)
    # 100 pairs: 3 minibatches of 32 per pass, in 2 ensembles (2 + 1 members); 40 pairs: 1 minibatch per pass
    assert [(b.desc, b.total, b.n) for b in bars] == [("MINE test", 3 * 3 * 2 + 3 * 1, 3 * 3 * 2 + 3 * 1)]
    estimate_mi_many(pairs, [0, 1, 2, 3], iters=1, **SMALL)
    assert len(bars) == 1                                         # no title, no bar


def test_a_log_gets_a_line_per_ensemble(capsys):
    """stderr not a terminal (a log file: no progress bar): a line after each ensemble when there are several."""
    pairs = _pairs(WIDTHS[:3])
    estimate_mi_many(pairs, [0, 1, 2], iters=1, ensemble=2, desc="MINE test", **SMALL)
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(" (")[0] for ln in lines] == ["MINE test: 2 of 3 estimates trained",
                                                   "MINE test: 3 of 3 estimates trained"]
    assert all(ln.endswith(" s)") for ln in lines)
    estimate_mi_many(pairs, [0, 1, 2], iters=1, desc="MINE test", **SMALL)          # one ensemble: the caller says
    estimate_mi_many(pairs, [0, 1, 2], iters=1, ensemble=2, **SMALL)                # no title: nothing
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("call,message", [
    (lambda p: estimate_mi_many(p, [1]), "estimate_mi_many takes one seed per pair: 2 pairs, 1 seeds"),
    (lambda p: estimate_mi_many(p, [1, 2], ensemble=0), "the MINE ensemble size must be at least 1, got 0"),
    (lambda p: estimate_mi_many(p, [1, 2], eval_pairs=p[:1]), "estimate_mi_many got 1 held-out pairs for 2 pairs"),
    (lambda p: estimate_mi_many(p, [1, 2], eval_pairs=[p[0], (p[0][0], p[1][1])]),
     "pair 1: held-out samples of width 1 and 8, training samples of width 3 and 8"),
    (lambda p: estimate_mi_many([p[0], (p[1][0][:50], p[1][1])], [1, 2]), "pair 1: x has 50 samples, y has 100"),
    (lambda p: estimate_mi_many([(p[0][0][:1], p[0][1][:1])], [1]), "MINE needs at least 2 samples per batch, got 1"),
    (lambda p: estimate_mi_many(p, [1, 2], loss="kl"), "unknown MINE loss 'kl'"),
])
def test_bad_input_is_one_line(call, message):
    with pytest.raises(UserError) as e:
        call(_pairs([(1, 8), (3, 8)]))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_no_host_sync_in_the_training_loop(monkeypatch):
    """The loop keeps the bounds and the divergence record on the device: no .item(), float() or .tolist() until the
    estimates are read (Adam's step counters, which torch keeps on the host, aside)."""
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _n=name, _r=real: reads.append((_n, self)) or _r(self, *a))
    pairs = _pairs(WIDTHS)
    ens = MineEnsemble([(x.shape[1], y.shape[1]) for x, y in pairs], [0, 1, 2, 3], **{k: v for k, v in SMALL.items()
                                                                                     if k != "batch_size"})
    ens.fit([p[0] for p in pairs], [p[1] for p in pairs], iters=2, batch_size=32)
    steps = [s["step"] for s in ens.opt.state.values()]
    assert len(steps) == len(ens.params) and reads
    assert [n for n, t in reads if not any(t is s for s in steps)] == []
    reads.clear()
    assert len(ens.estimate([p[0] for p in pairs], [p[1] for p in pairs])) == 4
    assert [n for n, _ in reads] == ["tolist"]


def test_run_mi_exp_trains_together_with_the_same_results(tmp_path):
    """run_mi_exp.py's default (--mine_ensemble 128) and one by one (--mine_ensemble 1): the same files, up to float
    rounding; --mine_ensemble 0 is refused."""
    _mi_files(tmp_path, np.ones((6, 3)))
    flags = ["--iters", "3", "--mine_hidden", "8", "--batch_size", "4"]
    together = _run_mi(tmp_path, "--exp_type", "no_context", *flags).files
    first = {k: v.copy() for k, v in np.load(together[0]).items()}
    alone = _run_mi(tmp_path, "--exp_type", "no_context", *flags, "--mine_ensemble", "1").files
    second = dict(np.load(alone[0]).items())
    assert sorted(first) == sorted(second) == ["0.mlp.dropout", "1.mlp.dropout", "batch_digest"]
    for k in ("0.mlp.dropout", "1.mlp.dropout"):
        assert np.isfinite(first[k]).all()
        np.testing.assert_allclose(first[k], second[k], rtol=0, atol=1e-4)
    with pytest.raises(UserError, match="--mine_ensemble"):
        _run_mi(tmp_path, "--exp_type", "no_context", "--mine_ensemble", "0")


def test_the_ensemble_is_built_inside_forked_rng():
    state = torch.random.get_rng_state()
    mine.MineEnsemble([(1, 2)], [3], hidden=4, hidden_layers=1)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_one_estimator_trains_without_host_sync_and_stops_counting_at_a_nan(monkeypatch):
    """Mine.fit (estimate_mi's path) reads its bounds once, after the loop (it read two a step); a NaN bound still
    ends in FloatingPointError, with the history up to it."""
    reads = []
    real = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: reads.append(1) or real(self))
    x, y = _pairs([(2, 2)], n=64)[0]
    m = mine.Mine(2, 2, hidden=8, hidden_layers=1, seed=0).fit(x, y, iters=3, batch_size=32)
    assert reads == [1] and len(m.history) == 6 and all(isinstance(v, float) for v in m.history)
    bad = x.copy()
    bad[:] = np.nan
    m = mine.Mine(2, 2, hidden=8, hidden_layers=1, seed=0)
    with pytest.raises(FloatingPointError, match="MINE bound became NaN or inf"):
        m.fit(bad, y, iters=3, batch_size=32)
    assert m.history == []
