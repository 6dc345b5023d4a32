"""MINE's training loop and estimator details, run_mi_exp's wiring (which pairs, which flags reach MINE, the padding
cut-off, the filter of the activation keys, the plots' ordering) and the gradient scripts' wiring (per-sample dropout
masks, --train_mode / --grad_seed / --unclipped reaching the computation, the clip-share column, the top-k tensors,
the batch-size check), each against an independent computation or a recorded call."""
import dataclasses
import math
import types

import numpy as np
import pytest
import torch
from test_analysis_figures import figures  # noqa: F401
from test_analysis_grads import _batch
from test_analysis_support import fake_mine, tiny_config, write_run

from decision_transformer.analysis import common, grads, mi
from decision_transformer.analysis.mine import Mine, StatisticsNetwork, estimate_mi, logmeanexp
from decision_transformer.data import Batch
from decision_transformer.errors import UserError
from decision_transformer.models import DecisionTransformer

# ---- mine.py -----------------------------------------------------------------------------------------------------


def _pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2)).astype(np.float32)
    return x, (0.8 * x + 0.6 * rng.standard_normal((n, 2))).astype(np.float32)


def test_fewer_samples_than_the_batch_still_train():
    """n < batch_size: one batch of all n samples per pass (not zero batches)."""
    x, y = _pairs(20)
    m = Mine(2, 2, hidden=8, hidden_layers=1, seed=0)
    before = [p.detach().clone() for p in m.net.parameters()]
    m.fit(x, y, iters=3, batch_size=50)
    assert len(m.history) == 3
    assert not all(torch.equal(a, b) for a, b in zip(before, m.net.parameters()))


def test_running_mean_starts_at_the_batch_and_weights_it_by_alpha():
    m = Mine(1, 1, hidden=4, hidden_layers=1)
    tj = torch.zeros(4)
    a = torch.tensor([0.0, 1.0, 2.0, 3.0])
    b = torch.tensor([5.0, 4.0, 6.0, 7.0])
    m._objective(tj, a)
    assert torch.allclose(m.log_mu, logmeanexp(a))
    assert m.log_mu.item() == pytest.approx(math.log(np.mean(np.exp([0.0, 1, 2, 3]))), rel=1e-6)
    m._objective(tj, b)
    expected = math.log(0.01 * np.mean(np.exp([5.0, 4, 6, 7])) + 0.99 * np.mean(np.exp([0.0, 1, 2, 3])))
    assert m.log_mu.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss,expected", [("fdiv", 2 - math.e), ("mine", 0.0), ("mine_biased", 0.0)])
def test_estimate_uses_the_losss_own_bound(loss, expected):
    """T ≡ 2: NWJ gives 2 - e^{2-1} = 2 - e, DV gives 2 - log mean e^2 = 0."""
    m = Mine(1, 1, loss=loss, hidden=4, hidden_layers=1)
    with torch.no_grad():
        m.net[-1].weight.zero_()
        m.net[-1].bias.fill_(2.0)
    x, y = _pairs(16)
    assert m.estimate(x[:, :1], y[:, :1]) == pytest.approx(expected, abs=1e-6)


def test_estimate_mi_evaluates_on_the_held_out_pairs():
    """eval_x / eval_y: the same training, then the bound on the held-out pairs (not on the training ones)."""
    x, y = _pairs(64, seed=0)
    xe, ye = _pairs(48, seed=1)
    kw = {"hidden": 8, "hidden_layers": 1, "lr": 1e-2, "seed": 4}
    got = estimate_mi(x, y, iters=4, batch_size=16, eval_x=xe, eval_y=ye, **kw)
    held_out = Mine(2, 2, **kw).fit(x, y, iters=4, batch_size=16).estimate(xe, ye)
    on_train = Mine(2, 2, **kw).fit(x, y, iters=4, batch_size=16).estimate(x, y)
    assert got == held_out and got != on_train


def test_the_generator_follows_the_seed():
    for s in (5, 6):
        assert torch.equal(Mine(1, 1, hidden=4, hidden_layers=1, seed=s)._perm(50),
                           torch.randperm(50, generator=torch.Generator().manual_seed(s)))
    assert not torch.equal(Mine(1, 1, hidden=4, seed=5)._perm(50), Mine(1, 1, hidden=4, seed=6)._perm(50))


