"""Flag values and run folders the scripts must refuse up front: one line ``error: ...``, exit 2, no traceback, and
nothing written (or, for --resume, nothing of the run changed)."""
import json
from pathlib import Path

import pytest
import torch

import experiment
import experiment_multi
import precompute_fisher
from conftest import fails, listed, load_script, write_source_models
from decision_transformer import merge_cli

TINY = ["--embed_dim", "16", "--n_layer", "1", "--n_head", "2", "--K", "5", "--batch_size", "6", "--warmup_steps",
        "10", "--num_eval_episodes", "0", "--num_steps_per_iter", "2"]


def files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def multi_data(multi_medium_data):
    return multi_medium_data


# ---- --resume with a config.json that is JSON but not an object ------------------------------------------------------

def test_experiment_resume_checks_flags_when_config_json_is_not_an_object(tmp_path, monkeypatch, capsys, hopper_data):
    monkeypatch.chdir(tmp_path)
    experiment.main(["--data_path", str(hopper_data), *TINY, "--max_iters", "1"])
    run = tmp_path / "checkpoints" / "dt_medium_hopper_666_K5"
    (run / "config.json").write_text("[]")
    before = files(run)
    msg = fails(experiment.main, ["--data_path", hopper_data, *TINY, "--max_iters", "2", "--resume",
                                  "--learning_rate", "5e-3"], capsys)
    assert "was made with other flags: --learning_rate 0.005 (the run: 0.0001)" in msg
    assert files(run) == before


def test_multi_resume_takes_the_seed_from_the_state_when_config_json_is_not_an_object(tmp_path, monkeypatch, capsys,
                                                                                       multi_data):
    base = ["--data_path", str(multi_data), *TINY]
    monkeypatch.chdir(tmp_path)
    experiment_multi.main([*base, "--max_iters", "1"])
    (run,) = (tmp_path / "checkpoints" / "multi").glob("gym-*")
    seed = json.loads((run / "config.json").read_text())["seed"]
    (run / "config.json").write_text("[]")
    assert "differs in --learning_rate 0.001" in fails(experiment_multi.main, [*base, "--max_iters", "2", "--resume",
                                                                               "--learning_rate", "1e-3"], capsys)
    experiment_multi.main([*base, "--max_iters", "2", "--resume"])
    assert json.loads((run / "config.json").read_text())["seed"] == seed


# ---- freezing every parameter ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("freeze", [[""], ["."], ["transformer", "embed", "predict"]])
def test_experiment_freezing_everything(tmp_path, monkeypatch, capsys, hopper_data, freeze):
    monkeypatch.chdir(tmp_path)
    msg = fails(experiment.main, ["--data_path", hopper_data, *TINY, "--max_iters", "1", "--freeze_subset", *freeze],
                capsys)
    assert "nothing is left to train" in msg
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("env", ["hopper", "reacher2d"])
def test_multi_has_no_env_flag(tmp_path, monkeypatch, capsys, env):
    """Not expanded by argparse to --env_version: the script says it trains the three envs together."""
    monkeypatch.chdir(tmp_path)
    msg = fails(experiment_multi.main, ["--env", env, *TINY, "--max_iters", "1"], capsys)
    assert "experiment_multi.py has no --env: it trains hopper, halfcheetah, walker2d together" in msg
    assert not list(tmp_path.iterdir())


def test_multi_eval_merge_pre_needs_evaluation(tmp_path, monkeypatch, capsys):
    """--eval_merge_pre picks p by evaluating: with 0 episodes it would pick nothing and say nothing."""
    monkeypatch.chdir(tmp_path)
    msg = fails(experiment_multi.main, [*TINY, "--max_iters", "1", "--multi_pretrained_models", "a.pt", "b.pt",
                                        "--eval_merge_pre", "--p_list", "0.2", "--num_eval_episodes", "0"], capsys)
    assert msg == ("error: --eval_merge_pre picks --p_list's p by evaluating each, but --num_eval_episodes 0 "
                   "evaluates nothing")
    assert not list(tmp_path.iterdir())


def test_experiment_checks_the_merge_numbers_up_front(tmp_path, monkeypatch, capsys, hopper_data):
    monkeypatch.chdir(tmp_path)
    for bad, expect in ((["--ties_density", "0"], "--ties_density must be a number in (0, 1]"),
                        (["--regmean_alpha", "2"], "--regmean_alpha must be a number in [0, 1]")):
        assert expect in fails(experiment.main, ["--data_path", hopper_data, *TINY, "--max_iters", "1",
                                                 "--pretrained_models", "a.pt", "b.pt", *bad], capsys)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("freeze", [[""], ["."]])
