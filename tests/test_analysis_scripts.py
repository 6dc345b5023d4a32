"""Every analysis script end to end on tiny checkpoints (and on a real experiment.py run), score normalisation
golden values, learning-curve smoothing, WandB lookup (faked), bad input, and the whole-suite driver."""
import csv
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from conftest import ROOT
from test_analysis_support import (  # noqa: F401
    expect_exit,
    load_script,
    tiny_runs,
    write_run,
)

from decision_transformer.analysis import curves, scores
from decision_transformer.analysis.runs import RunKey, load_state_dict, parse_run_dir
from decision_transformer.errors import UserError
from decision_transformer.synthetic import write_pkl

DATA = ["--K", "3", "--batch_size", "6"]


def out(tmp_path):
    return ["--results_dir", str(tmp_path / "res"), "--figs_dir", str(tmp_path / "figs")]


def figure_ok(path):
    assert path.with_suffix(".png").stat().st_size > 1000 and path.with_suffix(".pdf").stat().st_size > 500, path


# ---- naming, scores, curves -------------------------------------------------------------------------------------

def test_run_dir_round_trip():
    for key in (RunKey("gpt2", "medium", "hopper", 666), RunKey("dt", "medium-replay", "walker2d", 42, 1, True, 3),
                RunKey("chibiT", "expert", "halfcheetah", 1, 5)):
        assert parse_run_dir(key.dir_name) == key
    assert parse_run_dir("dt_medium_hopper_666_123456") is None      # merge runs carry an id suffix


def test_normalisation_golden_values():
    """evaluation.md §4: hopper returns 2943.12 / 118.69 / 9.87 -> TAKAGI dataset-based 83.73 / 2.87 / -0.24,
    D4RL 91.05 / 4.27 / 0.93."""
    ref = scores.RECORDED_DATASET_RETURNS["hopper"]
    for r, ds, d4 in ((2943.12, 83.73, 91.05), (118.69, 2.87, 4.27), (9.87, -0.24, 0.93)):
        assert scores.dataset_normalize(r, ref) == pytest.approx(ds, abs=0.005)
        assert scores.d4rl_normalize("hopper", r) == pytest.approx(d4, abs=0.005)


def test_ema_smoothing():
    assert np.allclose(curves.ema_smooth([1.0, 2.0, 3.0]), [1.0, 1.2, 1.56])
    assert np.allclose(curves.ema_smooth([1.0, 2.0, 3.0], legacy=True), [1.2, 1.36, 1.688])  # TAKAGI's y0 = 1.2 x0
    # a missing epoch (NaN in WandB's history) is a gap: it did not carry NaN through the rest of the curve
    nan = float("nan")
    np.testing.assert_allclose(curves.ema_smooth([1.0, nan, 2.0, 3.0]), [1.0, nan, 1.2, 1.56])
    np.testing.assert_allclose(curves.ema_smooth([nan, 1.0, 2.0], legacy=True), [nan, 1.2, 1.36])
    assert curves.ema_smooth([]).shape == (0,) and np.isnan(curves.ema_smooth([nan, nan])).all()


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def two_seed_runs(tmp_path):
    """dt runs of seeds 666 (returns 10, 300, 50) and 42 (100, 200, 250), random/expert datasets of mean return 20
    and 1020 (dataset score = (R - 20) / 10): (checkpoints folder, data folder)."""
    ck = tmp_path / "checkpoints"
    write_run(ck, "dt", epochs=(1,), returns=[10.0, 300.0, 50.0])
    write_run(ck, "dt", seed=42, epochs=(1,), returns=[100.0, 200.0, 250.0])
    data = tmp_path / "data"
    traj = lambda r: {"observations": np.zeros((2, 11), np.float32), "actions": np.zeros((2, 3), np.float32),
                      "rewards": np.array([r, 0.0], np.float32), "terminals": np.array([False, True])}
    write_pkl(data / "hopper-random-v2.pkl", [traj(10.0), traj(30.0)])           # mean return 20
    write_pkl(data / "hopper-expert-v2.pkl", [traj(1020.0)])                      # mean return 1020
    return ck, data


