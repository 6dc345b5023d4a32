"""Result file names carry the settings that change the numbers: a gradient, score-table, learning-curve or MINE run
with a non-default setting writes tagged files next to the default ones (it used to replace them), the default names
stay the originals', and the readers (plots, run_all) find the tagged files given the same flags."""
import csv
import json

import numpy as np
import pytest
from test_analysis_support import fake_mine, write_run
from test_mine_grads_wiring import _mi_files, _run_mi

from decision_transformer.analysis import attention, cka, common, curves, grads, mi, report, scores
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
    (["--K", "5"], "_ctx5", True),                                   # the analysis batch's context and seed
    (["--batch_seed", "1"], "_bseed1", True),
    (["--batch_seed", "1", "--K", "5", "--batch_size", "6", "--eps", "0.01"], "_bs6_eps0.01_ctx5_bseed1", False),
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
    for tag in ("_eps{eps}", "_evalmode", "_indep", "_bs{n}", "_gseed{n}", "_unclipped", "_ctx{k}", "_bseed{n}"):
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
    assert {"learning_curve_no_context_dt_medium_666.csv", "normalized_scores_medium_K1_d4rl_seed666.csv",
            "normalized_scores_medium_K1_d4rl_seed666_best.md"} == set(_snapshot(res))
    before, before_figs = _snapshot(res), _snapshot(tmp_path / "figs")
    curves.run_no_context(curves.build_no_context_parser().parse_args(base + ["--target", "1800"]))
    assert _new(before, res) == {"learning_curve_no_context_dt_medium_666_target1800.csv",
                                 "normalized_scores_medium_K1_d4rl_seed666_target1800.csv",
                                 "normalized_scores_medium_K1_d4rl_seed666_target1800_best.md"}
    assert _new(before_figs, tmp_path / "figs") == {f"learning_curve_no_context_dt_medium_666_target1800.{x}"
                                                    for x in ("png", "pdf")}
    tagged = _rows(res / "learning_curve_no_context_dt_medium_666_target1800.csv")
    assert [float(r["return_mean"]) for r in tagged if r["K"] == "1"] == [50.0 * i for i in range(1, 7)]
    # --score_norm names Table 2's files; the curves are raw returns, the same under either normalisation
    before = _snapshot(res)
    curves.run_no_context(curves.build_no_context_parser().parse_args(base + ["--score_norm", "dataset",
                                                                              "--data_path", str(tmp_path)]))
    assert _new(before, res) == {"normalized_scores_medium_K1_dataset_seed666.csv",
                                 "normalized_scores_medium_K1_dataset_seed666_best.md"}


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
    fake_mine(monkeypatch, lambda x, y, **kw: float(next(value)))
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
    fake_mine(monkeypatch, lambda x, y, **kw: 1.0)
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


# ---- the analysis batch: --batch_size, --K (the batch's context, not the runs' --run_K), --batch_seed ----------------

BATCH_SETTINGS = [
    (["--batch_seed", "1"], "_bseed1"),
    (["--K", "5"], "_ctx5"),
    (["--batch_size", "8"], "_bs8"),
    (["--K", "5", "--batch_seed", "1", "--batch_size", "8"], "_bs8_ctx5_bseed1"),
]


@pytest.fixture(scope="module")
def batch_runs(tmp_path_factory, hopper_data):
    """One-block gpt2 runs: K=20 (epochs 0, 1, 40: CKA, MINE, gradients) and K=1 (epochs 0, 4: attention)."""
    ck = tmp_path_factory.mktemp("batch") / "ck"
    data = hopper_data / "hopper-medium-v2.pkl"
    write_run(ck, "gpt2", epochs=(0, 1, 40), data_file=data, n_layer=1)
    write_run(ck, "gpt2", K=1, epochs=(0, 4), data_file=data, n_layer=1)
    return ck


def _parse(build, argv):
    return build().parse_args([str(a) for a in argv])