def test_multi_freezing_everything(tmp_path, monkeypatch, capsys, multi_data, freeze):
    monkeypatch.chdir(tmp_path)
    msg = fails(experiment_multi.main, ["--data_path", multi_data, *TINY, "--max_iters", "1", "--freeze_subset",
                                        *freeze], capsys)
    assert "nothing is left to train" in msg
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("freeze", [[""], ["."]])
def test_lm_cotraining_freezing_everything(tmp_path, monkeypatch, capsys, hopper_data, freeze):
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = tmp_path / "lm"
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=40, vocab_size=50)).save_pretrained(lm)
    monkeypatch.chdir(tmp_path)
    main = load_script("lm_cotraining/experiment.py").main
    msg = fails(main, ["--data_path", hopper_data, "--pretrained_lm", lm, "--K", "5", "--batch_size", "6",
                       "--num_eval_episodes", "0", "--num_steps_per_iter", "2", "--max_iters", "1",
                       "--freeze_subset", *freeze], capsys)
    assert "nothing is left to train" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm"]


# ---- experiment.py's RegMean windows ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", ["0", "-5"])
def test_experiment_regmean_needs_windows(tmp_path, monkeypatch, capsys, hopper_data, n):
    monkeypatch.chdir(tmp_path)
    msg = fails(experiment.main, ["--data_path", hopper_data, *TINY, "--merge_method", "regmean",
                                  "--regmean_n_windows", n], capsys)
    assert f"--regmean_n_windows {n}" in msg
    assert not list(tmp_path.iterdir())


# ---- precompute_fisher.py and merge_cli: --K and --seed --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_source_models(tmp_path_factory.mktemp("bad_flags"), ("hopper", "halfcheetah"), n=200, max_ep_len=40,
                               id_base=300000)


@pytest.mark.parametrize("bad, expect", [(["--K", "5000"], "--K 5000 exceeds the episode length 1000"),
                                         (["--K", "1001"], "--K 1001 exceeds the episode length 1000"),
                                         (["--seed", "-1"], "--seed must be in [0, 2^32), got -1"),
                                         (["--seed", str(2**32)], "--seed must be in [0, 2^32)")])
def test_fisher_and_merge_bound_K_and_seed(tiny, tmp_path, capsys, bad, expect):
    root, data, paths = tiny
    h, c = paths["hopper"], paths["halfcheetah"]
    assert expect in fails(precompute_fisher.main, ["--model", h, "--data_path", data, "--f_batch_size", "2",
                                                    "--f_num_batches", "1", "--device", "cpu", *bad], capsys)
    assert not (h.parent / "info").exists()
    out = tmp_path / "m.pt"
    assert expect in fails(merge_cli.main, ["--models", h, c, "--include", "attn", "--data_path", data, "--out", out,
                                            *bad], capsys)
    assert not out.exists()


# ---- data/train_behaviour_policies.py --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, expect", [
    (["--max_minutes", "nan"], "--max_minutes must be a positive number, got nan"),
    (["--max_minutes", "-1"], "--max_minutes must be a positive number"),
    (["--max_minutes", "0"], "--max_minutes must be a positive number"),
    (["--expert_tolerance", "nan"], "--expert_tolerance must be a number >= 0"),
    (["--expert_tolerance", "-1"], "--expert_tolerance must be a number >= 0"),
    (["--checkpoint_minutes", "inf"], "--checkpoint_minutes must be a positive number"),
    (["--long_eval_episodes", "0"], "--long_eval_episodes: must be at least 1"),
    (["--total_steps", "0"], "--total_steps: must be at least 1"),
    (["--total_steps", "-1"], "--total_steps: must be at least 1"),
    (["--threads", "0"], "--threads: must be at least 1"),
    (["--seed", "-1"], "--seed must be in [0, 2^32)"),
    (["--threads", "1000000000000"], "--threads 1000000000000 is too large (at most 4096)"),
    (["--run_name", "../x"], "--run_name '../x' must be a plain folder name (it is made in --state_dir)"),
    (["--run_name", ".."], "--run_name '..' must be a plain folder name"),
])
def test_train_behaviour_policies_flags(tmp_path, monkeypatch, capsys, bad, expect):
    from decision_transformer import sac

    monkeypatch.setattr(sac, "train_behaviour_policy", lambda *a, **k: pytest.fail("SAC training started"))
    main = load_script("data/train_behaviour_policies.py").main
    argv = ["--env", "hopper", "--state_dir", tmp_path / "state", "--policy_dir", tmp_path / "policies", *bad]
    assert expect in fails(main, argv, capsys)
    assert not list(tmp_path.iterdir())


def test_train_behaviour_policies_says_when_no_policy_was_chosen(tmp_path, monkeypatch, capsys):
    """A medium-only run too short to find a candidate printed "medium at None (score None, final); expert at None":
    it now says no medium.pt was written, and leaves out the role not asked for."""
    from decision_transformer import sac

    meta = {"env_steps": 2000, "medium_step": None, "medium_eval": None, "medium_final": True, "best_step": None,
            "best_eval": None}
    monkeypatch.setattr(sac, "train_behaviour_policy", lambda *a, **k: meta)
    main = load_script("data/train_behaviour_policies.py").main
    main([str(a) for a in ["--env", "hopper", "--roles", "medium", "--total_steps", "2000", "--state_dir",
                           tmp_path / "state", "--policy_dir", tmp_path / "policies"]])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"hopper: 2000 env steps; no medium policy yet (medium.pt not written; train longer or resume) "
                    f"[{tmp_path / 'policies' / 'hopper'}]")
    meta.update(medium_step=1500, medium_eval=31.5, best_step=2000, best_eval=70.1, expert_final=False)
    main([str(a) for a in ["--env", "hopper", "--state_dir", tmp_path / "state", "--policy_dir", tmp_path / "p2"]])
    assert ("medium at 1500 (score 31.5, final); expert at 2000 (score 70.1, the best so far: more --total_steps "
            "trains on)") in capsys.readouterr().out


