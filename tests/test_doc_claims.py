"""Claims of the README, the --help texts and the docstrings, checked against what the code does: a merge run's
--max_iters 0 evaluation, merge_cli's --K warning, the --resume flag lists, --save_model's file name, --data_path's
default, validate_trajectories' aliasing, select_top_trajectories' budget, the LM-loss decay, --eval_workers auto
and the CKA defaults."""
import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest

import experiment
from conftest import ROOT, listed, merge_with_evaluations_recorded, write_source_models
from decision_transformer import merge_cli

SMALL = ["--embed_dim", "16", "--n_layer", "1", "--K", "5", "--batch_size", "8", "--warmup_steps", "10"]


@pytest.fixture(scope="module")
def srcs(tmp_path_factory):
    """Datasets and tiny checkpoints (16 x 1, K=5, blocks perturbed per env) for hopper and walker2d."""
    return write_source_models(tmp_path_factory.mktemp("claims"), ("hopper", "walker2d"), n=250, max_ep_len=50,
                               id_base=300000)


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- a merge run with --max_iters 0 evaluates the merged model as iteration 0 ----------------------------------------

def test_merge_run_with_max_iters_0_evaluates_the_merged_model_as_iteration_0(srcs, tmp_path, monkeypatch, capsys):
    root, data, paths = srcs
    monkeypatch.chdir(tmp_path)
    experiment.main(["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models", str(paths["hopper"]),
                     str(paths["walker2d"]), "--include", "attn", "--copy_model", "--max_iters", "0",
                     "--num_eval_episodes", "1", "--env_targets", "3600"])
    err = capsys.readouterr().err
    (rd,) = listed(tmp_path / "checkpoints")
    it0 = json.loads((rd / "config.json").read_text())["merge_info"]["iteration_0"]
    assert "evaluation/target_3600_return_mean" in it0
    (row,) = rows_of(rd)  # the run's only row: iteration 0, the merged model's evaluation
    assert row["iteration"] == 0 and row["evaluation/target_3600_return_mean"] == it0[
        "evaluation/target_3600_return_mean"]
    assert sorted(p.name for p in rd.iterdir()) == ["config.json", "metrics.jsonl", "model_0.pt"]
    assert "iter 0 (merged" in err
    assert (f"--max_iters 0: no iteration trained; {Path('checkpoints') / rd.name / 'model_0.pt'} holds the merged "
            f"model, evaluated as iteration 0") in err
    assert "no iteration trained or evaluated" not in err


def test_merge_run_with_max_iters_0_and_no_episodes_evaluates_nothing(srcs, tmp_path, monkeypatch, capsys):
    root, data, paths = srcs
    calls = merge_with_evaluations_recorded(monkeypatch, tmp_path, data, paths, *SMALL, "--max_iters", "0",
                                            "--num_eval_episodes", "0")
    err = capsys.readouterr().err
    (rd,) = listed(tmp_path / "checkpoints")
    assert calls == [] and "iteration_0" not in json.loads((rd / "config.json").read_text())["merge_info"]
    assert (f"--max_iters 0: no iteration trained or evaluated; {Path('checkpoints') / rd.name / 'model_0.pt'} holds "
            f"the merged model") in err


def test_a_plain_run_with_max_iters_0_still_evaluates_nothing(hopper_data, tmp_path, monkeypatch, capsys):
    from decision_transformer import run as run_mod

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_mod, "evaluate_episodes", lambda *a, **k: pytest.fail("evaluated"))
    experiment.main(["--data_path", str(hopper_data), *SMALL, "--max_iters", "0", "--num_eval_episodes", "1"])
    assert "--max_iters 0: no iteration trained or evaluated" in capsys.readouterr().err
    assert rows_of(tmp_path / "checkpoints" / "dt_medium_hopper_666_K5") == []


# ---- merge_cli's --K warning: only for the methods whose windows are --K long ----------------------------------------

