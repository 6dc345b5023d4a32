"""The score tables (analysis/scores.py, results_table.py) say what they average: a run that stopped before its
max_iters, runs of one cell with other recorded flags, a diverged (NaN / null) last evaluation, a cell over fewer seeds
than the title names; and the no-context script's single-seed Table 2 does not replace the table over seeds."""
import csv
import json
import math
import sys
import types

import numpy as np

from decision_transformer import results_table
from decision_transformer.analysis import curves, report, scores
from decision_transformer.checkpoint import run_dir_name

RET = "evaluation/target_3600_return_mean"


def metrics_run(root, model="dt", seed=666, K=20, returns=(1000.0, 2000.0, 1500.0), config=None, env="hopper"):
    """A run folder with metrics.jsonl (one row per iteration, both hopper targets) and, given ``config``, a
    config.json."""
    d = root / run_dir_name(model, "medium", env, seed, K, False, None)
    d.mkdir(parents=True)
    rows = [{"iteration": i, "training/action_error": 1.0 / i, RET: r,
             "evaluation/target_1800_return_mean": None if r is None else r / 2} for i, r in enumerate(returns, 1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config is not None:
        (d / "config.json").write_text(json.dumps({"env": env, "seed": seed, "K": K, **config}))
    return d


def score_args(ck, tmp_path, *extra, seeds=(666,), models=("dt",)):
    return scores.build_parser().parse_args([str(a) for a in [
        "--checkpoint_dir", ck, "--env_name_list", "hopper", "--model_name_list", *models, "--seed_list", *seeds,
        "--results_dir", tmp_path / "res", "--figs_dir", tmp_path / "figs", "--no_figure", *extra]])


def hopper_row(outs):
    return next(line for line in outs.tables[0][1].splitlines() if line.startswith("| hopper"))


def csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# ---- 1. an unfinished run, runs of other flags ----------------------------------------------------------------------

FULL = {"max_iters": 3, "embed_dim": 128, "n_layer": 3, "learning_rate": 1e-4, "device": "cuda", "threads": "auto",
        "outdir": "checkpoints"}


def test_a_run_stopped_before_its_max_iters_is_named_and_its_cell_marked(tmp_path, capsys):
    ck = tmp_path / "ck"
    metrics_run(ck, seed=42, config=FULL)
    metrics_run(ck, seed=666, returns=(1000.0,), config=FULL)                  # stopped at iteration 1 of 3
    outs = scores.run(score_args(ck, tmp_path, seeds=(42, 666)))
    err = capsys.readouterr().err
    assert "dt_medium_hopper_666: stopped at iteration 1 of 3" in err
    assert "dt_medium_hopper_42" not in err
    row = hopper_row(outs)
    assert row.rstrip(" |").endswith(results_table.INCOMPLETE_MARK)
    table = outs.tables[0][1]
    assert "had not reached its max_iters: dt_medium_hopper_666 (stopped at iteration 1 of 3)" in table
    assert table in (tmp_path / "res" / "normalized_scores_medium_K20_d4rl_best.md").read_text()
    by_seed = {r["seed"]: r for r in csv_rows(tmp_path / "res" / "normalized_scores_medium_K20_d4rl.csv")}
    assert (by_seed["666"]["last_iteration"], by_seed["666"]["max_iters"]) == ("1", "3")


def test_runs_of_one_cell_with_other_flags_are_noted_naming_the_flag(tmp_path, capsys):
    ck = tmp_path / "ck"
    metrics_run(ck, seed=42, config=FULL)
    metrics_run(ck, seed=666, config={**FULL, "embed_dim": 256, "device": "cpu", "threads": 4, "outdir": "elsewhere"})
    outs = scores.run(score_args(ck, tmp_path, seeds=(42, 666)))
    err = capsys.readouterr().err
    assert "embed_dim" in err and "dt_medium_hopper_42" in err and "dt_medium_hopper_666" in err
    assert not any(f in err for f in ("device", "threads", "outdir", "seed"))   # not compared
    assert hopper_row(outs).rstrip(" |").endswith(results_table.MIXED_MARK)
    assert "embed_dim 128 (dt_medium_hopper_42), 256 (dt_medium_hopper_666)" in outs.tables[0][1]


def test_the_model_sizes_are_read_from_the_recorded_architecture(tmp_path, capsys):
    """A pretrained LM's config replaces --n_layer: the runs' model_config says what they trained."""
    ck = tmp_path / "ck"
    metrics_run(ck, seed=42, config={**FULL, "model_config": {"backbone": {"n_embd": 768, "n_layer": 12}}})
    metrics_run(ck, seed=666, config={**FULL, "n_layer": 6, "model_config": {"backbone": {"n_embd": 768,
                                                                                           "n_layer": 6}}})
    outs = scores.run(score_args(ck, tmp_path, seeds=(42, 666)))
    assert "n_layer 12 (dt_medium_hopper_42), 6 (dt_medium_hopper_666)" in outs.tables[0][1]
    assert "embed_dim" not in capsys.readouterr().err


def test_runs_without_config_are_read_as_before(tmp_path, capsys):
    ck = tmp_path / "ck"
    metrics_run(ck, seed=42)
    metrics_run(ck, seed=666, returns=(1000.0,))
    outs = scores.run(score_args(ck, tmp_path, seeds=(42, 666)))
    assert capsys.readouterr().err == ""
    best = [float(r["best_score"]) for r in csv_rows(tmp_path / "res" / "normalized_scores_medium_K20_d4rl.csv")]
    assert outs.tables[0][1] == f"| env | Random Init |\n|---|---|\n| hopper | {scores.mean_std(best)} |"
    assert "±" in scores.mean_std(best)


def test_results_table_marks_a_stopped_run_and_notes_rows_of_other_flags(tmp_path, capsys):
    def run(name, n_rows, **cfg):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"env": cfg.pop("env", "hopper"), **cfg}))
        env = json.loads((d / "config.json").read_text())["env"]
        T = {"hopper": 3600, "walker2d": 5000}[env]
        rows = [{"iteration": i, f"evaluation/target_{T}_return_mean": 1000.0 * i,
                 f"evaluation/target_{T}_d4rl_score_mean": 10.0 * i} for i in range(1, n_rows + 1)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return d

    short = run("short", 1, max_iters=3, n_layer=3)
    walk = run("walk", 3, env="walker2d", max_iters=3, n_layer=4)
    capsys.readouterr()
    for pick in ("last", "best"):
        assert results_table.read_run(str(short), pick) == {"hopper": 10.0}
        assert f"{short}: stopped at iteration 1 of 3" in capsys.readouterr().err
    assert results_table.read_run(str(walk), "last") == {"walker2d": 30.0}
    assert capsys.readouterr().err == ""
    results_table.main(["--row", f"src={short}", "--row", f"src={walk}", "--envs", "hopper", "walker2d",
                        "--pick", "last"])
    cap = capsys.readouterr()
    assert f"{short}: stopped at iteration 1 of 3" in cap.err
    assert "row 'src'" in cap.err and "n_layer 3 (" in cap.err and "4 (" in cap.err
    assert "| src | 10.0† | 30.0 | 20.0‡ |" in cap.out
    assert f"† from a run that had not reached its max_iters: {short} (stopped at iteration 1 of 3)" in cap.out
    assert "‡ row src: run folders with other flags: n_layer" in cap.out


def test_results_table_notes_a_row_of_merges_made_differently(tmp_path, capsys):
    """A mean merge and a Fisher merge (or other --include substrings) in one row are named, their average marked;
    --use_fisher is --merge_method fisher, and the order of the substrings does not matter."""
    def run(name, env, **cfg):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"env": env, "max_iters": 1, **cfg}))
        T = {"hopper": 3600, "walker2d": 5000}[env]
        (d / "metrics.jsonl").write_text(json.dumps({"iteration": 1, f"evaluation/target_{T}_return_mean": 1.0,
                                                     f"evaluation/target_{T}_d4rl_score_mean": 5.0}) + "\n")
        return d

    mean = run("mean", "hopper", merge_method="mean", use_fisher=False, include=["attn", "mlp"])
    fisher = run("fisher", "walker2d", merge_method="mean", use_fisher=True, include=["mlp", "attn"])
    results_table.main(["--row", f"m={mean}", "--row", f"m={fisher}", "--envs", "hopper", "walker2d"])
    cap = capsys.readouterr()
    assert f"differ in merge_method \"mean\" ({mean}), \"fisher\" ({fisher})" in cap.err
    assert "include" not in cap.err
    assert "| m | 5.0 | 5.0 | 5.0‡ |" in cap.out
    same = run("fisher2", "hopper", merge_method="fisher", include=["attn", "mlp"])
    results_table.main(["--row", f"m={same}", "--row", f"m={fisher}", "--envs", "hopper", "walker2d"])
    assert "| m | 5.0 | 5.0 | 5.0 |" in capsys.readouterr().out