@pytest.mark.parametrize("layers", [0, -1])
def test_statistics_network_needs_a_hidden_layer(layers):
    with pytest.raises(UserError) as e:
        StatisticsNetwork(4, hidden=8, hidden_layers=layers)
    assert str(e.value) == f"the statistics network needs at least one hidden layer, got {layers}"
    assert len(StatisticsNetwork(4, hidden=8, hidden_layers=1)) == 3          # Linear, ReLU, Linear


# ---- mi.py -------------------------------------------------------------------------------------------------------

def _mi_files(tmp_path, mask, extra_acts=(), B=6, K=3, D=5):
    rng = np.random.default_rng(0)
    data = {"states": rng.standard_normal((B, K, 11)), "actions": rng.standard_normal((B, K, 3)),
            "rtg": rng.standard_normal((B, K + 1, 1)), "timesteps": np.zeros((B, K)), "attention_mask": mask}
    acts = {f"{i}.mlp.dropout": rng.standard_normal((B, 3 * K, D)).astype(np.float32) for i in range(2)}
    acts.update({k: rng.standard_normal((B, 3 * K, D)).astype(np.float32) for k in extra_acts})
    common.save_npz(mi.data_file(tmp_path, "hopper", "medium", 666), **data)
    common.save_npz(mi.activation_file(tmp_path, 40, "gpt2", "hopper", "medium", 666), **acts)
    return data, acts


def _record(monkeypatch):
    calls = []

    def fake(x, y, **kw):
        calls.append((x.copy(), y.copy(), kw))
        return float(len(calls))

    fake_mine(monkeypatch, fake)
    return calls


def _run_mi(tmp_path, *flags):
    io = ["-psm", tmp_path, "-pd", tmp_path, "-pa", tmp_path, "--device", "cpu"]
    return mi.run_mi(mi.build_mi_parser().parse_args([str(a) for a in io + list(flags)]))


def test_no_context_pairs_and_block_outputs_only(tmp_path, monkeypatch):
    """no_context: per block (only the *.mlp.dropout outputs), MI(s_t, act[3t+1]) then MI(a_t, act[3t+1])."""
    B, K = 6, 3
    data, acts = _mi_files(tmp_path, np.ones((B, K)), extra_acts=("0.attn.c_attn", "1.ln_2"))
    calls = _record(monkeypatch)
    _run_mi(tmp_path, "--exp_type", "no_context")
    expected = []
    for blk in ("0.mlp.dropout", "1.mlp.dropout"):
        expected += [(data["states"][:, t], acts[blk][:, 3 * t + 1]) for t in range(K)]
        expected += [(data["actions"][:, t], acts[blk][:, 3 * t + 1]) for t in range(K)]
    assert len(calls) == len(expected)
    for (x, y, _), (ex, ey) in zip(calls, expected):
        np.testing.assert_array_equal(x, ex.astype(np.float32))
        np.testing.assert_array_equal(y, ey)
    nc = np.load(tmp_path / "mi_40_gpt2_hopper_medium_666.npz")
    assert sorted(nc.files) == ["0.mlp.dropout", "1.mlp.dropout", "batch_digest"]   # block outputs and the batch
    np.testing.assert_array_equal(nc["1.mlp.dropout"], [[7, 8, 9], [10, 11, 12]])


def test_mine_flags_and_distinct_seeds_reach_the_estimator(tmp_path, monkeypatch):
    _mi_files(tmp_path, np.ones((6, 3)))
    calls = _record(monkeypatch)
    _run_mi(tmp_path, "--exp_type", "data", "--batch_size", "7", "--lr", "0.01", "--mine_hidden_layers", "2",
            "--mine_loss", "fdiv", "--mine_hidden", "9", "--iters", "11", "--seed", "666", "--mine_ensemble", "5")
    assert len(calls) == 6
    for i, (_, _, kw) in enumerate(calls):
        assert kw == {"iters": 11, "batch_size": 7, "loss": "fdiv", "hidden": 9, "hidden_layers": 2, "lr": 0.01,
                      "seed": 667 + i, "device": torch.device("cpu"), "ensemble": 5}


