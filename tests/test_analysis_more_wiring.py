"""Wiring of the learning curves, parameter similarity, attention distance and report steps: values, file names,
flags and defaults that reach the numbers (stand-ins for checkpoints and models where the real ones are not needed)."""
import csv
import sys
import types

import numpy as np
import pytest
import torch
from test_analysis_figures import metrics_run

from decision_transformer.analysis import attention, common, curves, params, report, scores
from decision_transformer.analysis.runs import RunKey
from decision_transformer.checkpoint import run_dir_name
from decision_transformer.errors import UserError

RET = "evaluation/target_3600_return_mean"


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


# ---- curves -----------------------------------------------------------------------------------------------------

def test_metric_series_refuses_booleans_and_turns_null_into_nan_and_numbers_into_floats():
    rows = [{"iteration": 1, RET: None}, {"iteration": 2, RET: 3}, {RET: 4.5}]
    it, val = curves.metric_series(rows, RET)
    assert it.tolist() == [1, 2, 3]
    assert np.isnan(val[0]) and val[1:].tolist() == [3.0, 4.5]
    with pytest.raises(UserError, match=f"^m.jsonl: row 2 has {RET} = true, not a number$"):
        curves.metric_series([{RET: 1.0}, {RET: True}], RET, "m.jsonl")     # a bool is not counted as 1.0


def test_metric_series_refuses_an_iteration_logged_twice_and_orders_iterations():
    """A run logs one row per iteration: a second row of the same iteration (a file pasted together) is an error
    naming both rows; rows out of order come back in iteration order, so that the last one is the last epoch."""
    with pytest.raises(UserError, match="^m.jsonl: iteration 2 is logged twice \\(rows 2 and 5\\)$"):
        curves.metric_series([{"iteration": i, RET: 1.0} for i in (1, 2, 3, 4, 2)], RET, "m.jsonl")
    it, val = curves.metric_series([{"iteration": i, RET: float(i)} for i in (3, 1, 2)], RET)
    assert it.tolist() == [1, 2, 3] and val.tolist() == [1.0, 2.0, 3.0]
    assert scores.best_and_last(*curves.metric_series([{"iteration": 4, RET: 9.0}, {"iteration": 1, RET: 1.0}],
                                                      RET)) == (4, 9.0, 4, 9.0)
    # NaN: damage in a metrics.jsonl, a value not computed in a WandB history
    with pytest.raises(UserError, match="row 1 has .* = NaN, not a number"):
        curves.metric_series([{"iteration": 1, RET: float("nan")}], RET)
    assert np.isnan(curves.metric_series([{"iteration": 1, RET: float("nan")}], RET, nan_ok=True)[1]).all()


def test_wandb_rows_number_iterations_from_step_plus_one(monkeypatch):
    class Run:
        name, state = "gym-experiment-hopper-medium-dt-666", "finished"

        def scan_history(self):
            return [{"_step": 0, RET: 5.0}, {"_step": 4, RET: 7.0}]

    class Api:
        def runs(self, path, filters=None):
            return [Run()]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=Api))
    rows = curves.run_metrics("unused", RunKey("dt", "medium", "hopper", 666), True)
    assert curves.metric_series(rows, RET)[0].tolist() == [1, 5]


def test_grad_clip_curves_keep_max_epoch_and_label_each_run(tmp_path):
    ck = tmp_path / "ck"
    metrics_run(ck, "gpt2", returns=[10.0, 20.0, 30.0, 40.0, 50.0])
    metrics_run(ck, "gpt2", returns=[1.0, 2.0, 3.0, 4.0, 5.0], no_grad_clip=True)
    curves.run_grad_clip(curves.build_grad_clip_parser().parse_args(
        ["--checkpoint_dir", str(ck), "--max_epoch", "3", "--results_dir", str(tmp_path / "res"),
         "--figs_dir", str(tmp_path / "figs")]))
    rows = _csv(tmp_path / "res" / "learning_curve_grad_clip_gpt2_hopper_medium_666.csv")
    ret = [(c, int(e), float(v)) for c, m, e, v in rows if m == RET]
    assert ret == [("with grad clip", 1, 10.0), ("with grad clip", 2, 20.0), ("with grad clip", 3, 30.0),
                   ("without grad clip", 1, 1.0), ("without grad clip", 2, 2.0), ("without grad clip", 3, 3.0)]


