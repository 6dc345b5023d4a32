"""The results table (decision_transformer/results_table.py) and Minari import/export (data/minari_datasets.py,
decision_transformer/minari_io.py): what they read, what they pick and write, and one ``error:`` line for input they
cannot use."""
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import fails, load_script

from decision_transformer import results_table
from decision_transformer.checkpoint import atomic_save, make_checkpoint
from decision_transformer.envs import get_env_spec
from decision_transformer.errors import UserError
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig

# ---- run folders as experiment.py / experiment_multi.py write them ---------------------------------------------------


def single_row(env, it, ret, score):
    T = int(get_env_spec(env).targets[0])
    return {f"evaluation/target_{T}_return_mean": ret, f"evaluation/target_{T}_d4rl_score_mean": score,
            "iteration": it}


def multi_row(envs, it, avg, scores):
    row = {"evaluation/average_norm_return_mean": avg, "iteration": it}
    for env, s in zip(envs, scores):
        spec = get_env_spec(env)
        row[f"evaluation/target_{int(spec.targets[0])}_{spec.gym_id('v4')}_d4rl_score_mean"] = s
    return row


def call(main, argv):
    """An entry point run with ``argv`` as the command line would give it (strings)."""
    return main([str(a) for a in argv])


def run_folder(path: Path, config, rows) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    (path / "metrics.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def merge_run(path: Path, rows, it0=None) -> Path:
    """An experiment.py merge run: iteration 0 (the merged model before finetuning) in its config and metrics."""
    it0 = it0 or single_row("hopper", 0, 3000.0, 90.0)
    return run_folder(path, {"env": "hopper", "env_version": "v4", "merge_info": {"method": "fisher",
                                                                                    "iteration_0": it0}},
                      [it0, *rows])


# ---- best / last leave iteration 0 out -------------------------------------------------------------------------------

def test_best_and_last_leave_the_merge_evaluation_out(tmp_path):
    run = merge_run(tmp_path / "run", [single_row("hopper", 1, 1000.0, 30.0), single_row("hopper", 2, 2000.0, 60.0),
                                       single_row("hopper", 3, 1500.0, 45.0)])
    assert results_table.read_run(str(run), "best") == {"hopper": 60.0}       # not iteration 0's 90
    assert results_table.read_run(str(run), "last") == {"hopper": 45.0}
    assert results_table.read_run(str(run), "0") == {"hopper": 90.0}


def test_a_run_of_other_env_targets_is_read_at_its_own_first_target(tmp_path):
    """A run made with --env_targets selects its best iteration by its first target and logs only its targets: the
    table reads it the same way (it said "no evaluation" for --env_targets 1800, and picked by 3600 for 1800,3600)."""
    def row(it, r1800, s1800, r3600=None, s3600=None):
        out = {"iteration": it, "evaluation/target_1800_return_mean": r1800,
               "evaluation/target_1800_d4rl_score_mean": s1800}
        if r3600 is not None:
            out |= {"evaluation/target_3600_return_mean": r3600, "evaluation/target_3600_d4rl_score_mean": s3600}
        return out

    only = run_folder(tmp_path / "only", {"env": "hopper", "env_targets": "1800"},
                      [row(1, 1000.0, 30.0), row(2, 1500.0, 45.0), row(3, 1200.0, 36.0)])
    assert results_table.read_run(str(only), "best") == {"hopper": 45.0}
    assert results_table.read_run(str(only), "last") == {"hopper": 36.0}
    both = run_folder(tmp_path / "both", {"env": "hopper", "env_targets": "1800,3600"},
                      [row(1, 1000.0, 30.0, 2000.0, 60.0), row(2, 1700.0, 51.0, 1000.0, 30.0)])
    assert results_table.read_run(str(both), "best") == {"hopper": 51.0}     # iteration 2, best at 1800
    bad = run_folder(tmp_path / "bad", {"env": "hopper", "env_targets": "1800,,3600"}, [row(1, 1.0, 1.0)])
    with pytest.raises(UserError, match="config.json: recorded --env_targets has an empty entry"):
        results_table.read_run(str(bad), "best")


def test_a_run_with_only_iteration_0_says_so(tmp_path, capsys):
    run = merge_run(tmp_path / "run", [])
    for pick in ("best", "last"):
        with pytest.raises(UserError, match=r"metrics.jsonl holds only iteration 0 .*read it with @0"):
            results_table.read_run(str(run), pick)
    assert "only iteration 0" in fails(results_table.main, ["--row", f"m={run}@last"], capsys)
    assert results_table.read_run(str(run), "0") == {"hopper": 90.0}


def test_last_is_the_highest_iteration_and_an_iteration_logged_twice_is_refused(tmp_path, capsys):
    run = run_folder(tmp_path / "run", {"env": "hopper"},
                     [single_row("hopper", 1, 1000.0, 30.0), single_row("hopper", 3, 1500.0, 45.0),
                      single_row("hopper", 2, 2000.0, 60.0)])
    assert results_table.read_run(str(run), "last") == {"hopper": 45.0}      # iteration 3, not the file's last row
    twice = run_folder(tmp_path / "twice", {"env": "hopper"},
                       [single_row("hopper", 1, 1000.0, 30.0), single_row("hopper", 2, 2000.0, 60.0),
                        single_row("hopper", 2, 3000.0, 90.0)])
    assert fails(results_table.main, ["--row", f"m={twice}@last"], capsys).endswith(
        f"{twice / 'metrics.jsonl'}: iteration 2 is logged twice (rows 2 and 3)")


# ---- NaN is never the best -------------------------------------------------------------------------------------------

def test_a_nan_score_is_not_picked_as_best(tmp_path):
    run = run_folder(tmp_path / "run", {"env": "hopper"},
                     [single_row("hopper", 1, 1000.0, 30.0), single_row("hopper", 2, math.nan, 99.0),
                      single_row("hopper", 3, 500.0, 15.0)])
    assert results_table.read_run(str(run), "best") == {"hopper": 30.0}
    envs = ["hopper", "walker2d"]
    multi = run_folder(tmp_path / "multi", {"model_class": "multi_dt", "envs": envs},
                       [multi_row(envs, 1, math.nan, [99.0, 99.0]), multi_row(envs, 2, 0.4, [40.0, 20.0])])
    assert results_table.read_run(str(multi), "best") == {"hopper": 40.0, "walker2d": 20.0}


@pytest.mark.parametrize("score", [math.nan, math.inf, "90.0", True])
def test_a_score_that_is_not_a_finite_number_is_one_line_naming_the_iteration(tmp_path, capsys, score):
    """A run never logs a non-finite D4RL score (a diverged evaluation stops it): one in metrics.jsonl is a damaged
    file, said with its iteration, not printed as 'nan' in the table (or a traceback for a string)."""
    run = run_folder(tmp_path / "run", {"env": "hopper"},
                     [single_row("hopper", 1, 1000.0, 30.0), single_row("hopper", 2, 2000.0, score)])
    for pick in ("best", "last"):
        msg = fails(results_table.main, ["--row", f"m={run}@{pick}"], capsys)
        assert msg.startswith(f"error: {run / 'metrics.jsonl'} (iteration 2): evaluation/target_3600_d4rl_score_mean "
                              f"is {score!r}, not a finite score"), msg
    it0 = merge_run(tmp_path / "merge", [single_row("hopper", 1, 1000.0, 30.0)],
                    it0=single_row("hopper", 0, 3000.0, score))
    assert "(merge_info.iteration_0): evaluation/target_3600_d4rl_score_mean" in fails(
        results_table.main, ["--row", f"m={it0}@0"], capsys)


# ---- damaged run files -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, rows, expect", [
    ([1, 2], [single_row("hopper", 1, 1.0, 1.0)], "config.json: not a run config (a JSON list, not an object)"),
    ({"seed": 1}, [single_row("hopper", 1, 1.0, 1.0)], "config.json: 'env' is not an env name (none)"),
    ({"env": ["hopper"]}, [single_row("hopper", 1, 1.0, 1.0)], "config.json: 'env' is not an env name (['hopper'])"),
    ({"model_class": "multi_dt"}, [single_row("hopper", 1, 1.0, 1.0)],
     "config.json: 'envs' is not a list of env names (none)"),
    ({"model_class": "multi_dt", "envs": "hopper"}, [single_row("hopper", 1, 1.0, 1.0)],
     "config.json: 'envs' is not a list of env names ('hopper')"),
    ({"env": "hopper"}, [single_row("hopper", 1, 1.0, 1.0), "[1, 2]"], "metrics.jsonl: line 2 is a JSON list"),
    ({"env": "hopper"}, ["7", single_row("hopper", 1, 1.0, 1.0)], "metrics.jsonl: line 1 is a JSON int"),
    ({"env": "hopper"}, ['"text"'], "metrics.jsonl: line 1 is a JSON str"),
])
def test_damaged_run_files_are_one_line_naming_the_file(tmp_path, capsys, config, rows, expect):
    run = run_folder(tmp_path / "run", config, rows)
    msg = fails(results_table.main, ["--row", f"r={run}"], capsys)
    assert msg.startswith(f"error: {run}/") and expect in msg


