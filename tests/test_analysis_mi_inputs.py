"""Bad input of the MINE / mutual-information scripts: an overflowing forward, fewer than 2 samples, malformed
result files (one line ``error: ...``, exit 2, nothing written), and all-NaN or missing results (``warning: ...``
lines, the figure still written)."""
import numpy as np
import pytest
import torch
from test_analysis_support import expect_exit, load_script, write_run

from decision_transformer.analysis import common, mi

SAVE = "mine/save_activation.py"
RUN_MI = "mine/run_mi_exp.py"
PLOT_MI = "analysis/section-52-mutual-information/plot_mutual_information.py"
PLOT_MI_DATA = "analysis/section-52-mutual-information/plot_mutual_information_data.py"
SMALL = ["--K", "3", "--device", "cpu"]


def _save_argv(ck, out, *extra):
    return ["--checkpoint_dir", ck, "--env_name_list", "hopper", "--model_name", "dt", *SMALL,
            "--results_dir", out, *extra]


# ---- 1. save_activation.py: a forward that overflows ---------------------------------------------------------------

def test_save_activation_refuses_non_finite_activations(tmp_path, hopper_data, capsys):
    """Finite weights whose forward overflows (every c_fc weight 1e30): one line naming the checkpoint and the first
    entry / token with NaN or inf, nothing written (not an .npz that is half NaN with exit 0)."""
    ck = tmp_path / "checkpoints"
    d = write_run(ck, "dt", epochs=(40,), data_file=hopper_data / "hopper-medium-v2.pkl")
    path = d / "model_40.pt"
    obj = torch.load(path, weights_only=True)
    for k, v in obj["state_dict"].items():
        if k.endswith("mlp.c_fc.weight"):
            v.fill_(1e30)
    torch.save(obj, path)
    out = tmp_path / "res"
    msg = expect_exit(capsys, load_script(SAVE).main, _save_argv(ck, out, "--batch_size", "4"))
    assert f"{path}: the model's forward pass gives non-finite activations, first at 1.mlp.dropout" in msg
    assert not out.exists()


# ---- 2. fewer than 2 samples ---------------------------------------------------------------------------------------

def test_save_activation_refuses_a_batch_of_one(tmp_path, hopper_data, capsys):
    ck = tmp_path / "checkpoints"
    write_run(ck, "dt", epochs=(40,), data_file=hopper_data / "hopper-medium-v2.pkl")
    out = tmp_path / "res"
    msg = expect_exit(capsys, load_script(SAVE).main, _save_argv(ck, out, "--batch_size", "1"))
    assert "invalid --batch_size 1: use an integer >= 2" in msg
    assert not out.exists()


@pytest.mark.parametrize("exp_type", ["normal", "no_context", "data"])
def test_run_mi_refuses_fewer_than_two_samples(tmp_path, capsys, exp_type):
    """Activation files of one sample (an older save_activation.py --batch_size 1): refused, not all-NaN MI."""
    B, K, D = 1, 2, 4
    rng = np.random.default_rng(0)
    df = common.save_npz(mi.data_file(tmp_path, "hopper", "medium", 666), states=rng.normal(size=(B, K, 11)),
                         actions=rng.normal(size=(B, K, 3)), rtg=rng.normal(size=(B, K + 1, 1)),
                         timesteps=np.zeros((B, K)), attention_mask=np.ones((B, K)))
    common.save_npz(mi.activation_file(tmp_path, 40, "gpt2", "hopper", "medium", 666),
                    **{f"{b}.mlp.dropout": rng.normal(size=(B, 3 * K, D)) for b in range(2)})
    argv = ["-psm", tmp_path / "out", "-pd", tmp_path, "-pa", tmp_path, "--iters", 1, "--mine_hidden", 4,
            "--batch_size", 2, "--device", "cpu", "--exp_type", exp_type]
    msg = expect_exit(capsys, load_script(RUN_MI).main, argv)
    assert f"{df}: 1 sample(s); MI needs at least 2" in msg
    assert not (tmp_path / "out").exists()


# ---- 3. malformed mi_xy_*.npz ----------------------------------------------------------------------------------------