def test_score_table_best_last_and_dataset_norm(tmp_path, capsys):
    ck, data = two_seed_runs(tmp_path)
    main = load_script("analysis/section-4-sanity-check/compute_normalized_score.py").main
    main(["--checkpoint_dir", ck, "--env_name_list", "hopper", "--model_name_list", "dt", "--score_norm", "dataset",
          "--data_path", data, *out(tmp_path)])
    rows = {int(r["seed"]): r for r in _rows(tmp_path / "res" / "normalized_scores_medium_K20_dataset.csv")}
    assert (int(rows[666]["best_epoch"]), float(rows[666]["best_return"])) == (2, 300.0)
    assert (int(rows[666]["last_epoch"]), float(rows[666]["last_return"])) == (3, 50.0)
    assert float(rows[666]["best_score"]) == pytest.approx(28.0) and float(rows[42]["best_score"]) == pytest.approx(23.0)
    table = (tmp_path / "res" / "normalized_scores_medium_K20_dataset_best.md").read_text()
    assert "25.5 ± 2.5" in table                                                  # mean ± population std
    figure_ok(tmp_path / "figs" / "normalized_scores_medium_K20_dataset_best")
    capsys.readouterr()
    msg = expect_exit(capsys, main, ["--checkpoint_dir", ck, "--model_name_list", "gpt2", "--env_name_list", "hopper",
                                     *out(tmp_path)])
    assert f"no run gpt2_medium_hopper_666 in {ck} (train it" in msg, msg


def test_from_wandb_with_a_fake_api(tmp_path, monkeypatch):
    class Run:
        def __init__(self, name, state, values):
            self.name, self.state, self.values = name, state, values

        def scan_history(self):
            return [{"_step": i, "evaluation/target_3600_return_mean": v} for i, v in enumerate(self.values)]

    runs = [Run("gym-experiment-hopper-medium-dt-666", "finished", [5.0, 7.0]),
            Run("gym-experiment-hopper-medium-dt-666-K1", "crashed", [1.0])]

    class Api:
        def runs(self, path, filters=None):
            assert path == "me/decision-transformer"
            return [r for r in runs if r.name == filters["display_name"]]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=Api))
    rows = curves.run_metrics("unused", RunKey("dt", "medium", "hopper", 666), True, entity="me")
    assert curves.metric_series(rows, "evaluation/target_3600_return_mean")[1].tolist() == [5.0, 7.0]
    with pytest.raises(UserError, match="no finished WandB run named gym-experiment-hopper-medium-dt-666-K1"):
        curves.run_metrics("unused", RunKey("dt", "medium", "hopper", 666, 1), True, entity="me")
    with pytest.raises(UserError, match="no finished WandB run named gym-experiment-hopper-medium-gpt2-666"):
        curves.run_metrics("unused", RunKey("gpt2", "medium", "hopper", 666), True, entity="me")


def test_learning_curve_scripts(tmp_path, tiny_runs):  # noqa: F811
    nc = load_script("analysis/section-55-fine-tuning-no-context/plot_learning_curve_no_context.py").main
    base = ["--checkpoint_dir", tiny_runs, "--env_name_list", "hopper", *out(tmp_path)]
    nc(base)
    figure_ok(tmp_path / "figs" / "learning_curve_no_context_gpt2_dt_medium_666")
    assert (tmp_path / "res" / "normalized_scores_medium_K1_d4rl_seed666_best.md").is_file()  # Table 2
    nc(base + ["-block"])
    rows = _rows(tmp_path / "res" / "learning_curve_block_hopper_medium_666.csv")
    assert {r["curve"] for r in rows} == {"block 0", "block 1", "GPT2 K=1", "Random Init K=1"}  # depth 2 from config
    assert max(int(r["epoch"]) for r in rows) == 10                                # hopper: first 10 epochs
    # an env without block runs is skipped with a note; the hopper figure is still written
    (tmp_path / "res" / "learning_curve_block_hopper_medium_666.csv").unlink()
    outs = curves.run_no_context(curves.build_no_context_parser().parse_args(
        [str(a) for a in ["--checkpoint_dir", tiny_runs, "--env_name_list", "walker2d", "hopper", "-block",
                          *out(tmp_path)]]))
    assert (tmp_path / "res" / "learning_curve_block_hopper_medium_666.csv").is_file()
    assert any(n.startswith("skipped: no block-replacement runs for walker2d") for n in outs.notes)
    with pytest.raises(UserError, match="no block-replacement runs for walker2d"):
        curves.run_no_context(curves.build_no_context_parser().parse_args(
            [str(a) for a in ["--checkpoint_dir", tiny_runs, "--env_name_list", "walker2d", "-block", *out(tmp_path)]]))
    load_script("analysis/section-54-gradient-analysis/plot_learning_curve_grad_clip.py").main(base)
    figure_ok(tmp_path / "figs" / "learning_curve_grad_clip_gpt2_hopper_medium_666")