def test_train_behaviour_policy_checks_its_roles_before_making_folders(tmp_path):
    from decision_transformer.errors import UserError
    from decision_transformer.sac import train_behaviour_policy

    with pytest.raises(UserError, match="roles must be"):
        train_behaviour_policy("hopper", tmp_path / "state", tmp_path / "policies", roles=(), buffer_capacity=10)
    assert not list(tmp_path.iterdir())


def test_a_second_process_training_into_one_state_dir_is_refused(tmp_path):
    """Two train_behaviour_policies.py on one --state_dir shared state.pt and both reported success, one's training
    lost. The second is now refused in one line, before anything is written."""
    import os

    from decision_transformer.errors import UserError
    from decision_transformer.sac import train_behaviour_policy
    from decision_transformer.sweep import _take_lock, folder_lock_path

    taken, fd = _take_lock(folder_lock_path(tmp_path / "state"))        # "another process" trains there
    assert taken
    try:
        with pytest.raises(UserError, match="another process is training this behaviour policy"):
            train_behaviour_policy("hopper", tmp_path / "state", tmp_path / "policies", roles=("expert",),
                                   total_steps=10, buffer_capacity=10)
    finally:
        os.close(fd)
    assert not (tmp_path / "state").exists() and not (tmp_path / "policies").exists()


def test_a_second_process_training_a_role_of_one_policy_folder_is_refused(tmp_path):
    """Two runs of other state folders but one --policy_dir (the default is one per env) wrote the same medium.pt and
    replay/ (a fresh one moved the running one's replay/ away). Runs of other roles may still share the folder."""
    import os

    from decision_transformer.errors import UserError
    from decision_transformer.sac import train_behaviour_policy
    from decision_transformer.sweep import _take_lock

    taken, fd = _take_lock(tmp_path / ".policies.policy-medium.lock")   # a run of the medium role
    assert taken
    try:
        with pytest.raises(UserError, match=f"^{tmp_path / 'policies'}: another process is training the medium "
                                            f"policy of {tmp_path / 'policies'} .*give another --policy_dir"):
            train_behaviour_policy("hopper", tmp_path / "state", tmp_path / "policies", roles=("medium", "expert"),
                                   medium_score=1.0, total_steps=10, buffer_capacity=10)
        assert not (tmp_path / "state").exists()
        meta = train_behaviour_policy("hopper", tmp_path / "state", tmp_path / "policies", roles=("expert",),
                                      total_steps=10, buffer_capacity=10, start_steps=5, eval_every=1000,
                                      log=lambda m: None)
        assert meta["env_steps"] == 10
    finally:
        os.close(fd)


# ---- benchmarks/bench_core.py ----------------------------------------------------------------------------------------

def test_bench_core_stepping_workers(monkeypatch, capsys):
    bench = load_script("benchmarks/bench_core.py")
    monkeypatch.setattr(bench, "bench_sampler", lambda *a, **k: pytest.fail("the benchmark started"))
    main = bench.main
    assert "--stepping_workers: must be at least 0, got -2" in fails(main, ["--stepping_workers", "1", "-2"], capsys)


@pytest.mark.parametrize("parser", ["decision_transformer.cli:experiment_parser",
                                    "decision_transformer.cli_lm:lm_cotraining_parser",
                                    "decision_transformer.multi_run:multi_parser",
                                    "decision_transformer.merge_cli:merge_parser",
                                    "decision_transformer.fisher:precompute_parser"])
def test_help_shows_every_default_and_no_switch_state(parser, monkeypatch):
    """--help gives the default of every option that takes a value (also without a help text), and none for on/off
    switches (--no_extend_positions, default True, must not read as on by default)."""
    import argparse
    import importlib

    module, name = parser.split(":")
    p = getattr(importlib.import_module(module), name)()
    monkeypatch.setenv("COLUMNS", "400")
    for a in p._actions:
        if not a.option_strings or a.default in (None, argparse.SUPPRESS) or a.help == argparse.SUPPRESS:
            continue
        entry = " ".join(p._get_formatter()._format_action(a).split())     # the option's lines in --help
        if a.nargs == 0:
            assert "default:" not in entry, entry
        else:
            assert "default: " in entry, entry


@pytest.mark.parametrize("parser", ["decision_transformer.cli:experiment_parser",
                                    "decision_transformer.cli_lm:lm_cotraining_parser",
                                    "decision_transformer.multi_run:multi_parser",
                                    "decision_transformer.merge_cli:merge_parser",
                                    "decision_transformer.fisher:precompute_parser"])
