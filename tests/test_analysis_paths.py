"""Where the analyses write by default (relative to the working directory, not next to the scripts), and runs
trained with another K than 20 (``--run_K``, and the hint naming them when it is missing)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from test_analysis_support import (  # noqa: F401
    expect_exit,
    load_script,
    tiny_runs,
    write_run,
)

from decision_transformer.analysis import attention, cka, common, curves, grads, mi, params, report, scores
from decision_transformer.analysis.runs import RunKey, other_k_hint, runs_with_other_k
from decision_transformer.checkpoint import DEFAULT_K

DATA = ["--K", "3", "--batch_size", "6"]
T = "_bs6_ctx3"                                     # (the tag of DATA's batch: 6 samples, context 3)
MI_DATA = ["--K", "3", "--data_batch_size", "6"]    # (run_mi_exp.py and the MI plots read DATA's batch so)
CKA = "analysis/section-51-activation-similarity"
MI = "analysis/section-52-mutual-information"


def _snapshot(folder: Path) -> dict:
    """Files under ``folder`` with their modification times (empty if it does not exist); bytecode caches aside."""
    if not folder.is_dir():
        return {}
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture
def repo_untouched():
    """Fails the test if it adds or rewrites any file under the repository's analysis/ folder."""
    before = _snapshot(ROOT / "analysis")
    yield
    assert _snapshot(ROOT / "analysis") == before, "an analysis wrote into the source tree"


# ---- relative output defaults -----------------------------------------------------------------------------------

def test_output_defaults_are_relative():
    builders = [cka.build_parser, cka.build_plot_parser, params.build_parser, grads.build_confusion_parser,
                grads.build_norm_parser, attention.build_parser, scores.build_parser, curves.build_no_context_parser,
                curves.build_grad_clip_parser, mi.build_save_parser, mi.build_mi_parser, mi.build_plot_parser,
                mi.build_plot_data_parser]
    for build in builders:
        a = build().parse_args([])
        for name in ("results_dir", "figs_dir", "path_to_save_mi", "path_to_data", "path_to_activation"):
            v = getattr(a, name, None)
            if v is not None:
                assert not os.path.isabs(v) and v.startswith("analysis/section-"), (build.__qualname__, name, v)
    assert cka.build_parser().parse_args([]).results_dir == "analysis/section-51-activation-similarity/results"
    assert cka.build_plot_parser().parse_args([]).results_dir == cka.build_parser().parse_args([]).results_dir
    assert mi.build_save_parser().parse_args([]).results_dir == mi.build_mi_parser().parse_args([]).path_to_data \
        == mi.build_plot_parser().parse_args([]).results_dir == "analysis/section-52-mutual-information/results"
    assert mi.build_plot_parser().parse_args([]).figs_dir == "analysis/section-52-mutual-information/figs"
    assert report.build_parser().parse_args([]).out_dir == "analysis/report"
    assert common.DEFAULT_RUN_K == DEFAULT_K


def test_default_outputs_go_under_the_working_directory(tmp_path, tiny_runs, monkeypatch, repo_untouched):  # noqa: F811
    """compute_cka -> plot_cka and save_activation -> run_mi_exp -> plots, all with their default folders, from
    another directory: everything lands under it and the chain still connects."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    ck = ["--checkpoint_dir", tiny_runs]
    load_script(f"{CKA}/compute_cka.py").main(ck + ["--env_name_list", "hopper", "--heatmap_token_list", "state",
                                                   *DATA])
    res, figs = cwd / CKA / "results", cwd / CKA / "figs"
    assert (res / f"cka_0_40_gpt2gpt2_hopper_medium_666{T}_state.npy").is_file()
    assert (figs / f"cka_0_40_gpt2gpt2_hopper_medium_666{T}_state.png").is_file()
    load_script(f"{CKA}/plot_cka.py").main(["--env_name_list", "hopper", "--model_name_list", "gpt2",
                                            "--token_list", "state", *DATA])
    assert (figs / f"cka_plot_0_40_gpt2_hopper_medium_666{T}_state.png").is_file()

    load_script(f"{MI}/save_activation.py").main(ck + ["--model_name", "gpt2", *DATA])
    mine = ["--iters", "1", "--mine_hidden", "4", "--batch_size", "3", "--device", "cpu", *MI_DATA]
    run_mi = load_script("mine/run_mi_exp.py").main
    run_mi(mine + ["--model_name", "gpt2"])
    run_mi(mine + ["--exp_type", "data"])
    setting = ["--iters", "1", "--mine_hidden", "4", "--batch_size", "3", *MI_DATA]  # the plots read what these wrote
    load_script(f"{MI}/plot_mutual_information.py").main(["--model_name_list", "gpt2", *setting])
    load_script(f"{MI}/plot_mutual_information_data.py").main(["--env_name", "hopper", *setting])
    mres, mfigs = cwd / MI / "results", cwd / MI / "figs"
    assert (mres / f"activation_40_gpt2_hopper_medium_666{T}.npz").is_file()
    assert (mres / f"mi_xy_0_40_gpt2_hopper_medium_666_h4_it1_mb3{T}.npz").is_file()
    assert (mfigs / f"mi_xy_40_gpt2_hopper_medium_666_h4_it1_mb3{T}.png").is_file()
    assert (mfigs / f"mi_data_hopper_medium_666_h4_it1_mb3{T}.png").is_file()

    load_script("analysis/run_all.py").main(ck + ["--only", "params", "--model_name_list", "dt"])
    assert (cwd / "analysis" / "report" / "report.md").is_file()
    assert (cwd / "analysis" / "report" / "section-53-parameter-similarity" / "results"
            / "paramdist_0_40_dt_hopper_medium_666.npy").is_file()


def test_script_by_absolute_path_writes_under_the_working_directory(tmp_path, tiny_runs, repo_untouched):  # noqa: F811
    """The user's case: ``python /abs/path/analysis/.../script.py`` from another folder, default output flags."""
    script = ROOT / "analysis" / "section-53-parameter-similarity" / "parameter_similarity_analysis.py"
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), "-plm", str(tiny_runs), "--model_name_list", "dt"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "analysis" / "section-53-parameter-similarity"
    assert (out / "results" / "paramdist_0_40_dt_hopper_medium_666.npy").is_file()
    assert (out / "figs" / "paramdist_0_40_dt_hopper_medium_666.png").is_file()