# ---- checkpoint analyses ----------------------------------------------------------------------------------------

def test_cka_scripts(tmp_path, tiny_runs, capsys):  # noqa: F811
    main = load_script("analysis/section-51-activation-similarity/compute_cka.py").main
    base = ["--checkpoint_dir", tiny_runs, "--env_name_list", "hopper", *DATA, *out(tmp_path)]
    main(base + ["--epoch2", "0", "--no_heatmap"])                               # a checkpoint against itself
    res = tmp_path / "res"
    m = np.load(res / "cka_0_0_gpt2gpt2_hopper_medium_666_bs6_ctx3_state.npy")
    assert m.shape == (18, 18) and np.allclose(np.diag(m), 1.0, atol=1e-4)
    main(base + ["--model_name1", "igpt", "--model_name2", "dt", "--block", "--no_heatmap"])
    assert np.load(res / "cka_0_40_igptdt_hopper_medium_666_block_bs6_ctx3_action.npy").shape == (4, 2)
    main(base + ["--no_context", "--legacy_feature_index", "--no_heatmap"])
    assert np.load(res / "cka_0_40_gpt2gpt2_hopper_medium_666_K1_legacyidx_bs6_ctx3_reward.npy").shape == (18, 18)
    for mdl in ("gpt2", "igpt", "dt"):
        main(base + ["--model_name1", mdl, "--model_name2", mdl, "--heatmap_token_list"] + (["state"] if mdl == "dt"
                                                                                              else []))
    figure_ok(tmp_path / "figs" / "cka_0_40_dtdt_hopper_medium_666_bs6_ctx3_state")
    capsys.readouterr()
    load_script("analysis/section-51-activation-similarity/plot_cka.py").main(
        ["-thr", "0.3", "--env_name_list", "hopper", *DATA, *out(tmp_path)])
    printed = capsys.readouterr().out
    assert "hopper/state gpt2:" in printed and "above 0.3" in printed
    figure_ok(tmp_path / "figs" / "cka_plot_0_40_gpt2_igpt_dt_hopper_medium_666_bs6_ctx3_state")
    rows = _rows(res / "cka_plot_0_40_gpt2_igpt_dt_hopper_medium_666_bs6_ctx3_state.csv")
    assert sum(r["model"] == "igpt" for r in rows) == 18                            # 4 blocks averaged onto 2
    igpt_diag = np.diag(np.load(res / "cka_0_40_igptigpt_hopper_medium_666_bs6_ctx3_state.npy"))
    first = next(float(r["cka"]) for r in rows if r["model"] == "igpt")
    assert first == pytest.approx((igpt_diag[0] + igpt_diag[9]) / 2)              # 0.ln_1 with 1.ln_1


def test_cka_estimator_variants_keep_their_own_results_and_figures(tmp_path, tiny_runs):  # noqa: F811
    """compute_cka.py --kernel rbf / --biased / --eps wrote the default run's file names: a variant replaced the
    default results, and an interrupted variant run left a set mixing both that plot_cka.py drew. Variants are now
    tagged, plot_cka.py reads them with the same flags, and its figures carry the tags (also --block's, which
    replaced the full figure)."""
    cka_main = load_script("analysis/section-51-activation-similarity/compute_cka.py").main
    plot_main = load_script("analysis/section-51-activation-similarity/plot_cka.py").main
    base = ["--checkpoint_dir", tiny_runs, "--env_name_list", "hopper", "--model_name1", "dt", "--model_name2", "dt",
            "--block", "--no_heatmap", *DATA, *out(tmp_path)]
    variant = ["--kernel", "rbf", "--rbf_threshold", "0.5", "--biased", "--eps", "1e-06"]
    cka_main([str(a) for a in base])
    cka_main([str(a) for a in base + variant])
    res = tmp_path / "res"
    plain = np.load(res / "cka_0_40_dtdt_hopper_medium_666_block_bs6_ctx3_state.npy")
    tagged = np.load(res / "cka_0_40_dtdt_hopper_medium_666_block_rbf0.5_biased_eps1e-06_bs6_ctx3_state.npy")
    assert plain.shape == tagged.shape and not np.allclose(plain, tagged)
    plot = ["--env_name_list", "hopper", "--model_name_list", "dt", "--block", "--token_list", "state", *DATA,
            *out(tmp_path)]
    plot_main(plot)
    plot_main(plot + variant)
    figs = sorted(p.stem for p in (tmp_path / "figs").glob("cka_plot_*.png"))
    assert figs == ["cka_plot_0_40_dt_hopper_medium_666_block_bs6_ctx3_state",
                    "cka_plot_0_40_dt_hopper_medium_666_block_rbf0.5_biased_eps1e-06_bs6_ctx3_state"]
    drawn = {r["layer"]: float(r["cka"]) for r in _rows(res / f"{figs[1]}.csv")}
    assert list(drawn.values()) == pytest.approx(np.diagonal(tagged).tolist())