def test_data_path_defaults_to_the_projects_data_from_a_sub_folder(parser, tmp_path, monkeypatch):
    """Every tool that reads datasets finds the project's data/ when started in a project sub-folder (as the
    originals' `../data`), and `data` from the root."""
    import importlib

    from decision_transformer import paths

    (tmp_path / "lm_cotraining").mkdir()
    monkeypatch.setattr(paths, "PROJECT_ROOT", tmp_path)
    module, name = parser.split(":")
    build = getattr(importlib.import_module(module), name)
    monkeypatch.chdir(tmp_path)
    assert build().get_default("data_path") == "data"
    monkeypatch.chdir(tmp_path / "lm_cotraining")
    assert build().get_default("data_path") == "../data"


# ---- sizes that would fill the memory, and flags that would be silently ignored -------------------------------------

@pytest.mark.parametrize("bad, expect", [
    (["--n_layer", "1000000000000"], "--n_layer 1000000000000 is too large (at most 1,024)"),
    (["--embed_dim", "131072", "--n_head", "1"], "--embed_dim 131072 is too large (at most 65,536)"),
    (["--num_eval_episodes", "20000"], "--num_eval_episodes 20000 is too large (at most 10,000)"),
    (["--threads", "1000000000000"], "--threads '1000000000000': use auto or a positive number of threads (at most "
                                     "4096)"),
    (["--load_checkpoint", ""], "--load_checkpoint '': give a path (or leave the flag out)"),
    (["--pretrained_lm", ""], "--pretrained_lm '': give a path (or leave the flag out)"),
    (["--gpt_kmeans", "10", "--gpt_kmeans_const", "-0.1"], "--gpt_kmeans_const must be a number >= 0 (a loss "
                                                           "weight), got -0.1"),
    (["--freeze_subset", "transformer.h.0", "nomatch"], "--freeze_subset 'nomatch' matches no parameter of the "
                                                        "model (its names are like "),
])
def test_experiment_refuses_sizes_and_names_up_front(tmp_path, monkeypatch, capsys, hopper_data, bad, expect):
    monkeypatch.chdir(tmp_path)
    assert expect in fails(experiment.main, ["--data_path", hopper_data, *TINY, "--max_iters", "1", *bad], capsys)
    assert not list(tmp_path.iterdir())