# ---- runs trained with another K --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def k5_runs(tmp_path_factory, hopper_data):
    """Only runs trained with K=5 (plus a K=20 no-grad-clip variant, which is not a K=5 alternative)."""
    root = tmp_path_factory.mktemp("k5") / "checkpoints"
    data_file = hopper_data / "hopper-medium-v2.pkl"
    for m in ("gpt2", "dt"):
        write_run(root, m, K=5, epochs=(0, 1, 4, 40), data_file=data_file)
    write_run(root, "dt", no_grad_clip=True, epochs=(1,), data_file=data_file)
    return root


def test_other_k_hint(k5_runs):
    key = RunKey("dt", "medium", "hopper", 666)
    assert [k.dir_name for k in runs_with_other_k(k5_runs, key)] == ["dt_medium_hopper_666_K5"]
    assert other_k_hint(k5_runs, key) == "found dt_medium_hopper_666_K5: pass --run_K 5"
    # the no-grad-clip run (K=20) is the alternative of a K=5 no-grad-clip key, the plain K=5 run is not
    assert [k.dir_name for k in runs_with_other_k(k5_runs, RunKey("dt", "medium", "hopper", 666, 5, True))] == \
        ["dt_medium_hopper_666_no_grad_clip"]
    assert other_k_hint(k5_runs, RunKey("dt", "medium", "hopper", 42)) == ""
    assert other_k_hint(k5_runs.parent / "nowhere", key) == ""


def test_missing_run_names_the_other_k(tmp_path, k5_runs, capsys):
    base = ["--checkpoint_dir", k5_runs, "--env_name_list", "hopper", *DATA, "--results_dir", tmp_path / "r",
            "--figs_dir", tmp_path / "f"]
    compute = load_script(f"{CKA}/compute_cka.py").main
    msg = expect_exit(capsys, compute, base + ["--model_name1", "dt", "--model_name2", "dt"])
    assert "checkpoint not found" in msg and "dt_medium_hopper_666/model_0.pt" in msg
    assert "found dt_medium_hopper_666_K5: pass --run_K 5" in msg
    msg = expect_exit(capsys, compute, base + ["--model_name1", "dt", "--model_name2", "dt", "--no_context"])
    assert "dt_medium_hopper_666_K1/model_0.pt" in msg and "pass --run_K 5" in msg
    msg = expect_exit(capsys, compute, base + ["--run_K", "0"])
    assert "invalid --run_K 0" in msg
    grad = load_script("analysis/section-54-gradient-analysis/compute_grad_confusion.py").main
    msg = expect_exit(capsys, grad, base + ["--model_name_list", "gpt2"])
    assert "found gpt2_medium_hopper_666_K5: pass --run_K 5" in msg