def test_parameter_similarity(tmp_path, tiny_runs):  # noqa: F811
    main = load_script("analysis/section-53-parameter-similarity/parameter_similarity_analysis.py").main
    main(["-plm", tiny_runs, *out(tmp_path)])
    main(["-plm", tiny_runs, "--concat", *out(tmp_path)])
    res = tmp_path / "res"
    dist = np.load(res / "paramdist_0_40_dt_hopper_medium_666.npy")
    cos = np.load(res / "paramcos_0_40_dt_hopper_medium_666.npy")
    assert dist.shape == cos.shape == (24,)                                       # 12 tensors x 2 blocks
    key = RunKey("dt", "medium", "hopper", 666)
    a = load_state_dict(tiny_runs, key, 0)[0]["transformer.h.1.attn.c_attn.weight"].double()
    b = load_state_dict(tiny_runs, key, 40)[0]["transformer.h.1.attn.c_attn.weight"].double()
    assert dist[14] == pytest.approx(float((b - a).norm()))                       # 1.attn.c_attn.weight
    assert cos[14] == pytest.approx(float(a.flatten() @ b.flatten() / (a.norm() * b.norm() + 1e-6)))
    cat = np.load(res / "paramdist_0_40_dt_hopper_medium_666_concat.npy")
    assert np.allclose(cat, [np.sqrt((dist[:12] ** 2).sum()), np.sqrt((dist[12:] ** 2).sum())])
    assert np.load(res / "paramdist_0_40_igpt_hopper_medium_666.npy").shape == (48,)
    figure_ok(tmp_path / "figs" / "paramcos_0_40_gpt2_igpt_dt_hopper_medium_666")


def test_gradient_scripts(tmp_path, tiny_runs):  # noqa: F811
    conf = load_script("analysis/section-54-gradient-analysis/compute_grad_confusion.py").main
    base = ["--checkpoint_dir", tiny_runs, "--env_name_list", "hopper", "--model_name_list", "gpt2", "dt", *DATA]
    conf(base + out(tmp_path))
    res = tmp_path / "res"
    c = np.load(res / "gradcossim_1_dt_hopper_medium_666_bs6_ctx3.npy")   # (--batch_size 6: tagged)
    assert c.shape == (6, 6) and np.allclose(np.diag(c), 1.0, atol=1e-5) and np.allclose(c, c.T, atol=1e-6)
    rows = {r["model"]: r for r in _rows(res / "grad_confusion_1_gpt2_dt_hopper_medium_666_bs6_ctx3.csv")}
    assert float(rows["dt"]["min_cosine"]) == pytest.approx(c[~np.eye(6, dtype=bool)].min(), abs=1e-6)
    # the mean over the pairs i != j, as the minimum: the diagonal's ones are left out
    assert float(rows["dt"]["mean_cosine"]) == pytest.approx(c[~np.eye(6, dtype=bool)].mean(), abs=1e-6)
    figure_ok(tmp_path / "figs" / "grad_confusion_1_gpt2_dt_hopper_medium_666_bs6_ctx3")
    conf(base + ["--independent_batches"] + out(tmp_path / "ind"))
    ind = tmp_path / "ind" / "res"
    assert np.allclose(np.load(ind / "gradcossim_1_gpt2_hopper_medium_666_indep_bs6_ctx3.npy"),
                       np.load(res / "gradcossim_1_gpt2_hopper_medium_666_bs6_ctx3.npy"))  # first draw: the same batch
    assert not np.allclose(np.load(ind / "gradcossim_1_dt_hopper_medium_666_indep_bs6_ctx3.npy"), c)  # then another
    norm = load_script("analysis/section-54-gradient-analysis/compute_grad_norm.py").main
    norm(base + out(tmp_path))
    n = np.load(res / "gradnorms_1_gpt2_dt_hopper_medium_666_bs6_ctx3.npy")
    assert n.shape == (2, 6) and (n > 0).all() and (n <= 0.25 + 1e-6).all()
    norm(base + ["--unclipped", "--train_mode", "false"] + out(tmp_path))
    assert np.load(res / "gradnorms_1_gpt2_dt_hopper_medium_666_unclipped_evalmode_bs6_ctx3.npy").shape == (2, 6)
    pp = _rows(res / "gradnorm_perparam_1_dt_hopper_medium_666_bs6_ctx3.csv")
    assert len(pp) == 24 and pp[0]["parameter"] == "0.ln_1.weight"
    figure_ok(tmp_path / "figs" / "gradnorm_perparam_1_dt_hopper_medium_666_bs6_ctx3")