def _xy(n=8, **changes):
    pos = np.arange(n)
    arrays = {"x": np.linspace(0, 1, n), "y": np.linspace(1, 2, n), "position": pos, "token": pos % 3,
              "depth": np.array(2)}
    arrays.update(changes)
    return arrays


@pytest.mark.parametrize("changes, msg", [
    ({"x": np.ones(5), "position": np.arange(59), "token": np.arange(59) % 3, "y": np.ones(59)},
     "arrays x, y, position, token of shapes [5], [59], [59], [59]"),
    ({"x": np.ones((3, 3))}, "arrays x, y, position, token of shapes [3, 3], [8], [8], [8]"),
    ({"token": np.arange(8)}, "array 'token' has values other than 0, 1, 2"),
    ({"token": np.full(8, np.nan)}, "array 'token' has values other than 0, 1, 2"),
    ({"y": np.full(8, np.inf)}, "array 'y' has infinite values"),
    ({"position": np.full(8, np.nan)}, "array 'position' has values that are not finite"),
    ({"depth": np.array(np.nan)}, "'depth' nan is not the depth of a model with block 0"),
    ({"y": np.array([0.5] * 7 + [-np.inf])}, "array 'y' has infinite values (failed estimates are NaN)"),
    ({"x": np.ones(8, complex)}, "array 'x' is not real (complex128)"),
    ({k: np.zeros(0) for k in ("x", "y", "position", "token")},
     "arrays x, y, position, token of shapes [0], [0], [0], [0]; run_mi_exp.py writes four 1-D arrays of one length"),
    ({"token": np.array([0, 1, 2, 3] * 2)}, "array 'token' has values other than 0, 1, 2 (R̂, s, a)"),
])
def test_plot_mi_refuses_malformed_xy_results(tmp_path, capsys, changes, msg):
    res = tmp_path / "res"
    res.mkdir()
    f = res / "mi_xy_0_40_dt_hopper_medium_666.npz"
    np.savez(f, **_xy(**changes))
    err = expect_exit(capsys, load_script(PLOT_MI).main, ["--results_dir", res, "--figs_dir", tmp_path / "figs",
                                                          "--model_name_list", "dt"])
    assert f"{f}: {msg}" in err
    assert not (tmp_path / "figs").exists()


def test_plot_mi_refuses_a_depth_that_does_not_exceed_the_block(tmp_path, capsys):
    res = tmp_path / "res"
    res.mkdir()
    np.savez(res / "mi_xy_0_40_dt_hopper_medium_666.npz", **_xy(depth=np.array(3)))
    f = res / "mi_xy_2_40_dt_hopper_medium_666.npz"
    np.savez(f, **_xy(depth=np.array(2)))
    err = expect_exit(capsys, load_script(PLOT_MI).main, ["--results_dir", res, "--figs_dir", tmp_path / "figs",
                                                          "--model_name_list", "dt"])
    assert f"{f}: 'depth' 2 is not the depth of a model with block 2" in err
    assert not (tmp_path / "figs").exists()


def _plot_mi_dt(res, tmp_path):
    return ["--results_dir", res, "--figs_dir", tmp_path / "figs", "--model_name_list", "dt"]


def test_plot_mi_refuses_results_of_one_model_with_different_depths(tmp_path, capsys):
    """Blocks 0 and 1 of a 2-block dt next to blocks 2 and 4 left over from a 5-block dt in the same folder were drawn
    as one model ("deep: Random Init block 1" and the 5-block model's blocks in other rows); now one line naming a
    file of each depth, nothing drawn."""
    res = tmp_path / "res"
    res.mkdir()
    for b, depth in ((0, 2), (1, 2), (2, 5), (4, 5)):
        np.savez(res / f"mi_xy_{b}_40_dt_hopper_medium_666.npz", **_xy(depth=np.array(depth)))
    err = expect_exit(capsys, load_script(PLOT_MI).main, _plot_mi_dt(res, tmp_path))
    assert (f"{res / 'mi_xy_0_40_dt_hopper_medium_666.npz'} records depth 2 but "
            f"{res / 'mi_xy_2_40_dt_hopper_medium_666.npz'} depth 5: results of two models of different depth") in err
    assert "remove the stale files, or every mi_xy_*_40_dt_hopper_medium_666.npz, and rerun run_mi_exp.py" in err
    assert not (tmp_path / "figs").exists()
    # an older file without the depth whose block the recorded depth does not have
    for f in res.iterdir():
        f.unlink()
    np.savez(res / "mi_xy_0_40_dt_hopper_medium_666.npz", **_xy(depth=np.array(2)))
    np.savez(res / "mi_xy_4_40_dt_hopper_medium_666.npz", **{k: v for k, v in _xy().items() if k != "depth"})
    err = expect_exit(capsys, load_script(PLOT_MI).main, _plot_mi_dt(res, tmp_path))
    assert (f"{res / 'mi_xy_0_40_dt_hopper_medium_666.npz'} records depth 2 but "
            f"{res / 'mi_xy_4_40_dt_hopper_medium_666.npz'} is block 4") in err
    assert not (tmp_path / "figs").exists()