def test_lm_weight_must_not_be_negative(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main = load_script("lm_cotraining/experiment.py").main
    assert "--gpt_lm_const must be a number >= 0 (a loss weight), got -1.0" in fails(
        main, ["--pretrained_lm", tmp_path / "lm", "--gpt_lm_const", "-1"], capsys)
    assert not list(tmp_path.iterdir())


def test_merge_cli_refuses_a_model_whose_config_does_not_rebuild_it(tiny, tmp_path, capsys):
    """A model file whose config does not fit its weights (state_dim 17 over hopper's), with a tensor its model
    lacks, or of an unknown env was merged and written with exit 0, a file every other tool then refused. Now the
    model file is named in one line and nothing is written."""
    root, data, paths = tiny
    good = torch.load(paths["hopper"], weights_only=True)
    bad = []
    for name, change in (("sdim", lambda c: c["config"]["model_config"].update(state_dim=17)),
                         ("extra", lambda c: c["state_dict"].update({"extra.weight": torch.zeros(3)})),
                         ("env", lambda c: c["config"].update(env="ant"))):
        c = torch.load(paths["hopper"], weights_only=True)
        change(c)
        torch.save(c, tmp_path / f"{name}.pt")
        bad.append(tmp_path / f"{name}.pt")
    out = tmp_path / "m.pt"
    for b, words in zip(bad, ("does not match the model: shape mismatch for embed_state.weight (checkpoint [16, 11], "
                              "model [16, 17])", "does not match the model: unexpected extra.weight",
                              "its config records unknown env 'ant'")):
        for models in ((b, paths["hopper"]), (paths["hopper"], b)):   # model 1 (its config is written) or another
            msg = fails(merge_cli.main, ["--models", *models, "--include", "attn", "--data_path", data,
                                         "--out", out], capsys)
            assert msg.startswith(f"error: {b}") and words in msg, msg
            assert not out.exists()
    merge_cli.main(list(map(str, ["--models", paths["hopper"], paths["hopper"], "--include", "attn", "--data_path",
                                  data, "--out", out])))
    assert out.is_file() and good["config"]["env"] == "hopper"


def test_merge_and_sweep_bound_their_counts(tiny, tmp_path, capsys):
    root, data, paths = tiny
    out = tmp_path / "m.pt"
    assert "--regmean_n_windows 1000000000000 is too large (at most 1,000,000)" in fails(
        merge_cli.main, ["--models", paths["hopper"], paths["halfcheetah"], "--include", "attn", "--data_path", data,
                         "--merge_method", "regmean", "--regmean_n_windows", "1000000000000", "--out", out], capsys)
    assert not out.exists()
    from decision_transformer import sweep

    assert "--procs 5000 is too large (at most 1024 processes at a time)" in fails(
        sweep.main, ["run", "generated_medium", "--dry_run", "--procs", "5000"], capsys)


def test_download_synthetic_checks_its_seed(tmp_path, capsys):
    main = load_script("data/download_d4rl_datasets.py").main
    msg = fails(main, ["--synthetic", "1", "--seed", "-1", "--envs", "hopper", "--datasets", "medium",
                       "--hdf5_dir", tmp_path / "h5", "--data_path", tmp_path / "data"], capsys)
    assert "--seed must be in [0, 2^32), got -1" in msg and not list(tmp_path.iterdir())


def test_chibit_vocabulary_is_bounded(tmp_path, capsys):
    main = load_script("lm_cotraining/pretrain_chibit.py").main
    (tmp_path / "t.txt").write_text("some text\n")
    msg = fails(main, ["--text", tmp_path / "t.txt", "--out", tmp_path / "lm", "--vocab_size", "5000000000"], capsys)
    assert msg == "error: --vocab_size 5000000000 is too large (at most 1,000,000)"
    assert not (tmp_path / "lm").exists()


# ---- flags that take effect only with another ------------------------------------------------------------------------

@pytest.mark.parametrize("parser, kinds, argv, expect", [
    ("decision_transformer.cli:experiment_parser", ("experiment",),
     ["--kmeans_cache", "c.pt", "-lmlr", "1e-3", "--include", "attn", "--p=0.3", "--env", "hopper"],
     ["--kmeans_cache has no effect without --gpt_kmeans",
      "--lm_learning_rate has no effect without --custom_transformer_decay",
      "--include has no effect without --pretrained_models", "--p has no effect without --pretrained_models"]),
    ("decision_transformer.cli:experiment_parser", ("experiment",),   # enabled, or left at their defaults: silent
     ["--gpt_kmeans", "10", "--kmeans_cache", "c.pt", "--custom_transformer_decay", "-lmlr", "1e-3"], []),
    ("decision_transformer.cli_lm:lm_cotraining_parser", ("experiment", "lm_cotraining"),
     ["--tokenizer_name", "t", "--gpt_lm_const", "0.5", "--disable_k_annealing"],
     ["--disable_k_annealing has no effect without --gpt_kmeans", "--tokenizer_name has no effect without --joint",
      "--gpt_lm_const has no effect without --joint"]),
    ("decision_transformer.cli_lm:lm_cotraining_parser", ("experiment", "lm_cotraining"),
     ["--joint", "--tokenizer_name", "t"], []),
    ("decision_transformer.multi_run:multi_parser", ("multi",), ["--ties_density", "0.5", "--p_list", "0", "1",
                                                                 "--save_mode=best", "--score_selected"],
     ["--ties_density has no effect without --multi_pretrained_models",
      "--p_list has no effect without --eval_merge_pre", "--save_mode has no effect without --save_model",
      "--score_selected has no effect without --selected_training"]),
    ("decision_transformer.cli:experiment_parser", ("experiment",), ["--save_mode", "best"],
     ["--save_mode has no effect without --save_model"]),
    ("decision_transformer.cli_lm:lm_cotraining_parser", ("experiment", "lm_cotraining"),   # a run that trains nothing
     ["--num_steps_per_iter", "0", "-lr", "1e-3", "-wd", "0.1", "--warmup_steps", "5", "--custom_transformer_decay",
      "--frozen", "--freeze_subset", "ln", "--gpt_kmeans", "10", "--init_reg", "1e-4", "--joint",
      "--dropout", "0.2", "--batch_size", "8"],
     [f"--{f} has no effect without training steps (--num_steps_per_iter 0 trains nothing)"
      for f in ("learning_rate", "weight_decay", "warmup_steps", "custom_transformer_decay", "frozen",
                "freeze_subset", "gpt_kmeans", "init_reg", "joint")]),
    ("decision_transformer.cli:experiment_parser", ("experiment",), ["--num_steps_per_iter", "0", "-rgc"],
     ["--remove_grad_clip has no effect without training steps (--num_steps_per_iter 0 trains nothing)"]),
    ("decision_transformer.cli_lm:lm_cotraining_parser", ("experiment", "lm_cotraining"),
     ["-lr", "1e-3", "--frozen", "--init_reg", "1e-4"], []),
])
def test_flags_without_the_flag_that_enables_them_are_warned_about(parser, kinds, argv, expect, capsys):
    import importlib

    from decision_transformer.cli import warn_inert_flags

    module, name = parser.split(":")
    p = getattr(importlib.import_module(module), name)()
    warn_inert_flags(p, argv, p.parse_args(argv), *kinds)
    assert capsys.readouterr().err.splitlines() == [f"warning: {w}" for w in expect]


def test_the_scripts_warn_about_inert_flags(tmp_path, monkeypatch, capsys, hopper_data):
    monkeypatch.chdir(tmp_path)
    experiment.main(["--data_path", str(hopper_data), *TINY, "--max_iters", "1", "--outdir", "", "--ties_density",
                     "0.5"])
    err = capsys.readouterr().err
    assert "warning: --ties_density has no effect without --pretrained_models" in err
    # and a run that keeps nothing says so
    assert "warning: --outdir '' writes no run folder, and without -w or --save_model nothing of this run is kept" in err
    assert not list(tmp_path.iterdir())


# ---- model files and the activation: before the data step (which may generate a dataset for minutes) -------------

@pytest.mark.parametrize("script, flags, expect", [
    ("experiment", ["--load_checkpoint", "nope.pt"], "error: nope.pt: checkpoint not found"),
    ("experiment", ["--load_checkpoint", "."], "error: .: is a folder, not a checkpoint"),
    ("experiment", ["--pretrained_models", "nope.pt", "other.pt"], "error: nope.pt: model file not found"),
    ("experiment", ["--activation_function", "gelu_nwe"],
     "error: --activation_function: unknown activation function 'gelu_nwe'; choose geglu or one of "),
    ("experiment_multi", ["--pretrained_model", "nope.pt"], "error: nope.pt: model file not found"),
    ("experiment_multi", ["--multi_pretrained_models", "nope.pt", "other.pt"], "error: nope.pt: model file not found"),
    ("experiment_multi", ["--activation_function", "gelu_nwe"],
     "error: --activation_function: unknown activation function 'gelu_nwe'; choose geglu or one of "),
    ("experiment", ["--load_checkpoint", "{bad}"], "error: {bad}: not a loadable checkpoint"),
    ("experiment", ["--freeze_subset", "nosuchname"], "error: --freeze_subset 'nosuchname' matches no parameter"),
    ("experiment", ["--resume"], "error: nothing to resume: checkpoints/dt_medium_hopper_666/train_state.pt does "
                                 "not exist"),
    ("experiment", ["--merge_method", "task_arithmetic", "--pretrained_models", "{bad}", "{bad}", "--merge_base",
                    "nope.pt"], "error: nope.pt: model file not found"),
    ("experiment", ["--pretrained_models", "{bad}", "{bad}", "--merge_frozen"], "error: --merge_frozen needs --include"),
    ("experiment", ["--outdir", "{bad}"], "error: --outdir writes to {bad}/, but {bad} is a file"),
    ("experiment_multi", ["--outdir", "{bad}/x"], "error: --outdir writes to {bad}/x/, but {bad} is a file"),
    ("experiment", ["--pretrained_models", "{bad}", "{bad}", "{bad}", "--flip"],
     "error: --flip needs exactly 2 --pretrained_models, got 3"),
])
def test_model_files_and_the_activation_are_checked_before_the_data_step(tmp_path, monkeypatch, capsys, script, flags,
                                                                          expect):
    """Everything that needs no data is refused before the data step: a missing dataset would be generated first,
    for minutes (here that step fails the test); nothing is written."""
    import importlib

    from decision_transformer import generation

    def data_step(*a, **k):
        raise AssertionError("the data step was reached (a missing dataset would be generated now)")

    monkeypatch.setattr(generation, "ensure_dataset", data_step)
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    line = fails(importlib.import_module(script).main,
                 ["--data_path", tmp_path / "empty", *[f.format(bad=bad) for f in flags]], capsys)
    assert line.startswith(expect.format(bad=bad)), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "work"] and not listed(tmp_path / "work")