def test_run_k_selects_the_runs(tmp_path, k5_runs, capsys):
    out = ["--results_dir", tmp_path / "res", "--figs_dir", tmp_path / "figs"]
    base = ["--checkpoint_dir", k5_runs, "--env_name_list", "hopper", "--run_K", "5", *DATA, *out]
    res = tmp_path / "res"
    load_script(f"{CKA}/compute_cka.py").main(base + ["--model_name1", "dt", "--model_name2", "dt", "--no_heatmap"])
    m = np.load(res / f"cka_0_40_dtdt_hopper_medium_666_K5{T}_state.npy")
    assert m.shape == (18, 18) and np.isfinite(m).all()
    load_script(f"{CKA}/plot_cka.py").main(["--env_name_list", "hopper", "--model_name_list", "dt", "--token_list",
                                            "state", "--run_K", "5", *DATA, *out])
    assert (tmp_path / "figs" / f"cka_plot_0_40_dt_hopper_medium_666_K5{T}_state.png").is_file()
    msg = expect_exit(capsys, load_script(f"{CKA}/plot_cka.py").main,
                      ["--env_name_list", "hopper", "--model_name_list", "dt", "--token_list", "state", *DATA, *out])
    assert f"cka_0_40_dtdt_hopper_medium_666{T}_state.npy" in msg                # the K=20 results: none

    load_script("analysis/section-53-parameter-similarity/parameter_similarity_analysis.py").main(
        ["-plm", k5_runs, "--model_name_list", "dt", "--run_K", "5", *out])
    assert np.load(res / "paramdist_0_40_dt_hopper_medium_666_K5.npy").shape == (24,)
    load_script("analysis/section-54-gradient-analysis/compute_grad_norm.py").main(
        base + ["--model_name_list", "dt"])
    assert np.load(res / f"gradnorms_1_dt_hopper_medium_666_K5{T}.npy").shape == (1, 6)   # (--batch_size 6: tagged)
    load_script("analysis/section-56-dependence-on-context/compute_attention_distance.py").main(
        base + ["--model_name_list", "dt"])
    assert np.load(res / f"att_dist_diff_0_4_dt_hopper_medium_666_K5{T}.npy").shape == (6, 2, 2)  # [B, blocks, heads]

    load_script(f"{MI}/save_activation.py").main(["--checkpoint_dir", k5_runs, "--model_name", "dt", "--run_K", "5",
                                                  *DATA, "--results_dir", res])
    assert (res / f"activation_40_dt_hopper_medium_666_K5{T}.npz").is_file()
    assert (res / f"data_hopper_medium_666_K5{T}.npz").is_file()
    io = ["-psm", res, "-pd", res, "-pa", res, "--iters", 1, "--mine_hidden", 4, "--batch_size", 3, "--device", "cpu",
          *MI_DATA]
    run_mi = load_script("mine/run_mi_exp.py").main
    run_mi(io + ["--model_name", "dt", "--run_K", "5"])
    assert (res / f"mi_xy_0_40_dt_hopper_medium_666_K5_h4_it1_mb3{T}.npz").is_file()     # (MINE settings: tagged)
    msg = expect_exit(capsys, run_mi, io + ["--model_name", "dt"])                   # K=20 files: none
    assert f"data_hopper_medium_666{T}.npz: file not found" in msg
    load_script(f"{MI}/plot_mutual_information.py").main(["--model_name_list", "dt", "--run_K", "5", *out, "--iters",
                                                          1, "--mine_hidden", 4, "--batch_size", 3, *MI_DATA])
    assert (tmp_path / "figs" / f"mi_xy_40_dt_hopper_medium_666_K5_h4_it1_mb3{T}.png").is_file()


def test_run_all_with_other_k(tmp_path, k5_runs):
    run_all = load_script("analysis/run_all.py").main
    common_flags = ["--checkpoint_dir", k5_runs, "--batch_size", "6", "--grad_batch_size", "4", "--K", "3",
                    "--only", "cka", "params"]
    run_all(common_flags + ["--out_dir", tmp_path / "k20"])
    text = (tmp_path / "k20" / "report.md").read_text()
    assert ("hopper: no K=20 runs of seed 666 with checkpoints (found runs with K=5: pass --run_K 5); CKA skipped"
            in text)
    assert "no K=20 checkpoints" not in text and "**Failed" not in text
    run_all(common_flags + ["--out_dir", tmp_path / "k5", "--run_K", "5"])
    text = (tmp_path / "k5" / "report.md").read_text()
    assert "**Failed" not in text and "skipped" not in text and "the K=5 runs" in text
    res = tmp_path / "k5" / "section-51-activation-similarity" / "results"
    assert np.load(res / "cka_0_40_gpt2gpt2_hopper_medium_666_K5_bs6_ctx3_state.npy").shape == (18, 18)
    assert (tmp_path / "k5" / "section-53-parameter-similarity" / "results"
            / "paramdist_0_40_dt_hopper_medium_666_K5.npy").is_file()


def test_run_all_names_a_misspelt_env_or_a_model_without_runs(tmp_path, k5_runs, capsys):
    """A misspelt env is the one line listing the known envs; a model name without runs says which models have some
    (any folder name can be a model, so it is not checked against a list)."""
    from conftest import fails

    run_all = load_script("analysis/run_all.py").main
    base = ["--checkpoint_dir", k5_runs, "--out_dir", tmp_path / "o", "--only", "params"]
    assert "unknown env 'hoper'" in fails(run_all, [*base, "--env_name_list", "hoper"], capsys)
    msg = fails(run_all, [*base, "--model_name_list", "xx"], capsys)
    assert msg == f"error: no runs of --model_name_list xx (dataset medium) in {k5_runs}; it has runs of dt, gpt2"
    assert fails(run_all, [*base, "--skip", "params", "cka"], capsys) == "error: --only and --skip both name params"
    assert not (tmp_path / "o").exists()
