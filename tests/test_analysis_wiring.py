"""What the analysis scripts and the results table pass on: CKA's flags reaching the estimator, the epochs and batch
it compares, its zero guards and default; the results table's env head, target, episodes and seed, its filtering of
unevaluated rows, paths with ``@``, duplicate warnings and empty rows; the score table's K, --select, --target,
recorded-reference fallback, last epoch, REID quotes and bars."""
import csv
import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_analysis_cka import xy  # noqa: F401
from test_analysis_scripts import two_seed_runs
from test_analysis_support import write_run
from test_tools_results import hopper_checkpoint, run_folder, single_row

from decision_transformer import evaluation, results_table
from decision_transformer.analysis import cka, common, curves, scores
from decision_transformer.checkpoint import atomic_save, make_checkpoint
from decision_transformer.envs import get_env_spec
from decision_transformer.errors import UserError
from decision_transformer.models import BackboneConfig
from decision_transformer.models.multi_decision_transformer import MODEL_CLASS, MultiDecisionTransformer, MultiDTConfig


def out(tmp_path):
    return ["--results_dir", str(tmp_path / "res"), "--figs_dir", str(tmp_path / "figs")]


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def recorder(monkeypatch, module, name):
    """Replace ``module.name`` by a wrapper that records each call's bound arguments (defaults applied) and calls
    the original."""
    real = getattr(module, name)
    sig = inspect.signature(real)
    calls = []

    def f(*a, **k):
        ba = sig.bind(*a, **k)
        ba.apply_defaults()
        calls.append(dict(ba.arguments))
        return real(*a, **k)

    monkeypatch.setattr(module, name, f)
    return calls


# ---- CKA --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cka_runs(tmp_path_factory, hopper_data):
    """checkpoints/ with one 1-block gpt2 hopper run, epochs 0 and 40."""
    root = tmp_path_factory.mktemp("cka") / "checkpoints"
    write_run(root, "gpt2", epochs=(0, 40), n_layer=1, data_file=hopper_data / "hopper-medium-v2.pkl")
    return root


def cka_args(root, tmp_path, *extra):
    return cka.build_parser().parse_args([str(a) for a in ["--checkpoint_dir", root, "--env_name_list", "hopper",
                                                           "--K", "3", "--batch_size", "6", "--no_heatmap",
                                                           *out(tmp_path), *extra]])


def test_cka_compares_epoch1_with_epoch2(tmp_path, cka_runs, monkeypatch):
    loads = recorder(monkeypatch, cka, "load_model")
    cka.run(cka_args(cka_runs, tmp_path))
    assert [(c["key"].model, c["epoch"]) for c in loads] == [("gpt2", 0), ("gpt2", 40)]
    m = np.load(tmp_path / "res" / "cka_0_40_gpt2gpt2_hopper_medium_666_bs6_ctx3_state.npy")   # (--batch_size, --K)
    assert m.shape == (9, 9) and not np.allclose(np.diag(m), 1.0, atol=1e-3)     # not a checkpoint against itself


def test_cka_flags_reach_the_estimator(tmp_path, cka_runs, monkeypatch):
    calls = recorder(monkeypatch, cka, "cka_matrix")
    cka.run(cka_args(cka_runs, tmp_path, "--biased", "--kernel", "rbf", "--rbf_threshold", "0.5", "--eps", "1e-6"))
    assert [(c["kernel"], c["debiased"], c["threshold"], c["eps"]) for c in calls] == [("rbf", False, 0.5, 1e-6)] * 3
    calls.clear()
    cka.run(cka_args(cka_runs, tmp_path))
    assert [(c["kernel"], c["debiased"], c["threshold"], c["eps"]) for c in calls] == [("linear", True, 1.0, 0.0)] * 3


def test_cka_batch_has_the_requested_K(tmp_path, cka_runs, monkeypatch):
    calls = recorder(monkeypatch, cka, "analysis_batch")
    cka.run(cka_args(cka_runs, tmp_path, "--batch_seed", "5"))
    assert [(c["batch_size"], c["K"], c["seed"]) for c in calls] == [(6, 3, 5)]