def test_a_multi_run_that_trains_nothing_finds_a_missing_dataset_before_writing_its_folder(tmp_path, monkeypatch,
                                                                                           capsys):
    """``experiment_multi.py --eval_only`` loads no data for training: the data its checkpoints record (state
    statistics) is loaded before the run folder is made, so a missing dataset leaves no folder of a run that never
    started."""
    monkeypatch.chdir(tmp_path)
    line = fails(experiment_multi.main, ["--data_path", tmp_path / "empty", "--no_generate", "--eval_only", "--seed",
                                         "1", "--max_iters", "1", "--num_eval_episodes", "1", "--embed_dim", "16",
                                         "--n_layer", "1", "--K", "5"], capsys)
    assert line.startswith(f"error: dataset not found: {tmp_path / 'empty' / 'hopper-medium-v2.pkl'}"), line
    assert list(tmp_path.iterdir()) == []   # (no run lock either)


@pytest.fixture(scope="module")
def source_models(tmp_path_factory):
    """Tiny hopper (two) and walker2d source models with stored configs (their datasets are not used here)."""
    from conftest import write_source_models

    root = tmp_path_factory.mktemp("sources")
    _, _, paths = write_source_models(root, ["hopper", "walker2d"], n=200, max_ep_len=40, id_base=500)
    _, _, second = write_source_models(root / "second", ["hopper"], n=200, max_ep_len=40, id_base=600)
    nan = root / "nan.pt"
    ckpt = torch.load(paths["hopper"], weights_only=False)
    ckpt["state_dict"]["transformer.h.0.attn.c_attn.weight"][0, 0] = float("nan")
    torch.save(ckpt, nan)
    return {"hopper": paths["hopper"], "hopper2": second["hopper"], "walker2d": paths["walker2d"], "nan": nan}


SMALL = ["--embed_dim", "16", "--n_layer", "1", "--n_head", "1", "--K", "5"]