def test_merge_cli_single_task_fisher_uses_the_models_own_k_and_does_not_warn_about_k(srcs, tmp_path, capsys):
    root, data, paths = srcs
    models = []
    for env in ("hopper", "walker2d"):  # copies, so that their Fisher files are computed here, not found cached
        (tmp_path / env).mkdir()
        models.append(tmp_path / env / paths[env].name)
        models[-1].write_bytes(paths[env].read_bytes())
    capsys.readouterr()
    merge_cli.main(["--models", *map(str, models), "--include", "attn", "--merge_method", "fisher",
                    "--f_batch_size", "4", "--f_num_batches", "2", "--data_path", str(data), "--device", "cpu",
                    "--out", str(tmp_path / "fisher.pt")])
    err = capsys.readouterr().err
    assert "was trained with K=" not in err and "--K" not in err
    assert err.count("windows of K=5 of") == 2  # each model's own context, not --K 20
    from decision_transformer import fisher as fisher_mod

    for m in models:
        info = fisher_mod.load_fisher(fisher_mod.fisher_info_path(m, 4, 2, "batch"))
        assert info["_source"]["K"] == 5 and info["_source"]["seed"] == fisher_mod.FISHER_SEED


@pytest.mark.parametrize("method", ["regmean", "greedy_soup"])
def test_merge_cli_warns_about_k_for_the_methods_that_read_k_windows(srcs, tmp_path, capsys, method):
    root, data, paths = srcs
    models = [str(paths["hopper"]), str(paths["walker2d"])]
    capsys.readouterr()
    merge_cli.main(["--models", *models, "--include", "attn", "--merge_method", method, "--regmean_n_windows", "8",
                    "--batch_size", "8", "--data_path", str(data), "--device", "cpu", "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert all(f"warning: {m} was trained with K=5; this run uses K=20 (--K)" in err for m in models)


# ---- --resume: the flags its help says may change are those the resume does not compare ------------------------------

def _parsers():
    from decision_transformer.cli import experiment_parser
    from decision_transformer.cli_lm import lm_cotraining_parser
    from decision_transformer.multi_run import multi_parser

    return {"experiment": experiment_parser(), "lm": lm_cotraining_parser(), "multi": multi_parser()}


@pytest.mark.parametrize("name", ["experiment", "lm", "multi"])
def test_resume_help_names_exactly_the_flags_a_resume_may_change(name):
    from decision_transformer.run import RESUME_FREE

    parser = _parsers()[name]
    (action,) = [a for a in parser._actions if a.dest == "resume"]
    listed_part = re.search(r"only (.*?) may differ", action.help).group(1)
    option_dest = {o: a.dest for a in parser._actions for o in a.option_strings}
    named = {option_dest[f] for f in re.findall(r"(--?\w+)", listed_part)}
    free = {d for d in RESUME_FREE if d in option_dest.values()} - {"resume", "note"}
    assert named == free
    if name == "multi":  # flags the old help called free, which a resume compares
        assert {"env_version", "p_list", "eval_merge_pre", "score_selected", "mode"}.isdisjoint(RESUME_FREE)


def test_resume_compares_an_evaluation_flag_of_a_multi_task_run():
    from decision_transformer.multi_run import multi_parser, resume_signature

    args = multi_parser().parse_args(["--eval_merge_pre", "--p_list", "0.5", "1", "--env_version", "v5"])
    sig = resume_signature(args)
    assert sig["eval_merge_pre"] is True and sig["p_list"] == [0.5, 1.0] and sig["env_version"] == "v5"


# ---- --save_model's file name follows --model_type -------------------------------------------------------------------

def test_save_model_writes_model_type_prefixed_files(hopper_data, tmp_path, monkeypatch):
    help_text = [a.help for a in _parsers()["experiment"]._actions if a.dest == "save_model"][0]
    assert "{model_type}_{exp_prefix}" in help_text
    monkeypatch.chdir(tmp_path)
    experiment.main(["--data_path", str(hopper_data), "--model_type", "bc", "--embed_dim", "16", "--n_layer", "1",
                     "--K", "5", "--batch_size", "8", "--max_iters", "0", "--num_eval_episodes", "0", "--save_model"])
    (saved,) = listed(tmp_path / "models" / "hopper")
    assert saved.name.startswith("bc_gym-experiment-hopper-medium-") and saved.suffix == ".pt"


# ---- --data_path's default -------------------------------------------------------------------------------------------

def test_data_path_default_is_the_projects_data_inside_the_project_and_data_outside(tmp_path, monkeypatch):
    from decision_transformer.paths import project_path

    monkeypatch.chdir(tmp_path)
    assert project_path("data") == "data"  # outside the project: ./data of the working folder
    monkeypatch.chdir(ROOT / "decision_transformer")
    assert Path(project_path("data")).resolve() == (ROOT / "data").resolve()
    from decision_transformer.fisher import precompute_parser

    for parser in (_parsers()["experiment"], precompute_parser(), merge_cli.merge_parser()):
        (action,) = [a for a in parser._actions if a.dest == "data_path"]
        assert "./data when started outside it" in action.help


# ---- data.py docstrings ----------------------------------------------------------------------------------------------

def test_validate_trajectories_returns_float32_arrays_themselves_and_converts_others():
    from decision_transformer.data import validate_trajectories
    from decision_transformer.envs import get_env_spec

    rng = np.random.default_rng(0)
    t32 = {"observations": rng.normal(size=(6, 11)).astype(np.float32),
           "actions": rng.uniform(-1, 1, (6, 3)).astype(np.float32), "rewards": np.ones(6, np.float32),
           "terminals": np.zeros(6, bool)}
    t64 = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in t32.items()}
    (a,), (b,) = (validate_trajectories([t], get_env_spec("hopper"), "x") for t in (t32, t64))
    assert a["observations"] is t32["observations"] and a["actions"] is t32["actions"]
    assert np.shares_memory(a["rewards"], t32["rewards"])
    assert a["terminals"] is not t32["terminals"]
    assert all(b[k].dtype == np.float32 and not np.shares_memory(b[k], t64[k])
               for k in ("observations", "actions", "rewards"))
    assert "float32 is not copied" in inspect.getdoc(validate_trajectories)


def test_select_top_trajectories_keeps_the_best_even_alone_over_the_budget():
    from decision_transformer.data import select_top_trajectories

    kept = select_top_trajectories(np.array([1.0, 5.0, 3.0]), np.array([10, 100, 10]), 0.1)  # budget 12 steps
    assert kept.tolist() == [1]
    assert "always kept" in inspect.getdoc(select_top_trajectories)


# ---- the ambiguous ones ----------------------------------------------------------------------------------------------

def test_lm_const_linear_decay_ends_at_const_over_s():
    from decision_transformer.training.lm_cotrain import LMCotraining

    lm = LMCotraining(None, const=2.0, linear_decay=True, total_steps=4)
    assert [lm.weight(s) for s in (1, 2, 3, 4)] == [2.0, 1.5, 1.0, 0.5]  # the last step: const / S, not 0
    help_text = [a.help for a in _parsers()["lm"]._actions if a.dest == "lm_const_linear_decay"][0]
    assert "--gpt_lm_const / S at the last" in help_text


def test_eval_workers_auto_is_none_below_8_episodes():
    from decision_transformer.evaluation import default_env_workers

    assert default_env_workers("cuda", 7) == 0 and default_env_workers("cpu", 100) == 0
    help_text = [a.help for a in _parsers()["experiment"]._actions if a.dest == "eval_workers"][0]
    assert "none below 8 episodes" in help_text


def test_cka_library_functions_default_to_biased_hsic_and_the_script_to_debiased():
    from decision_transformer.analysis import cka

    assert inspect.signature(cka.cka).parameters["debiased"].default is False
    assert inspect.signature(cka.linear_cka).parameters["debiased"].default is False
    assert inspect.signature(cka.cka_matrix).parameters["debiased"].default is True
    assert "default to ``debiased=False``" in cka.__doc__


def test_run_module_docstring_does_not_say_scripts_holds_the_differences():
    from decision_transformer import run

    assert "``SCRIPTS`` holds what differs" not in run.__doc__
    assert set(run.SCRIPTS) == {run.EXPERIMENT, run.LM_COTRAINING} and all(
        isinstance(v, str) for v in run.SCRIPTS.values())

