"""Bad input of the analysis scripts: corrupt .npz / .npy files, non-finite MINE inputs, metrics rows with a
non-integer iteration, CKA results that do not match their layer list, and numeric flags out of range: one line
``error: ...``, exit 2, nothing written."""
import io
import json
import struct
import sys
import types

import numpy as np
import pytest
from test_analysis_support import expect_exit, load_script, write_run

from decision_transformer.analysis import common, curves, mi
from decision_transformer.analysis.activations import BLOCK_ENTRIES
from decision_transformer.analysis.runs import RunKey
from decision_transformer.errors import UserError

SCRIPTS = {
    "conf": "analysis/section-54-gradient-analysis/compute_grad_confusion.py",
    "norm": "analysis/section-54-gradient-analysis/compute_grad_norm.py",
    "clip": "analysis/section-54-gradient-analysis/plot_learning_curve_grad_clip.py",
    "cka": "analysis/section-51-activation-similarity/compute_cka.py",
    "plot_cka": "analysis/section-51-activation-similarity/plot_cka.py",
    "nc": "analysis/section-55-fine-tuning-no-context/plot_learning_curve_no_context.py",
    "score": "analysis/section-4-sanity-check/compute_normalized_score.py",
    "params": "analysis/section-53-parameter-similarity/parameter_similarity_analysis.py",
    "att": "analysis/section-56-dependence-on-context/compute_attention_distance.py",
    "save": "mine/save_activation.py",
    "mine": "mine/run_mi_exp.py",
    "plot_mi": "analysis/section-52-mutual-information/plot_mutual_information.py",
    "plot_mi_data": "analysis/section-52-mutual-information/plot_mutual_information_data.py",
    "all": "analysis/run_all.py",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, hopper_data):
    """checkpoints/ with dt runs of K=20 (epochs 0, 1, 40) and K=1 (epochs 0, 1, 4)."""
    root = tmp_path_factory.mktemp("bad_input2") / "checkpoints"
    for K, epochs in ((20, (0, 1, 40)), (1, (0, 1, 4))):
        write_run(root, "dt", K=K, epochs=epochs, data_file=hopper_data / "hopper-medium-v2.pkl")
    return root


def _argv(script, ck, out):
    """A script's command line on ``runs`` that would work but for the flag under test, writing under ``out``."""
    res = ["--results_dir", out / "res", "--figs_dir", out / "figs"]
    ckpt = ["--checkpoint_dir", ck, "--env_name_list", "hopper"]
    small = ["--K", "3", "--batch_size", "4", "--device", "cpu"]
    return {"conf": ckpt + ["--model_name_list", "dt"] + small + res,
            "norm": ckpt + ["--model_name_list", "dt"] + small + res,
            "clip": ckpt + ["--model_name", "dt", "--max_epoch", "2"] + res,
            "cka": ckpt + ["--model_name1", "dt", "--model_name2", "dt", "--no_heatmap"] + small + res,
            "plot_cka": ["--env_name_list", "hopper", "--model_name_list", "dt"] + res,
            "nc": ckpt + ["--model_name_list", "dt"] + res,
            "score": ckpt + ["--model_name_list", "dt", "--seed_list", "666"] + res,
            "params": ["-plm", ck, "--model_name_list", "dt"] + res,
            "att": ckpt + ["--model_name_list", "dt"] + small + res,
            "save": ckpt + ["--model_name", "dt"] + small + ["--results_dir", out / "res"],
            "mine": ["-psm", out / "res", "-pd", out.parent, "-pa", out.parent, "--device", "cpu"],
            "plot_mi": res, "plot_mi_data": res,
            "all": ["--checkpoint_dir", ck, "--out_dir", out, "--only", "params"]}[script]


@pytest.mark.parametrize("script, flags, msg", [
    ("conf", ["--max_grad_memory_gb", "nan"], "invalid --max_grad_memory_gb nan: use a positive number"),
    ("norm", ["--max_grad_memory_gb", "inf"], "invalid --max_grad_memory_gb inf"),
    ("norm", ["--max_grad_memory_gb", "0"], "invalid --max_grad_memory_gb 0.0"),
    ("conf", ["--max_grad_memory_gb", "-1"], "invalid --max_grad_memory_gb -1.0"),
    ("norm", ["--top_k", "0"], "invalid --top_k 0: use an integer >= 1"),
    ("norm", ["--top_k", "-1"], "invalid --top_k -1"),
    ("norm", ["--grad_seed", "-1"], "invalid --grad_seed -1: use a non-negative integer below 2**32"),
    ("conf", ["--grad_seed", str(2 ** 32)], f"invalid --grad_seed {2 ** 32}"),
    ("conf", ["--batch_seed", "-1"], "invalid --batch_seed -1"),
    ("conf", ["--epoch", "-1"], "invalid --epoch -1: use an integer >= 0"),
    ("conf", ["--eps", "-1"], "invalid --eps -1.0: use a number >= 0"),
    ("conf", ["--eps", "inf"], "invalid --eps inf"),
    ("cka", ["--eps", "-1"], "invalid --eps -1.0: use a number >= 0"),
    ("cka", ["--eps", "nan"], "invalid --eps nan"),
    ("cka", ["--kernel", "rbf", "--rbf_threshold", "nan"], "invalid --rbf_threshold nan: use a positive number"),
    ("cka", ["--kernel", "rbf", "--rbf_threshold", "-1"], "invalid --rbf_threshold -1.0"),
    ("cka", ["--batch_seed", "-2"], "invalid --batch_seed -2"),
    ("cka", ["--seed", "-1"], "invalid --seed -1"),
    ("cka", ["--epoch1", "-1"], "invalid --epoch1 -1"),
    ("plot_cka", ["-thr", "nan"], "invalid --thr nan: use a finite number"),
    ("plot_cka", ["--epoch2", "-40"], "invalid --epoch2 -40"),
    ("nc", ["-block", "--smoothing", "nan"], "invalid --smoothing nan: use a number in [0, 1)"),
    ("nc", ["-block", "--smoothing", "2"], "invalid --smoothing 2.0"),
    ("nc", ["-block", "--smoothing", "-1"], "invalid --smoothing -1.0"),
    ("nc", ["-block", "--smoothing", "1"], "invalid --smoothing 1.0"),
    ("nc", ["--max_epoch", "-1"], "invalid --max_epoch -1"),
    ("nc", ["-block", "--max_epoch", "0"], "invalid --max_epoch 0"),
    ("nc", ["--seed", "-666"], "invalid --seed -666"),
    ("clip", ["--K", "0"], "invalid --K 0"),
    ("clip", ["--max_epoch", "0"], "invalid --max_epoch 0"),
    ("score", ["--seed_list", "666", "-42"], "invalid --seed_list -42"),
    ("score", ["--K", "-1"], "invalid --K -1"),
    ("params", ["--seed", "-1"], "invalid --seed -1"),
    ("params", ["--epoch2", "-1"], "invalid --epoch2 -1"),
    ("att", ["--batch_seed", "-1"], "invalid --batch_seed -1"),
    ("att", ["--epoch1", "-1"], "invalid --epoch1 -1"),
    ("save", ["--batch_seed", "-1"], "invalid --batch_seed -1"),
    ("save", ["--epoch", "-1"], "invalid --epoch -1"),
    ("mine", ["--epoch", "-1"], "invalid --epoch -1"),
    ("plot_mi", ["--seed", "-1"], "invalid --seed -1"),
    ("plot_mi_data", ["--seed", str(2 ** 40)], f"invalid --seed {2 ** 40}"),
    ("all", ["--grad_batch_size", "1"], "invalid --grad_batch_size 1: use an integer >= 2"),
    ("all", ["--batch_size", "3"], "invalid --batch_size 3: use an integer >= 4"),     # up front, not at the CKA step
    ("all", ["--grad_batch_size", "100001"], "--grad_batch_size 100001 is too large (at most 100,000)"),
    ("all", ["--mine_iters", "0"], "invalid --mine_iters 0"),
    ("all", ["--grad_epoch", "-1"], "invalid --grad_epoch -1"),
    ("all", ["--seed", "-1"], "invalid --seed -1"),
])
def test_numeric_flags(runs, tmp_path, capsys, script, flags, msg):
    out = tmp_path / "out"
    err = expect_exit(capsys, load_script(SCRIPTS[script]).main, _argv(script, runs, out) + flags)
    assert msg in err
    assert not out.exists()                                                   # checked before anything is written