# ---- @0 of a multi-task merge run ------------------------------------------------------------------------------------

def test_0_of_a_multi_task_merge_run_says_what_it_needs(tmp_path, capsys):
    envs = ["hopper", "walker2d"]
    run = run_folder(tmp_path / "multi", {"model_class": "multi_dt", "envs": envs,
                                          "merge_info": {"method": "fisher", "models": ["a.pt"]}},
                     [multi_row(envs, 1, 0.5, [50.0, 40.0])])
    msg = fails(results_table.main, ["--row", f"m={run}@0"], capsys)
    assert "@0 needs a merge run of experiment.py" in msg and "multi-task merge runs record none" in msg
    assert "merge runs with training record one" not in msg


# ---- checkpoints: every entry checked before any evaluation ----------------------------------------------------------

def hopper_checkpoint(path: Path, stats: bool, dataset="medium") -> Path:
    cfg = DTConfig(11, 3, max_length=5, backbone=BackboneConfig(n_embd=16, n_layer=1))
    extra = dict(state_mean=torch.zeros(11), state_std=torch.ones(11)) if stats else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(make_checkpoint(DecisionTransformer(cfg, seed=0).state_dict(),
                                {"env": "hopper", "dataset": dataset, "model_config": cfg.to_dict()}, **extra), path)
    return path