def test_cka_of_an_all_zero_representation_is_zero(xy):  # noqa: F811
    x, _ = xy
    assert cka.cka_matrix([torch.zeros(100, 3)], [torch.tensor(x)])[0, 0] == 0.0
    assert cka.cka_matrix([torch.zeros(100, 3)], [torch.tensor(x)], debiased=False)[0, 0] == 0.0
    assert cka.linear_cka(np.zeros((10, 3)), x[:10]) == 0.0
    assert cka.linear_cka(x[:10], np.zeros((10, 3)), debiased=True) == 0.0


def test_cka_matrix_is_debiased_by_default(xy):  # noqa: F811
    x, y = xy
    got = cka.cka_matrix([torch.tensor(x)], [torch.tensor(y)])[0, 0]
    assert got == pytest.approx(cka.linear_cka(x, y, debiased=True), rel=1e-12)
    assert got == pytest.approx(0.51346, abs=5e-6)                                  # the reference notebook's value
    assert abs(got - cka.linear_cka(x, y, debiased=False)) > 0.04                   # biased: 0.55761


def test_plot_cka_counts_the_layers_above_the_threshold(tmp_path, capsys):
    res = tmp_path / "res"
    res.mkdir()
    names = ["0.ln_1", "0.attn.c_attn", "0.mlp.dropout", "1.ln_1", "1.attn.c_attn", "1.mlp.dropout"]
    diag = [0.9, 0.1, 0.5, 0.2, 0.31, 0.3]
    stem = "cka_0_40_gpt2gpt2_hopper_medium_666"
    np.save(res / f"{stem}_state.npy", np.diag(diag))
    with open(res / f"{stem}_layers.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["axis", "index", "layer"])
        w.writerows([[axis, i, n] for axis in ("rows", "cols") for i, n in enumerate(names)])
    capsys.readouterr()
    cka.plot(cka.build_plot_parser().parse_args(["-thr", "0.3", "--model_name_list", "gpt2", "--env_name_list",
                                                 "hopper", "--token_list", "state", *out(tmp_path)]))
    printed = capsys.readouterr().out
    assert printed == "hopper/state gpt2: 3 layers above 0.3: 0.ln_1, 0.mlp.dropout, 1.attn.c_attn\n"
    rows = _csv(res / "cka_plot_0_40_gpt2_hopper_medium_666_state.csv")
    assert [(r["layer"], float(r["cka"])) for r in rows] == list(zip(names, diag))
    assert sum(float(r["cka"]) > 0.3 for r in rows) == 3


# ---- results table ----------------------------------------------------------------------------------------------

@pytest.fixture
def fake_evaluation(monkeypatch):
    """evaluate_episodes and env_pool replaced: each evaluation records (active env head or None, env, target,
    episodes, seed, state dims) and returns episodes of return 1000 (hopper) / 2000 (walker2d)."""
    calls, closed = [], []

    class Res:
        def __init__(self, returns):
            self.returns = returns

    def evaluate(model, env, target, num_episodes, state_mean, state_std, *, seed, device, pool):
        calls.append((getattr(model, "active", None), env, target, num_episodes, seed, len(state_mean)))
        return Res(np.full(num_episodes, {"hopper": 1000.0, "walker2d": 2000.0}[env]))

    class Pool:
        def __init__(self, env):
            self.env = env

        def close(self):
            closed.append(self.env)

    monkeypatch.setattr(evaluation, "evaluate_episodes", evaluate)
    monkeypatch.setattr(evaluation, "env_pool", lambda env, *a, **k: Pool(env))
    return calls, closed


def test_a_multi_task_checkpoint_is_evaluated_with_each_envs_head(tmp_path, capsys, fake_evaluation):
    calls, closed = fake_evaluation
    m = MultiDecisionTransformer(MultiDTConfig(envs=["hopper", "walker2d"], max_length=5,
                                               backbone=BackboneConfig(n_embd=16, n_layer=1)), seed=0)
    stats = {"hopper": {"state_mean": torch.zeros(11), "state_std": torch.ones(11)},
             "walker2d": {"state_mean": torch.zeros(17), "state_std": torch.ones(17)}}
    ck = tmp_path / "multi.pt"
    atomic_save(make_checkpoint(m.state_dict(), {"model_class": MODEL_CLASS, "model_config": m.config.to_dict()},
                                state_stats=stats), ck)
    results_table.main(["--row", f"m={ck}", "--num_eval_episodes", "2"])
    assert calls == [(0, "hopper", 3600.0, 2, 666, 11), (1, "walker2d", 5000.0, 2, 666, 17)]
    assert closed == ["hopper", "walker2d"]
    h, w = get_env_spec("hopper").d4rl_score(1000.0), get_env_spec("walker2d").d4rl_score(2000.0)
    assert f"| m | {h:.1f} | — | {w:.1f} | {(h + w) / 2:.1f}* |" in capsys.readouterr().out


def test_a_checkpoint_is_evaluated_at_the_first_target_with_the_given_episodes_and_seed(tmp_path, fake_evaluation):
    calls, _ = fake_evaluation
    ck = hopper_checkpoint(tmp_path / "h.pt", stats=True)
    results_table.main(["--row", f"a={ck}", "--num_eval_episodes", "3", "--seed", "7"])
    assert calls == [(None, "hopper", 3600.0, 3, 7, 11)]


def test_rows_without_evaluation_are_not_read(tmp_path):
    run = run_folder(tmp_path / "run", {"env": "hopper"}, [single_row("hopper", 1, 1000.0, 30.0), {"iteration": 2}])
    assert results_table.read_run(str(run), "last") == {"hopper": 30.0}
    assert results_table.read_run(str(run), "best") == {"hopper": 30.0}
    bare = run_folder(tmp_path / "bare", {"env": "hopper"}, [{"iteration": 1, "training/train_loss_mean": 0.5}])
    for pick in ("best", "last"):
        with pytest.raises(UserError) as e:
            results_table.read_run(str(bare), pick)
        assert str(e.value) == f"{bare}: no evaluation in metrics.jsonl"


def test_an_existing_path_with_at_is_not_split(tmp_path):
    run = run_folder(tmp_path / "run@2", {"env": "hopper"}, [single_row("hopper", 1, 1000.0, 30.0),
                                                             single_row("hopper", 2, 500.0, 15.0)])
    assert results_table.collect([f"a={run}"], pick="best") == {"a": {"hopper": 30.0}}
    assert results_table.collect([f"a={run}@last"], pick="best") == {"a": {"hopper": 15.0}}   # split at the last @


def test_two_scores_of_one_env_in_a_row_are_warned_about(tmp_path, capsys):
    a = run_folder(tmp_path / "a", {"env": "hopper"}, [single_row("hopper", 1, 1000.0, 30.0)])
    b = run_folder(tmp_path / "b", {"env": "hopper"}, [single_row("hopper", 1, 1000.0, 40.0)])
    capsys.readouterr()
    assert results_table.collect([f"r={a}", f"r={b}"], pick="best") == {"r": {"hopper": 40.0}}
    assert capsys.readouterr().err == f"warning: row 'r' has two hopper scores; keeping the later one ({b})\n"
    results_table.collect([f"r={a}", f"s={b}"], pick="best")
    assert capsys.readouterr().err == ""


def test_a_row_without_scores_has_no_partial_average_mark(tmp_path, capsys):
    hop = run_folder(tmp_path / "hop", {"env": "hopper"}, [single_row("hopper", 1, 1000.0, 30.0)])
    walk = run_folder(tmp_path / "walk", {"env": "walker2d"}, [single_row("walker2d", 1, 1000.0, 20.0)])
    capsys.readouterr()
    results_table.main(["--row", f"h={hop}", "--row", f"w={walk}", "--envs", "hopper", "halfcheetah"])
    assert capsys.readouterr().out == ("| model | hopper | halfcheetah | average |\n|---|---:|---:|---:|\n"
                                       "| h | 30.0 | — | 30.0* |\n| w | — | — | — |\n"
                                       "\n\\* average over the envs that have a score only\n")
    results_table.main(["--row", f"w={walk}", "--envs", "hopper"])
    assert capsys.readouterr().out == "| model | hopper | average |\n|---|---:|---:|\n| w | — | — |\n"


# ---- score tables -----------------------------------------------------------------------------------------------

def score_args(ck, tmp_path, *extra):
    return scores.build_parser().parse_args([str(a) for a in ["--checkpoint_dir", ck, "--env_name_list", "hopper",
                                                              *out(tmp_path), *extra]])


@pytest.fixture
def figures(monkeypatch):
    """common.save_figure replaced: the figures are kept (and closed at the end) instead of written."""
    figs = []

    def keep(fig, figs_dir, stem, dpi=120):
        figs.append(fig)
        return Path(figs_dir) / f"{stem}.png"

    monkeypatch.setattr(common, "save_figure", keep)
    yield figs
    for fig in figs:
        common.pyplot().close(fig)


def bars(fig):
    """{legend label: [(bar centre, height)]} of the figure's bar groups."""
    from matplotlib.container import BarContainer

    ax = fig.axes[0]
    return {c.get_label(): [(p.get_x() + p.get_width() / 2, p.get_height()) for p in c.patches]
            for c in ax.containers if isinstance(c, BarContainer)}


def d4rl(r):
    return float(get_env_spec("hopper").d4rl_score(r))


def test_score_table_reads_the_runs_of_the_given_K(tmp_path):
    ck = tmp_path / "checkpoints"
    write_run(ck, "dt", epochs=(1,), returns=[100.0, 200.0])
    write_run(ck, "dt", K=1, epochs=(1,), returns=[500.0, 700.0, 600.0])
    scores.run(score_args(ck, tmp_path, "--K", "1", "--model_name_list", "dt", "--seed_list", "666", "--no_figure"))
    rows = _csv(tmp_path / "res" / "normalized_scores_medium_K1_d4rl.csv")
    assert [(r["run"], int(r["best_epoch"]), float(r["best_return"]), int(r["last_epoch"]), float(r["last_return"]))
            for r in rows] == [("dt_medium_hopper_666_K1", 2, 700.0, 3, 600.0)]


@pytest.fixture
def two_seeds(tmp_path):
    return two_seed_runs(tmp_path)


def test_select_last_picks_the_last_scores_for_table_and_bars(tmp_path, two_seeds, figures):
    ck, data = two_seeds
    scores.run(score_args(ck, tmp_path, "--model_name_list", "dt", "--score_norm", "dataset", "--data_path", data,
                          "--select", "last"))
    table = (tmp_path / "res" / "normalized_scores_medium_K20_dataset_last.md").read_text()
    assert table == f"| env | {common.model_label('dt')} |\n|---|---|\n| hopper | 13.0 ± 10.0 |\n"  # last: 3.0, 23.0
    [(x, h)] = bars(figures[0])[common.model_label("dt")]
    assert (x, h) == (pytest.approx(0.0), pytest.approx(13.0))


def test_dataset_norm_needs_data_only_for_envs_with_runs(tmp_path, two_seeds):
    """The default env list names all three envs; with hopper runs only, only hopper's random/expert data is read
    (halfcheetah's, absent, used to stop the table)."""
    ck, data = two_seeds
    outs = scores.run(scores.build_parser().parse_args(
        [str(a) for a in ["--checkpoint_dir", ck, *out(tmp_path), "--model_name_list", "dt", "--score_norm",
                          "dataset", "--data_path", data, "--no_figure"]]))
    assert [n for n in outs.notes if n.startswith("dataset-based")] == \
        [f"dataset-based normalisation for hopper: hopper-random/expert datasets in {data}"]
    assert [r["env"] for r in _csv(tmp_path / "res" / "normalized_scores_medium_K20_dataset.csv")] == ["hopper"] * 2


def test_target_selects_the_metric(tmp_path, two_seeds):
    ck, _ = two_seeds
    scores.run(score_args(ck, tmp_path, "--model_name_list", "dt", "--seed_list", "666", "--target", "1800",
                          "--no_figure"))
    [r] = _csv(tmp_path / "res" / "normalized_scores_medium_K20_d4rl_target1800.csv")   # tagged, with its target
    assert int(r["target"]) == 1800
    assert (float(r["best_return"]), float(r["last_return"])) == (150.0, 25.0)   # the 1800 series is half the 3600
    assert float(r["best_score"]) == pytest.approx(d4rl(150.0), rel=1e-12)


def test_dataset_norm_falls_back_to_the_recorded_hopper_means(tmp_path, two_seeds):
    ck, _ = two_seeds
    empty = tmp_path / "empty"
    empty.mkdir()
    outs = scores.run(score_args(ck, tmp_path, "--model_name_list", "dt", "--seed_list", "666", "--score_norm",
                                 "dataset", "--data_path", empty, "--no_figure"))
    assert outs.notes == [f"dataset-based normalisation for hopper: TAKAGI's recorded hopper random/expert means "
                          f"(18.4, 3511.36); datasets not found in {empty}"]
    [r] = _csv(tmp_path / "res" / "normalized_scores_medium_K20_dataset.csv")
    assert float(r["best_score"]) == pytest.approx(100 * (300.0 - 18.40) / (3511.36 - 18.40), rel=1e-12)


def test_the_last_epoch_is_the_last_evaluated_one():
    """A NaN evaluation (diverged) is evaluated: the last epoch's NaN is the run's last score, not an earlier one's;
    the best is over the other values. A WandB row that did not log the key (null there) is no evaluation."""
    be, bv, le, lv = scores.best_and_last(np.array([1, 2, 3]), np.array([10.0, 300.0, math.nan]))
    assert (be, bv, le) == (2, 300.0, 3) and math.isnan(lv)
    be, bv, le, lv = scores.best_and_last(np.array([1, 2, 3, 4]), np.array([math.nan, 5.0, 7.0, math.nan]))
    assert (be, bv, le) == (3, 7.0, 4) and math.isnan(lv)
    rows = [{"iteration": 1, "r": 10.0}, {"iteration": 2, "r": 300.0}, {"iteration": 3, "r": None}]
    it, val = curves.metric_series(rows, "r", nan_ok=True)
    assert list(it) == [1, 2] and list(val) == [10.0, 300.0]
    it, val = curves.metric_series(rows, "r")          # a metrics.jsonl's null is its writer's NaN
    assert list(it) == [1, 2, 3] and math.isnan(val[2])


def test_reid_quotes_only_in_the_d4rl_medium_K20_table(tmp_path):
    ck = tmp_path / "checkpoints"
    write_run(ck, "gpt2", epochs=(1,), returns=[1000.0, 2000.0])
    write_run(ck, "gpt2", K=1, epochs=(1,), returns=[1000.0, 2000.0])
    write_run(ck, "gpt2", dataset="medium-replay", epochs=(1,), returns=[1000.0, 2000.0])
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["--model_name_list", "gpt2", "--seed_list", "666", "--no_figure"]

    def table(*extra):
        title, md = scores.run(score_args(ck, tmp_path, *base, *extra)).tables[0]
        return md.splitlines()[-1]

    assert table() == f"| hopper | {d4rl(2000.0):.1f} (1 seed) (REID 79.1 ± 1.1) |"
    ds = 100 * (2000.0 - 18.40) / (3511.36 - 18.40)
    assert table("--score_norm", "dataset", "--data_path", empty) == f"| hopper | {ds:.1f} (1 seed) |"
    assert table("--K", "1") == f"| hopper | {d4rl(2000.0):.1f} (1 seed) |"
    assert table("--dataset_name", "medium-replay") == f"| hopper | {d4rl(2000.0):.1f} (1 seed) |"


def test_a_seed_without_scores_is_left_out_of_the_bar(tmp_path, figures):
    ck = tmp_path / "checkpoints"
    write_run(ck, "dt", epochs=(1,), returns=[None, None])       # null: not computed (a run never writes NaN)
    write_run(ck, "dt", seed=42, epochs=(1,), returns=[100.0, 200.0])
    scores.run(score_args(ck, tmp_path, "--model_name_list", "dt"))
    assert bars(figures[0]) == {common.model_label("dt"): [(pytest.approx(0.0), pytest.approx(d4rl(200.0)))]}


def test_bars_of_two_models_are_placed_in_model_order(tmp_path, figures):
    ck = tmp_path / "checkpoints"
    write_run(ck, "dt", epochs=(1,), returns=[100.0])
    write_run(ck, "gpt2", epochs=(1,), returns=[300.0])
    scores.run(score_args(ck, tmp_path, "--model_name_list", "dt", "gpt2", "--seed_list", "666"))
    assert bars(figures[0]) == {common.model_label("dt"): [(pytest.approx(-0.2), pytest.approx(d4rl(100.0)))],
                                common.model_label("gpt2"): [(pytest.approx(0.2), pytest.approx(d4rl(300.0)))]}