# ---- 2. a diverged last evaluation -----------------------------------------------------------------------------------

def test_the_last_is_the_last_evaluated_epoch_also_when_nan():
    assert scores.best_and_last(np.array([1, 2, 3]), np.array([10.0, 300.0, math.nan]))[1:3] == (300.0, 3)
    assert math.isnan(scores.best_and_last(np.array([1, 2, 3]), np.array([10.0, 300.0, math.nan]))[3])
    assert scores.best_and_last(np.array([1, 2]), np.array([math.nan, 5.0])) == (2, 5.0, 2, 5.0)


def test_a_wandb_run_whose_last_evaluation_is_nan_has_a_nan_last(tmp_path, monkeypatch, capsys):
    class Run:
        def __init__(self, name, values):
            self.name, self.state, self.values = name, "finished", values

        def scan_history(self):
            return [{"_step": i, RET: v} for i, v in enumerate(self.values)]

    runs = [Run("gym-experiment-hopper-medium-dt-666", [1000.0, 2000.0, math.nan]),
            Run("gym-experiment-hopper-medium-dt-42", [1000.0, 1500.0, 1800.0])]

    class Api:
        def runs(self, path, filters=None):
            return [r for r in runs if r.name == filters["display_name"]]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=Api))
    outs = scores.run(score_args(tmp_path / "ck", tmp_path, "--from_wandb", "--select", "last", seeds=(42, 666)))
    by_seed = {r["seed"]: r for r in csv_rows(tmp_path / "res" / "normalized_scores_medium_K20_d4rl.csv")}
    assert by_seed["666"]["last_epoch"] == "3" and by_seed["666"]["last_return"] == "nan"
    assert float(by_seed["666"]["best_return"]) == 2000.0
    row = hopper_row(outs)
    assert f"{scores.d4rl_normalize('hopper', 1800.0):.1f} (1 of 2 seeds)" in row
    assert "dt_medium_hopper_666 (epoch 3)" in outs.tables[0][1]
    assert "dt_medium_hopper_666: its last evaluation (epoch 3) is NaN" in capsys.readouterr().err
    outs = scores.run(score_args(tmp_path / "ck", tmp_path, "--from_wandb", "--select", "best", seeds=(42, 666)))
    assert "NaN evaluations (diverged) left out of the best: dt_medium_hopper_666 (epoch 3)" in outs.tables[0][1]
    assert "(1 of 2 seeds)" not in hopper_row(outs)