def test_pair_average_averages_neighbours():
    np.testing.assert_allclose(mi._pair_average(np.arange(24.0), 12), np.arange(12) * 2 + 0.5)
    np.testing.assert_array_equal(mi._pair_average(np.arange(5.0), 2), np.arange(5.0))    # not a multiple: as is


def test_exclude_padding_needs_two_samples(tmp_path, monkeypatch):
    """--exclude_padding: 1 sample left -> NaN without an estimate; 2 left -> estimated on those 2."""
    mask = np.ones((6, 3))
    mask[:5, 0] = 0
    mask[:4, 1] = 0
    data, _ = _mi_files(tmp_path, mask)
    calls = _record(monkeypatch)
    _run_mi(tmp_path, "--exp_type", "data", "--exclude_padding")
    sa = np.load(tmp_path / "mi_data_state_action_hopper_medium_666_nopad.npy")    # tagged: a variant
    ra = np.load(tmp_path / "mi_data_rtg_action_hopper_medium_666_nopad.npy")
    assert math.isnan(sa[0]) and math.isnan(ra[0])
    np.testing.assert_array_equal(sa[1:], [1, 2])
    np.testing.assert_array_equal(ra[1:], [3, 4])
    assert [len(c[0]) for c in calls] == [2, 6, 2, 6]
    np.testing.assert_array_equal(calls[0][0], data["states"][4:, 1].astype(np.float32))


def test_data_boxplot_order(tmp_path, figures):  # noqa: F811
    """Figure 22: the first box is I(s; a), the second I(R̂; a)."""
    common.save_npy(tmp_path / "mi_data_state_action_hopper_medium_666.npy", np.array([1.0, 1.0, 1.0]))
    common.save_npy(tmp_path / "mi_data_rtg_action_hopper_medium_666.npy", np.array([2.0, 2.0, 2.0]))
    mi.plot_mi_data(mi.build_plot_data_parser().parse_args(
        ["--results_dir", str(tmp_path), "--figs_dir", str(tmp_path / "figs"), "--env_name", "hopper"]))
    [(stem, fig)] = figures
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Î(s; a)", "Î(R̂; a)"]
    by_box = {}
    for line in ax.lines:
        xs, ys = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        if len(xs):
            by_box.setdefault(int(round(xs.mean())), set()).update(ys.tolist())
    assert by_box == {1: {1.0}, 2: {2.0}}


def test_estimator_variants_write_tagged_results_that_the_plots_read_with_the_same_flags(tmp_path, monkeypatch,
                                                                                         figures):  # noqa: F811
    """--exclude_padding, --mine_hidden_layers and --mine_loss runs write next to the default results (they used to
    replace them); each plotting script reads a variant with the same flags and tags its figure."""
    _mi_files(tmp_path, np.ones((6, 3)))
    value = iter(range(1, 10_000))
    fake_mine(monkeypatch, lambda x, y, **kw: float(next(value)))
    variant = ["--exclude_padding", "--mine_hidden_layers", "2", "--mine_loss", "fdiv"]
    for exp in ("normal", "no_context", "data"):
        _run_mi(tmp_path, "--exp_type", exp)
        _run_mi(tmp_path, "--exp_type", exp, *variant)
    tag = "_nopad_L2_fdiv"
    for stem in ("mi_xy_1_40_gpt2_hopper_medium_666", "mi_40_gpt2_hopper_medium_666"):
        plain, tagged = np.load(tmp_path / f"{stem}.npz"), np.load(tmp_path / f"{stem}{tag}.npz")
        k = plain.files[0]
        assert not np.array_equal(plain[k], tagged[k])            # the variant's estimates kept apart
    plain = np.load(tmp_path / "mi_data_state_action_hopper_medium_666.npy")
    tagged = np.load(tmp_path / f"mi_data_state_action_hopper_medium_666{tag}.npy")
    assert plain.max() < tagged.min()                            # the variant ran later: its own file
    io = ["--results_dir", str(tmp_path), "--figs_dir", str(tmp_path / "figs"), "--env_name", "hopper"]
    for flags in ([], variant):
        mi.plot_mi(mi.build_plot_parser().parse_args(io + ["--model_name_list", "gpt2", *flags]))
        mi.plot_mi(mi.build_plot_parser().parse_args(io + ["--model_name_list", "gpt2", "--no_context", *flags]))
        mi.plot_mi_data(mi.build_plot_data_parser().parse_args(io + flags))
    stems = [stem for stem, _ in figures]
    assert [s.endswith(tag) for s in stems] == [False] * 3 + [True] * 3
    assert len(set(stems)) == 6
    with pytest.raises(UserError, match="--mine_loss, .*--lr run are read with the same flags"):
        mi.plot_mi_data(mi.build_plot_data_parser().parse_args(io + ["--mine_loss", "mine_biased"]))