def test_plot_mi_depths_of_other_runs_and_variants_do_not_conflict(tmp_path, capsys):
    """Only the files of the figure's model, epoch, env, dataset, seed and tags are one model: a 5-block dt of
    another seed, epoch or estimator variant next to them is not a conflict."""
    res = tmp_path / "res"
    res.mkdir()
    for b in (0, 1):
        np.savez(res / f"mi_xy_{b}_40_dt_hopper_medium_666.npz", **_xy(depth=np.array(2)))
    for name in ("mi_xy_4_40_dt_hopper_medium_42.npz", "mi_xy_4_10_dt_hopper_medium_666.npz",
                 "mi_xy_4_40_dt_hopper_medium_666_nopad.npz"):
        np.savez(res / name, **_xy(depth=np.array(5)))
    load_script(PLOT_MI).main(_plot_mi_dt(res, tmp_path))
    assert (tmp_path / "figs" / "mi_xy_40_dt_hopper_medium_666.png").is_file()
    assert "error" not in capsys.readouterr().err


def test_save_activation_refuses_a_data_folder_below_a_file(tmp_path, hopper_data, capsys):
    ck = tmp_path / "checkpoints"
    write_run(ck, "dt", epochs=(40,), data_file=hopper_data / "hopper-medium-v2.pkl")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = tmp_path / "res"
    msg = expect_exit(capsys, load_script(SAVE).main, _save_argv(ck, out, "--batch_size", "4", "--path_to_save_data",
                                                                 blocker / "x"))
    assert f"argument --path_to_save_data: {blocker / 'x'}: {blocker} is a file, not a folder" in msg
    assert not out.exists() and blocker.read_text() == "x"


def _other_data(tmp_path):
    """A folder with another hopper-medium-v2.pkl: the same batch flags draw another batch from it."""
    from decision_transformer.synthetic import make_dataset

    other = tmp_path / "other"
    make_dataset(other, "hopper", "medium", 2000, seed=5, max_ep_len=100)
    return other


def test_activations_saved_on_another_batch_than_the_data_file_are_refused(tmp_path, hopper_data, capsys):
    """One data_*.npz serves every model: saving a second model's activations on another batch of the same flags
    (other data) rewrites it with a warning, and run_mi_exp.py then refuses the first model's activations (computed
    on the old batch) with one line instead of pairing them with the wrong states and actions; the second model's
    run. Another --batch_seed writes files of its own (tagged _bseed{n}) and replaces nothing."""
    ck = tmp_path / "checkpoints"
    for m in ("dt", "gpt2"):
        write_run(ck, m, epochs=(40,), data_file=hopper_data / "hopper-medium-v2.pkl")
    out = tmp_path / "res"
    save = load_script(SAVE).main
    save([str(a) for a in _save_argv(ck, out, "--batch_size", "4")])
    capsys.readouterr()
    argv = [str(a) for a in _save_argv(ck, out, "--batch_size", "4", "--batch_seed", "1")]
    argv[argv.index("dt")] = "gpt2"
    save(argv)
    assert "held a different batch" not in capsys.readouterr().err
    assert (out / "data_hopper_medium_666_bs4_ctx3_bseed1.npz").is_file()
    save(argv[:-2] + ["--data_path", str(_other_data(tmp_path))])
    assert "held a different batch; activation files saved with it for other models no longer match" in \
        capsys.readouterr().err
    mi_argv = ["-pd", out, "-pa", out, "-psm", tmp_path / "mi", "--exp_type", "no_context", "--iters", "1",
               "--device", "cpu", "--K", "3", "--data_batch_size", "4"]
    err = expect_exit(capsys, load_script(RUN_MI).main, [*mi_argv, "--model_name", "dt"])
    tag = "_bs4_ctx3"
    assert f"{mi.activation_file(out, 40, 'dt', 'hopper', 'medium', 666, tag)}: computed on a different batch than " \
           f"{mi.data_file(out, 'hopper', 'medium', 666, tag)} holds" in err
    assert not (tmp_path / "mi").exists()
    load_script(RUN_MI).main([str(a) for a in [*mi_argv, "--model_name", "gpt2"]])
    assert (tmp_path / "mi" / "mi_40_gpt2_hopper_medium_666_it1_bs4_ctx3.npz").is_file()   # (--iters 1 etc.: tagged)