def test_a_null_last_score_of_a_local_run_is_nan_not_an_earlier_epoch(tmp_path):
    ck = tmp_path / "ck"
    metrics_run(ck, returns=(1000.0, 2000.0, None))
    outs = scores.run(score_args(ck, tmp_path, "--select", "last"))
    assert hopper_row(outs) == "| hopper | n/a |"
    assert "last evaluation NaN (diverged), left out of the mean: dt_medium_hopper_666 (epoch 3)" in outs.tables[0][1]


def test_results_table_last_is_the_last_evaluated_iteration_also_when_null(tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"env": "hopper"}))
    rows = [{"iteration": 1, RET: 1000.0, "evaluation/target_3600_d4rl_score_mean": 30.0},
            {"iteration": 2, RET: None, "evaluation/target_3600_d4rl_score_mean": None}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    last = results_table.read_run(str(d), "last")
    assert list(last) == ["hopper"] and math.isnan(last["hopper"])
    assert f"{d}: its last evaluation (iteration 2) has a null hopper score" in capsys.readouterr().err
    assert results_table.read_run(str(d), "best") == {"hopper": 30.0}
    assert f"{d}: iteration 2 evaluated NaN or null" in capsys.readouterr().err
    results_table.main(["--row", f"m={d}@last", "--envs", "hopper", "walker2d"])
    assert "| m | nan | — | — |" in capsys.readouterr().out


# ---- 3. the no-context script's single-seed Table 2 -----------------------------------------------------------------

def test_the_single_seed_table_2_does_not_replace_the_table_over_seeds(tmp_path):
    ck = tmp_path / "ck"
    for seed in (42, 666):
        metrics_run(ck, seed=seed, K=1)
    metrics_run(ck, seed=666, K=20)
    scores.run(score_args(ck, tmp_path, "--K", "1", seeds=(42, 666)))
    res = tmp_path / "res"
    over_seeds = {p.name: p.read_text() for p in res.iterdir()}
    assert set(over_seeds) == {"normalized_scores_medium_K1_d4rl.csv", "normalized_scores_medium_K1_d4rl_best.md"}
    outs = curves.run_no_context(curves.build_no_context_parser().parse_args([str(a) for a in [
        "--checkpoint_dir", ck, "--env_name_list", "hopper", "--model_name_list", "dt", "--results_dir", res,
        "--figs_dir", tmp_path / "figs"]]))
    assert {p.name: p.read_text() for p in res.iterdir() if p.name in over_seeds} == over_seeds   # untouched
    assert {"normalized_scores_medium_K1_d4rl_seed666.csv", "normalized_scores_medium_K1_d4rl_seed666_best.md"} \
        <= {p.name for p in res.iterdir()}
    assert any("seeds [666]" in title for title, _ in outs.tables)
    curves.run_no_context(curves.build_no_context_parser().parse_args([str(a) for a in [
        "--checkpoint_dir", ck, "--env_name_list", "hopper", "--model_name_list", "dt", "--results_dir", res,
        "--figs_dir", tmp_path / "figs", "--target", "1800"]]))
    assert (res / "normalized_scores_medium_K1_d4rl_seed666_target1800_best.md").is_file()


# ---- 4. a cell over fewer seeds than the title names ----------------------------------------------------------------

def test_a_cell_over_fewer_seeds_than_the_title_says_so():
    assert scores.mean_std([1.0, 2.0], 3) == "1.5 ± 0.5 (2 of 3 seeds)"
    assert scores.mean_std([1.0, 2.0, math.nan], 3) == "1.5 ± 0.5 (2 of 3 seeds)"
    assert scores.mean_std([1.0], 3) == "1.0 (1 of 3 seeds)"
    assert scores.mean_std([1.0], 1) == "1.0 (1 seed)"
    assert scores.mean_std([1.0, 2.0, 3.0], 3) == "2.0 ± 0.8"
    assert scores.mean_std([math.nan], 3) == "n/a"


def test_run_all_marks_a_cell_over_two_of_three_seeds(tmp_path):
    ck = tmp_path / "ck"
    for seed in (7, 42, 666):
        metrics_run(ck, "gpt2", seed=seed)
    for seed in (42, 666):
        metrics_run(ck, "dt", seed=seed)
    args = report.build_parser().parse_args([str(a) for a in ["--checkpoint_dir", ck, "--out_dir", tmp_path / "rep",
                                                              "--only", "scores"]])
    text = report.run(args).read_text()
    title = "**Table 1: best normalised score (d4rl), medium, K=20, mean ± std over seeds [7, 42, 666]**"
    assert title in text
    header, _, row = text[text.index(title):].splitlines()[2:5]
    assert header == "| env | GPT2 | Random Init |"
    cells = row.strip("| ").split(" | ")
    assert cells[1].endswith("(REID 79.1 ± 1.1)") and "seeds)" not in cells[1]    # GPT2: all three seeds
    assert "(2 of 3 seeds)" in cells[2]                                            # Random Init: two


def test_merge_flags_are_compared_only_where_the_merge_method_reads_them():
    """--no_trace_norm is --fisher_norm none; the Fisher flags of mean merges (recorded at their defaults, unread)
    and the task-vector scale of Fisher merges are not compared, the Fisher flags of Fisher merges are."""
    fisher = dict(merge_method="fisher", fisher_norm="trace", no_trace_norm=False, f_batch_size=64, merge_lambda=None)
    same = results_table.flag_differences({"a": {**fisher, "no_trace_norm": True},
                                           "b": {**fisher, "fisher_norm": "none"}})
    assert same == []
    differ = results_table.flag_differences({"a": {**fisher, "no_trace_norm": True}, "b": fisher})
    assert len(differ) == 1 and differ[0].startswith("fisher_norm") and "no_trace_norm" not in differ[0]
    mean = dict(fisher, merge_method="mean")
    assert results_table.flag_differences({"a": {**mean, "f_batch_size": 8, "no_trace_norm": True}, "b": mean}) == []
    ties = dict(merge_method="ties", merge_lambda=1.0, ties_density=0.2, f_batch_size=64)
    assert results_table.flag_differences({"a": ties, "b": {**ties, "f_batch_size": 8}}) == []
    assert [d.split()[0] for d in results_table.flag_differences({"a": ties, "b": {**ties, "merge_lambda": 0.5}})] \
        == ["merge_lambda"]