@pytest.fixture
def no_evaluation(monkeypatch):
    """Records evaluate_checkpoint's calls instead of evaluating."""
    calls = []
    monkeypatch.setattr(results_table, "evaluate_checkpoint",
                        lambda path, **kw: calls.append(path) or {"hopper": 1.0})
    return calls


def test_a_missing_fallback_dataset_is_found_before_any_evaluation(tmp_path, capsys, no_evaluation):
    good = hopper_checkpoint(tmp_path / "good.pt", stats=True)
    bare = hopper_checkpoint(tmp_path / "bare.pt", stats=False, dataset="expert")
    msg = fails(results_table.main, ["--row", f"a={good}", "--row", f"b={bare}", "--data_path", tmp_path / "data"],
                capsys)
    assert "dataset not found: " + str(tmp_path / "data" / "hopper-expert-v2.pkl") in msg
    assert no_evaluation == []


def test_pick_on_a_checkpoint_file_is_refused(tmp_path, capsys, no_evaluation):
    good = hopper_checkpoint(tmp_path / "good.pt", stats=True)
    for pick in ("best", "0"):
        assert fails(results_table.main, ["--row", f"a={good}@{pick}"], capsys) == \
            f"error: --row 'a={good}@{pick}': @{pick} picks an iteration of a run folder; {good} is a checkpoint " \
            f"file (evaluated as it is)"
    assert no_evaluation == []
    results_table.main(["--row", f"a={good}"])                           # without @ it is evaluated
    assert no_evaluation == [str(good)]