# ---- corrupt files ----------------------------------------------------------------------------------------------

def _npz_bytes(compressed=False, **arrays) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _corrupt_variants() -> dict:
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((40, 30)), "b": np.arange(10)}
    plain, packed = _npz_bytes(**arrays), _npz_bytes(True, **arrays)
    bad_deflate = bytearray(packed)                                          # a reserved deflate block type
    name_len, extra_len = struct.unpack("<HH", packed[26:30])
    bad_deflate[30 + name_len + extra_len:34 + name_len + extra_len] = b"\xff" * 4
    end = plain.index(b"}", plain.index(b"{'descr'"))
    bad_header = plain[:end] + b" " + plain[end + 1:]                        # an unbalanced member header
    npy = io.BytesIO()
    np.save(npy, arrays["a"])
    return {"truncated": plain[:len(plain) // 2], "zlib": bytes(bad_deflate), "header": bad_header,
            "npy": npy.getvalue()}


@pytest.mark.parametrize("variant", list(_corrupt_variants()))
def test_load_npz_refuses_corrupt_archives(tmp_path, variant):
    f = tmp_path / "x.npz"
    f.write_bytes(_corrupt_variants()[variant])
    with pytest.raises(UserError, match=r"x\.npz: not a (readable )?\.npz file"):
        common.load_npz(f)


def test_load_npy_refuses_an_npz_archive(tmp_path):
    f = tmp_path / "x.npy"
    f.write_bytes(_npz_bytes(a=np.ones(3)))
    with pytest.raises(UserError, match=r"x\.npy: not a \.npy file \(found an \.npz archive\)"):
        common.load_npy(f)


B, K, D, DEPTH = 6, 3, 5, 4


def _mi_inputs(folder, **changes):
    """A data file and a 4-block activation file as save_activation.py writes them, with ``changes`` applied."""
    rng = np.random.default_rng(0)
    data = {"states": rng.standard_normal((B, K, 11)), "actions": rng.standard_normal((B, K, 3)),
            "rtg": rng.standard_normal((B, K + 1, 1)), "timesteps": np.zeros((B, K)), "attention_mask": np.ones((B, K))}
    acts = {f"{i}.mlp.dropout": rng.standard_normal((B, 3 * K, D)).astype(np.float32) for i in range(DEPTH)}
    for k, v in changes.items():
        (acts if k[0].isdigit() else data)[k] = v
    return (common.save_npz(mi.data_file(folder, "hopper", "medium", 666), **data),
            common.save_npz(mi.activation_file(folder, 40, "gpt2", "hopper", "medium", 666), **acts))


def _mine(folder, *extra):
    return ["-psm", folder / "out", "-pd", folder, "-pa", folder, "--iters", 1, "--mine_hidden", 4, "--batch_size", 4,
            "--device", "cpu", *extra]


def test_truncated_npz_files_are_one_line_errors(tmp_path, capsys):
    data, act = _mi_inputs(tmp_path)
    run_mi = load_script(SCRIPTS["mine"]).main
    good = act.read_bytes()
    act.write_bytes(good[:len(good) // 2])                                   # as `head -c N good.npz > bad.npz`
    msg = expect_exit(capsys, run_mi, _mine(tmp_path))
    assert f"{act}: not a readable .npz file" in msg
    good = data.read_bytes()
    data.write_bytes(good[:len(good) // 2])
    msg = expect_exit(capsys, run_mi, _mine(tmp_path, "--exp_type", "data"))
    assert f"{data}: not a readable .npz file" in msg
    assert not (tmp_path / "out").exists()
    res = tmp_path / "res"
    result = res / "mi_xy_0_40_gpt2_hopper_medium_666.npz"
    result.parent.mkdir()
    good = _npz_bytes(x=np.ones(8), y=np.ones(8), position=np.arange(8), token=np.arange(8) % 3)
    result.write_bytes(good[:len(good) // 2])
    plot = load_script(SCRIPTS["plot_mi"]).main
    msg = expect_exit(capsys, plot, ["--results_dir", res, "--figs_dir", tmp_path / "figs", "--model_name_list",
                                     "gpt2"])
    assert f"{result}: not a readable .npz file" in msg and not (tmp_path / "figs").exists()


@pytest.mark.parametrize("exp_type, change, msg", [
    ("data", {"states": np.full((B, K, 11), np.nan)}, "data_hopper_medium_666.npz: array 'states' has NaN"),
    ("normal", {"rtg": np.full((B, K + 1, 1), np.inf)}, "data_hopper_medium_666.npz: array 'rtg' has NaN or infinite"),
    ("normal", {"1.mlp.dropout": np.full((B, 3 * K, D), np.nan, np.float32)},
     "activation_40_gpt2_hopper_medium_666.npz: array '1.mlp.dropout' has NaN or infinite values"),
    ("no_context", {"3.mlp.dropout": np.zeros((B, 3 * K - 3, D), np.float32)},
     "activation 3.mlp.dropout has shape (6, 6, 5), the data file's batch needs [6, 9, D]"),
    ("data", {"rtg": np.zeros((B, K, 1))},
     "arrays of shapes attention_mask (6, 3), states (6, 3, 11), actions (6, 3, 3), rtg (6, 3, 1)"),
])
def test_mine_refuses_non_finite_and_misshapen_inputs(tmp_path, capsys, exp_type, change, msg):
    _mi_inputs(tmp_path, **change)
    err = expect_exit(capsys, load_script(SCRIPTS["mine"]).main, _mine(tmp_path, "--exp_type", exp_type))
    assert msg in err
    assert not (tmp_path / "out").exists()


def test_mine_checks_every_layer_before_writing(tmp_path, capsys):
    _, act = _mi_inputs(tmp_path)
    err = expect_exit(capsys, load_script(SCRIPTS["mine"]).main, _mine(tmp_path, "--layers", 0, 7))
    assert not (tmp_path / "out").exists()                                   # layer 0 is not estimated first
    assert f"no activation 7.mlp.dropout in {act} (depth 4)" in err


# ---- CKA results against their layer list -----------------------------------------------------------------------

def test_plot_cka_without_results_names_the_commands_and_run_alls_folder(tmp_path, capsys):
    """No results in --results_dir: the error says what writes them, and where run_all.py keeps its own."""
    plot = load_script(SCRIPTS["plot_cka"]).main
    msg = expect_exit(capsys, plot, ["--env_name_list", "hopper", "--model_name_list", "dt", "--token_list", "state",
                                     "--results_dir", tmp_path / "empty", "--figs_dir", tmp_path / "figs"])
    assert msg.startswith("error: no CKA results for hopper/state: looked for ")
    assert "(run compute_cka.py --model_name1 M --model_name2 M --epoch1 0 --epoch2 40;" in msg
    assert msg.rstrip().endswith("run_all.py keeps its results under its --out_dir: --results_dir "
                                 "OUT/section-51-activation-similarity/results)")
    assert not (tmp_path / "figs").exists()


def test_plot_cka_refuses_a_matrix_of_another_model(tmp_path, capsys):
    """A 3 x 3 matrix next to the layer list of a 3-block model (27 hooked layers): refused, not a 3-point curve."""
    res = tmp_path / "res"
    stem = res / "cka_0_40_dtdt_hopper_medium_666"
    names = [f"{b}.{e}" for b in range(3) for e in BLOCK_ENTRIES]
    common.save_csv(f"{stem}_layers.csv", ["axis", "index", "layer"],
                    [[axis, i, n] for axis in ("rows", "cols") for i, n in enumerate(names)])
    common.save_npy(f"{stem}_state.npy", np.eye(3))
    plot = load_script(SCRIPTS["plot_cka"]).main
    argv = ["--env_name_list", "hopper", "--model_name_list", "dt", "--token_list", "state", "--results_dir", res,
            "--figs_dir", tmp_path / "figs"]
    msg = expect_exit(capsys, plot, argv)
    assert f"{stem}_state.npy: a CKA matrix of shape (3, 3), but {stem}_layers.csv lists 27 layers" in msg
    common.save_npy(f"{stem}_state.npy", np.eye(27))
    common.save_csv(f"{stem}_layers.csv", ["axis", "index", "layer"],
                    [["rows", i, n] for i, n in enumerate(names)] + [["cols", i, n] for i, n in enumerate(names[:-1])]
                    + [["cols", 26, "2.ln_1"]])
    assert "rows and columns differ" in expect_exit(capsys, plot, argv)
    (res / "cka_0_40_dtdt_hopper_medium_666_layers.csv").write_text("axis,index,name\nrows,0,0.ln_1\n")
    assert "_layers.csv: line 2 is not an axis,index,layer row" in expect_exit(capsys, plot, argv)
    assert not (tmp_path / "figs").exists() and not list(res.glob("cka_plot_*"))


def test_plot_cka_refuses_a_complex_matrix(tmp_path, capsys):
    """A complex matrix passed as numeric and finite (numpy's ComplexWarning, a figure of the real parts); now one line
    as in the MI plots."""
    res = tmp_path / "res"
    stem = res / "cka_0_40_dtdt_hopper_medium_666"
    names = [f"{b}.{e}" for b in range(3) for e in BLOCK_ENTRIES]
    common.save_csv(f"{stem}_layers.csv", ["axis", "index", "layer"],
                    [[axis, i, n] for axis in ("rows", "cols") for i, n in enumerate(names)])
    common.save_npy(f"{stem}_state.npy", np.eye(27) * (0.5 + 0.1j))
    argv = ["--env_name_list", "hopper", "--model_name_list", "dt", "--token_list", "state", "--results_dir", res,
            "--figs_dir", tmp_path / "figs"]
    msg = expect_exit(capsys, load_script(SCRIPTS["plot_cka"]).main, argv)
    assert f"{stem}_state.npy: array 'CKA matrix' is not real (complex128)" in msg
    assert not (tmp_path / "figs").exists() and not list(res.glob("cka_plot_*"))


# ---- metrics rows -----------------------------------------------------------------------------------------------

def test_non_integer_iteration_names_the_file_and_line(tmp_path, capsys):
    ck = tmp_path / "checkpoints"
    score = load_script(SCRIPTS["score"]).main
    nc = load_script(SCRIPTS["nc"]).main
    files = []
    for K in (20, 1):
        d = write_run(ck, "dt", K=K, epochs=(1,), returns=[10.0, 20.0, 30.0])
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        rows[1]["iteration"] = 2.0                                           # an integral float is an iteration
        (d / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in rows[1:]))
        files.append((d / "metrics.jsonl", rows))
    argv = ["--checkpoint_dir", ck, "--env_name_list", "hopper", "--model_name_list", "dt",
            "--results_dir", tmp_path / "res", "--figs_dir", tmp_path / "figs"]
    score(argv + ["--seed_list", "666"])
    for f, rows in files:
        rows[2]["iteration"] = "x"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + "\n" + json.dumps(rows[2]) + "\n")
    msg = expect_exit(capsys, score, argv + ["--seed_list", "666"])
    assert f"{files[0][0]}: line 4 has a non-integer iteration 'x'" in msg
    msg = expect_exit(capsys, nc, argv)
    assert f"{files[1][0]}: line 4 has a non-integer iteration 'x'" in msg


def test_wandb_row_with_a_non_integer_iteration(monkeypatch):
    class Run:
        name, state = "gym-experiment-hopper-medium-dt-666", "finished"

        def scan_history(self):
            return [{"_step": 0, "evaluation/target_3600_return_mean": 1.0},
                    {"_step": 1, "iteration": "x", "evaluation/target_3600_return_mean": 2.0}]

    class Api:
        def runs(self, path, filters=None):
            return [Run()]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=Api))
    with pytest.raises(UserError, match="WandB run gym-experiment-hopper-medium-dt-666: row 2 has a non-integer "
                                        "iteration 'x'"):
        curves.run_metrics("unused", RunKey("dt", "medium", "hopper", 666), True)


def test_parameter_similarity_refuses_non_finite_weights(runs, tmp_path, capsys):
    """A NaN weight in an epoch's checkpoint is one line naming the file and tensor, as for the other analyses, not
    NaN distances written with exit 0."""
    import shutil

    import torch

    ck = tmp_path / "checkpoints"
    shutil.copytree(runs, ck)
    path = next(ck.glob("dt_medium_hopper_666*/model_40.pt"))
    obj = torch.load(path, weights_only=True)
    obj["state_dict"]["transformer.h.1.mlp.c_fc.weight"][0, 0] = float("nan")
    torch.save(obj, path)
    main = load_script(SCRIPTS["params"]).main
    msg = expect_exit(capsys, main, _argv("params", ck, tmp_path / "out"))
    assert "model_40.pt" in msg and "transformer.h.1.mlp.c_fc.weight contains NaN or inf" in msg
    assert not list((tmp_path / "out").rglob("paramdist_*"))


@pytest.mark.parametrize("arrays, msg", [
    ({"0.mlp.dropout": np.zeros((2, 3)), "1.mlp.dropout": np.zeros((2, 4))}, "different K ([3, 4])"),
    ({"0.mlp.dropout": np.zeros((2, 3)), "1.mlp.dropout": np.zeros((3, 3))}, "shape [3, 3], expected [2, K]"),
    ({"0.mlp.dropout": np.zeros((2, 3)), "last": np.zeros((2, 3))}, "'last' is not named {block}.{module}"),
    ({"0.mlp.dropout": np.array([["a", "b"], ["c", "d"]])}, "is not numeric"),
])
def test_plot_mi_no_context_refuses_malformed_results(tmp_path, capsys, arrays, msg):
    """A no-context MI result with blocks of different K, a wrong shape, a key that is not a block's or text
    arrays: one line naming the file, no traceback, no figure."""
    res = tmp_path / "res"
    res.mkdir()
    np.savez(res / "mi_40_dt_hopper_medium_666.npz", **arrays)
    main = load_script(SCRIPTS["plot_mi"]).main
    err = expect_exit(capsys, main, ["--results_dir", res, "--figs_dir", tmp_path / "figs", "--exp_type",
                                     "no_context", "--model_name_list", "dt"])
    assert "mi_40_dt_hopper_medium_666.npz" in err and msg in err
    assert not (tmp_path / "figs").exists() or not list((tmp_path / "figs").iterdir())


def test_plot_mi_normal_panels_fit_every_model(tmp_path, monkeypatch):
    """Each panel's y range covers the largest MI of every model drawn in it, not only the last model's."""
    import matplotlib.figure

    res = tmp_path / "res"
    res.mkdir()
    pos = np.arange(6)
    for model, value in (("gpt2", 8.0), ("dt", 0.5)):
        full = np.full(6, value)
        np.savez(res / f"mi_xy_0_40_{model}_hopper_medium_666.npz", x=full, y=full / 2, position=pos, token=pos % 3)
    limits = []
    real_savefig = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **kw):
        limits.append([ax.get_ylim() for ax in fig.axes])
        return real_savefig(fig, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    load_script(SCRIPTS["plot_mi"]).main(["--results_dir", str(res), "--figs_dir", str(tmp_path / "figs"),
                                          "--model_name_list", "gpt2", "dt"])
    assert limits and limits[0][0] == pytest.approx((-0.1, 8.2)) and limits[0][1] == pytest.approx((-0.1, 5.5))


def _copy_runs(runs, tmp_path):
    import shutil

    ck = tmp_path / "checkpoints"
    shutil.copytree(runs, ck)
    return ck


def test_a_corrupt_metrics_file_is_an_error_not_a_missing_run(runs, tmp_path, capsys):
    """A run whose metrics.jsonl exists but is not valid JSON stops the score table and the curves with one line
    naming the file and line (it is not shown as 'n/a'); run_all reports the failed analysis and exits non-zero."""
    ck = _copy_runs(runs, tmp_path)
    metrics = next(ck.glob("dt_medium_hopper_666/metrics.jsonl"))
    n = len(metrics.read_text().splitlines())
    with metrics.open("a") as f:
        f.write("{bad\n")
    score = load_script(SCRIPTS["score"]).main
    msg = expect_exit(capsys, score, _argv("score", ck, tmp_path / "o1") + ["--K", "20"])
    assert f"{metrics}: line {n + 1} is not valid JSON" in msg
    nc = load_script(SCRIPTS["nc"]).main
    msg = expect_exit(capsys, nc, _argv("nc", ck, tmp_path / "o2"))
    assert f"line {n + 1} is not valid JSON" in msg
    run_all = load_script(SCRIPTS["all"]).main
    msg = expect_exit(capsys, run_all, ["--checkpoint_dir", ck, "--out_dir", tmp_path / "o3", "--only", "scores"])
    assert "1 analyses failed (scores)" in msg
    assert "is not valid JSON" in (tmp_path / "o3" / "report.md").read_text()


def test_missing_runs_are_notes_in_the_outputs(runs, tmp_path, capsys):
    """A run without metrics is skipped with a note (printed, and carried into run_all's report), and an env
    without runs gets no panel (and no matplotlib empty-legend warning)."""
    import warnings

    from decision_transformer.analysis import scores

    args = scores.build_parser().parse_args([str(a) for a in _argv("score", runs, tmp_path / "o")]
                                            + ["--K", "20", "--seed_list", "666", "667"])
    outs = scores.run(args)
    assert any(n.startswith("skipped: no run dt_medium_hopper_667 in ") for n in outs.notes), outs.notes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o = curves.run_no_context(curves.build_no_context_parser().parse_args(
            [str(a) for a in _argv("nc", runs, tmp_path / "o")] + ["--env_name_list", "hopper", "walker2d"]))
    assert any("walker2d" in n for n in o.notes)


@pytest.mark.parametrize("script", ["score", "nc", "clip"])
def test_a_misspelt_env_name_lists_the_known_envs(runs, tmp_path, capsys, script):
    main = load_script(SCRIPTS[script]).main
    argv = [str(a) for a in _argv(script, runs, tmp_path / "o")]
    argv[argv.index("hopper")] = "hoper"
    msg = expect_exit(capsys, main, argv)
    assert "unknown env 'hoper'; choose one of hopper, halfcheetah, walker2d" in msg


@pytest.mark.parametrize("script", ["score", "nc", "clip"])
def test_a_metrics_file_that_is_not_text_is_one_line(runs, tmp_path, capsys, script):
    """Random bytes in metrics.jsonl: one line naming the file (it was a UnicodeDecodeError traceback)."""
    ck = _copy_runs(runs, tmp_path)
    metrics = next(ck.glob("dt_medium_hopper_666/metrics.jsonl"))
    metrics.write_bytes(bytes(range(128, 256)) * 3)
    argv = [str(a) for a in _argv(script, ck, tmp_path / "o")]
    msg = expect_exit(capsys, load_script(SCRIPTS[script]).main, argv + (["--K", "20"] if script == "score" else []))
    assert f"{metrics}: not a text file (byte 0 is not UTF-8)" in msg


def _set_returns(metrics, value: str):
    """Every ``evaluation/target_3600_return_mean`` of a metrics.jsonl set to ``value`` (JSON text)."""
    import json

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    text = ""
    for r in rows:
        if "evaluation/target_3600_return_mean" in r:
            r["evaluation/target_3600_return_mean"] = "@"
        text += json.dumps(r).replace('"@"', value) + "\n"
    metrics.write_text(text)


@pytest.mark.parametrize("value", ['"high"', "Infinity", "true", "[1]", "NaN"])
def test_a_return_that_is_not_a_number_is_one_line(runs, tmp_path, capsys, value):
    """A return logged as a string, inf, a bool, a list or NaN (a run writes null for a value not computed, and stops
    rather than log a NaN return) is damage, named by file and row (strings and NaN were read as not computed, so
    --select last reported an earlier iteration as the last; inf was tabled as 'inf')."""
    ck = _copy_runs(runs, tmp_path)
    metrics = next(ck.glob("dt_medium_hopper_666/metrics.jsonl"))
    _set_returns(metrics, value)
    msg = expect_exit(capsys, load_script(SCRIPTS["score"]).main, [str(a) for a in _argv("score", ck, tmp_path / "o")]
                      + ["--K", "20"])
    assert f"{metrics}: row " in msg and "has evaluation/target_3600_return_mean = " in msg
    assert msg.rstrip().endswith("not a number")


def test_a_run_whose_returns_are_all_null_is_skipped_with_a_note(runs, tmp_path):
    """Null returns (values not computed) leave the run out with a note rather than an 'n/a' row of -1 epochs."""
    from decision_transformer.analysis import scores

    ck = _copy_runs(runs, tmp_path)
    _set_returns(next(ck.glob("dt_medium_hopper_666/metrics.jsonl")), "null")
    args = scores.build_parser().parse_args([str(a) for a in _argv("score", ck, tmp_path / "o")]
                                            + ["--K", "20", "--seed_list", "666", "667"])
    with pytest.raises(UserError, match="no runs found for the score table: .*every "
                                        "evaluation/target_3600_return_mean value is null"):
        scores.run(args)


@pytest.mark.parametrize("script, flag", [("score", "--seed_list"), ("score", "--model_name_list"),
                                          ("nc", "--env_name_list"), ("conf", "--model_name_list")])
def test_a_value_given_twice_in_a_list_flag_is_refused(runs, tmp_path, capsys, script, flag):
    """--seed_list 666 666 counted one run twice (a '± 0.0' over one seed); every list flag refuses a repeat."""
    argv = [str(a) for a in _argv(script, runs, tmp_path / "o")]
    value = {"--seed_list": "666", "--model_name_list": "dt", "--env_name_list": "hopper"}[flag]
    argv += [flag, value, value]
    msg = expect_exit(capsys, load_script(SCRIPTS[script]).main, argv)
    assert f"argument {flag}: {value} is given twice" in msg


def _edit_checkpoint(ck, pattern: str, edit):
    import torch

    path = next(ck.glob(pattern))
    obj = torch.load(path, weights_only=True)
    edit(obj)
    torch.save(obj, path)
    return path


def _overflowing(obj):
    """Finite weights whose forward pass overflows: every c_fc weight 1e30."""
    for k, v in obj["state_dict"].items():
        if k.endswith("mlp.c_fc.weight"):
            v.fill_(1e30)


@pytest.mark.parametrize("script, extra, msg", [
    ("cka", ["--epoch2", "1"], "model_1.pt: the model's forward pass gives non-finite activations, first at "),
    ("conf", ["--epoch", "1"], "model_1.pt: the per-sample gradients are not finite (the model's loss overflows)"),
    ("norm", ["--epoch", "1"], "model_1.pt: the per-sample gradients are not finite"),
    ("att", ["--epoch2", "4"], "model_4.pt: the attention distances are not finite"),
])
def test_a_model_whose_forward_pass_overflows_is_one_line(runs, tmp_path, capsys, script, extra, msg):
    """Finite weights that overflow in the forward pass gave CKA 0, NaN confusion / norms / attention distances with
    exit 0; now one line naming the checkpoint, and no result file."""
    ck = _copy_runs(runs, tmp_path)
    _edit_checkpoint(ck, "dt_medium_hopper_666/model_1.pt", _overflowing)
    _edit_checkpoint(ck, "dt_medium_hopper_666_K1/model_4.pt", _overflowing)
    out = tmp_path / "o"
    err = expect_exit(capsys, load_script(SCRIPTS[script]).main, _argv(script, ck, out) + extra)
    assert msg in err
    assert not (out / "res").exists() or not [p for p in (out / "res").iterdir() if "_1_" in p.name
                                              or p.name.startswith(("cka_", "grad"))]


def _copy_in_a_deeper_checkpoint(ck, tmp_path, hopper_data, K: int, epoch: int):
    """``model_{epoch}.pt`` of the dt run of ``K`` replaced by the checkpoint of a 5-block run (the runs have 2)."""
    import shutil

    other = write_run(tmp_path / "deeper", "dt", K=K, epochs=(epoch,), n_layer=5,
                      data_file=hopper_data / "hopper-medium-v2.pkl")
    run = ck / ("dt_medium_hopper_666" + ("" if K == 20 else f"_K{K}"))
    shutil.copy(other / f"model_{epoch}.pt", run / f"model_{epoch}.pt")
    return run


@pytest.mark.parametrize("extra, sizes", [([], ("2 blocks x 2 heads", "5 blocks x 2 heads")),
                                          (["--legacy", "--run_K", "1"], ("2 blocks", "5 blocks"))])
def test_attention_refuses_two_epochs_of_different_size(runs, tmp_path, hopper_data, capsys, extra, sizes):
    """A model_4.pt copied in from a deeper run crashed with numpy's broadcast ValueError after att_dist_0_* was
    written; now one line naming both checkpoints and their sizes, and no file of that model."""
    ck = _copy_runs(runs, tmp_path)
    run = _copy_in_a_deeper_checkpoint(ck, tmp_path, hopper_data, 1, 4)
    out = tmp_path / "o"
    err = expect_exit(capsys, load_script(SCRIPTS["att"]).main, _argv("att", ck, out) + extra)
    assert (f"{run / 'model_0.pt'} has {sizes[0]} but {run / 'model_4.pt'} has {sizes[1]}: two checkpoints of one "
            f"run are one model") in err
    assert not (out / "res").exists() or not list((out / "res").iterdir())
    assert not (out / "figs").exists()


def test_cka_refuses_two_epochs_of_one_run_of_different_depth(runs, tmp_path, hopper_data, capsys):
    """Epoch 0 against a model_40.pt copied in from a 5-block run gave a 18 x 45 matrix with exit 0 (which plot_cka.py
    then refused as "rows and columns differ"); now one line naming both checkpoints, nothing written. Two models of
    different names may differ in depth (a model against another of a different depth): still compared."""
    ck = _copy_runs(runs, tmp_path)
    run = _copy_in_a_deeper_checkpoint(ck, tmp_path, hopper_data, 20, 40)
    out = tmp_path / "o"
    err = expect_exit(capsys, load_script(SCRIPTS["cka"]).main, _argv("cka", ck, out))
    assert (f"{run / 'model_0.pt'} has 2 blocks but {run / 'model_40.pt'} has 5: two checkpoints of one run are one "
            f"model") in err
    assert not (out / "res").exists() or not list((out / "res").iterdir())
    write_run(ck, "gpt2", epochs=(40,), n_layer=5, data_file=hopper_data / "hopper-medium-v2.pkl")
    argv = _argv("cka", ck, out) + ["--model_name2", "gpt2"]
    load_script(SCRIPTS["cka"]).main([str(a) for a in argv])
    mats = list((out / "res").glob("cka_0_40_dtgpt2_*.npy"))
    assert mats and all(np.load(f).shape == (2 * len(BLOCK_ENTRIES), 5 * len(BLOCK_ENTRIES)) for f in mats)


def test_zero_gradients_are_warned_of(runs, tmp_path, capsys):
    """All-zero weights give zero gradients, whose cosines are 0: a warning says so (it read as 'no confusion')."""
    ck = _copy_runs(runs, tmp_path)
    _edit_checkpoint(ck, "dt_medium_hopper_666/model_1.pt", lambda o: [v.zero_() for v in o["state_dict"].values()])
    load_script(SCRIPTS["conf"]).main([str(a) for a in _argv("conf", ck, tmp_path / "o")] + ["--epoch", "1"])
    err = capsys.readouterr().err
    assert "model_1.pt: 4 of 4 samples have a zero transformer.h gradient (their cosines are 0)" in err


def test_biased_cka_needs_three_examples(runs, tmp_path, capsys, monkeypatch):
    """--biased with 1 or 2 examples gave all-0 or all-1 matrices with exit 0; the flag is checked before any model
    is loaded, and the estimator itself refuses too."""
    import torch

    from decision_transformer.analysis import cka

    monkeypatch.setattr(cka, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    for n in ("1", "2"):
        argv = _argv("cka", runs, tmp_path / "o") + ["--biased", "--batch_size", n]
        assert f"error: --batch_size {n}: CKA needs at least 3 examples" in \
            expect_exit(capsys, load_script(SCRIPTS["cka"]).main, argv)
    argv = _argv("cka", runs, tmp_path / "o") + ["--batch_size", "3"]
    assert "error: --batch_size 3: debiased CKA needs at least 4 examples (3 with --biased)" in \
        expect_exit(capsys, load_script(SCRIPTS["cka"]).main, argv)
    with pytest.raises(UserError, match="^CKA needs at least 3 examples, got 2$"):
        cka.center_gram(torch.ones(2, 2))


@pytest.mark.parametrize("script", ["cka", "params", "conf"])
def test_a_multi_task_checkpoint_in_a_run_folder_is_named_as_such(runs, tmp_path, capsys, script):
    """A multi-task checkpoint was 'invalid model_config (... missing state_dim ...)' for most analyses and was
    compared without a word by the parameter similarity."""
    ck = _copy_runs(runs, tmp_path)

    def multi(o):
        o["config"]["model_config"]["model_class"] = "multi_dt"

    path = _edit_checkpoint(ck, "dt_medium_hopper_666/model_1.pt", multi)
    extra = {"cka": ["--epoch2", "1"], "params": ["--epoch2", "1"], "conf": ["--epoch", "1"]}[script]
    err = expect_exit(capsys, load_script(SCRIPTS[script]).main, _argv(script, ck, tmp_path / "o") + extra)
    assert f"{path}: a multi-task checkpoint (experiment_multi.py); the analyses take single-task runs" in err


def test_an_output_folder_that_cannot_be_made_is_refused_before_any_work(runs, tmp_path, capsys):
    """--figs_dir below a file was found only after the results were replaced (mixing two runs' files)."""
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = tmp_path / "o"
    for flag, value, problem in (("--figs_dir", blocker, "it is a file, not a folder"),
                                 ("--results_dir", blocker / "res", f"{blocker} is a file, not a folder")):
        argv = _argv("cka", runs, out) + [flag, value]
        err = expect_exit(capsys, load_script(SCRIPTS["cka"]).main, argv)
        assert f"argument {flag}: {value}: {problem}" in err
    assert not out.exists()


def test_plot_cka_refuses_a_matrix_with_nan(runs, tmp_path, capsys):
    out = tmp_path / "o"
    load_script(SCRIPTS["cka"]).main([str(a) for a in _argv("cka", runs, out)])
    capsys.readouterr()
    f = next((out / "res").glob("*_reward.npy"))
    mat = np.load(f)
    mat[:] = np.nan
    np.save(f, mat)
    argv = ["--results_dir", out / "res", "--figs_dir", out / "figs", "--env_name_list", "hopper", "--model_name_list",
            "dt", "--token_list", "reward", "--K", "3", "--batch_size", "4"]     # (the batch of _argv's small)
    err = expect_exit(capsys, load_script(SCRIPTS["plot_cka"]).main, argv)
    assert f"{f}: array 'CKA matrix' has NaN or infinite values" in err


def test_analysis_batches_are_bounded_and_cka_checks_its_gram_memory_first(runs, tmp_path, capsys):
    """--batch_size 100000000 was OOM-killed (exit 137, no message); CKA's n x n Grams are checked against half the
    machine's memory before any forward pass."""
    from decision_transformer.analysis.cka import check_gram_memory

    for script in ("cka", "conf", "att", "save"):
        argv = _argv(script, runs, tmp_path / "o") + ["--batch_size", "100001"]
        assert "--batch_size 100001 is too large (at most 100,000)" in \
            expect_exit(capsys, load_script(SCRIPTS[script]).main, argv)
    err = expect_exit(capsys, load_script(SCRIPTS["cka"]).main, _argv("cka", runs, tmp_path / "o")
                      + ["--batch_size", "100000"])
    assert "examples needs" in err and "GiB for its Gram matrices (n² float64 each)" in err
    check_gram_memory(2, 100, limit=160_000)
    with pytest.raises(UserError, match=r"^CKA of 2 layers on 101 examples needs 0\.0 GiB"):
        check_gram_memory(2, 101, limit=160_000)


def test_cka_checks_the_gram_memory_of_both_models_layers(runs, tmp_path, monkeypatch):
    """The memory check counts the hooked layers of both models (the Grams of both are held at once)."""
    from decision_transformer.analysis import cka

    seen = []
    real = cka.check_gram_memory
    monkeypatch.setattr(cka, "check_gram_memory", lambda n_layers, n, *a, **k: (seen.append((n_layers, n)),
                                                                                 real(n_layers, n, *a, **k))[1])
    out = tmp_path / "o"
    load_script(SCRIPTS["cka"]).main([str(a) for a in _argv("cka", runs, out)])
    layers = next((out / "res").glob("*_layers.csv")).read_text().splitlines()[1:]
    rows, cols = (sum(line.startswith(axis + ",") for line in layers) for axis in ("rows", "cols"))
    assert rows > 0 and rows == cols
    assert seen == [(rows + cols, 4)]


def test_the_gram_memory_limit_defaults_to_half_the_machines_memory(monkeypatch):
    from decision_transformer.analysis import cka

    sizes = {"SC_PHYS_PAGES": 80, "SC_PAGE_SIZE": 4000}          # 320,000 bytes: a limit of 160,000
    monkeypatch.setattr(cka.os, "sysconf", lambda name: sizes[name])
    cka.check_gram_memory(2, 100)                                  # 160,000 bytes
    with pytest.raises(UserError, match=r"^CKA of 2 layers on 101 examples needs 0\.0 GiB"):
        cka.check_gram_memory(2, 101)


def test_non_finite_activations_name_the_first_bad_layer():
    import torch

    from decision_transformer.analysis.activations import check_finite_activations

    ok = torch.zeros(2)
    for acts, first in (({"0.attn": ok, "1.attn": torch.tensor([0., float("inf")])}, "1.attn"),
                        ({"0.attn": torch.tensor([float("-inf")]), "1.attn": ok}, "0.attn"),
                        ({"0.attn": ok, "0.mlp": torch.tensor([float("nan")]), "1.attn": torch.tensor([float("nan")])},
                         "0.mlp")):
        with pytest.raises(UserError, match=f"^s: the model's forward pass gives non-finite activations, first at "
                                            f"{first}$"):
            check_finite_activations(acts, "s")
    check_finite_activations({"0.attn": ok, "1.attn": ok}, "s")


def test_the_repeated_value_of_a_list_flag_is_the_one_named(runs, tmp_path, capsys):
    argv = [str(a) for a in _argv("score", runs, tmp_path / "o")] + ["--seed_list", "666", "667", "667"]
    msg = expect_exit(capsys, load_script(SCRIPTS["score"]).main, argv)
    assert "argument --seed_list: 667 is given twice" in msg


def test_an_output_folder_below_a_file_two_levels_up_is_refused(runs, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = tmp_path / "o"
    argv = _argv("cka", runs, out) + ["--results_dir", blocker / "a" / "res"]
    err = expect_exit(capsys, load_script(SCRIPTS["cka"]).main, argv)
    assert f"argument --results_dir: {blocker / 'a' / 'res'}: {blocker} is a file, not a folder" in err
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [(None, None), ("load_checkpoint", "other/model_9.pt"),
                                         ("pretrained_models", ["a.pt", "b.pt"])])
def test_epoch_0_is_rebuilt_from_the_seed_only_for_a_run_that_started_from_it(tmp_path, flag, value):
    """Without model_0.pt, a random-init run's initial weights are rebuilt from its seed (the DT constructor reseeds);
    a run started from --load_checkpoint or a merge began from other weights, so rebuilding them would compare the
    run with weights it never had: one line instead."""
    import torch

    from decision_transformer.analysis.runs import load_state_dict
    from decision_transformer.checkpoint import load_checkpoint
    from decision_transformer.models import DecisionTransformer, DTConfig

    d = write_run(tmp_path, "dt", epochs=(1, 4))
    if flag:
        for e in (1, 4):
            ckpt = torch.load(d / f"model_{e}.pt", weights_only=True)
            ckpt["config"][flag] = value
            torch.save(ckpt, d / f"model_{e}.pt")
    key = RunKey("dt", "medium", "hopper", 666, 20)
    if flag is None:
        sd, _ = load_state_dict(tmp_path, key, 0)
        cfg = DTConfig.from_dict(load_checkpoint(d / "model_1.pt")["config"]["model_config"])
        seeded = DecisionTransformer(cfg, seed=666).state_dict()
        assert sd.keys() == seeded.keys() and all(torch.equal(sd[k], v) for k, v in seeded.items())
        return
    with pytest.raises(UserError, match=f"started from --{flag} .*whose weights only model_0.pt holds"):
        load_state_dict(tmp_path, key, 0)


def test_plot_cka_warns_when_its_models_were_computed_on_different_batches(tmp_path, hopper_data, capsys):
    """compute_cka.py records the batch in its layer list; plot_cka.py warns when the models it draws saw different
    batches, and says nothing when they saw the same. Another --batch_seed for one of them no longer replaces its
    results (they are tagged _bseed{n}): a batch record that differs stands for other data."""
    ck = tmp_path / "checkpoints"
    for m in ("dt", "gpt2"):
        write_run(ck, m, epochs=(0, 40), data_file=hopper_data / "hopper-medium-v2.pkl")
    out = tmp_path / "o"
    compute, plot = load_script(SCRIPTS["cka"]).main, load_script(SCRIPTS["plot_cka"]).main
    base = [str(a) for a in _argv("cka", ck, out)]

    def run(model, *extra):
        argv = list(base)
        argv[argv.index("--model_name1") + 1] = argv[argv.index("--model_name2") + 1] = model
        compute([*argv, *extra])

    plot_argv = [str(a) for a in [*_argv("plot_cka", ck, out), "--model_name_list", "dt", "gpt2", "--K", "3",
                                  "--batch_size", "4"]]
    run("dt")
    run("gpt2")
    capsys.readouterr()
    plot(plot_argv)
    assert "different batches" not in capsys.readouterr().err
    run("gpt2", "--batch_seed", "5")
    layers = out / "res" / "cka_0_40_gpt2gpt2_hopper_medium_666_bs4_ctx3_layers.csv"
    assert (out / "res" / "cka_0_40_gpt2gpt2_hopper_medium_666_bs4_ctx3_bseed5_layers.csv").is_file()
    capsys.readouterr()
    plot(plot_argv)
    assert "different batches" not in capsys.readouterr().err
    text = layers.read_text()
    layers.write_text(text[:text.rindex("batch,0,")] + "batch,0,0123456789abcdef\n")   # another batch's record
    plot(plot_argv)
    assert "record different batches, so the figure compares models that did not see the same batch" in \
        capsys.readouterr().err


@pytest.mark.parametrize("flags, expect", [
    (["--device", "bogus"], "error: unknown --device 'bogus'; use auto, cpu, cuda or cuda:N"),
    (["--data_path", "{empty}"], "error: dataset not found: {empty}/hopper-medium-v2.pkl"),
    (["--data_path", "{file}"], "error: --data_path {file}: a file, not a folder of datasets"),
])
def test_run_all_checks_the_device_and_datasets_before_any_step(runs, tmp_path, capsys, flags, expect):
    """A misspelt --device or a --data_path without the datasets failed only the steps that run models (cka, mi,
    grads, attention), after scores, curves and parameters had written their results: one line first, nothing
    written."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("not a folder\n")
    names = {"empty": tmp_path / "empty", "file": tmp_path / "afile"}
    run_all = load_script(SCRIPTS["all"]).main
    msg = expect_exit(capsys, run_all, ["--checkpoint_dir", runs, "--out_dir", tmp_path / "out",
                                        *[f.format(**names) for f in flags]])
    assert msg.startswith(expect.format(**names)), msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["cka", "conf", "norm", "att", "save"])
def test_an_envs_missing_dataset_is_found_before_the_first_env_is_analysed(script, tmp_path, hopper_data, capsys):
    """Runs of hopper and walker2d, a --data_path holding only hopper's dataset: the scripts analysed hopper and
    wrote its results before refusing walker2d; now the refusal comes first and nothing is written."""
    import shutil

    ck = tmp_path / "ck"
    for env in ("hopper", "walker2d"):
        write_run(ck, "dt", env=env, K=20, epochs=(0, 1, 40))
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(hopper_data / "hopper-medium-v2.pkl", data)
    argv = [a for a in _argv(script, ck, tmp_path / "out") if a != "hopper"]   # (--env_name_list: both envs)
    at = argv.index("--env_name_list") + 1
    argv[at:at] = ["hopper", "walker2d"]
    msg = expect_exit(capsys, load_script(SCRIPTS[script]).main, argv + ["--data_path", data])
    assert msg.startswith(f"error: dataset not found: {data / 'walker2d-medium-v2.pkl'}"), msg
    assert not (tmp_path / "out").exists()


def test_run_all_needs_no_dataset_for_an_env_that_no_data_step_analyses(runs, tmp_path, hopper_data, capsys):
    """A walker2d run of another seed is in the score tables only (the data steps analyse --seed's runs): its missing
    dataset stopped the whole report up front; only the envs a selected data step analyses need one."""
    import shutil

    ck = tmp_path / "checkpoints"
    shutil.copytree(runs, ck)
    write_run(ck, "dt", env="walker2d", seed=7, K=20, epochs=(0, 1, 40))
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(hopper_data / "hopper-medium-v2.pkl", data)
    run_all = load_script(SCRIPTS["all"]).main
    argv = ["--checkpoint_dir", ck, "--out_dir", tmp_path / "out", "--only", "cka", "--batch_size", "4", "--K", "3",
            "--data_path", data]
    run_all([str(a) for a in argv])
    assert list((tmp_path / "out").rglob("*.csv")), "CKA of hopper's runs was not written"
    (data / "hopper-medium-v2.pkl").unlink()   # hopper's runs are analysed: its dataset is still needed up front
    argv[3] = tmp_path / "out2"
    msg = expect_exit(capsys, run_all, [str(a) for a in argv])
    assert msg.startswith(f"error: dataset not found: {data}/hopper-medium-v2.pkl"), msg
    assert not (tmp_path / "out2").exists()


def test_a_stand_in_dataset_is_warned_about_once(runs, tmp_path, capsys):
    """The up-front dataset check looks the file up quietly: a smoke-test stand-in was warned about twice per env
    (once by the check, once as it was loaded)."""
    download = load_script("data/download_d4rl_datasets.py").main
    download(["--synthetic", "20", "--envs", "hopper", "--datasets", "medium", "--hdf5_dir", str(tmp_path / "h5"),
              "--data_path", str(tmp_path / "syn")])
    capsys.readouterr()
    load_script(SCRIPTS["cka"]).main([str(a) for a in [*_argv("cka", runs, tmp_path / "out"), "--data_path",
                                                       tmp_path / "syn"]])
    assert capsys.readouterr().err.count("is a smoke-test stand-in") == 1


def test_run_all_speaks_of_a_stand_in_dataset_once(runs, tmp_path, capsys):
    """Every analysis run_all makes looked the dataset up again (and read the whole file to find its path): a
    smoke-test stand-in was warned about once per analysis (7 times for a report); now once per process."""
    load_script("data/download_d4rl_datasets.py").main(
        ["--synthetic", "20", "--envs", "hopper", "--datasets", "medium", "--hdf5_dir", str(tmp_path / "h5"),
         "--data_path", str(tmp_path / "syn")])
    capsys.readouterr()
    load_script(SCRIPTS["all"]).main([str(a) for a in ["--checkpoint_dir", runs, "--out_dir", tmp_path / "out",
                                                       "--only", "cka", "grads", "--batch_size", "4", "--K", "3",
                                                       "--data_path", tmp_path / "syn"]])
    assert capsys.readouterr().err.count("is a smoke-test stand-in") == 1


@pytest.mark.parametrize("script", ["conf", "cka", "score", "params", "att"])
def test_a_checkpoint_dir_that_is_a_file_is_one_line(runs, tmp_path, capsys, script):
    """A --checkpoint_dir that is a file was looked into: "checkpoint not found: f.pkl/dt_.../model_0.pt (... train
    it with experiment.py --outdir f.pkl)"."""
    f = tmp_path / "f.pkl"
    f.write_bytes(b"x")
    argv = [str(f) if a == runs else str(a) for a in _argv(script, runs, tmp_path / "out")]
    msg = expect_exit(capsys, load_script(SCRIPTS[script]).main, argv)
    assert "argument --checkpoint_dir" in msg and f"{f} is a file, not a folder of run folders (see " in msg, msg
    assert not (tmp_path / "out").exists()


def test_a_recorded_stand_in_dataset_is_said(tmp_path, capsys):
    """Without --data_path an analysis uses the data file a checkpoint records; a smoke-test stand-in recorded there
    was used without a word (the same file found in --data_path is warned about)."""
    load_script("data/download_d4rl_datasets.py").main(
        ["--synthetic", "20", "--envs", "hopper", "--datasets", "medium", "--hdf5_dir", str(tmp_path / "h5"),
         "--data_path", str(tmp_path / "syn")])
    ck = tmp_path / "checkpoints"
    write_run(ck, "dt", K=20, epochs=(0, 1, 40), data_file=tmp_path / "syn" / "hopper-medium-v2.pkl")
    capsys.readouterr()
    load_script(SCRIPTS["all"]).main([str(a) for a in ["--checkpoint_dir", ck, "--out_dir", tmp_path / "out",
                                                       "--only", "cka", "grads", "--batch_size", "4", "--K", "3"]])
    err = capsys.readouterr().err
    assert err.count("is a smoke-test stand-in") == 1, err
    assert list((tmp_path / "out").rglob("*.csv")), "the analyses did not run on the recorded file"


def test_an_interrupt_while_a_figure_is_saved_stops_the_report(runs, tmp_path, capsys, monkeypatch):
    """Ctrl-C while matplotlib wrote a PDF surfaced as a zlib.error raised during the interrupt: run_all counted the
    analysis as failed, went on with the next and exited 2. Now it stops at once: error: interrupted, exit 130."""
    import zlib

    from decision_transformer.analysis import report

    def interrupted_figure(plan, args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise zlib.error("Error -2 while flushing: inconsistent stream state")

    monkeypatch.setattr(report, "step_cka", interrupted_figure)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        load_script(SCRIPTS["all"]).main([str(a) for a in ["--checkpoint_dir", runs, "--out_dir", tmp_path / "out",
                                                           "--only", "cka", "grads", "--batch_size", "4", "--K", "3"]])
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.rstrip().endswith("error: interrupted"), err
    assert "== grads" not in err and "Traceback" not in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_run_all_warns_of_the_cpu_fallback_once(runs, tmp_path, capsys, monkeypatch):
    """run_all --device cuda without CUDA: each analysis resolved the device and warned again (14 lines for a
    report); now once per process."""
    from decision_transformer import run

    monkeypatch.setattr(run, "_CPU_FALLBACKS_SAID", set(), raising=False)   # (earlier tests may have warned)
    load_script(SCRIPTS["all"]).main([str(a) for a in ["--checkpoint_dir", runs, "--out_dir", tmp_path / "out",
                                                       "--only", "cka", "grads", "--batch_size", "4", "--K", "3",
                                                       "--device", "cuda"]])
    assert capsys.readouterr().err.count("--device cuda requested but CUDA is not available") == 1


def test_a_folder_or_a_foreign_tensor_in_a_run_is_named_for_what_it_is(runs, tmp_path, capsys):
    """A folder named model_40.pt was 'checkpoint not found: ...model_40.pt; the folder has ... model_40.pt', a folder
    named metrics.jsonl 'metrics not found'; an epoch's checkpoint lacking a block tensor, or holding an integer
    one, was 'the two checkpoints have different transformer.h tensors', naming neither file."""
    import shutil

    import torch

    ck = _copy_runs(runs, tmp_path)
    params = load_script(SCRIPTS["params"]).main
    last = _edit_checkpoint(ck, "dt_medium_hopper_666/model_40.pt",
                            lambda o: o["state_dict"].pop("transformer.h.1.mlp.c_fc.bias"))
    first = last.with_name("model_0.pt")
    msg = expect_exit(capsys, params, _argv("params", ck, tmp_path / "o1"))
    assert msg == (f"error: {first} has transformer.h.1.mlp.c_fc.bias, which {last} lacks: the two are not the same "
                   f"model at two epochs"), msg
    _edit_checkpoint(ck, "dt_medium_hopper_666/model_40.pt", lambda o: o["state_dict"].update(
        {"transformer.h.1.mlp.c_fc.bias": torch.zeros(o["state_dict"]["transformer.h.1.mlp.c_proj.weight"].shape[0],
                                                      dtype=torch.int64)}))
    msg = expect_exit(capsys, params, _argv("params", ck, tmp_path / "o2"))
    assert msg.startswith(f"error: {last}: transformer.h.1.mlp.c_fc.bias holds int64 numbers, not floating point"), msg
    last.unlink()
    last.mkdir()
    msg = expect_exit(capsys, params, _argv("params", ck, tmp_path / "o3"))
    assert msg == f"error: {last}: is a folder, not a checkpoint file", msg
    cka = load_script(SCRIPTS["cka"]).main
    msg = expect_exit(capsys, cka, _argv("cka", ck, tmp_path / "o4") + ["--epoch2", "40"])
    assert msg == f"error: {last}: is a folder, not a checkpoint file", msg
    metrics = ck / "dt_medium_hopper_666" / "metrics.jsonl"
    metrics.unlink()
    metrics.mkdir()
    score = load_script(SCRIPTS["score"]).main
    msg = expect_exit(capsys, score, _argv("score", ck, tmp_path / "o5") + ["--K", "20"])
    assert msg == f"error: {metrics}: is a folder, not the run's metrics file", msg
    shutil.rmtree(metrics)
    assert not list(tmp_path.glob("o*/res/*"))


@pytest.mark.parametrize("config, said", [
    ('{"max_iters": "abc"}', 'max_iters is "abc", not a whole number >= 0; whether the run finished is not checked'),
    ('{"max_iters": null}', "max_iters is null, not a whole number >= 0; whether the run finished is not checked"),
    ('{"max_iters": -3}', "max_iters is -3, not a whole number >= 0; whether the run finished is not checked"),
    (None, "a folder, not a run config; the run's iterations and flags are not checked"),
])
def test_a_run_config_the_score_table_cannot_use_is_said(runs, tmp_path, capsys, config, said):
    """A config.json whose max_iters is no count, or a folder in its place, went without a word (a JSON list got a
    warning): the table could not tell whether the run had finished."""
    ck = _copy_runs(runs, tmp_path)
    path = ck / "dt_medium_hopper_666" / "config.json"
    path.unlink(missing_ok=True)
    if config is None:
        path.mkdir()
    else:
        path.write_text(config)
    score = load_script(SCRIPTS["score"]).main
    score([str(a) for a in _argv("score", ck, tmp_path / "o") + ["--K", "20"]])
    warnings = [line for line in capsys.readouterr().err.splitlines() if str(path) in line]
    assert warnings == [f"warning: {path}: {said}"], warnings