@pytest.mark.parametrize("exp_type", ["normal", "no_context"])
def test_mi_figures_warn_when_their_models_saw_different_batches(tmp_path, hopper_data, capsys, exp_type):
    """MI results record their batch: a figure drawing models whose results came from different batches (one model's
    activations saved again from other data, and its MI recomputed) says so in a warning; another --batch_seed
    writes files of its own and leaves the figure's alone."""
    ck = tmp_path / "checkpoints"
    for m in ("dt", "gpt2"):
        write_run(ck, m, epochs=(40,), data_file=hopper_data / "hopper-medium-v2.pkl")
    out = tmp_path / "res"
    save = load_script(SAVE).main
    argv = [str(a) for a in _save_argv(ck, out, "--batch_size", "4")]
    argv[argv.index("dt")] = "dt gpt2"
    argv = " ".join(argv).split()
    save(argv)
    mi_argv = ["-pd", out, "-pa", out, "-psm", out, "--exp_type", exp_type, "--iters", "1", "--mine_hidden", "4",
               "--layers", "0", "--device", "cpu", "--K", "3", "--data_batch_size", "4"]
    run_mi = load_script(RUN_MI).main
    for m in ("dt", "gpt2"):
        run_mi([str(a) for a in [*mi_argv, "--model_name", m]])
    plot = load_script(PLOT_MI).main
    plot_argv = [str(a) for a in ["--results_dir", out, "--figs_dir", tmp_path / "figs", "--model_name_list", "dt",
                                  "gpt2", "--exp_type", exp_type, "--iters", "1", "--mine_hidden", "4", "--K", "3",
                                  "--data_batch_size", "4"]]
    capsys.readouterr()
    plot(plot_argv)
    assert "different batches" not in capsys.readouterr().err
    gpt2_argv = [*argv[:argv.index("dt")], "gpt2", *argv[argv.index("gpt2") + 1:]]
    save(gpt2_argv + ["--batch_seed", "1"])
    run_mi([str(a) for a in [*mi_argv, "--model_name", "gpt2", "--batch_seed", "1"]])
    capsys.readouterr()
    plot(plot_argv)
    assert "different batches" not in capsys.readouterr().err
    save(gpt2_argv + ["--data_path", str(_other_data(tmp_path))])
    run_mi([str(a) for a in [*mi_argv, "--model_name", "gpt2"]])
    capsys.readouterr()
    plot(plot_argv)
    assert "were computed on different batches, so the figure compares models that did not see the same batch" in \
        capsys.readouterr().err


# ---- 4. malformed mi_data_*.npy ------------------------------------------------------------------------------------