def test_grad_clip_curves_of_each_k_get_their_own_files_in_run_all(tmp_path):
    """run_all draws one gradient-clip figure per K of *_no_grad_clip runs; all used to go to one file name, the last
    K's replacing the others' (and the report showing one figure twice)."""
    from decision_transformer.analysis import report

    ck = tmp_path / "ck"
    for K, base in ((20, 10.0), (5, 100.0)):
        metrics_run(ck, "dt", K=K, returns=[base * i for i in range(1, 6)])
        metrics_run(ck, "dt", K=K, returns=[base * i + 1 for i in range(1, 6)], no_grad_clip=True)
    report.run(report.build_parser().parse_args(["--checkpoint_dir", str(ck), "--model_name_list", "dt",
                                                 "--env_name_list", "hopper", "--only", "curves",
                                                 "--out_dir", str(tmp_path / "rep")]))
    res = tmp_path / "rep" / "section-54-gradient-analysis" / "results"
    for tag, base in (("", 10.0), ("_K5", 100.0)):
        rows = _csv(res / f"learning_curve_grad_clip_dt_hopper_medium_666{tag}.csv")
        assert [float(v) for c, m, e, v in rows if m == RET and c == "with grad clip"][:2] == [base, 2 * base]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.count("learning_curve_grad_clip_dt_hopper_medium_666.png") == 1
    assert md.count("learning_curve_grad_clip_dt_hopper_medium_666_K5.png") == 1


def test_block_curves_default_to_five_epochs_off_hopper_and_use_the_smoothing_weight(tmp_path):
    ck = tmp_path / "ck"
    for b in range(2):
        metrics_run(ck, "dt", env="walker2d", K=1, block=b, returns=[8.0 * i for i in range(1, 11)])
    curves.run_no_context(curves.build_no_context_parser().parse_args(
        ["--checkpoint_dir", str(ck), "--env_name_list", "walker2d", "-block", "--smoothing", "0.5",
         "--results_dir", str(tmp_path / "res"), "--figs_dir", str(tmp_path / "figs")]))
    rows = _csv(tmp_path / "res" / "learning_curve_block_walker2d_medium_666_smooth0.5.csv")   # (tagged weight)
    ret = [(int(e), float(v), float(s)) for c, m, e, v, s in rows
           if c == "block 0" and m == "evaluation/target_5000_return_mean"]
    # y0 = 8, y_n = 0.5 y_{n-1} + 0.5 x_n
    assert ret == [(1, 8.0, 8.0), (2, 16.0, 12.0), (3, 24.0, 18.0), (4, 32.0, 25.0), (5, 40.0, 32.5)]


def test_block_curves_of_another_lm_read_its_own_runs(tmp_path):
    """-block --replaced_lm igpt draws the dt-igpt_..._K1_block{b} runs against igpt's and the random init's K=1 runs;
    the GPT-2 block runs (dt_...) in the same folder are drawn only by the default figure."""
    ck = tmp_path / "ck"
    for b in range(2):
        metrics_run(ck, "dt", env="walker2d", K=1, block=b, returns=[1.0] * 5)
        metrics_run(ck, "dt-igpt", env="walker2d", K=1, block=b, returns=[2.0 + b] * 5)
    metrics_run(ck, "igpt", env="walker2d", K=1, returns=[7.0] * 5)
    out = ["--results_dir", str(tmp_path / "res"), "--figs_dir", str(tmp_path / "figs")]
    for lm in ([], ["--replaced_lm", "igpt"]):
        curves.run_no_context(curves.build_no_context_parser().parse_args(
            ["--checkpoint_dir", str(ck), "--env_name_list", "walker2d", "-block", *lm, *out]))
    ret = "evaluation/target_5000_return_mean"
    gpt = {(c, float(v)) for c, m, e, v, s in _csv(tmp_path / "res" / "learning_curve_block_walker2d_medium_666.csv")
           if m == ret}
    assert gpt == {("block 0", 1.0), ("block 1", 1.0)}
    igpt = {(c, float(v)) for c, m, e, v, s in
            _csv(tmp_path / "res" / "learning_curve_block_walker2d_medium_666_igpt.csv") if m == ret}
    assert igpt == {("block 0", 2.0), ("block 1", 3.0), ("iGPT K=1", 7.0)}