def test_attention_script_and_missing_checkpoint(tmp_path, tiny_runs, capsys):  # noqa: F811
    main = load_script("analysis/section-56-dependence-on-context/compute_attention_distance.py").main
    base = ["--checkpoint_dir", tiny_runs, "--env_name_list", "hopper", "--batch_size", "6", *out(tmp_path)]
    main(base + ["--model_name_list", "gpt2", "igpt"])                           # K=1 runs, 20-step contexts
    res = tmp_path / "res"
    gap = np.load(res / "att_dist_diff_0_4_igpt_hopper_medium_666_K1_bs6.npy")
    d0 = np.load(res / "att_dist_0_igpt_hopper_medium_666_K1_bs6.npy")
    d4 = np.load(res / "att_dist_4_igpt_hopper_medium_666_K1_bs6.npy")
    assert gap.shape == (6, 4, 2) and np.allclose(gap, np.abs(d4 - d0)) and (d0 <= 59).all()
    figure_ok(tmp_path / "figs" / "att_dist_diff_0_4_gpt2_igpt_hopper_medium_666_K1_bs6")
    main(base + ["--legacy"])
    assert np.load(res / "att_dist_diff_0_4_dt_hopper_medium_666_K20_legacy_bs6.npy").shape == (6, 2, 1)
    msg = expect_exit(capsys, main, base + ["--epoch2", "7"])
    assert "checkpoint not found" in msg and "gpt2_medium_hopper_666_K1/model_7.pt" in msg and "model_40.pt" in msg


def test_model_scripts_leave_out_the_default_envs_without_runs(tmp_path, tiny_runs, capsys):  # noqa: F811
    """The table's commands as typed after training hopper only: CKA, its plot, both gradient scripts and the
    attention distance analyse hopper and leave halfcheetah and walker2d out with a note (they wrote hopper's
    results, then stopped with exit 2 at halfcheetah's missing checkpoint). A missing checkpoint of an env that has
    runs is still the error."""
    scripts = {"cka": "section-51-activation-similarity/compute_cka.py",
               "plot": "section-51-activation-similarity/plot_cka.py",
               "conf": "section-54-gradient-analysis/compute_grad_confusion.py",
               "norm": "section-54-gradient-analysis/compute_grad_norm.py",
               "att": "section-56-dependence-on-context/compute_attention_distance.py"}
    extra = {"cka": ["--block", "--no_heatmap", *DATA], "plot": DATA, "conf": ["--model_name_list", "dt", *DATA],
             "norm": ["--model_name_list", "dt", *DATA], "att": ["--model_name_list", "dt", "--batch_size", "6"]}
    for name, script in scripts.items():
        ck = [] if name == "plot" else ["--checkpoint_dir", str(tiny_runs)]
        load_script(f"analysis/{script}").main(ck + extra[name] + ["--block"] * (name == "plot") + out(tmp_path))
        printed = capsys.readouterr().out
        for env in ("halfcheetah", "walker2d"):
            assert f"note: skipped {env}: no " in printed, (name, printed)
    res = tmp_path / "res"
    assert (res / "cka_0_40_gpt2gpt2_hopper_medium_666_block_bs6_ctx3_state.npy").is_file()
    assert (res / "gradcossim_1_dt_hopper_medium_666_bs6_ctx3.npy").is_file()          # (--batch_size 6: tagged)
    assert (res / "att_dist_diff_0_4_dt_hopper_medium_666_K1_bs6.npy").is_file()
    msg = expect_exit(capsys, load_script(f"analysis/{scripts['cka']}").main,
                      ["--checkpoint_dir", str(tiny_runs), "--epoch2", "7", *extra["cka"], *out(tmp_path)])
    assert "checkpoint not found" in msg and "model_7.pt" in msg