@pytest.mark.parametrize("flags, expect", [
    (["--pretrained_models", "{bad}", "{bad}"], "error: {bad}: not a loadable checkpoint"),
    (["--pretrained_models", "{hopper}", "{walker2d}", *SMALL],
     "error: {walker2d}: cannot merge with {hopper}: tensor embed_state.weight is [16, 17] in this model"),
    (["--pretrained_models", "{hopper}", "{nan}", *SMALL], "error: {nan}: tensor transformer.h.0.attn.c_attn.weight "),
    (["--pretrained_models", "{walker2d}", "{walker2d}", "--copy_model", *SMALL],
     "error: {walker2d}: this model has state/action dims 17/6, --env hopper needs 11/3"),
    (["--pretrained_models", "{hopper}", "{hopper2}"], "error: the merged model (model 1: {hopper}) does not match "),
    (["--pretrained_models", "{hopper}"], "error: {hopper} does not match the model: shape mismatch"),
    (["--pretrained_models", "{walker2d}", *SMALL],
     "error: {walker2d}: this model has state/action dims 17/6, --env hopper needs 11/3; give a hopper model"),
    (["--pretrained_models", "{hopper}", "--copy_include", "--include", "attn"],
     "error: --copy_include: merged tensor transformer.h.0.attn.c_attn.weight has shape [16, 48], the fresh model "),
    (["--pretrained_models", "{hopper}", "{hopper2}", "--use_fisher", "--include", "attn", *SMALL],
     "error: --data_path {empty}: "),
    (["--pretrained_models", "{hopper}", "{hopper2}", "--use_fisher", "--include", "attn", "--dataset", "expert",
      *SMALL], "error: dataset not found: {empty}/hopper-medium-v2.pkl"),
])
def test_merge_models_are_checked_before_the_data_step(tmp_path, monkeypatch, capsys, source_models, flags, expect):
    """experiment.py --pretrained_models: the models are loaded and checked (damaged, NaN, mismatched with each other,
    not fitting --env or the model they are loaded into, their Fisher or dataset missing where it is not the run's
    own) before the data step, which would generate a missing dataset for minutes (here it fails the test)."""
    from decision_transformer import generation

    def data_step(*a, **k):
        raise AssertionError("the data step was reached (a missing dataset would be generated now)")

    monkeypatch.setattr(generation, "ensure_dataset", data_step)
    bad, empty = tmp_path / "bad.pt", tmp_path / "empty"
    bad.write_text("not a checkpoint\n")
    if "--use_fisher" in flags and "expert" not in flags:
        empty.write_text("a file where the datasets' folder belongs\n")
    names = {k: str(v) for k, v in source_models.items()} | {"bad": bad, "empty": empty}
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    line = fails(experiment.main, ["--data_path", empty, "--max_iters", "1", *[f.format(**names) for f in flags]],
                 capsys)
    assert line.startswith(expect.format(**names)), line
    assert not listed(tmp_path / "work") and not list(source_models["hopper"].parent.glob("info*"))


def test_a_blocked_fisher_place_is_found_before_the_data_step(tmp_path, monkeypatch, capsys, source_models):
    """experiment.py --use_fisher: a file where a model's ``info/`` Fisher folder belongs is refused before the data
    step (it was found after it, once the run's dataset had been loaded or generated)."""
    import shutil

    from decision_transformer import generation

    monkeypatch.setattr(generation, "ensure_dataset",
                        lambda *a, **k: pytest.fail("the data step was reached (a missing dataset is generated now)"))
    models = tmp_path / "models" / "hopper"
    models.mkdir(parents=True)
    a = Path(shutil.copy(source_models["hopper"], models))
    b = Path(shutil.copy(source_models["hopper2"], models))
    (models / "info").write_text("a file where the Fisher files' folder belongs\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    line = fails(experiment.main, ["--data_path", tmp_path / "empty", "--max_iters", "1", "--pretrained_models", a, b,
                                   "--use_fisher", "--include", "attn", *SMALL], capsys)
    info = models / "info"
    assert line.startswith(f"error: the Fisher cache writes to {info}/, but {info} is a file"), line
    assert not listed(tmp_path / "work")


@pytest.mark.parametrize("where", ["pretrained_lm", "bc", "multi_pretrained_model"])
def test_an_activation_the_model_does_not_use_is_not_refused(tmp_path, monkeypatch, capsys, hopper_data, where):
    """--activation_function shapes only a model built from the flags: with an LM backbone (its config sets it), the
    BC MLP or a multi-task --pretrained_model (its recorded architecture) an unknown name has no effect, as before
    the flag was checked up front (those runs were refused)."""
    from test_merging import tiny_lm
    from test_multi import save_multi

    monkeypatch.chdir(tmp_path)
    small = ["--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes", "0", "--K", "5",
             "--batch_size", "4", "--activation_function", "bogus"]
    if where == "multi_pretrained_model":
        from decision_transformer.synthetic import make_dataset

        for i, env in enumerate(("hopper", "halfcheetah", "walker2d")):
            make_dataset(tmp_path / "data", env, "medium", 300, seed=i, max_ep_len=50)
        save_multi(tmp_path / "base.pt", 0, [])
        experiment_multi.main([str(a) for a in ["--data_path", tmp_path / "data", "--pretrained_model",
                                                tmp_path / "base.pt", "--outdir", "runs", *small]])
        assert "--activation_function bogus (the model has relu): no effect" in capsys.readouterr().err
    else:
        flags = ["--pretrained_lm", tiny_lm(tmp_path / "lm")] if where == "pretrained_lm" else ["--model_type", "bc"]
        experiment.main([str(a) for a in ["--data_path", hopper_data, "--outdir", "runs", *flags, *small]])
    rows = [json.loads(line) for f in tmp_path.glob("runs/**/metrics.jsonl") for line in f.read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1], rows   # (the run trained its one iteration)