# ---- parameter similarity ---------------------------------------------------------------------------------------

def _sd(scale):
    """Two blocks of two tensors each, plus float attention buffers that must be ignored."""
    return {"transformer.wte.weight": torch.ones(2) * scale,
            "transformer.h.0.ln_1.weight": torch.tensor([1.0, 0.0]) * scale,
            "transformer.h.0.attn.bias": torch.ones(2) * scale,
            "transformer.h.0.attn.c_attn.weight": torch.tensor([0.0, 2.0]),
            "transformer.h.1.ln_1.weight": torch.tensor([3.0, 0.0]),
            "transformer.h.1.attn.masked_bias": torch.ones(1) * scale,
            "transformer.h.1.mlp.c_fc.weight": torch.tensor([0.0, 4.0]) * scale}


def test_parameter_similarity_per_tensor_and_per_block():
    names, dist, cos = params.parameter_similarity(_sd(1.0), _sd(2.0))
    assert names == ["0.ln_1.weight", "0.attn.c_attn.weight", "1.ln_1.weight", "1.mlp.c_fc.weight"]
    assert dist.tolist() == pytest.approx([1.0, 0.0, 0.0, 4.0])
    names, dist, cos = params.parameter_similarity(_sd(1.0), _sd(-1.0), concat=True)
    assert names == ["block 0", "block 1"]
    # block 0: a = (1, 0, 0, 2), b = (-1, 0, 0, 2); block 1: a = (3, 0, 0, 4), b = (3, 0, 0, -4)
    assert dist.tolist() == pytest.approx([2.0, 8.0])
    assert cos.tolist() == pytest.approx([3 / 5, -7 / 25], rel=1e-12)
    _, _, takagi = params.parameter_similarity(_sd(1.0), _sd(-1.0), concat=True, eps=1e-6)
    assert takagi.tolist() == pytest.approx([3 / (5 + 1e-6), -7 / (25 + 1e-6)], rel=1e-12)


def test_a_small_tensors_cosine_does_not_shrink_unless_eps_asks():
    """A tensor of norm 1e-4 that keeps its direction has cosine 1 (the original's +1e-6 made it 1e-8 / (1e-8 + 1e-6)
    ≈ 0.01, as if turned by 90°: ChibiT's small biases read so); --eps 1e-6 reproduces that."""
    small, moved = _sd(1e-4), _sd(1.01e-4)
    names, _, cos = params.parameter_similarity(small, moved)
    i = names.index("1.mlp.c_fc.weight")
    assert cos[i] == pytest.approx(1.0, rel=1e-12)
    _, _, takagi = params.parameter_similarity(small, moved, eps=1e-6)
    assert takagi[i] == pytest.approx(1.6e-7 * 1.01 / (1.6e-7 * 1.01 + 1e-6), rel=1e-6) and takagi[i] < 0.2


@pytest.fixture
def fake_params(monkeypatch):
    sds = {0: _sd(1.0), 40: _sd(-1.0), 4: _sd(3.0)}
    monkeypatch.setattr(params, "load_state_dict", lambda ck, key, e: (sds[e], None))
    monkeypatch.setattr(params, "require_checkpoints", lambda *a: None)   # (no files: stand-in weights)
    figs = []

    def save(fig, figs_dir, stem, dpi=120):
        figs.append((stem, [ax.get_ylim() for ax in fig.axes]))
        common.pyplot().close(fig)
        return stem

    monkeypatch.setattr(common, "save_figure", save)
    return figs