def test_an_empty_label_and_a_huge_episode_count_are_refused_before_any_evaluation(tmp_path, capsys,
                                                                                     no_evaluation):
    good = hopper_checkpoint(tmp_path / "good.pt", stats=True)
    assert "empty LABEL" in fails(results_table.main, ["--row", f"={good}"], capsys)
    assert fails(results_table.main, ["--row", f"a={good}", "--num_eval_episodes", "100000"], capsys) == \
        "error: --num_eval_episodes 100000 is too large (at most 10,000)"
    assert no_evaluation == []


def test_a_model_whose_actions_are_not_finite_stops_the_table_with_exit_3(tmp_path, capsys):
    """Finite weights that overflow give NaN actions and NaN returns: exit 3 naming the checkpoint, as a training
    run's evaluation does, instead of a 'nan' score written with exit 0; nothing is written."""
    path = hopper_checkpoint(tmp_path / "over.pt", stats=True)
    obj = torch.load(path, weights_only=True)
    for k, v in obj["state_dict"].items():
        if k.endswith("mlp.c_fc.weight"):
            v.fill_(1e30)
    torch.save(obj, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)         # MuJoCo's own "Nan, Inf or huge value in CTRL"
        with pytest.raises(SystemExit) as e:
            results_table.main(["--row", f"a={path}", "--num_eval_episodes", "1", "--out", str(tmp_path / "t")])
    assert e.value.code == 3
    assert f"error: {path}: the hopper evaluation gave non-finite returns" in capsys.readouterr().err
    assert not list(tmp_path.glob("t.*"))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_one_non_finite_return_among_finite_ones_stops_the_table_with_exit_3(tmp_path, capsys, monkeypatch, bad):
    """A single inf (not only NaN, not only when every return is bad) stops the table."""
    import types

    import numpy as np

    from decision_transformer import evaluation

    path = hopper_checkpoint(tmp_path / "m.pt", stats=True)
    monkeypatch.setattr(evaluation, "env_pool", lambda *a, **k: types.SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(evaluation, "evaluate_episodes",
                        lambda *a, **k: types.SimpleNamespace(returns=np.array([100.0, bad])))
    with pytest.raises(SystemExit) as e:
        results_table.main(["--row", f"a={path}", "--num_eval_episodes", "2", "--out", str(tmp_path / "t")])
    assert e.value.code == 3
    assert f"error: {path}: the hopper evaluation gave non-finite returns" in capsys.readouterr().err
    assert not list(tmp_path.glob("t.*"))


# ---- the written table -----------------------------------------------------------------------------------------------

def test_out_names_are_appended_not_replaced(tmp_path, capsys):
    run = run_folder(tmp_path / "run", {"env": "hopper"}, [single_row("hopper", 1, 1000.0, 30.0)])
    call(results_table.main, ["--row", f"a={run}", "--out", tmp_path / "res" / "merge.v2"])
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["merge.v2.csv", "merge.v2.md"]
    assert f"wrote {tmp_path / 'res' / 'merge.v2.csv'} and {tmp_path / 'res' / 'merge.v2.md'}" in \
        capsys.readouterr().err
    assert "--out .: give a file name" in fails(results_table.main, ["--row", f"a={run}", "--out", "."], capsys)
    (tmp_path / "afile").write_text("")
    capsys.readouterr()
    msg = fails(results_table.main, ["--row", f"a={run}", "--out", tmp_path / "afile" / "sub" / "t"], capsys)
    assert msg == f"error: --out {tmp_path / 'afile' / 'sub' / 't'}: {tmp_path / 'afile'} is a file, not a folder"


def test_csv_holds_full_precision_numbers_and_the_env_count(tmp_path, capsys):
    rows = {"source": {"hopper": 10.0, "halfcheetah": 20.0, "walker2d": 30.0}, "merge": {"hopper": 5.0}, "none": {},
            "fine": {"hopper": 1 / 3, "halfcheetah": 2.25}}
    header, body = results_table.build_table(rows)
    lines = results_table.to_csv(rows).splitlines()
    assert lines == ["model,hopper,halfcheetah,walker2d,average,envs_averaged", "source,10.0,20.0,30.0,20.0,3",
                     "merge,5.0,,,5.0,1", "none,,,,,", f"fine,{1 / 3!r},2.25,,{(1 / 3 + 2.25) / 2!r},2"]
    assert "| fine | 0.3 | 2.2 | — | 1.3* |" in results_table.to_markdown(header, body)  # the CSV is not rounded
    assert "| merge | 5.0 | — | — | 5.0* |" in results_table.to_markdown(header, body)   # the markdown keeps its *


def test_envs_are_deduplicated_and_a_row_outside_them_is_said(tmp_path, capsys):
    hop = run_folder(tmp_path / "hop", {"env": "hopper"}, [single_row("hopper", 1, 1000.0, 30.0)])
    walk = run_folder(tmp_path / "walk", {"env": "walker2d"}, [single_row("walker2d", 1, 1000.0, 20.0)])
    capsys.readouterr()
    call(results_table.main, ["--row", f"h={hop}", "--row", f"w={walk}", "--envs", "hopper", "hopper",
                              "--out", tmp_path / "t"])
    out = capsys.readouterr()
    assert (tmp_path / "t.csv").read_text().splitlines() == ["model,hopper,average,envs_averaged",
                                                             "h,30.0,30.0,1", "w,,,"]
    assert "| model | hopper | average |" in out.out
    warnings = [line for line in out.err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: row 'w' has scores for walker2d only, none of --envs hopper; its cells are empty"]
    # no row with a score for any of --envs: a table of empty cells replaced the one at --out (exit 0); now one line,
    # and the table written before stays (without --out the empty table is shown, as test_analysis_wiring checks)
    before = [(tmp_path / f"t.{x}").read_text() for x in ("csv", "md")]
    with pytest.raises(SystemExit) as e:
        results_table.main(list(map(str, ["--row", f"w={walk}", "--envs", "hopper", "halfcheetah", "--out",
                                           tmp_path / "t"])))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: no row has a score for --envs hopper halfcheetah (the rows have scores for walker2d); --out "
        f"{tmp_path / 't'} not written"]
    assert [(tmp_path / f"t.{x}").read_text() for x in ("csv", "md")] == before


# ---- Minari ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def minari_script():
    pytest.importorskip("minari")
    return load_script("data/minari_datasets.py")


@pytest.mark.parametrize("dataset_id", ["dt/hopper/medium", "hopper", "dt/hopper/medium-v", "dt//medium-v0",
                                        "../medium-v0"])
def test_export_needs_a_versioned_dataset_id(tmp_path, capsys, minari_script, dataset_id):
    from decision_transformer.synthetic import make_dataset

    pkl = make_dataset(tmp_path / "data", "hopper", "medium", 100, seed=0, max_ep_len=30)
    msg = fails(minari_script.main, ["export", pkl, dataset_id, "--minari_root", tmp_path / "root"], capsys)
    assert msg == f"error: {dataset_id!r} is not a Minari dataset id of the form namespace/name-vN " \
                  f"(e.g. dt/hopper/medium-v0)"
    assert not (tmp_path / "root").exists()


def test_export_checks_next_observations(tmp_path, capsys, minari_script):
    """Minari's observations are the DT's plus each episode's last next observation: a NaN or a wrong width there
    is one line, not a NaN dataset or a numpy traceback."""
    import pickle

    from decision_transformer.synthetic import make_dataset

    pkl = make_dataset(tmp_path / "data", "hopper", "medium", 100, seed=0, max_ep_len=30)
    trajs = pickle.loads(pkl.read_bytes())
    for damage, words in ((lambda t: t["next_observations"].__setitem__((-1, 0), float("nan")), "NaN"),
                          (lambda t: t.__setitem__("next_observations", t["next_observations"][:, :5]), "shape")):
        bad = [dict(t) for t in trajs]
        bad[1] = {k: v.copy() for k, v in bad[1].items()}
        damage(bad[1])
        path = tmp_path / "bad-hopper-medium-v2.pkl"
        path.write_bytes(pickle.dumps(bad))
        msg = fails(minari_script.main, ["export", path, "dt/hopper/medium-v0", "--env", "hopper", "--minari_root",
                                         tmp_path / "root"], capsys)
        assert "trajectory 1" in msg and "next_observations" in msg and words in msg, msg
    assert not (tmp_path / "root").exists()


@pytest.fixture
def exported(tmp_path, minari_script):
    from decision_transformer.synthetic import make_dataset

    pkl = make_dataset(tmp_path / "data", "hopper", "medium", 200, seed=0, max_ep_len=30)
    call(minari_script.main, ["export", pkl, "dt/hopper/medium-v0", "--minari_root", tmp_path / "root"])
    return tmp_path / "root", tmp_path / "root" / "dt" / "hopper" / "medium-v0"


def test_export_records_metadata_and_prints_no_minari_warnings(tmp_path, capsys, monkeypatch, minari_script):
    """Optional metadata flags reach the dataset; Minari's nags about unset optional metadata are not shown."""
    import minari

    from decision_transformer.synthetic import make_dataset

    pkl = make_dataset(tmp_path / "data", "hopper", "medium", 200, seed=0, max_ep_len=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning left unfiltered fails the export
        call(minari_script.main, ["export", pkl, "dt/hopper/medium-v0", "--minari_root", tmp_path / "root",
                                  "--author", "A. Researcher", "--code_permalink", "https://example.org/code"])
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "root"))
    meta = minari.load_dataset("dt/hopper/medium-v0").storage.metadata
    assert meta["author"] == {"A. Researcher"} and meta["code_permalink"] == "https://example.org/code"