def test_script_from_another_directory(tmp_path, tiny_runs):  # noqa: F811
    """A script runs from any working directory; a missing run is one line naming the path, exit 2."""
    script = ROOT / "analysis" / "section-53-parameter-similarity" / "parameter_similarity_analysis.py"
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, str(script), "-plm", str(tiny_runs), "--model_name_list", "dt",
                           "--env_name", "walker2d", *out(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: checkpoint not found: ")
    assert "dt_medium_walker2d_666/model_0.pt" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "res").exists() or not list((tmp_path / "res").iterdir())


# ---- a real experiment.py run and the whole suite ---------------------------------------------------------------

def test_on_a_real_experiment_run(tmp_path, monkeypatch, hopper_data):
    import experiment

    monkeypatch.chdir(tmp_path)
    experiment.main(["--data_path", str(hopper_data), "--embed_dim", "16", "--n_layer", "2", "--n_head", "2",
                     "--batch_size", "4", "--warmup_steps", "2", "--max_iters", "2", "--num_steps_per_iter", "3",
                     "--num_eval_episodes", "1", "--share_input_output_proj", "--dropout", "0.2"])
    ck = tmp_path / "checkpoints"
    assert (ck / "dt_medium_hopper_666" / "model_2.pt").is_file()
    report = load_script("analysis/run_all.py").main
    report(["--checkpoint_dir", str(ck), "--out_dir", str(tmp_path / "report"), "--batch_size", "6",
            "--grad_batch_size", "4", "--K", "3", "--only", "scores", "cka", "params", "grads"])
    text = (tmp_path / "report" / "report.md").read_text()
    assert "epoch 40 not in every run; CKA uses epoch 2" in text
    assert "Table 1: best normalised score (d4rl)" in text and "| hopper |" in text
    cka = np.load(tmp_path / "report" / "section-51-activation-similarity" / "results"
                  / "cka_0_2_dtdt_hopper_medium_666_bs6_ctx3_state.npy")        # (--batch_size 6 --K 3: tagged)
    assert cka.shape == (18, 18) and np.isfinite(cka).all()
    for title in ("CKA (Fig. 1)", "Figs. 3, 4", "Figs. 5, 6, 7"):
        assert title in text
    assert "**Failed" not in text
    assert "![grad_confusion_1_dt_hopper_medium_666_bs4_ctx3]" in text    # (--grad_batch_size 4 --K 3: tagged)


def test_run_all_writes_one_report(tmp_path, tiny_runs):  # noqa: F811
    """The driver on the tiny runs (CKA, parameters and gradients run in the real-run test above)."""
    load_script("analysis/run_all.py").main([
        "--checkpoint_dir", str(tiny_runs), "--out_dir", str(tmp_path / "rep"), "--batch_size", "6",
        "--K", "3", "--mine_iters", "1", "--mine_hidden", "4", "--skip", "cka", "params", "grads"])
    rep = tmp_path / "rep"
    text = (rep / "report.md").read_text()
    for title in ("Tables 1 and 2", "Fig. 8", "CKA (Fig. 1)", "MINE", "Figs. 3, 4", "Figs. 5, 6, 7", "Fig. 10"):
        assert title in text
    assert "**Failed" not in text and text.count("Skipped (--skip / --only).") == 3
    assert "| hopper | gpt2 | 42, 666, 666_K1, 666_no_grad_clip |" in text
    links = [line[line.index("](") + 2:-1] for line in text.splitlines() if line.startswith("![")]
    assert len(links) >= 8 and all((rep / link).is_file() for link in links)
    mres = rep / "section-52-mutual-information" / "results"
    assert (mres / "mi_xy_2_40_igpt_hopper_medium_666_h4_it1_bs6_ctx3.npz").is_file()   # (the MINE settings, batch)
    cfg = json.loads((tiny_runs / "gpt2_medium_hopper_666" / "config.json").read_text())
    assert cfg["model_name"] == "gpt2"  # the fixture really is named like an LM run
    assert torch.load(tiny_runs / "gpt2_medium_hopper_666" / "model_0.pt", weights_only=True)["format_version"] == 1