def test_params_files_table_and_auto_axis(tmp_path, fake_params):
    outs = params.run(params.build_parser().parse_args(
        ["-plm", str(tmp_path), "--model_name_list", "dt", "--epoch1", "0", "--epoch2", "40",
         "--distance_ylim", "auto", "--results_dir", str(tmp_path / "res"), "--figs_dir", str(tmp_path / "figs")]))
    dist = np.load(tmp_path / "res" / "paramdist_0_40_dt_hopper_medium_666.npy")
    assert dist.tolist() == pytest.approx([2.0, 0.0, 0.0, 8.0])
    cos = np.load(tmp_path / "res" / "paramcos_0_40_dt_hopper_medium_666.npy")
    assert cos.tolist() == pytest.approx([-1.0, 1.0, 1.0, -1.0], abs=1e-12)
    stems = dict(fake_params)
    assert stems["paramdist_0_40_dt_hopper_medium_666_auto"][0] == pytest.approx((0.0, 8.4))
    (title, table), = outs.tables
    # mean L2 (2 + 0 + 0 + 8) / 4; the smallest cosine, -1, is first reached at 0.ln_1.weight
    assert table.splitlines()[-1] == ("| Random Init | 2.5000 | 8.0000 (1.mlp.c_fc.weight) | 0.0000 | "
                                      "-1.0000 (0.ln_1.weight) |")


def test_params_summary_leaves_out_tensors_that_start_at_zero(tmp_path, monkeypatch, fake_params):
    """A zero-initialised bias has cosine 0 by definition (its θ₀ has no direction): its bar and file entry stay 0, as
    the originals', but the table's mean and min cosine are over the other tensors, and a note says so."""
    start, end = _sd(1.0), _sd(1.0)
    start["transformer.h.0.attn.c_attn.bias"] = torch.zeros(2)
    end["transformer.h.0.attn.c_attn.bias"] = torch.tensor([0.5, -0.5])
    end["transformer.h.1.mlp.c_fc.weight"] = torch.tensor([4.0, 4.0])          # cos 1/sqrt(2)
    monkeypatch.setattr(params, "load_state_dict", lambda ck, key, e: ({0: start, 40: end}[e], None))
    monkeypatch.setattr(params, "require_checkpoints", lambda *a: None)   # (no files: stand-in weights)
    assert params.starts_at_zero(start).tolist() == [False, False, False, False, True]   # (state-dict order)
    assert params.starts_at_zero(start, concat=True).tolist() == [False, False]
    outs = params.run(params.build_parser().parse_args(
        ["-plm", str(tmp_path), "--model_name_list", "dt", "--results_dir", str(tmp_path / "res"),
         "--figs_dir", str(tmp_path / "figs")]))
    cos = np.load(tmp_path / "res" / "paramcos_0_40_dt_hopper_medium_666.npy")
    assert cos[4] == 0.0
    (title, table), = outs.tables
    row = table.splitlines()[-1].rstrip(" |").split(" | ")
    mean = (1 + 1 + 1 + 2 ** -0.5) / 4
    assert row[3] == f"{mean:.4f}" and row[4] == f"{2 ** -0.5:.4f} (1.mlp.c_fc.weight)"
    assert any("1 of 5 tensors start at zero" in n and "0.attn.c_attn.bias" in n for n in outs.notes)


# ---- attention distance -----------------------------------------------------------------------------------------

@pytest.fixture
def fake_attention(monkeypatch):
    """Stand-ins: the model of epoch e gives distances D[e] [B=3, blocks=2, heads=2]; records the calls."""
    D = {0: np.array([[[1.0, 3.0], [0.0, 0.0]], [[2.0, 2.0], [1.0, 1.0]], [[9.0, 9.0], [5.0, 5.0]]]),
         4: np.array([[[0.0, 0.0], [1.0, 1.0]], [[1.0, 1.0], [4.0, 4.0]], [[3.0, 3.0], [4.0, 4.0]]])}
    calls = {"keys": [], "units": []}

    def load_model(ck, key, e, device):
        calls["keys"].append(key)
        return types.SimpleNamespace(model=e, checkpoint=None)

    def distances(model, batch, unit="token", legacy=False):
        calls["units"].append(unit)
        return D[model]

    monkeypatch.setattr(attention, "load_model", load_model)

    monkeypatch.setattr(attention, "require_checkpoints", lambda *a: None)   # (no files: stand-in models)
    monkeypatch.setattr(attention, "SharedDataset", lambda *a, **k: types.SimpleNamespace(get=lambda env, lm: None))
    monkeypatch.setattr(attention, "analysis_batch", lambda *a, **k: None)
    monkeypatch.setattr(attention, "model_attention_distances", distances)
    monkeypatch.setattr(common, "save_figure", lambda fig, figs_dir, stem, dpi=120: common.pyplot().close(fig) or stem)
    return calls