def test_missing_mi_inputs_say_which_command_writes_them(tmp_path):
    """run_mi_exp.py without save_activation.py's files: the line names the file and the command that writes it."""
    with pytest.raises(UserError) as e:
        _run_mi(tmp_path, "--model_name", "igpt", "--epoch", "3")
    assert str(e.value).startswith(f"{tmp_path / 'data_hopper_medium_666.npz'}: file not found; save_activation.py "
                                   f"writes it")
    _mi_files(tmp_path, np.ones((6, 3)))
    with pytest.raises(UserError) as e:
        _run_mi(tmp_path, "--model_name", "igpt", "--epoch", "3", "--exp_type", "no_context")
    assert str(e.value).startswith(f"{tmp_path / 'activation_3_igpt_hopper_medium_666.npz'}: file not found; run "
                                   f"save_activation.py --model_name igpt --epoch 3 --env_name_list hopper")


# ---- grads.py ----------------------------------------------------------------------------------------------------

def test_every_sample_draws_its_own_dropout_masks():
    """Four copies of one sample: identical gradients in eval mode, different ones with dropout on."""
    model = DecisionTransformer(tiny_config(n_layer=1), seed=0)
    one = _batch(B=5, K=4)
    batch = Batch(**{f.name: getattr(one, f.name)[2:3].expand(4, *getattr(one, f.name).shape[1:]).clone()
                     for f in dataclasses.fields(one)})
    ev = grads.per_sample_grad_stats(model, batch, train_mode=False).cosine(None)
    assert torch.allclose(ev, torch.ones(4, 4, dtype=torch.float64), atol=1e-9)
    tr = grads.per_sample_grad_stats(model, batch, train_mode=True, seed=0).cosine(None)
    off = ~torch.eye(4, dtype=torch.bool)
    assert (tr[off] < 0.9).all()                                 # (same masks: all 1)


@pytest.fixture
def grad_run(tmp_path, hopper_data):
    root = tmp_path / "ck"
    write_run(root, "gpt2", epochs=(1,), data_file=hopper_data / "hopper-medium-v2.pkl", n_layer=1, step=1.0)
    return ["--checkpoint_dir", str(root), "--env_name_list", "hopper", "--model_name_list", "gpt2", "--K", "3",
            "--batch_size", "4", "--results_dir", str(tmp_path / "res"), "--figs_dir", str(tmp_path / "figs")]


def _spy(monkeypatch, name, record, result=None):
    real = getattr(grads, name)

    def f(model, batch, **kw):
        record.append((name, model, batch, kw))
        return real(model, batch, **kw) if result is None else result(model, batch, **kw)

    monkeypatch.setattr(grads, name, f)


def test_train_mode_and_grad_seed_reach_the_gradients(grad_run, monkeypatch):
    rec = []
    _spy(monkeypatch, "per_sample_grad_stats", rec)
    _spy(monkeypatch, "full_batch_param_norms", rec)
    flags = ["--train_mode", "false", "--grad_seed", "3"]
    grads.run_confusion(grads.build_confusion_parser().parse_args(grad_run + flags))
    grads.run_norms(grads.build_norm_parser().parse_args(grad_run + flags))
    got = [(name, kw["train_mode"], kw["seed"]) for name, _, _, kw in rec]
    assert got == [("per_sample_grad_stats", False, 3), ("per_sample_grad_stats", False, 3),
                   ("full_batch_param_norms", False, 3)]
    rec.clear()
    grads.run_confusion(grads.build_confusion_parser().parse_args(grad_run))
    assert [(kw["train_mode"], kw["seed"]) for _, _, _, kw in rec] == [(True, 0)]


