"""Result file names carry the settings that change the numbers: a gradient, score-table, learning-curve or MINE run
with a non-default setting writes tagged files next to the default ones (it used to replace them), the default names
stay the originals', and the readers (plots, run_all) find the tagged files given the same flags."""
import csv
import json

import numpy as np
import pytest
from test_analysis_support import write_run
from test_mine_grads_wiring import _mi_files, _run_mi

from decision_transformer.analysis import curves, grads, mi, scores
from decision_transformer.checkpoint import run_dir_name
from decision_transformer.errors import UserError


def _snapshot(folder) -> dict:
    """{file name: bytes} of every file in ``folder``."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _new(before: dict, folder) -> set:
    """The names of the files of ``folder`` that were not in ``before``; the files of ``before`` must be unchanged."""
    after = _snapshot(folder)
    changed = [n for n, b in before.items() if after.get(n) != b]
    assert not changed, f"rewritten: {changed}"
    return set(after) - set(before)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- gradients --------------------------------------------------------------------------------------------------

@pytest.fixture
def grad_args(tmp_path, hopper_data):
    ck = tmp_path / "ck"
    write_run(ck, "gpt2", epochs=(1,), data_file=hopper_data / "hopper-medium-v2.pkl", n_layer=1, step=1.0)
    return ["--checkpoint_dir", str(ck), "--env_name_list", "hopper", "--model_name_list", "gpt2",
            "--results_dir", str(tmp_path / "res"), "--figs_dir", str(tmp_path / "figs")]     # the default batch


CONFUSION_FILES = ("gradcossim_1_gpt2_hopper_medium_666{t}.npy", "grad_confusion_1_gpt2_hopper_medium_666{t}.csv")
NORM_FILES = ("gradnorms_1_gpt2_hopper_medium_666{t}.npy", "gradnorm_perparam_1_gpt2_hopper_medium_666{t}.npy",
              "gradnorm_perparam_1_gpt2_hopper_medium_666{t}.csv")


@pytest.mark.parametrize("flags, tag, norms", [
    (["--eps", "1e-6"], "_eps1e-06", False),
    (["--train_mode", "false"], "_evalmode", True),
    (["--independent_batches"], "_indep", True),
    (["--batch_size", "7"], "_bs7", True),
    (["--grad_seed", "3"], "_gseed3", True),
    (["--eps", "0.01", "--grad_seed", "2", "--batch_size", "6", "--independent_batches", "--train_mode", "false"],
     "_evalmode_indep_bs6_gseed2_eps0.01", False),
])
def test_gradient_settings_tag_every_file_and_leave_the_defaults(grad_args, tmp_path, flags, tag, norms):
    """Each setting that changes the gradients (or the cosines) tags the npy, the csv and the figure of both scripts;
    the default run's files keep the original names and are left as they were."""
    res, figs = tmp_path / "res", tmp_path / "figs"
    grads.run_confusion(grads.build_confusion_parser().parse_args(grad_args))          # default: 50 samples
    grads.run_norms(grads.build_norm_parser().parse_args(grad_args))                   # default: 100 samples
    defaults = {f.format(t="") for f in CONFUSION_FILES + NORM_FILES}
    assert defaults <= set(_snapshot(res))
    assert {"grad_confusion_1_gpt2_hopper_medium_666.png", "gradnorms_1_gpt2_hopper_medium_666.png",
            "gradnorm_perparam_1_gpt2_hopper_medium_666.png"} <= set(_snapshot(figs))
    before, before_figs = _snapshot(res), _snapshot(figs)
    grads.run_confusion(grads.build_confusion_parser().parse_args(grad_args + flags))
    expect = {f.format(t=tag) for f in CONFUSION_FILES}
    expect_figs = {f"grad_confusion_1_gpt2_hopper_medium_666{tag}.{x}" for x in ("png", "pdf")}
    if norms:
        grads.run_norms(grads.build_norm_parser().parse_args(grad_args + flags))
        expect |= {f.format(t=tag) for f in NORM_FILES}
        expect_figs |= {f"{s}_1_gpt2_hopper_medium_666{tag}.{x}" for s in ("gradnorms", "gradnorm_perparam")
                        for x in ("png", "pdf")}
    assert _new(before, res) == expect
    assert _new(before_figs, figs) == expect_figs