def _att_args(tmp_path, *extra):
    return attention.build_parser().parse_args(
        ["--checkpoint_dir", str(tmp_path), "--env_name_list", "hopper", "--model_name_list", "dt",
         "--epoch1", "0", "--epoch2", "4", "--results_dir", str(tmp_path / "res"), "--figs_dir",
         str(tmp_path / "figs"), *extra])


def test_attention_gap_is_absolute_and_the_table_is_its_median(tmp_path, fake_attention):
    outs = attention.run(_att_args(tmp_path))
    assert [k.K for k in fake_attention["keys"]] == [1, 1]                      # the paper's K = 1 runs
    gap = np.load(tmp_path / "res" / "att_dist_diff_0_4_dt_hopper_medium_666_K1.npy")
    assert gap[:, :, 0].tolist() == [[1.0, 1.0], [1.0, 3.0], [6.0, 1.0]]
    # head-averaged gaps: block 0 (2, 1, 6), block 1 (1, 3, 1) -> medians 2, 1 (means would be 3, 1.667)
    (title, table), = outs.tables
    assert table.splitlines()[-1] == "| Random Init | 2.000 | 1.000 |"


def test_attention_unit_reaches_the_distances_and_the_file_names(tmp_path, fake_attention):
    attention.run(_att_args(tmp_path, "--distance_unit", "timestep"))
    assert fake_attention["units"] == ["timestep", "timestep"]
    assert (tmp_path / "res" / "att_dist_diff_0_4_dt_hopper_medium_666_K1_timestep.npy").is_file()


# ---- report steps -----------------------------------------------------------------------------------------------

def _ckpts(root, runs):
    """Run folders with empty model_{e}.pt files (what discovery and the epoch choice look at)."""
    for (model, K, epochs) in runs:
        d = root / run_dir_name(model, "medium", "hopper", 666, K, False, None)
        d.mkdir(parents=True)
        for e in epochs:
            (d / f"model_{e}.pt").write_bytes(b"")
    return root


def _record(monkeypatch, module, name):
    got = []
    monkeypatch.setattr(module, name, lambda a: got.append(a) or common.Outputs())
    return got


def _plan(tmp_path, *extra):
    args = report.build_parser().parse_args(["--checkpoint_dir", str(tmp_path / "ck"), "--out_dir",
                                             str(tmp_path / "rep"), *extra])
    return report._Plan(args), args


def test_report_attention_uses_the_K1_runs_at_the_attention_epoch(tmp_path, monkeypatch):
    _ckpts(tmp_path / "ck", [("dt", 1, (0, 2, 3, 4, 40)), ("dt", 20, (0, 40))])
    got = _record(monkeypatch, attention, "run")
    plan, args = _plan(tmp_path)
    report.step_attention(plan, args)
    (a,), = [got]
    assert (a.K_ckpt, a.epoch1, a.epoch2) == (1, 0, 4)


def test_report_epochs_prefer_the_wanted_one_then_the_largest_below_never_zero(tmp_path, monkeypatch):
    _ckpts(tmp_path / "ck", [("dt", 20, (0, 3, 40, 50)), ("gpt2", 20, (0, 3, 40, 50)), ("dt", 5, (0,))])
    got = _record(monkeypatch, params, "run")
    plan, args = _plan(tmp_path, "--distance_ylim", "auto")
    report.step_params(plan, args)
    assert [(a.epoch1, a.epoch2, a.distance_ylim, a.run_K) for a in got] == [(0, 40, "auto", 20)]
    assert plan.common_epoch("hopper", ["dt"], 10) == 3
    plan5, _ = _plan(tmp_path, "--run_K", "5")
    assert plan5.common_epoch("hopper", ["dt"], 40) is None                    # only epoch 0: nothing to compare