def test_unclipped_norms_are_unclipped(grad_run, monkeypatch, tmp_path):
    rec = []
    _spy(monkeypatch, "per_sample_grad_stats", rec)
    grads.run_norms(grads.build_norm_parser().parse_args(grad_run + ["--unclipped", "--train_mode", "false"]))
    [(_, model, batch, _)] = rec
    st = grads.per_sample_grad_stats(model, batch, train_mode=False, gram=False)
    assert (st.sqnorm_all.sqrt() > 0.25).any()                       # the clip would change these samples
    res = tmp_path / "res"
    stem = "gradnorm_perparam_1_gpt2_hopper_medium_666_unclipped_evalmode_bs4_ctx3"   # (the settings and batch)
    np.testing.assert_allclose(np.load(res / "gradnorms_1_gpt2_hopper_medium_666_unclipped_evalmode_bs4_ctx3.npy"),
                               st.h_norms(None).numpy()[None], rtol=1e-6)
    pp = grads.full_batch_param_norms(model, batch, clip=None, train_mode=False)
    assert sum(v * v for v in pp.values()) > 0.25 ** 2
    np.testing.assert_allclose(np.load(res / f"{stem}.npy"),
                               list(pp.values()), rtol=1e-6)
    lines = (res / f"{stem}.csv").read_text().splitlines()
    assert lines[0] == "parameter,norm" and [ln.split(",")[0] for ln in lines[1:]] == list(pp)
    np.testing.assert_allclose([float(ln.split(",")[1]) for ln in lines[1:]], list(pp.values()), rtol=1e-6)


def test_share_at_the_clip_column(grad_run, monkeypatch, tmp_path):
    """Clipped norms reach at most 0.25/(1 + 1e-6) < 0.25: "at the clip" means above 0.99 x 0.25."""
    def stats(model, batch, **kw):          # samples 0, 1 clipped to 0.25/(1+1e-6); 2, 3 unclipped 0.1
        sq = torch.tensor([1.0, 1.0, 0.01, 0.01], dtype=torch.float64)
        return grads.GradStats(None, sq, sq.clone())

    _spy(monkeypatch, "per_sample_grad_stats", [], result=stats)
    outs = grads.run_norms(grads.build_norm_parser().parse_args(grad_run))
    n = np.load(tmp_path / "res" / "gradnorms_1_gpt2_hopper_medium_666_bs4_ctx3.npy")
    np.testing.assert_allclose(n, [[0.25 / (1 + 1e-6)] * 2 + [0.1] * 2], rtol=1e-9)
    [(title, table)] = outs.tables
    assert title == "Per-sample gradient norms of transformer.h, hopper, epoch 1 (after the 0.25 clip)"
    assert table.splitlines()[-1] == f"| GPT2 | 0.1750 | 0.1750 | 0.2500 | {np.mean(n > 0.2475):.2f} |" \
        == "| GPT2 | 0.1750 | 0.1750 | 0.2500 | 0.50 |"


def test_perparam_figure_names_the_largest_tensors(tmp_path, figures):  # noqa: F811
    args = types.SimpleNamespace(epoch=1, dataset_name="medium", seed=666, top_k=1, figs_dir=str(tmp_path))
    grads._perparam_figure({"a": 1.0, "b": 5.0, "c": 3.0}, "gpt2", "hopper", args, "")
    [(stem, fig)] = figures
    assert stem == "gradnorm_perparam_1_gpt2_hopper_medium_666"
    a2 = fig.axes[1]
    assert [t.get_text() for t in a2.get_xticklabels()] == ["b", "others"]
    np.testing.assert_allclose([p.get_height() for p in a2.patches], [5 / 9, 4 / 9])
    args.top_k = 2
    figures.clear()
    grads._perparam_figure({"a": 1.0, "b": 5.0, "c": 3.0}, "gpt2", "hopper", args, "")
    assert [t.get_text() for t in figures[0][1].axes[1].get_xticklabels()] == ["b", "c", "others"]


def test_confusion_needs_two_samples(tmp_path):
    args = grads.build_confusion_parser().parse_args(
        ["--checkpoint_dir", str(tmp_path / "none"), "--batch_size", "1", "--results_dir", str(tmp_path / "r")])
    with pytest.raises(UserError) as e:
        grads.run_confusion(args)
    assert str(e.value) == "gradient confusion needs --batch_size >= 2"
    assert not (tmp_path / "r").exists()