def test_run_all_draws_one_block_replacement_figure_per_lm(tmp_path):
    """GPT-2 block runs (dt_..._block{b}) and iGPT block runs (dt-igpt_..._block{b}) in one folder: run_all draws
    Figure 9 for each, each against its own LM's K=1 run."""
    ck = tmp_path / "ck"
    for b in range(2):
        write_run(ck, "dt", K=1, block=b, epochs=(1, 2))
        write_run(ck, "dt-igpt", K=1, block=b, epochs=(1, 2))
    for m in ("gpt2", "igpt", "dt"):
        write_run(ck, m, K=1, epochs=(1, 2))
    load_script("analysis/run_all.py").main([
        "--checkpoint_dir", str(ck), "--out_dir", str(tmp_path / "rep"), "--only", "curves"])
    figs = tmp_path / "rep" / "section-55-fine-tuning-no-context" / "figs"
    assert (figs / "learning_curve_block_hopper_medium_666.png").is_file()
    assert (figs / "learning_curve_block_hopper_medium_666_igpt.png").is_file()
    rows = _rows(figs.parent / "results" / "learning_curve_block_hopper_medium_666_igpt.csv")
    assert {r["curve"] for r in rows} == {"block 0", "block 1", "iGPT K=1", "Random Init K=1"}


def test_run_all_leaves_an_env_without_d4rl_scores_out_of_the_score_tables(tmp_path):
    """A reacher2d run next to hopper's (as after the README's reacher2d smoke run): the score step made the whole
    driver fail ("reacher2d has no D4RL reference returns"); it now tables hopper, says why reacher2d is not there,
    and the learning curves are still drawn."""
    ck = tmp_path / "ck"
    for env in ("hopper", "reacher2d"):
        write_run(ck, "dt", env=env, epochs=(1, 2))
        write_run(ck, "dt", env=env, K=1, epochs=(1, 2))
    load_script("analysis/run_all.py").main([
        "--checkpoint_dir", str(ck), "--out_dir", str(tmp_path / "rep"), "--only", "scores", "curves"])
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "**Failed" not in text
    assert "reacher2d: no D4RL reference returns, so no normalised score; left out of the score tables" in text
    scores = text[text.index("## Section 4"):text.index("## Learning curves")]
    rows = [line for line in scores.splitlines() if line.startswith("| ") and not line.startswith("| env")]
    assert rows == ["| hopper | 7.4 (1 seed) |"] * 4                    # Tables 1 and 2, best and last
    assert (tmp_path / "rep" / "section-55-fine-tuning-no-context" / "figs"
            / "learning_curve_no_context_dt_medium_666.png").is_file()


def test_corrupt_inputs_are_one_line_errors(tmp_path, capsys):
    ck = tmp_path / "checkpoints"
    d = write_run(ck, "dt", epochs=(1,))
    (d / "metrics.jsonl").write_text('{"iteration": 1}\n{not json\n')
    main = load_script("analysis/section-4-sanity-check/compute_normalized_score.py").main
    msg = expect_exit(capsys, main, ["--checkpoint_dir", ck, "--model_name_list", "dt", "--env_name_list", "hopper",
                                     "--seed_list", "666", *out(tmp_path)])
    assert "dt_medium_hopper_666/metrics.jsonl: line 2 is not valid JSON" in msg
    (d / "model_1.pt").write_bytes(b"garbage")
    params = load_script("analysis/section-53-parameter-similarity/parameter_similarity_analysis.py").main
    msg = expect_exit(capsys, params, ["-plm", ck, "--model_name_list", "dt", "--epoch2", "1", *out(tmp_path)])
    assert "model_1.pt: not a loadable checkpoint" in msg
    (tmp_path / "data_hopper_medium_666.npz").write_bytes(b"PK garbage")
    run_mi = load_script("mine/run_mi_exp.py").main
    msg = expect_exit(capsys, run_mi, ["-pd", tmp_path, "-psm", tmp_path, "--exp_type", "data", "--device", "cpu"])
    assert "data_hopper_medium_666.npz: not a readable .npz file" in msg