def test_a_merge_run_says_each_thing_once(tmp_path, monkeypatch, capsys, source_models):
    """A merge run on a smoke-test stand-in dataset: the stand-in was warned about once per load of the run's data
    (the data step, RegMean's windows, the merged model's evaluation: 3 times) and an inert --p twice (the flag
    checks ran again in the merge); one model without an LM was evaluated as "merged" after "(no merge)"."""
    load_script("data/download_d4rl_datasets.py").main(
        ["--synthetic", "200", "--envs", "hopper", "--datasets", "medium", "--hdf5_dir", str(tmp_path / "h5"),
         "--data_path", str(tmp_path / "syn")])
    monkeypatch.chdir(tmp_path)
    run = ["--data_path", str(tmp_path / "syn"), "--max_iters", "1", "--num_steps_per_iter", "1",
           "--num_eval_episodes", "1", "--outdir", "runs", *SMALL]
    capsys.readouterr()
    experiment.main([*run, "--pretrained_models", str(source_models["hopper"]), str(source_models["hopper2"]),
                     "--merge_method", "regmean", "--regmean_n_windows", "4", "--batch_size", "2", "--p", "0.3"])
    err = capsys.readouterr().err
    assert err.count("is a smoke-test stand-in") == 1, err
    assert err.count("--p 0.3 has no effect") == 1, err
    assert "iter 0 (merged, before finetuning)" in err
    experiment.main([*run, "--pretrained_models", str(source_models["hopper"])])
    err = capsys.readouterr().err
    assert "(no merge)" in err and "iter 0 (loaded, before finetuning)" in err and "merged, before" not in err, err
    experiment.main([*run, "--pretrained_models", str(source_models["hopper"]), "--p", "0.3", "--flip"])
    assert capsys.readouterr().err.count("warning: --p and --flip have no effect: one --pretrained_models model "
                                         "without --pretrained_lm is loaded without a merge") == 1


def test_a_multi_task_checkpoint_of_another_K_is_said(tmp_path, monkeypatch, capsys):
    """experiment_multi.py --load_checkpoint of a model trained with another K said nothing (experiment.py warns)."""
    from test_multi import save_multi

    from decision_transformer.synthetic import make_dataset

    monkeypatch.chdir(tmp_path)
    for i, env in enumerate(("hopper", "halfcheetah", "walker2d")):
        make_dataset(tmp_path / "data", env, "medium", 300, seed=i, max_ep_len=50)
    save_multi(tmp_path / "k5.pt", 0, [])
    experiment_multi.main([str(a) for a in ["--data_path", tmp_path / "data", "--load_checkpoint", tmp_path / "k5.pt",
                                            "--embed_dim", "16", "--n_layer", "1", "--n_head", "2", "--K", "4",
                                            "--max_iters", "1", "--num_steps_per_iter", "1", "--num_eval_episodes",
                                            "0", "--batch_size", "6", "--outdir", "runs"]])
    assert capsys.readouterr().err.count(f"warning: {tmp_path / 'k5.pt'} was trained with K=5; this run uses K=4") == 1


def test_precompute_fisher_says_when_K_is_not_the_models(tmp_path, capsys, source_models):
    """precompute_fisher.py --K other than the model's training context estimated on other windows without a word."""
    import shutil

    model = tmp_path / "models" / "hopper" / source_models["hopper"].name
    model.parent.mkdir(parents=True)
    shutil.copy(source_models["hopper"], model)
    data = source_models["hopper"].parents[2] / "data"
    capsys.readouterr()
    precompute_fisher.main([str(a) for a in ["--model", model, "--data_path", data, "--f_batch_size", "2",
                                             "--f_num_batches", "1", "--device", "cpu", "--K", "4"]])
    assert capsys.readouterr().err.count(f"warning: {model} was trained with K=5; this run uses K=4 (--K)") == 1


def test_resuming_from_a_folder_where_the_training_state_belongs_says_so(tmp_path, monkeypatch, capsys):
    """A folder named train_state.pt in the run folder read 'nothing to resume: ... train_state.pt does not exist'."""
    import experiment

    from decision_transformer import generation

    monkeypatch.setattr(generation, "ensure_dataset", lambda *a, **k: pytest.fail("the data step was reached"))
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "checkpoints" / "dt_medium_hopper_666" / "train_state.pt"
    state.mkdir(parents=True)
    line = fails(experiment.main, ["--data_path", tmp_path / "empty", "--resume"], capsys)
    assert line == "error: cannot resume: checkpoints/dt_medium_hopper_666/train_state.pt is a folder, not the run's " \
                   "training state", line
    assert state.is_dir() and not list(state.iterdir())