def test_report_curves_pass_run_K(tmp_path, monkeypatch):
    _ckpts(tmp_path / "ck", [("dt", 1, (0, 4)), ("dt", 10, (0, 4))])
    got = _record(monkeypatch, curves, "run_no_context")
    plan, args = _plan(tmp_path, "--run_K", "10")
    report.step_curves(plan, args)
    assert [a.run_K for a in got] == [10]


def test_metric_series_refuses_an_integer_too_large_for_a_float():
    """json reads 400 nines as an int; it was an OverflowError traceback."""
    with pytest.raises(UserError, match=f"^m.jsonl: row 1 has {RET} = 9999.*, not a number$"):
        curves.metric_series([{"iteration": 1, RET: int("9" * 400)}], RET, "m.jsonl")


def test_dataset_normalisation_refuses_expert_data_not_above_random(monkeypatch):
    """Equal random and expert means made the scale infinite ('inf ± nan' in the table, an unreadable figure)."""
    from decision_transformer.analysis import scores

    trajs = [{"rewards": np.ones(10, dtype=np.float32)}]
    monkeypatch.setattr(scores, "load_dataset", lambda path, env, ds: (f"{env}-{ds}.pkl", trajs))
    with pytest.raises(UserError, match=r"^--score_norm dataset: the hopper expert data's mean return \(10\) is not "
                                        r"above the random data's \(10\) in d; these cannot normalise a score$"):
        scores.dataset_reference("hopper", "d")


def test_the_cka_threshold_line_is_labelled(tmp_path, monkeypatch):
    from decision_transformer.analysis import cka

    labels = []
    real = common.legend
    monkeypatch.setattr(common, "legend", lambda ax, **k: labels.extend(ax.get_legend_handles_labels()[1]) or
                        real(ax, **k))
    res = tmp_path / "res"
    res.mkdir()
    names = ["0.ln_1", "0.mlp.dropout", "1.ln_1", "1.mlp.dropout"]
    stem = cka.result_stem(0, 40, "dt", "dt", "hopper", "medium", 666, False, False, False, 20)
    np.save(res / f"{stem}_state.npy", np.eye(4) * 0.5 + 0.2)
    common.save_csv(res / f"{stem}_layers.csv", ["axis", "index", "layer"],
                    [["rows", i, n] for i, n in enumerate(names)] + [["cols", i, n] for i, n in enumerate(names)])
    cka.plot(cka.build_plot_parser().parse_args([str(a) for a in [
        "--results_dir", res, "--figs_dir", tmp_path / "figs", "--env_name_list", "hopper", "--model_name_list",
        "dt", "--token_list", "state"]]))
    assert "threshold 0.23" in labels


def test_params_eps_tags_every_file_and_is_checked(tmp_path, fake_params, capsys):
    """--eps 1e-6 (the original's cosine) is saved under _eps1e-06 beside the default results, never over them."""
    argv = ["-plm", str(tmp_path), "--model_name_list", "dt", "--epoch1", "0", "--epoch2", "40",
            "--results_dir", str(tmp_path / "res"), "--figs_dir", str(tmp_path / "figs")]
    params.run(params.build_parser().parse_args(argv))
    params.run(params.build_parser().parse_args([*argv, "--eps", "1e-6"]))
    res = tmp_path / "res"
    plain, takagi = (np.load(res / f"paramcos_0_40_dt_hopper_medium_666{t}.npy") for t in ("", "_eps1e-06"))
    assert plain[0] == -1.0 and takagi[0] == pytest.approx(-1 / (1 + 1e-6), rel=1e-12)
    assert (res / "paramsim_0_40_dt_hopper_medium_666_eps1e-06.csv").is_file()
    assert any(stem.endswith("_eps1e-06") for stem, _ in fake_params)
    with pytest.raises(UserError, match="--eps"):
        params.run(params.build_parser().parse_args([*argv, "--eps", "-1"]))