@pytest.mark.parametrize("array, msg", [
    (np.array(["a", "b"]), "array 'MI' is not numeric"),
    (np.array(1.0), "an array of shape []; run_mi_exp.py writes a 1-D array"),
    (np.ones((2, 3)), "an array of shape [2, 3]; run_mi_exp.py writes a 1-D array"),
    (np.array([1.0, np.inf]), "array 'MI' has infinite values"),
])
def test_plot_mi_data_refuses_malformed_results(tmp_path, capsys, array, msg):
    res = tmp_path / "res"
    res.mkdir()
    f = res / "mi_data_state_action_hopper_medium_666.npy"
    np.save(f, array)
    np.save(res / "mi_data_rtg_action_hopper_medium_666.npy", np.linspace(0, 1, 3))
    err = expect_exit(capsys, load_script(PLOT_MI_DATA).main, ["--results_dir", res, "--figs_dir", tmp_path / "figs",
                                                               "--env_name", "hopper"])
    assert f"{f}: {msg}" in err
    assert not (tmp_path / "figs").exists()


def test_plot_mi_data_accepts_nan_estimates(tmp_path, capsys):
    """Failed estimates are NaN (what run_mi_exp.py writes for them): drawn without them, no warning."""
    res = tmp_path / "res"
    res.mkdir()
    for w in ("state", "rtg"):
        np.save(res / f"mi_data_{w}_action_hopper_medium_666.npy", np.array([0.5, np.nan, 1.0]))
    load_script(PLOT_MI_DATA).main(["--results_dir", res, "--figs_dir", tmp_path / "figs", "--env_name", "hopper"])
    assert "warning" not in capsys.readouterr().err
    assert (tmp_path / "figs" / "mi_data_hopper_medium_666.png").is_file()


def test_plot_mi_data_refuses_state_and_rtg_results_of_different_lengths(tmp_path, capsys):
    """The two files of one env come from one data file, so one timestep count: a state result of 3 beside an rtg
    result of 5 (one of them from another run) is refused naming both, not drawn as if they matched."""
    res = tmp_path / "res"
    res.mkdir()
    np.save(res / "mi_data_state_action_hopper_medium_666.npy", np.linspace(0, 1, 3))
    np.save(res / "mi_data_rtg_action_hopper_medium_666.npy", np.linspace(0, 1, 5))
    err = expect_exit(capsys, load_script(PLOT_MI_DATA).main, ["--results_dir", res, "--figs_dir", tmp_path / "figs",
                                                               "--env_name", "hopper"])
    assert (f"{res / 'mi_data_state_action_hopper_medium_666.npy'} has 3 timesteps but "
            f"{res / 'mi_data_rtg_action_hopper_medium_666.npy'} has 5") in err
    assert not (tmp_path / "figs").exists()


# ---- 5. every estimate NaN -----------------------------------------------------------------------------------------

def test_all_nan_results_are_warned_about(tmp_path, capsys):
    res, figs = tmp_path / "res", tmp_path / "figs"
    res.mkdir()
    nan = np.full(8, np.nan)
    xy = res / "mi_xy_0_40_dt_hopper_medium_666.npz"
    np.savez(xy, **_xy(x=nan, y=nan))
    blocks = res / "mi_40_dt_hopper_medium_666.npz"
    np.savez(blocks, **{f"{b}.mlp.dropout": np.full((2, 3), np.nan) for b in range(2)})
    data = [res / f"mi_data_{w}_action_hopper_medium_666.npy" for w in ("state", "rtg")]
    for f in data:
        np.save(f, np.full(3, np.nan))
    plot = load_script(PLOT_MI).main
    argv = ["--results_dir", res, "--figs_dir", figs, "--model_name_list", "dt"]
    capsys.readouterr()
    plot(argv)
    err = capsys.readouterr().err
    assert f"warning: {xy}: every x and y estimate is NaN" in err
    assert "RuntimeWarning" not in err
    plot(argv + ["--exp_type", "no_context"])
    err = capsys.readouterr().err
    assert f"warning: {blocks}: every state and action estimate is NaN" in err
    assert "RuntimeWarning" not in err
    load_script(PLOT_MI_DATA).main(["--results_dir", res, "--figs_dir", figs, "--env_name", "hopper"])
    err = capsys.readouterr().err
    assert all(f"warning: {f}: every estimate is NaN" in err for f in data)
    assert {p.name for p in figs.glob("*.png")} == {"mi_xy_40_dt_hopper_medium_666.png",
                                                    "mi_no_context_40_dt_hopper_medium_666.png",
                                                    "mi_data_hopper_medium_666.png"}