def test_import_does_not_replace_a_pkl_without_force(tmp_path, capsys, minari_script, exported):
    root, _ = exported
    pkl = tmp_path / "data" / "hopper-medium-v2.pkl"
    before = pkl.read_bytes()
    argv = ["import", "dt/hopper/medium-v0", "--dataset", "medium", "--data_path", tmp_path / "data",
            "--minari_root", root]
    assert fails(minari_script.main, argv, capsys) == \
        f"error: {pkl} already exists; pass --force to replace it or choose another --dataset or --data_path"
    assert pkl.read_bytes() == before
    call(minari_script.main, [*argv, "--force"])
    assert capsys.readouterr().out.startswith(f"{pkl}: ")
    call(minari_script.main, [*argv[:3], "expert", *argv[4:]])
    assert (tmp_path / "data" / "hopper-expert-v2.pkl").is_file()


def test_damaged_minari_datasets_are_one_line_naming_the_dataset(tmp_path, capsys, minari_script, exported):
    root, folder = exported
    argv = ["import", "dt/hopper/medium-v0", "--dataset", "expert", "--data_path", tmp_path / "out",
            "--minari_root", root]
    meta = folder / "data" / "metadata.json"
    good_meta = meta.read_text()
    meta.write_text("{}")
    msg = fails(minari_script.main, argv, capsys)
    assert "'dt/hopper/medium-v0'" in msg and str(folder) in msg and "metadata.json" in msg
    meta.write_text(good_meta)
    data = folder / "data" / "main_data.hdf5"
    data.write_bytes(data.read_bytes()[:5000])                     # truncated
    msg = fails(minari_script.main, argv, capsys)
    assert "'dt/hopper/medium-v0'" in msg and str(folder) in msg and "unreadable" in msg
    assert not (tmp_path / "out").exists()