@pytest.mark.parametrize("flags, tag", BATCH_SETTINGS)
def test_cka_batch_settings_tag_the_results_and_plot_cka_reads_them(tmp_path, batch_runs, flags, tag):
    """compute_cka.py on another batch (--batch_seed 1 used to replace the default matrices) writes tagged matrices,
    layer lists and heatmaps next to the default ones; plot_cka.py reads them given the same flags and tags its
    figure and CSV."""
    res, figs = tmp_path / "res", tmp_path / "figs"
    io = ["--results_dir", res, "--figs_dir", figs]
    argv = ["--checkpoint_dir", batch_runs, "--env_name_list", "hopper", "--heatmap_token_list", "state", *io]
    cka.run(_parse(cka.build_parser, argv))
    stem = "cka_0_40_gpt2gpt2_hopper_medium_666"
    assert {f"{stem}_{t}.npy" for t in ("reward", "state", "action")} | {f"{stem}_layers.csv"} == set(_snapshot(res))
    plot = ["--env_name_list", "hopper", "--model_name_list", "gpt2", "--token_list", "state", *io]
    cka.plot(_parse(cka.build_plot_parser, plot))
    before, before_figs = _snapshot(res), _snapshot(figs)
    cka.run(_parse(cka.build_parser, argv + flags))
    assert _new(before, res) == {f"{stem}{tag}_{t}.npy" for t in ("reward", "state", "action")} \
        | {f"{stem}{tag}_layers.csv"}
    assert _new(before_figs, figs) == {f"{stem}{tag}_state.{x}" for x in ("png", "pdf")}
    before, before_figs = _snapshot(res), _snapshot(figs)
    cka.plot(_parse(cka.build_plot_parser, plot + flags))
    assert _new(before, res) == {f"cka_plot_0_40_gpt2_hopper_medium_666{tag}_state.csv"}
    assert _new(before_figs, figs) == {f"cka_plot_0_40_gpt2_hopper_medium_666{tag}_state.{x}" for x in ("png", "pdf")}
    drawn = [float(r["cka"]) for r in _rows(res / f"cka_plot_0_40_gpt2_hopper_medium_666{tag}_state.csv")]
    assert drawn == pytest.approx(np.diagonal(np.load(res / f"{stem}{tag}_state.npy")).tolist())


def test_plot_cka_reads_another_batch_only_given_its_flags(tmp_path, batch_runs):
    io = ["--results_dir", tmp_path / "res", "--figs_dir", tmp_path / "figs"]
    cka.run(_parse(cka.build_parser, ["--checkpoint_dir", batch_runs, "--env_name_list", "hopper", "--no_heatmap",
                                      "--K", "5", "--batch_seed", "1", *io]))
    plot = ["--env_name_list", "hopper", "--model_name_list", "gpt2", "--token_list", "state", *io]
    with pytest.raises(UserError, match=r"cka_0_40_gpt2gpt2_hopper_medium_666_state\.npy .*--batch_size, --K or "
                                        r"--batch_seed runs are read with the same flags"):
        cka.plot(_parse(cka.build_plot_parser, plot))
    cka.plot(_parse(cka.build_plot_parser, plot + ["--K", "5", "--batch_seed", "1"]))


@pytest.mark.parametrize("flags, tag", BATCH_SETTINGS)
def test_attention_batch_settings_tag_every_file(tmp_path, batch_runs, flags, tag):
    res, figs = tmp_path / "res", tmp_path / "figs"
    argv = ["--checkpoint_dir", batch_runs, "--env_name_list", "hopper", "--model_name_list", "gpt2",
            "--results_dir", res, "--figs_dir", figs]
    attention.run(_parse(attention.build_parser, argv))
    names = ("att_dist_0_gpt2_hopper_medium_666_K1{t}.npy", "att_dist_4_gpt2_hopper_medium_666_K1{t}.npy",
             "att_dist_diff_0_4_gpt2_hopper_medium_666_K1{t}.npy")
    assert set(_snapshot(res)) == {n.format(t="") for n in names}
    before, before_figs = _snapshot(res), _snapshot(figs)
    attention.run(_parse(attention.build_parser, argv + flags))
    assert _new(before, res) == {n.format(t=tag) for n in names}
    assert _new(before_figs, figs) == {f"att_dist_diff_0_4_gpt2_hopper_medium_666_K1{tag}.{x}" for x in ("png", "pdf")}