def test_the_gradient_tags_are_said_in_the_help():
    text = grads.build_confusion_parser().format_help() + grads.build_norm_parser().format_help()
    for tag in ("_eps{eps}", "_evalmode", "_indep", "_bs{n}", "_gseed{n}", "_unclipped"):
        assert tag in text, tag


def test_default_gradient_settings_have_no_tag():
    assert grads.setting_tag(grads.build_confusion_parser().parse_args([]), grads.CONFUSION_BATCH_SIZE) == ""
    assert grads.setting_tag(grads.build_norm_parser().parse_args([]), grads.NORM_BATCH_SIZE) == ""
    # each script's own default batch: 50 samples is the norms' non-default
    assert grads.setting_tag(grads.build_norm_parser().parse_args(["--batch_size", "50"]),
                             grads.NORM_BATCH_SIZE) == "_bs50"


# ---- score tables and learning curves ----------------------------------------------------------------------------

def _metrics(root, model, K=20, block=None, no_grad_clip=False, n=6):
    """A hopper run with metrics only: target 3600 returns 100·i, target 1800 returns half of them."""
    d = root / run_dir_name(model, "medium", "hopper", 666, K, no_grad_clip, block)
    d.mkdir(parents=True)
    rows = [{"iteration": i, "training/action_error": 1.0 / i, "evaluation/target_3600_return_mean": 100.0 * i,
             "evaluation/target_1800_return_mean": 50.0 * i} for i in range(1, n + 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _io(tmp_path):
    return ["--results_dir", str(tmp_path / "res"), "--figs_dir", str(tmp_path / "figs")]


def test_score_table_target_is_tagged_and_recorded(tmp_path):
    ck = tmp_path / "ck"
    _metrics(ck, "dt")
    base = ["--checkpoint_dir", str(ck), "--env_name_list", "hopper", "--model_name_list", "dt", "--seed_list",
            "666", *_io(tmp_path)]
    outs = scores.run(scores.build_parser().parse_args(base))
    res = tmp_path / "res"
    assert {"normalized_scores_medium_K20_d4rl.csv", "normalized_scores_medium_K20_d4rl_best.md"} \
        == set(_snapshot(res))
    [r] = _rows(res / "normalized_scores_medium_K20_d4rl.csv")
    assert (int(r["target"]), float(r["best_return"])) == (3600, 600.0)
    assert "target" not in outs.tables[0][0]
    before, before_figs = _snapshot(res), _snapshot(tmp_path / "figs")
    outs = scores.run(scores.build_parser().parse_args(base + ["--target", "1800"]))
    assert _new(before, res) == {"normalized_scores_medium_K20_d4rl_target1800.csv",
                                 "normalized_scores_medium_K20_d4rl_target1800_best.md"}
    assert _new(before_figs, tmp_path / "figs") == {f"normalized_scores_medium_K20_d4rl_target1800_best.{x}"
                                                    for x in ("png", "pdf")}
    [r] = _rows(res / "normalized_scores_medium_K20_d4rl_target1800.csv")
    assert (int(r["target"]), float(r["best_return"])) == (1800, 300.0)
    assert ", target 1800," in outs.tables[0][0]
    # REID's quoted values are at the default targets: not next to another target's scores
    assert "REID" not in (res / "normalized_scores_medium_K20_d4rl_target1800_best.md").read_text()


def test_no_context_curves_and_table_2_tag_the_target(tmp_path):
    ck = tmp_path / "ck"
    for K in (1, 20):
        _metrics(ck, "dt", K=K)
    base = ["--checkpoint_dir", str(ck), "--env_name_list", "hopper", "--model_name_list", "dt", *_io(tmp_path)]
    curves.run_no_context(curves.build_no_context_parser().parse_args(base))
    res = tmp_path / "res"
    assert {"learning_curve_no_context_dt_medium_666.csv", "normalized_scores_medium_K1_d4rl.csv",
            "normalized_scores_medium_K1_d4rl_best.md"} == set(_snapshot(res))
    before, before_figs = _snapshot(res), _snapshot(tmp_path / "figs")
    curves.run_no_context(curves.build_no_context_parser().parse_args(base + ["--target", "1800"]))
    assert _new(before, res) == {"learning_curve_no_context_dt_medium_666_target1800.csv",
                                 "normalized_scores_medium_K1_d4rl_target1800.csv",
                                 "normalized_scores_medium_K1_d4rl_target1800_best.md"}
    assert _new(before_figs, tmp_path / "figs") == {f"learning_curve_no_context_dt_medium_666_target1800.{x}"
                                                    for x in ("png", "pdf")}
    tagged = _rows(res / "learning_curve_no_context_dt_medium_666_target1800.csv")
    assert [float(r["return_mean"]) for r in tagged if r["K"] == "1"] == [50.0 * i for i in range(1, 7)]
    # --score_norm names Table 2's files; the curves are raw returns, the same under either normalisation
    before = _snapshot(res)
    curves.run_no_context(curves.build_no_context_parser().parse_args(base + ["--score_norm", "dataset",
                                                                              "--data_path", str(tmp_path)]))
    assert _new(before, res) == {"normalized_scores_medium_K1_dataset.csv",
                                 "normalized_scores_medium_K1_dataset_best.md"}


@pytest.mark.parametrize("flags, tag", [
    (["--smoothing", "0.5"], "_smooth0.5"),
    (["--legacy_smoothing"], "_legacysmooth"),
    (["--target", "1800"], "_target1800"),
    (["--target", "1800", "--smoothing", "0", "--legacy_smoothing"], "_target1800_smooth0_legacysmooth"),
])
def test_block_curves_tag_the_smoothing_and_target(tmp_path, flags, tag):
    ck = tmp_path / "ck"
    for b in range(2):
        _metrics(ck, "dt", K=1, block=b)
    base = ["--checkpoint_dir", str(ck), "--env_name_list", "hopper", "-block", *_io(tmp_path)]
    curves.run_no_context(curves.build_no_context_parser().parse_args(base))
    res, figs = tmp_path / "res", tmp_path / "figs"
    assert set(_snapshot(res)) == {"learning_curve_block_hopper_medium_666.csv"}
    before, before_figs = _snapshot(res), _snapshot(figs)
    curves.run_no_context(curves.build_no_context_parser().parse_args(base + flags))
    assert _new(before, res) == {f"learning_curve_block_hopper_medium_666{tag}.csv"}
    assert _new(before_figs, figs) == {f"learning_curve_block_hopper_medium_666{tag}.{x}" for x in ("png", "pdf")}


def test_grad_clip_curves_tag_the_target(tmp_path):
    ck = tmp_path / "ck"
    for ngc in (False, True):
        _metrics(ck, "gpt2", no_grad_clip=ngc)
    base = ["--checkpoint_dir", str(ck), *_io(tmp_path)]
    curves.run_grad_clip(curves.build_grad_clip_parser().parse_args(base))
    res = tmp_path / "res"
    assert set(_snapshot(res)) == {"learning_curve_grad_clip_gpt2_hopper_medium_666.csv"}
    before = _snapshot(res)
    curves.run_grad_clip(curves.build_grad_clip_parser().parse_args(base + ["--target", "1800"]))
    assert _new(before, res) == {"learning_curve_grad_clip_gpt2_hopper_medium_666_target1800.csv"}


# ---- MINE -------------------------------------------------------------------------------------------------------

MI_SETTINGS = [
    (["--iters", "100"], "_it100"),
    (["--lr", "0.001"], "_lr0.001"),
    (["--batch_size", "32"], "_mb32"),
    (["--mine_hidden", "64"], "_h64"),
    (["--lr", "0.001", "--iters", "100", "--mine_hidden", "64", "--batch_size", "32", "--mine_loss", "fdiv"],
     "_fdiv_h64_it100_mb32_lr0.001"),
]


@pytest.mark.parametrize("flags, tag", MI_SETTINGS)
def test_mine_settings_tag_the_results_and_the_plots_read_them(tmp_path, monkeypatch, flags, tag):
    """--iters, --lr, --batch_size and --mine_hidden runs write next to the default results (an --iters 100 run
    replaced the 1000-iteration one); both plotting scripts read them given the same flags and tag their figures."""
    _mi_files(tmp_path, np.ones((6, 3)))
    value = iter(range(1, 10_000))
    monkeypatch.setattr(mi, "estimate_mi", lambda x, y, **kw: float(next(value)))
    stems = ("mi_xy_0_40_gpt2_hopper_medium_666", "mi_xy_1_40_gpt2_hopper_medium_666", "mi_40_gpt2_hopper_medium_666",
             "mi_data_state_action_hopper_medium_666", "mi_data_rtg_action_hopper_medium_666")
    exts = (".npz", ".npz", ".npz", ".npy", ".npy")
    for exp in ("normal", "no_context", "data"):
        _run_mi(tmp_path, "--exp_type", exp)
    assert {s + x for s, x in zip(stems, exts)} <= set(_snapshot(tmp_path))
    before = _snapshot(tmp_path)
    for exp in ("normal", "no_context", "data"):
        _run_mi(tmp_path, "--exp_type", exp, *flags)
    assert _new(before, tmp_path) == {s + tag + x for s, x in zip(stems, exts)}
    figs = tmp_path / "figs"
    io = ["--results_dir", str(tmp_path), "--figs_dir", str(figs), "--env_name", "hopper"]
    for extra in ([], flags):
        mi.plot_mi(mi.build_plot_parser().parse_args(io + ["--model_name_list", "gpt2", *extra]))
        mi.plot_mi(mi.build_plot_parser().parse_args(io + ["--model_name_list", "gpt2", "--no_context", *extra]))
        mi.plot_mi_data(mi.build_plot_data_parser().parse_args(io + extra))
    drawn = {p.stem for p in figs.glob("*.png")}
    plain = {"mi_xy_40_gpt2_hopper_medium_666", "mi_no_context_40_gpt2_hopper_medium_666", "mi_data_hopper_medium_666"}
    assert drawn == plain | {s + tag for s in plain}


def test_mine_settings_are_read_only_given_the_same_flags(tmp_path, monkeypatch):
    _mi_files(tmp_path, np.ones((6, 3)))
    monkeypatch.setattr(mi, "estimate_mi", lambda x, y, **kw: 1.0)
    _run_mi(tmp_path, "--exp_type", "data", "--iters", "100")
    io = ["--results_dir", str(tmp_path), "--figs_dir", str(tmp_path / "figs"), "--env_name", "hopper"]
    with pytest.raises(UserError, match=r"mi_data_state_action_\{env\}_medium_666\.npy .*--iters, --batch_size or "
                                        r"--lr run are read with the same flags"):
        mi.plot_mi_data(mi.build_plot_data_parser().parse_args(io))
    with pytest.raises(UserError, match=r"mi_data_state_action_\{env\}_medium_666_it10\.npy"):
        mi.plot_mi_data(mi.build_plot_data_parser().parse_args(io + ["--iters", "10"]))
    mi.plot_mi_data(mi.build_plot_data_parser().parse_args(io + ["--iters", "100"]))


def test_default_mine_settings_have_no_tag_and_the_help_says_the_tags():
    for build in (mi.build_mi_parser, mi.build_plot_parser, mi.build_plot_data_parser):
        p = build()
        assert mi._variant_tag(p.parse_args([])) == ""
        text = p.format_help()
        for tag in ("_it{n}", "_lr{lr}", "_mb{n}", "_h{n}", "_nopad", "_L{n}"):
            assert tag in text, (build.__name__, tag)