def test_some_nan_estimates_or_one_all_nan_block_are_not_warned_about(tmp_path, capsys):
    """A warning only when every estimate of x (or y), or of state (or action) in every block, is NaN; numpy's
    RuntimeWarnings over an all-NaN block are not shown (nor raised)."""
    import warnings

    res, figs = tmp_path / "res", tmp_path / "figs"
    res.mkdir()
    x = np.linspace(0, 1, 8)
    x[3] = np.nan
    np.savez(res / "mi_xy_0_40_dt_hopper_medium_666.npz", **_xy(x=x, depth=np.array(1)))   # all of a 1-block model
    partial = np.ones((2, 3))
    partial[:, 1] = np.nan                                       # some NaN in every block, all NaN in none but 0
    np.savez(res / "mi_40_dt_hopper_medium_666.npz", **{"0.mlp.dropout": np.full((2, 3), np.nan),
                                                        "1.mlp.dropout": partial})
    plot = load_script(PLOT_MI).main
    argv = ["--results_dir", res, "--figs_dir", figs, "--model_name_list", "dt"]
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot(argv)
        plot(argv + ["--exp_type", "no_context"])
    assert "warning" not in capsys.readouterr().err
    assert [w for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert {p.name for p in figs.glob("*.png")} == {"mi_xy_40_dt_hopper_medium_666.png",
                                                    "mi_no_context_40_dt_hopper_medium_666.png"}


# ---- 6. models / envs without results ------------------------------------------------------------------------------

def test_missing_models_and_envs_are_warned_about(tmp_path, capsys):
    res, figs = tmp_path / "res", tmp_path / "figs"
    res.mkdir()
    np.savez(res / "mi_xy_0_40_dt_hopper_medium_666.npz", **_xy(depth=np.array(1)))   # all of a 1-block model
    np.savez(res / "mi_40_dt_hopper_medium_666.npz", **{f"{b}.mlp.dropout": np.ones((2, 3)) for b in range(2)})
    for w in ("state", "rtg"):
        np.save(res / f"mi_data_{w}_action_hopper_medium_666.npy", np.linspace(0, 1, 3))
    np.save(res / "mi_data_state_action_walker2d_medium_666.npy", np.linspace(0, 1, 3))     # its rtg file missing
    plot = load_script(PLOT_MI).main
    argv = ["--results_dir", res, "--figs_dir", figs, "--model_name_list", "dt", "gpt2", "igpt"]
    capsys.readouterr()
    plot(argv)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert lines == [f"warning: {res}/mi_xy_*_40_{m}_hopper_medium_666.npz not found; that model is left out of the "
                     f"figure" for m in ("gpt2", "igpt")]
    plot(argv + ["--exp_type", "no_context"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert lines == [f"warning: {res}/mi_40_{m}_hopper_medium_666.npz not found; that model is left out of the figure"
                     for m in ("gpt2", "igpt")]
    load_script(PLOT_MI_DATA).main(["--results_dir", res, "--figs_dir", figs, "--env_name_list", "hopper",
                                    "walker2d", "halfcheetah"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert len(lines) == 2
    assert f"{res}/mi_data_rtg_action_walker2d_medium_666.npy not found; that env is left out" in lines[0]
    assert "mi_data_state_action_walker2d" not in lines[0]
    assert f"{res}/mi_data_state_action_halfcheetah_medium_666.npy and " in lines[1]
    assert (figs / "mi_data_hopper_medium_666.png").is_file()


def test_nothing_found_is_still_an_error(tmp_path, capsys):
    res = tmp_path / "res"
    res.mkdir()
    argv = ["--results_dir", res, "--figs_dir", tmp_path / "figs"]
    plot = load_script(PLOT_MI).main
    assert "no MI results mi_xy_*" in expect_exit(capsys, plot, argv + ["--model_name_list", "gpt2", "igpt"])
    assert "no MI results" in expect_exit(capsys, plot, argv + ["--exp_type", "no_context"])
    msg = expect_exit(capsys, load_script(PLOT_MI_DATA).main, argv + ["--env_name_list", "hopper", "walker2d"])
    assert "no data-MI results" in msg
    assert not (tmp_path / "figs").exists()