def _save_activation(ck, res, *flags):
    return mi.run_save(_parse(mi.build_save_parser, ["--checkpoint_dir", ck, "--model_name", "gpt2",
                                                     "--results_dir", res, *flags]))


def _mi_read_flags(flags):
    """run_mi_exp.py's and the MI plots' spelling of save_activation.py's batch flags (--batch_size: MINE's)."""
    return ["--data_batch_size" if f == "--batch_size" else f for f in flags]


@pytest.mark.parametrize("flags, tag", BATCH_SETTINGS)
def test_mine_batch_settings_tag_the_batch_and_results_and_the_readers_find_them(tmp_path, batch_runs, monkeypatch,
                                                                                 flags, tag):
    """save_activation.py on another batch (--batch_seed 1 used to replace the data file, stranding every other
    model's activations) writes tagged activation and data files; run_mi_exp.py reads them given the same flags
    (--data_batch_size for save_activation.py's --batch_size) and tags its results after the MINE settings' tags;
    both plotting scripts read those and tag their figures."""
    res = tmp_path / "res"
    fake_mine(monkeypatch, lambda x, y, **kw: 1.0)
    _save_activation(batch_runs, res)
    assert set(_snapshot(res)) == {"activation_40_gpt2_hopper_medium_666.npz", "data_hopper_medium_666.npz"}
    before = _snapshot(res)
    _save_activation(batch_runs, res, *flags)
    assert _new(before, res) == {f"activation_40_gpt2_hopper_medium_666{tag}.npz", f"data_hopper_medium_666{tag}.npz"}
    data = np.load(res / f"data_hopper_medium_666{tag}.npz")
    assert data["states"].shape[:2] == (8 if "_bs8" in tag else 100, 5 if "_ctx5" in tag else 20)
    read = _mi_read_flags(flags)
    for extra in ([], read):
        for exp in ("normal", "no_context", "data"):
            _run_mi(res, "--exp_type", exp, "--iters", "1", *extra)
    stems = ("mi_xy_0_40_gpt2_hopper_medium_666{t}.npz", "mi_40_gpt2_hopper_medium_666{t}.npz",
             "mi_data_state_action_hopper_medium_666{t}.npy", "mi_data_rtg_action_hopper_medium_666{t}.npy")
    assert _new(before, res) == {f"activation_40_gpt2_hopper_medium_666{tag}.npz", f"data_hopper_medium_666{tag}.npz"} \
        | {s.format(t="_it1") for s in stems} | {s.format(t="_it1" + tag) for s in stems}
    figs = tmp_path / "figs"
    io = ["--results_dir", res, "--figs_dir", figs, "--env_name", "hopper", "--iters", "1"]
    for extra in ([], read):
        mi.plot_mi(_parse(mi.build_plot_parser, io + ["--model_name_list", "gpt2", *extra]))
        mi.plot_mi(_parse(mi.build_plot_parser, io + ["--model_name_list", "gpt2", "--no_context", *extra]))
        mi.plot_mi_data(_parse(mi.build_plot_data_parser, io + extra))
    plain = {"mi_xy_40_gpt2_hopper_medium_666_it1", "mi_no_context_40_gpt2_hopper_medium_666_it1",
             "mi_data_hopper_medium_666_it1"}
    assert {p.stem for p in figs.glob("*.png")} == plain | {s + tag for s in plain}


def test_run_mi_exp_reads_another_batch_only_given_its_flags(tmp_path, batch_runs):
    """A batch saved with --K 5 --batch_seed 1 only: run_mi_exp.py without those flags finds no data file, and its
    hint names the flags that would have written it."""
    res = tmp_path / "res"
    _save_activation(batch_runs, res, "--K", "5", "--batch_seed", "1", "--batch_size", "8")
    with pytest.raises(UserError, match=r"data_hopper_medium_666\.npz: file not found"):
        _run_mi(res, "--exp_type", "data")
    with pytest.raises(UserError, match=r"data_hopper_medium_666_bs8_ctx5\.npz: file not found; .*--batch_size 8 "
                                        r"--K 5 --model_name M"):
        _run_mi(res, "--exp_type", "data", "--K", "5", "--data_batch_size", "8")


def test_default_batches_have_no_tag_and_the_help_says_the_tags():
    assert common.batch_tag(common.DEFAULT_BATCH_K, common.DEFAULT_BATCH_SEED, 100, common.DEFAULT_BATCH_SIZE) == ""
    assert common.batch_tag(20, 0, 7) == ""                    # no default size: the size is not tagged here
    for build in (cka.build_parser, cka.build_plot_parser):
        assert cka.batch_tag(build().parse_args([])) == ""
    for build in (mi.build_mi_parser, mi.build_plot_parser, mi.build_plot_data_parser):
        assert mi._tags(build().parse_args([])) == ""
    parsers = (cka.build_parser, cka.build_plot_parser, attention.build_parser, grads.build_confusion_parser,
               grads.build_norm_parser, mi.build_save_parser, mi.build_mi_parser, mi.build_plot_parser,
               mi.build_plot_data_parser, report.build_parser)
    for build in parsers:
        text = build().format_help()
        for tag in ("_bs{n}", "_ctx{k}", "_bseed{n}"):
            assert tag in text, (build.__module__, build.__name__, tag)
    for build in (mi.build_mi_parser, mi.build_plot_parser, mi.build_plot_data_parser):
        assert "--data_batch_size" in build().format_help()
    # save_activation.py's --batch_size is the batch's; run_mi_exp.py's spelling of it is accepted there too
    assert mi.build_save_parser().parse_args(["--data_batch_size", "8"]).batch_size == 8


def test_run_all_with_non_default_batch_flags_writes_a_complete_report(tmp_path, batch_runs):
    """run_all passes --batch_size, --grad_batch_size, --K and --batch_seed to every analysis that draws a batch, and
    to the readers of their files: the report has every figure (none failed), all from tagged files, and a run with
    the default batch next to it in the same folder keeps its own names."""
    out = tmp_path / "rep"
    base = ["--checkpoint_dir", batch_runs, "--out_dir", out, "--mine_iters", "1", "--mine_hidden", "4",
            "--only", "cka", "mi", "grads", "attention"]
    report.run(_parse(report.build_parser, base + ["--batch_size", "8", "--grad_batch_size", "6", "--K", "5",
                                                   "--batch_seed", "1"]))
    text = (out / "report.md").read_text()
    assert "**Failed" not in text and "batches of 8 samples with K=5, batch seed 1" in text
    links = [line[line.index("](") + 2:-1] for line in text.splitlines() if line.startswith("![")]
    assert all((out / link).is_file() for link in links)
    stems = {link.rsplit("/", 1)[-1][:-len(".png")] for link in links}
    assert stems == {"cka_0_40_gpt2gpt2_hopper_medium_666_bs8_ctx5_bseed1_state",
                     "cka_plot_0_40_gpt2_hopper_medium_666_bs8_ctx5_bseed1_reward",
                     "cka_plot_0_40_gpt2_hopper_medium_666_bs8_ctx5_bseed1_state",
                     "cka_plot_0_40_gpt2_hopper_medium_666_bs8_ctx5_bseed1_action",
                     "mi_xy_40_gpt2_hopper_medium_666_h4_it1_bs8_ctx5_bseed1",
                     "mi_no_context_40_gpt2_hopper_medium_666_h4_it1_bs8_ctx5_bseed1",
                     "mi_data_hopper_medium_666_h4_it1_bs8_ctx5_bseed1",
                     "grad_confusion_1_gpt2_hopper_medium_666_bs6_ctx5_bseed1",
                     "gradnorms_1_gpt2_hopper_medium_666_bs8_ctx5_bseed1",
                     "gradnorm_perparam_1_gpt2_hopper_medium_666_bs8_ctx5_bseed1",
                     "att_dist_diff_0_4_gpt2_hopper_medium_666_K1_bs8_ctx5_bseed1"}
    mres = out / common.SECTIONS["mi"] / "results"
    assert np.load(mres / "data_hopper_medium_666_bs8_ctx5_bseed1.npz")["states"].shape[:2] == (8, 5)
    files = [p.name for p in out.rglob("*") if p.is_file() and p.name != "report.md"]
    assert files and [f for f in files if "_ctx5_bseed1" not in f] == []          # every result file: tagged
