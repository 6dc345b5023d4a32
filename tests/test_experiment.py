"""End-to-end runs of experiment.py on small real-MuJoCo data, and its bad-input behaviour."""
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

import experiment
from decision_transformer.checkpoint import load_checkpoint

TINY = ["--embed_dim", "32", "--n_layer", "1", "--K", "5", "--batch_size", "8", "--warmup_steps", "10",
        "--num_eval_episodes", "2"]


def run(tmp_path, monkeypatch, data, *extra):
    """Run ``experiment.main`` in ``tmp_path`` (relative paths resolve there) with tiny budgets."""
    monkeypatch.chdir(tmp_path)
    experiment.main(["--data_path", str(data), *TINY, *extra])
    return tmp_path


def run_dir(tmp_path, name="dt_medium_hopper_666_K5"):
    return tmp_path / "checkpoints" / name


def test_seed_command_as_written(tmp_path, hopper_data):
    """The pre-training seed's command, from another working directory, WandB offline without credentials."""
    cmd = [sys.executable, str(ROOT / "experiment.py"), "--env", "hopper", "--dataset", "medium", "--model_type", "dt",
           "--seed", "666", "--outdir", "checkpoints", "--dropout", "0.2", "--share_input_output_proj",
           "--warmup_steps", "5000", "--embed_dim", "768", "--n_layer", "12", "-w",
           "--data_path", str(hopper_data), "--max_iters", "1", "--num_steps_per_iter", "2",
           "--num_eval_episodes", "2",
           "--batch_size", "2"]  # only to keep a 12 x 768 model fast on two CPU cores
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc -> no credentials
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rd = tmp_path / "checkpoints" / "dt_medium_hopper_666"
    for f in ("model_0.pt", "model_1.pt", "config.json", "metrics.jsonl"):
        assert (rd / f).is_file(), f
    ckpt = torch.load(rd / "model_1.pt", weights_only=True)
    assert ckpt["config"]["model_config"]["backbone"]["n_layer"] == 12
    assert not any(k.startswith("predict_") for k in ckpt["state_dict"])  # tied heads
    rows = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and "evaluation/target_3600_return_mean" in rows[0]
    assert list((tmp_path / "wandb").glob("offline-run-*")), "WandB should run offline without credentials"


def test_training_outputs_and_metrics(tmp_path, monkeypatch, hopper_data):
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "2", "--num_steps_per_iter", "5", "--save_model",
        "--save_mode", "both")
    rd = run_dir(tmp_path)
    assert sorted(p.name for p in rd.glob("model_*.pt")) == ["model_0.pt", "model_1.pt", "model_2.pt"]
    rows = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
    keys = {"time/training", "time/evaluation", "time/total", "training/train_loss_mean", "training/train_loss_std",
            "training/action_error"}
    for t in (3600, 1800):
        keys |= {f"evaluation/target_{t}_{s}" for s in ("return_mean", "return_std", "length_mean", "length_std",
                                                         "d4rl_score_mean", "d4rl_score_std")}
    assert keys <= set(rows[0])
    cfg = json.loads((rd / "config.json").read_text())
    assert cfg["seed"] == 666 and cfg["K"] == 5
    saved = list((tmp_path / "models" / "hopper").glob("dt_gym-experiment-hopper-medium-*.pt"))
    names = sorted(p.name for p in saved)
    assert len(names) == 2 and names[1].endswith("_best.pt") and names[0][:-3] + "_best.pt" == names[1]
    ckpt = load_checkpoint(saved[0])
    assert ckpt["format_version"] == 1 and ckpt["state_mean"].shape == (11,)
    # model_0.pt holds the exact initial weights: rebuilding the model from the seed gives them again
    from decision_transformer.models import DecisionTransformer, DTConfig

    init = DecisionTransformer(DTConfig.from_dict(ckpt["config"]["model_config"]), seed=666).state_dict()
    m0 = load_checkpoint(rd / "model_0.pt")["state_dict"]
    assert all(torch.equal(init[k], m0[k]) for k in init)
    m2 = load_checkpoint(rd / "model_2.pt")["state_dict"]
    assert not torch.equal(m0["embed_state.weight"], m2["embed_state.weight"])


def test_run_folder_names(tmp_path, monkeypatch, hopper_data):
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "1", "--remove_grad_clip",
        "--seed", "42", "--num_eval_episodes", "0")
    assert (tmp_path / "checkpoints" / "dt_medium_hopper_42_K5_no_grad_clip" / "model_1.pt").is_file()


def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch, hopper_data):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    run(a, monkeypatch, hopper_data, "--max_iters", "3", "--num_steps_per_iter", "4")
    run(b, monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "4")
    run(b, monkeypatch, hopper_data, "--max_iters", "3", "--num_steps_per_iter", "4", "--resume")
    sa = load_checkpoint(run_dir(a) / "model_3.pt")["state_dict"]
    sb = load_checkpoint(run_dir(b) / "model_3.pt")["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ra = (run_dir(a) / "metrics.jsonl").read_text().splitlines()
    rb = (run_dir(b) / "metrics.jsonl").read_text().splitlines()
    assert len(rb) == 3
    strip = lambda line: {k: v for k, v in json.loads(line).items() if not k.startswith("time/")}  # noqa: E731
    assert [strip(x) for x in ra] == [strip(x) for x in rb]


def test_resume_past_the_end_writes_nothing_and_time_total_goes_on(tmp_path, monkeypatch, capsys, hopper_data):
    """``time/total`` counts on from the interrupted part's time after --resume (it does not restart at 0); a resume
    with --max_iters below the iterations already trained says so and leaves the run's record and models as they
    are (no config.json with the smaller --max_iters, no "last" model labelled with it)."""
    args = ["--num_steps_per_iter", "2", "--num_eval_episodes", "0", "--save_model", "--save_mode", "last"]
    run(tmp_path, monkeypatch, hopper_data, *args, "--max_iters", "2")
    run(tmp_path, monkeypatch, hopper_data, *args, "--max_iters", "3", "--resume")
    rows = [json.loads(line) for line in (run_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    totals = [r["time/total"] for r in rows]
    assert [r["iteration"] for r in rows] == [1, 2, 3] and totals == sorted(totals) and totals[2] > totals[1]
    state = load_checkpoint(run_dir(tmp_path) / "train_state.pt")
    assert state["elapsed"] == pytest.approx(totals[2], abs=0.5)
    record = {p: p.read_bytes() for p in [run_dir(tmp_path) / "config.json", run_dir(tmp_path) / "metrics.jsonl",
                                          *(tmp_path / "models" / "hopper").iterdir()]}
    capsys.readouterr()
    run(tmp_path, monkeypatch, hopper_data, *args, "--max_iters", "2", "--resume")
    assert "it has trained 3 iterations, more than --max_iters 2; nothing to do, nothing written" in \
        capsys.readouterr().err
    assert {p: p.read_bytes() for p in record} == record
    # --max_iters equal to the iterations trained: the last model, written at the end of the run, is not written again
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "models" / "hopper").iterdir()}
    run(tmp_path, monkeypatch, hopper_data, *args, "--max_iters", "3", "--resume")
    assert "the last model is written already (no iteration trained since)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and {p: p.read_bytes() for p in record} == record
    (last,) = stamps      # one a stop after the training state and before the last model did not write: written
    last.unlink()
    run(tmp_path, monkeypatch, hopper_data, *args, "--max_iters", "3", "--resume")
    assert f"saved {last.relative_to(tmp_path)}" in capsys.readouterr().err and last.is_file()
    assert sorted(record) == sorted([*run_dir(tmp_path).glob("*.json*"), *(tmp_path / "models" / "hopper").iterdir()])


def test_resume_removes_what_a_killed_run_left_half_written(tmp_path, monkeypatch, capsys, hopper_data):
    """A ``kill -9`` during a checkpoint write leaves ``train_state.pt.{pid}.tmp``; the resumed run removes it."""
    import time

    args = ["--num_steps_per_iter", "2", "--num_eval_episodes", "0"]
    run(tmp_path, monkeypatch, hopper_data, *args, "--max_iters", "1")
    proc = subprocess.Popen(["true"])
    proc.wait()
    stale = run_dir(tmp_path) / f"train_state.pt.{proc.pid}.tmp"
    best = tmp_path / "models" / "hopper" / f"dt_gym-experiment-hopper-medium-123456_best.pt.{proc.pid}.tmp"
    best.parent.mkdir(parents=True)
    for f in (stale, best):
        f.write_bytes(b"half a checkpoint")
        os.utime(f, (time.time() - 600,) * 2)
    capsys.readouterr()
    run(tmp_path, monkeypatch, hopper_data, *args, "--max_iters", "2", "--resume", "--save_model")
    err = capsys.readouterr().err
    assert f"removed 1 temporary file(s) a killed run left in {Path('checkpoints') / run_dir(tmp_path).name}: " \
           f"{stale.name}" in err
    assert f"removed 1 temporary file(s) a killed run left in {Path('models') / 'hopper'}: {best.name}" in err
    assert not stale.exists() and not best.exists() and (run_dir(tmp_path) / "model_2.pt").is_file()


def test_resume_bad_training_state(tmp_path, monkeypatch, capsys, hopper_data):
    """--resume without a saved state, or from a state that lacks the optimiser, stops with one line; the run's
    checkpoints stay as they were."""
    monkeypatch.chdir(tmp_path)
    msg = expect_error(capsys, ["--data_path", str(hopper_data), *TINY, "--max_iters", "2", "--resume"])
    assert "nothing to resume" in msg and "train_state.pt does not exist" in msg
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes", "0")
    st_path = run_dir(tmp_path) / "train_state.pt"
    good = load_checkpoint(st_path)
    torch.save({k: v for k, v in good.items() if k != "optimizer"}, st_path)
    before = (run_dir(tmp_path) / "model_1.pt").read_bytes()
    msg = expect_error(capsys, ["--data_path", str(hopper_data), *TINY, "--max_iters", "2", "--resume",
                                "--num_steps_per_iter", "2"])
    assert "train_state.pt: cannot restore the training state (KeyError" in msg
    assert (run_dir(tmp_path) / "model_1.pt").read_bytes() == before
    # a damaged iteration count would cut metrics.jsonl back to it and overwrite the saved models
    metrics = (run_dir(tmp_path) / "metrics.jsonl").read_bytes()
    for bad in (-1, 0.5, True):
        torch.save({**good, "iteration": bad}, st_path)
        msg = expect_error(capsys, ["--data_path", str(hopper_data), *TINY, "--max_iters", "2", "--resume",
                                    "--num_steps_per_iter", "2", "--num_eval_episodes", "0"])
        assert f"cannot restore the training state (ValueError: its iteration {bad!r} is not a non-negative " \
               f"integer)" in msg
        assert (run_dir(tmp_path) / "model_1.pt").read_bytes() == before
        assert (run_dir(tmp_path) / "metrics.jsonl").read_bytes() == metrics
    # torch loads any scheduler values; a wrong one was a traceback at the first step
    for key, bad, why in (("last_epoch", "x", "'x' (an integer ≥ 0 is expected)"),
                          ("base_lrs", [], "[] (1 values are expected)"),
                          ("base_lrs", [float("nan")], "nan (a finite number is expected)")):
        torch.save({**good, "scheduler": {**good["scheduler"], key: bad}}, st_path)
        msg = expect_error(capsys, ["--data_path", str(hopper_data), *TINY, "--max_iters", "2", "--resume",
                                    "--num_steps_per_iter", "2", "--num_eval_episodes", "0"])
        assert msg.endswith(f"cannot restore the training state (ValueError: its scheduler state has {key} {why})")
        assert (run_dir(tmp_path) / "metrics.jsonl").read_bytes() == metrics


def test_resume_refuses_changed_flags(tmp_path, monkeypatch, capsys, hopper_data):
    """--resume with a training flag changed (the restored optimiser would keep the old one while the record says the
    new one) stops with one line naming it; evaluation and length flags may change; a finished run says so."""
    args = ["--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes", "0"]
    run(tmp_path, monkeypatch, hopper_data, *args, "--save_model", "--save_mode", "both", "--num_eval_episodes", "1")
    err = capsys.readouterr().err
    assert "saved models/hopper/dt_gym-experiment-hopper-medium-" in err and "_best.pt (best so far, iteration 1)" in err
    msg = expect_error(capsys, ["--data_path", str(hopper_data), *TINY, *args, "--max_iters", "2", "--resume",
                                "--learning_rate", "1e-3"])
    assert "was made with other flags: --learning_rate 0.001 (the run: 0.0001)" in msg
    run(tmp_path, monkeypatch, hopper_data, *args, "--resume", "--num_eval_episodes", "1")
    assert "it has finished all 1 iterations, nothing to do" in capsys.readouterr().err
    run(tmp_path, monkeypatch, hopper_data, *args, "--max_iters", "2", "--resume", "--num_eval_episodes", "1")
    assert (run_dir(tmp_path) / "model_2.pt").is_file()


def test_resume_refuses_another_runs_training_state(tmp_path, monkeypatch, capsys, hopper_data):
    """A train_state.pt copied in from another run (here the seed-2 run's, into the seed-1 run's folder, whose
    config.json matches the command) was continued silently as this run: one line now, and nothing is written."""
    import shutil

    args = ["--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes", "0"]
    run(tmp_path, monkeypatch, hopper_data, *args, "--seed", "1")
    run(tmp_path, monkeypatch, hopper_data, *args, "--seed", "2")
    mine, other = run_dir(tmp_path, "dt_medium_hopper_1_K5"), run_dir(tmp_path, "dt_medium_hopper_2_K5")
    shutil.copy(other / "train_state.pt", mine / "train_state.pt")
    before = {p.name: p.read_bytes() for p in mine.iterdir() if p.is_file()}
    msg = expect_error(capsys, ["--data_path", str(hopper_data), *TINY, *args, "--seed", "1", "--max_iters", "2",
                                "--resume"])
    rel = mine.relative_to(tmp_path)   # (as --outdir names it)
    assert msg == (f"error: --resume: {rel / 'train_state.pt'} was saved by a run with other flags than the run in "
                   f"{rel}: --seed 2 (this run: 1). It is another run's training state (copied in?): put this "
                   f"run's own back, or start the run afresh without --resume")
    assert {p.name: p.read_bytes() for p in mine.iterdir() if p.is_file()} == before
    run(tmp_path, monkeypatch, hopper_data, *args, "--seed", "2", "--max_iters", "2", "--resume")
    assert (other / "model_2.pt").is_file()


def test_evaluate_only_and_load_checkpoint(tmp_path, monkeypatch, hopper_data):
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "5")
    trained = json.loads((run_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()[0])
    ckpt = run_dir(tmp_path) / "model_1.pt"
    (tmp_path / "eval").mkdir()
    run(tmp_path / "eval", monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "0",
        "--load_checkpoint", str(ckpt))
    evaluated = json.loads((run_dir(tmp_path / "eval") / "metrics.jsonl").read_text().splitlines()[0])
    for k in trained:
        if k.startswith("evaluation/"):
            assert evaluated[k] == trained[k], k
    assert evaluated["training/train_loss_mean"] is None  # NaN for an empty iteration, written as null


def test_load_checkpoint_of_another_architecture_is_refused(tmp_path, monkeypatch, capsys, hopper_data):
    """Settings no tensor shape shows (heads, activation, embedding order) are compared with the checkpoint's record:
    a checkpoint of another architecture is one line naming them and the flags to set, instead of a silent load that
    runs as another network; with its flags it loads."""
    arch = ["--n_head", "2", "--activation_function", "gelu"]
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes",
        "0", *arch)
    ckpt = run_dir(tmp_path) / "model_1.pt"
    (tmp_path / "eval").mkdir()
    monkeypatch.chdir(tmp_path / "eval")
    base = ["--data_path", str(hopper_data), *TINY, "--max_iters", "1", "--num_steps_per_iter", "0",
            "--num_eval_episodes", "0", "--load_checkpoint", str(ckpt)]
    msg = expect_error(capsys, [*base, "--embed_order", "time_then_ln"])
    assert msg == (f"error: {ckpt} was trained with n_head 2, activation_function 'gelu', embed_order 'ln_then_time'; "
                   f"the model these flags build has n_head 1, activation_function 'relu', embed_order "
                   f"'time_then_ln': its weights would run as another network (set --activation_function, "
                   f"--embed_order, --n_head as the checkpoint's run did)")
    assert not (tmp_path / "eval" / "checkpoints").exists()
    run(tmp_path / "eval", monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "0",
        "--num_eval_episodes", "0", "--load_checkpoint", str(ckpt), *arch)
    loaded = load_checkpoint(run_dir(tmp_path / "eval") / "model_1.pt")["state_dict"]
    assert all(torch.equal(loaded[k], v) for k, v in load_checkpoint(ckpt)["state_dict"].items())


def test_a_block_replacement_checkpoint_is_not_loaded_into_a_plain_model():
    """A transplanted block (its own heads and activation, ``block_overrides``) has the shapes of a plain block of
    the host's width: the recorded per-block settings are compared too."""
    from decision_transformer.checkpoint import check_same_behaviour
    from decision_transformer.errors import UserError
    from decision_transformer.models import BackboneConfig, DTConfig

    over = BackboneConfig(n_embd=64, n_layer=2, block_overrides={1: {"n_head": 8, "activation_function": "gelu_new"}})
    a = DTConfig(11, 3, backbone=over).to_dict()
    b = DTConfig(11, 3, backbone=BackboneConfig(n_embd=64, n_layer=2)).to_dict()
    with pytest.raises(UserError, match=r"block_overrides .*\(set --pretrained_block as the checkpoint's run did\)"):
        check_same_behaviour("ckpt.pt", a, b)
    check_same_behaviour("ckpt.pt", a, DTConfig(11, 3, backbone=over).to_dict())  # the same: accepted
    check_same_behaviour("ckpt.pt", json.loads(json.dumps(a)), a)                   # keys as JSON wrote them
    other_dropout = BackboneConfig(n_embd=64, n_layer=2, block_overrides={1: {"n_head": 8, "resid_pdrop": 0.0,
                                                                              "activation_function": "gelu_new"}})
    check_same_behaviour("ckpt.pt", a, DTConfig(11, 3, backbone=other_dropout).to_dict())  # --dropout: the same net


def test_frozen_blocks_stay_fixed(tmp_path, monkeypatch, hopper_data):
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "5", "--frozen",
        "--num_eval_episodes", "0")
    s0 = load_checkpoint(run_dir(tmp_path) / "model_0.pt")["state_dict"]
    s1 = load_checkpoint(run_dir(tmp_path) / "model_1.pt")["state_dict"]
    for k in s0:
        if k.startswith("transformer.h."):
            assert torch.equal(s0[k], s1[k]), k
    assert not torch.equal(s0["embed_state.weight"], s1["embed_state.weight"])


# ---- bad input --------------------------------------------------------------------------------------------------

def expect_error(capsys, argv, code=2):
    with pytest.raises(SystemExit) as e:
        experiment.main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ")
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_missing_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    msg = expect_error(capsys, ["--data_path", str(tmp_path / "nowhere"), "--no_generate", *TINY])
    assert "hopper-medium-v2.pkl" in msg and "download_d4rl_datasets.py" in msg and "generate_datasets.py" in msg
    assert not (tmp_path / "nowhere").exists()


def test_missing_dataset_is_generated(tmp_path, monkeypatch, capsys):
    """Without --no_generate a missing dataset is generated from the bundled policies (random: an untrained actor;
    the size is cut down here to keep the test fast)."""
    from decision_transformer import generation

    real = generation.generate_dataset
    monkeypatch.setattr(generation, "generate_dataset", lambda *a, **k: real(*a, **{**k, "num_transitions": 3000}))
    data = tmp_path / "fresh"
    run(tmp_path, monkeypatch, data, "--dataset", "random", "--max_iters", "1", "--num_steps_per_iter", "2")
    assert (data / "hopper-random-v2.pkl").is_file()
    assert "generating hopper-random" in capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "dt_random_hopper_666_K5" / "model_1.pt").is_file()


@pytest.mark.parametrize("flag,value,needle", [("--env", "ant", "unknown env 'ant'"),
                                               ("--dataset", "medium-v2", "unknown dataset"),
                                               ("--env_targets", "abc", "--env_targets"),
                                               ("--K", "0", "invalid --K"),
                                               ("--env_targets", "nan", "is not a return target"),
                                               ("--env_targets", "3600,inf", "is not a return target"),
                                               ("--env_targets", "3600.5", "3600.5 is not a whole number"),
                                               ("--env_targets", "3600,1800,3600", "lists a target twice"),
                                               ("--env_targets", "3600,,1800", "has an empty entry"),
                                               ("--env_targets", "3600,", "has an empty entry"),
                                               ("--seed", "-1", "--seed must be in [0, 2^32)"),
                                               ("--learning_rate", "inf", "--learning_rate must be a positive"),
                                               ("--weight_decay", "-1", "--weight_decay must be a number >= 0"),
                                               ("--weight_decay", "1e4", "lr * wd must be below 1"),
                                               ("--lm_learning_rate", "nan", "--lm_learning_rate must be"),
                                               ("--p", "nan", "--p must be a number in [0, 1]"),
                                               ("--fisher_floor", "-1", "--fisher_floor must be"),
                                               ("--f_batch_size", "0", "invalid --f_batch_size 0"),
                                               ("--f_num_batches", "-2", "invalid --f_num_batches -2"),
                                               ("--precision", "fp8", "argument --precision: invalid choice")])
def test_bad_flags(tmp_path, monkeypatch, capsys, hopper_data, flag, value, needle):
    """One error line, exit 2, and nothing written: not even the run folder of an earlier run is touched."""
    monkeypatch.chdir(tmp_path)
    earlier = run_dir(tmp_path) / "model_1.pt"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier run")
    assert needle in expect_error(capsys, ["--data_path", str(hopper_data), *TINY, flag, value])
    assert [p.name for p in run_dir(tmp_path).iterdir()] == ["model_1.pt"] and earlier.read_bytes() == b"an earlier run"


def test_save_mode_best_without_evaluation(tmp_path, monkeypatch, capsys, hopper_data):
    """--save_mode best writes only the best-evaluated model: with --num_eval_episodes 0 nothing would be saved, so
    it is refused before anything is written; --save_mode both warns and saves the last model."""
    monkeypatch.chdir(tmp_path)
    base = ["--data_path", str(hopper_data), *TINY, "--max_iters", "1", "--num_steps_per_iter", "2", "--save_model",
            "--num_eval_episodes", "0"]
    assert "--save_mode best saves the best-evaluated model, but --num_eval_episodes 0 evaluates nothing" in \
        expect_error(capsys, [*base, "--save_mode", "best"])
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "models").exists()
    experiment.main([*base, "--save_mode", "both"])
    assert "warning: --save_mode both with --num_eval_episodes 0: nothing is evaluated" in capsys.readouterr().err
    assert [p.name.endswith("_best.pt") for p in (tmp_path / "models" / "hopper").iterdir()] == [False]


def test_a_fresh_run_sets_an_earlier_one_aside(tmp_path, monkeypatch, capsys, hopper_data):
    """A fresh run in a folder that holds an earlier run moves that run to previous/<timestamp>/ (nothing lost, no
    folder mixing two runs); --resume continues in place."""
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "2", "--num_steps_per_iter", "2", "--num_eval_episodes", "0")
    old = {p.name: p.read_bytes() for p in run_dir(tmp_path).iterdir()}
    capsys.readouterr()
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes", "0")
    assert "held an earlier run; moved it to" in capsys.readouterr().err
    (prev,) = (run_dir(tmp_path) / "previous").iterdir()
    assert {p.name: p.read_bytes() for p in prev.iterdir()} == old
    assert sorted(p.name for p in run_dir(tmp_path).iterdir()) == ["config.json", "metrics.jsonl", "model_0.pt",
                                                                   "model_1.pt", "previous", "train_state.pt"]


def test_a_fresh_run_starting_from_a_model_in_its_own_folder_is_refused(tmp_path, monkeypatch, capsys, hopper_data):
    """A finetune of the run's own model_2.pt with the same folder name (--load_checkpoint and -lr are not part of
    it) used to move its source to previous/ under itself; --resume then could not find it."""
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "2", "--num_steps_per_iter", "2", "--num_eval_episodes", "0")
    before = {p.name: p.read_bytes() for p in run_dir(tmp_path).iterdir()}
    src = run_dir(tmp_path) / "model_2.pt"
    for path in (src, "./checkpoints/dt_medium_hopper_666_K5/../dt_medium_hopper_666_K5/model_2.pt"):
        msg = expect_error(capsys, ["--data_path", str(hopper_data), *TINY, "--max_iters", "1", "--num_steps_per_iter",
                                    "2", "--num_eval_episodes", "0", "--load_checkpoint", str(path), "-lr", "5e-5"])
        assert msg == (f"error: --load_checkpoint {path} lies in the folder this run writes "
                       f"({run_dir(tmp_path).relative_to(tmp_path)}), whose files a fresh run moves to previous/; copy "
                       f"it elsewhere first, or give this run another --outdir")
        assert {p.name: p.read_bytes() for p in run_dir(tmp_path).iterdir()} == before   # nothing moved
    # in a subfolder, or a link in the folder to a file elsewhere: both would be moved too
    (run_dir(tmp_path) / "keep").mkdir()
    (run_dir(tmp_path) / "keep" / "src.pt").write_bytes(src.read_bytes())
    elsewhere = tmp_path / "elsewhere.pt"
    elsewhere.write_bytes(src.read_bytes())
    (run_dir(tmp_path) / "link.pt").symlink_to(elsewhere)
    before = {p.name for p in run_dir(tmp_path).iterdir()}
    for path in (run_dir(tmp_path) / "keep" / "src.pt", run_dir(tmp_path) / "link.pt"):
        msg = expect_error(capsys, ["--data_path", str(hopper_data), *TINY, "--max_iters", "1", "--num_steps_per_iter",
                                    "2", "--num_eval_episodes", "0", "--load_checkpoint", str(path)])
        assert msg.startswith(f"error: --load_checkpoint {path} lies in the folder this run writes")
    assert {p.name for p in run_dir(tmp_path).iterdir()} == before
    # said before the model is built and the data loaded (or generated, for minutes)
    from decision_transformer import run as run_module

    with monkeypatch.context() as m:
        m.setattr(run_module, "build_model_from_args", lambda *a, **k: pytest.fail("the model was built"))
        m.setattr(run_module, "load_dataset", lambda *a, **k: pytest.fail("the data step was reached"))
        msg = expect_error(capsys, ["--data_path", str(hopper_data), *TINY, "--load_checkpoint", str(src)])
        assert msg.startswith(f"error: --load_checkpoint {src} lies in the folder this run writes")
    copy = tmp_path / "start.pt"
    copy.write_bytes(src.read_bytes())
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes", "0",
        "--load_checkpoint", str(copy), "-lr", "5e-5")
    assert "previous" in {p.name for p in run_dir(tmp_path).iterdir()}


def test_corrupt_dataset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hopper-medium-v2.pkl").write_bytes(b"\x80\x04garbage")
    msg = expect_error(capsys, ["--data_path", str(tmp_path), *TINY])
    assert "hopper-medium-v2.pkl" in msg


def test_checkpoint_mismatch_names_tensor(tmp_path, monkeypatch, capsys, hopper_data):
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "1", "--num_eval_episodes", "0")
    # (outside the run's folder, which these flags name too: a source in it is refused first, before the model is built)
    ckpt = tmp_path / "model_1.pt"
    shutil.copy(run_dir(tmp_path) / "model_1.pt", ckpt)
    argv = ["--data_path", str(hopper_data), *TINY, "--embed_dim", "64", "--load_checkpoint", str(ckpt)]
    msg = expect_error(capsys, argv)
    assert "does not match the model" in msg and "shape mismatch for transformer.wte.weight" in msg
    assert "(checkpoint [50257, 32], model [50257, 64])" in msg
    # and which flags the checkpoint's run set: the sizes it records, with their flags
    assert msg.endswith("(it was trained with n_embd 32; the model these flags build has n_embd 64: set --embed_dim as "
                        "its run did)")
    argv = ["--data_path", str(hopper_data), *TINY, "--share_input_output_proj", "--load_checkpoint", str(ckpt)]
    msg = expect_error(capsys, argv)
    assert "missing" in msg or "unexpected" in msg
    assert "share_input_output_proj False; the model these flags build has share_input_output_proj True: drop " \
           "--share_input_output_proj as its run did" in msg     # (it said "set": the wrong way round)


def test_malicious_checkpoint_is_refused(tmp_path, monkeypatch, capsys, hopper_data):
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"state_dict": Evil()}))
    monkeypatch.chdir(tmp_path)
    msg = expect_error(capsys, ["--data_path", str(hopper_data), *TINY, "--load_checkpoint", str(bad)])
    assert "evil.pt" in msg and not sentinel.exists()


def test_nan_loss_stops_and_keeps_earlier_checkpoints(tmp_path, monkeypatch, capsys, hopper_data):
    from decision_transformer.training import trainer as trainer_mod

    real = trainer_mod.masked_action_mse
    calls = {"n": 0}

    def poisoned(pred, target, mask):
        calls["n"] += 1
        loss = real(pred, target, mask)
        return loss * float("nan") if calls["n"] > 6 else loss  # iteration 2 (steps 6..10) diverges

    monkeypatch.setattr(trainer_mod, "masked_action_mse", poisoned)
    monkeypatch.chdir(tmp_path)
    argv = ["--data_path", str(hopper_data), *TINY, "--max_iters", "3", "--num_steps_per_iter", "5",
            "--num_eval_episodes", "0"]
    msg = expect_error(capsys, argv, code=3)
    assert "iteration 2" in msg and "step 2" in msg
    rd = run_dir(tmp_path)
    assert (rd / "model_1.pt").is_file() and not (rd / "model_2.pt").exists()
    good = load_checkpoint(rd / "model_1.pt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in good.values() if v.is_floating_point())
    assert len((rd / "metrics.jsonl").read_text().splitlines()) == 1


def test_nan_evaluation_returns_stop_the_run_as_a_divergence(tmp_path, monkeypatch, capsys, hopper_data):
    """Weights that overflow while the loss stays finite give NaN actions and NaN returns: the run stops with exit
    code 3 before that iteration is logged or saved, as for a NaN loss."""
    import numpy as np

    from decision_transformer import run as run_mod

    real, calls = run_mod.evaluate_episodes, {"n": 0}

    def poisoned(*a, **k):
        res = real(*a, **k)
        calls["n"] += 1
        if calls["n"] > 2:  # iteration 2 (two targets per iteration)
            res.returns = np.full(len(res.returns), np.nan)
        return res

    monkeypatch.setattr(run_mod, "evaluate_episodes", poisoned)
    monkeypatch.chdir(tmp_path)
    msg = expect_error(capsys, ["--data_path", str(hopper_data), *TINY, "--max_iters", "3", "--num_steps_per_iter",
                                "2", "--num_eval_episodes", "1"], code=3)
    assert msg == ("error: the evaluation of iteration 2 gave non-finite returns (evaluation/target_3600_return_mean):"
                   " the model's actions are not finite numbers, its weights have diverged; checkpoints of earlier "
                   "iterations are kept")
    rd = run_dir(tmp_path)
    assert (rd / "model_1.pt").is_file() and not (rd / "model_2.pt").exists()
    assert len((rd / "metrics.jsonl").read_text().splitlines()) == 1


def test_resume_after_a_failed_fresh_start_points_at_the_set_aside_run(tmp_path, monkeypatch, capsys, hopper_data):
    """A fresh start moves the run's earlier files to previous/<stamp>/; when it fails before its first iteration
    ends, --resume finds no training state and says where the earlier run went."""
    args = ["--num_steps_per_iter", "2", "--num_eval_episodes", "0", "--max_iters", "1"]
    from decision_transformer import run as run_mod

    run(tmp_path, monkeypatch, hopper_data, *args)

    monkeypatch.setattr(run_mod, "save_train_state", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    expect_error(capsys, ["--data_path", str(hopper_data), *TINY, *args], code=130)  # fresh start, stopped
    (aside,) = (run_dir(tmp_path) / "previous").iterdir()
    msg = expect_error(capsys, ["--data_path", str(hopper_data), *TINY, *args, "--max_iters", "2", "--resume"])
    assert msg.endswith(f"train_state.pt does not exist; the run there before the last fresh start was set aside in "
                        f"{aside.relative_to(tmp_path)}: move its files back into "
                        f"{run_dir(tmp_path).relative_to(tmp_path)} to resume it")


def test_an_interrupt_while_an_iterations_files_are_written_stops_after_all_of_them(tmp_path, monkeypatch, capsys,
                                                                                     hopper_data):
    """Ctrl-C between the first best model and the first training state left models/ a best model of a run that
    --resume could not find (no training state), and the rerun drew another id. The iteration's files are now written
    together: the run stops right after them, and --resume continues it under its own id."""
    import signal

    from decision_transformer import run as run_mod

    real_save = run_mod.atomic_save

    def save_then_interrupted(obj, path, *a, **k):
        out = real_save(obj, path, *a, **k)
        if str(path).endswith("_best.pt"):
            signal.raise_signal(signal.SIGINT)   # (Ctrl-C just after the best model is written)
        return out

    monkeypatch.setattr(run_mod, "atomic_save", save_then_interrupted)
    monkeypatch.chdir(tmp_path)
    base = ["--data_path", str(hopper_data), *TINY, "--num_steps_per_iter", "2", "--num_eval_episodes", "1",
            "--save_model", "--save_mode", "best"]
    expect_error(capsys, [*base, "--max_iters", "1"], code=130)
    assert (run_dir(tmp_path) / "train_state.pt").is_file()
    (best,) = (tmp_path / "models" / "hopper").iterdir()
    monkeypatch.setattr(run_mod, "atomic_save", real_save)
    experiment.main([*base, "--max_iters", "2", "--resume"])
    assert [p.name for p in (tmp_path / "models" / "hopper").iterdir()] == [best.name]
    assert (run_dir(tmp_path) / "model_2.pt").is_file()


def test_max_iters_0_writes_the_initial_model_and_says_so(tmp_path, monkeypatch, capsys, hopper_data):
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "0")
    assert f"--max_iters 0: no iteration trained or evaluated; {Path('checkpoints') / run_dir(tmp_path).name}" \
           f"{os.sep}model_0.pt holds the initial model" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir(tmp_path).iterdir()) == ["config.json", "metrics.jsonl", "model_0.pt"]
    # with --load_checkpoint it holds the loaded weights, and says so
    loaded = tmp_path / "loaded.pt"
    shutil.copy(run_dir(tmp_path) / "model_0.pt", loaded)
    (tmp_path / "again").mkdir()
    run(tmp_path / "again", monkeypatch, hopper_data, "--max_iters", "0", "--load_checkpoint", str(loaded))
    assert f"model_0.pt holds the model of {loaded}" in capsys.readouterr().err
    # nothing is trained, so "best without evaluation" is no contradiction: the same run with --save_mode best
    (tmp_path / "best").mkdir()
    run(tmp_path / "best", monkeypatch, hopper_data, "--max_iters", "0", "--save_model", "--save_mode", "best",
        "--num_eval_episodes", "0")
    assert (run_dir(tmp_path / "best") / "model_0.pt").is_file()


def test_bf16_on_cpu_when_asked(tmp_path, monkeypatch, hopper_data):
    from decision_transformer.run import autocast_dtype

    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    from decision_transformer import run as run_mod

    seen = []  # torch.is_autocast_enabled("cpu") at each training (train-mode) forward of the run's model
    real_init = run_mod.Trainer.__init__

    def spy(self, model, *a, **k):
        model.register_forward_pre_hook(lambda m, _: seen.append(torch.is_autocast_enabled("cpu")) if m.training
                                        else None)
        real_init(self, model, *a, **k)

    monkeypatch.setattr(run_mod.Trainer, "__init__", spy)
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "3", "--precision", "bf16")
    assert len(seen) >= 3 and all(seen)        # the training forwards ran under autocast
    rows = [json.loads(line) for line in (run_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["training/train_loss_mean"] > 0
    ckpt = torch.load(run_dir(tmp_path) / "model_1.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())
    seen.clear()
    fp32 = tmp_path / "fp32"
    fp32.mkdir()
    run(fp32, monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "3")
    assert len(seen) >= 3 and not any(seen)    # and without --precision they do not


def test_learning_rate_and_weight_decay_reach_the_optimiser(tmp_path, monkeypatch, hopper_data):
    """--learning_rate and --weight_decay are the AdamW's (the warm-up schedule scales the lr from it)."""
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes",
        "0", "--learning_rate", "3e-3", "--weight_decay", "0.05")
    groups = load_checkpoint(run_dir(tmp_path) / "train_state.pt")["optimizer"]["param_groups"]
    assert groups and all(g["initial_lr"] == 3e-3 and g["weight_decay"] == 0.05 for g in groups)
    # 2 scheduler steps into a 10-step warm-up (TINY's --warmup_steps 10)
    assert all(g["lr"] == pytest.approx(3e-3 * 3 / 10, rel=1e-6) for g in groups)


def test_freeze_subset_needs_names(capsys):
    """A bare --freeze_subset (default None) is a usage error, not a silent no-op; with names it lists them."""
    from decision_transformer.cli import experiment_parser
    from decision_transformer.multi_run import multi_parser

    for parser in (experiment_parser(), multi_parser()):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["--freeze_subset"])
        assert e.value.code == 2 and "--freeze_subset" in capsys.readouterr().err
        assert parser.parse_args(["--freeze_subset", "ln_f", "wpe"]).freeze_subset == ["ln_f", "wpe"]


def test_eval_workers_give_the_same_metrics(tmp_path, monkeypatch, hopper_data):
    """--eval_workers 2 (envs stepped in two worker processes) logs exactly the metrics of stepping them here."""
    from decision_transformer import env_workers

    started = []  # the worker counts of the EnvWorkers the runs start
    real_init = env_workers.EnvWorkers.__init__

    def spy(self, env, version=env_workers.DEFAULT_ENV_VERSION, workers=2):
        started.append(workers)
        real_init(self, env, version, workers)

    monkeypatch.setattr(env_workers.EnvWorkers, "__init__", spy)
    rows, used = {}, {}
    for w in ("0", "2"):
        d = tmp_path / w
        d.mkdir()
        run(d, monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes", "4",
            "--eval_workers", w)
        row = json.loads((run_dir(d) / "metrics.jsonl").read_text())
        rows[w] = {k: v for k, v in row.items() if k.startswith("evaluation/target")}
        used[w], started[:] = list(started), []
    assert rows["0"] and rows["0"] == rows["2"]
    assert used["0"] == [] and used["2"] and set(used["2"]) == {2}  # the envs really were stepped in 2 workers


def test_best_model_is_written_before_the_training_state(tmp_path, monkeypatch, capsys, hopper_data):
    """A run stopped while saving the training state of an improved iteration has already written its _best.pt;
    the resumed run redoes that iteration."""
    from decision_transformer import run as run_mod

    real = run_mod.save_train_state

    def stopped(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "save_train_state", stopped)
    with pytest.raises(SystemExit):
        run(tmp_path, monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "2", "--save_model",
            "--save_mode", "best")
    assert len(list((tmp_path / "models" / "hopper").glob("dt_gym-experiment-hopper-medium-*_best.pt"))) == 1
    monkeypatch.setattr(run_mod, "save_train_state", real)


def test_atomic_save_uses_a_temporary_file_of_its_own(tmp_path, monkeypatch):
    """Runs writing one shared cache file (k-means centres, Fisher, tokens) at the same time never share a temporary
    file: its name carries the process id and a random part (hosts sharing a file system reuse process ids)."""
    from decision_transformer import checkpoint

    written = []
    real_save = torch.save
    monkeypatch.setattr(checkpoint.torch, "save", lambda obj, f: (written.append(Path(f)), real_save(obj, f)))
    out = checkpoint.atomic_save({"x": torch.ones(2)}, tmp_path / "cache" / "c.pt")
    checkpoint.atomic_save({"x": torch.ones(2)}, tmp_path / "cache" / "c.pt")
    assert len(written) == 2 and written[0] != written[1] and out.is_file()
    for w in written:
        assert w.parent == tmp_path / "cache" and re.fullmatch(rf"c\.pt\.{os.getpid()}\.[0-9a-f]{{8}}\.tmp", w.name)
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_find_run_ignores_flags_an_older_config_does_not_record(tmp_path):
    from decision_transformer.checkpoint import find_run

    d = tmp_path / "run_123"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"lr": 0.1}))
    (d / "train_state.pt").write_bytes(b"x")
    assert find_run(tmp_path, "run_", {"lr": 0.1, "flag_added_later": 3}, require="train_state.pt") == d
    assert find_run(tmp_path, "run_", {"lr": 0.2}, require="train_state.pt") is None


def test_resume_checks_flags_against_the_training_state_when_config_json_is_broken(tmp_path, monkeypatch, capsys,
                                                                                   hopper_data):
    args = ["--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes", "0"]
    run(tmp_path, monkeypatch, hopper_data, *args)
    (run_dir(tmp_path) / "config.json").write_text("{broken")
    msg = expect_error(capsys, ["--data_path", str(hopper_data), *TINY, *args, "--max_iters", "2", "--resume",
                                "--learning_rate", "5e-3"])
    assert "was made with other flags: --learning_rate 0.005 (the run: 0.0001)" in msg
    assert "--no_token_cache" not in msg and "--note" not in msg        # not flags of experiment.py / hidden


def test_started_in_a_project_sub_folder_the_defaults_are_the_projects_folders(tmp_path, monkeypatch, hopper_data):
    """As the originals' scripts ran from a sub-folder (``cd lm_cotraining``, ``../data``): started anywhere inside
    the project, a run reads the project's data/ and writes the project's checkpoints/ and models/ (nothing new
    appears in the sub-folder), and records its data file so that an analysis started elsewhere finds it."""
    import shutil

    from decision_transformer import paths
    from decision_transformer.analysis.runs import analysis_dataset

    project = tmp_path / "project"
    (project / "lm_cotraining").mkdir(parents=True)
    shutil.copytree(hopper_data, project / "data")
    monkeypatch.setattr(paths, "PROJECT_ROOT", project)
    monkeypatch.chdir(project / "lm_cotraining")
    experiment.main([*TINY, "--max_iters", "1", "--num_steps_per_iter", "2", "--save_model", "--no_generate"])
    assert not any((project / "lm_cotraining").iterdir())
    run = project / "checkpoints" / "dt_medium_hopper_666_K5"
    assert (run / "model_1.pt").is_file() and list((project / "models" / "hopper").glob("*.pt"))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data_file"] == str((project / "data" / "hopper-medium-v2.pkl").resolve())
    monkeypatch.chdir(tmp_path)   # an analysis started outside the project still finds the recorded file
    ds = analysis_dataset("hopper", "medium", None, load_checkpoint(run / "model_1.pt"))
    assert len(ds) > 0


def test_resume_refuses_other_data_and_never_generates(tmp_path, monkeypatch, capsys, hopper_data):
    """--resume continues on the data the run started on: a dataset replaced meanwhile (other statistics or another
    number of timesteps) is one line, and a missing one is not generated anew."""
    import shutil

    from decision_transformer.synthetic import make_dataset

    data = tmp_path / "data"
    shutil.copytree(hopper_data, data)
    run(tmp_path, monkeypatch, data, "--max_iters", "1", "--num_steps_per_iter", "2")
    before = (run_dir(tmp_path) / "train_state.pt").read_bytes()
    other = tmp_path / "other"
    make_dataset(other, "hopper", "medium", 1500, seed=5, max_ep_len=100)
    shutil.copy(other / "hopper-medium-v2.pkl", data / "hopper-medium-v2.pkl")
    msg = expect_error(capsys, ["--data_path", str(data), *TINY, "--max_iters", "2", "--num_steps_per_iter", "2",
                                "--resume"])
    assert "--resume: the hopper data" in msg and "is not the data" in msg
    assert (run_dir(tmp_path) / "train_state.pt").read_bytes() == before          # nothing changed
    (data / "hopper-medium-v2.pkl").unlink()
    msg = expect_error(capsys, ["--data_path", str(data), *TINY, "--max_iters", "2", "--num_steps_per_iter", "2",
                                "--resume"])
    assert "not found" in msg and not (data / "hopper-medium-v2.pkl").exists()


def test_load_checkpoint_reads_an_original_pickled_model(tmp_path, monkeypatch, hopper_data):
    """--load_checkpoint takes the originals' whole pickled modules (through the restricted importer), like every
    other loader; the run evaluates exactly the imported weights."""
    from test_legacy_import import LDecisionTransformer, save_original
    from torch import nn

    from decision_transformer.legacy_import import import_legacy

    orig = LDecisionTransformer(n_layer=1)
    orig.transformer.wte, orig.transformer.wpe = nn.Embedding(50257, 16), nn.Embedding(1024, 16)  # as LAWSON's
    path = tmp_path / "models" / "hopper" / "dt_gym-experiment-hopper-medium-123_best.pt"
    path.parent.mkdir(parents=True)
    save_original(orig, path)
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "0", "--embed_dim", "16",
        "--n_head", "4", "--activation_function", "gelu_new", "--load_checkpoint", str(path), "--save_model")
    saved = load_checkpoint(run_dir(tmp_path) / "model_1.pt")["state_dict"]
    imported = import_legacy(path)["state_dict"]
    assert saved.keys() == imported.keys()
    assert all(torch.equal(saved[k], imported[k]) for k in imported)


def test_load_checkpoint_refuses_a_multi_task_model(tmp_path, monkeypatch, capsys, hopper_data):
    from test_multi import save_multi

    multi = save_multi(tmp_path / "multi.pt", 0, ["hopper"])
    monkeypatch.chdir(tmp_path)
    msg = expect_error(capsys, ["--data_path", str(hopper_data), *TINY, "--max_iters", "1", "--num_steps_per_iter",
                                "0", "--load_checkpoint", str(multi)])
    assert msg == (f"error: {multi}: a multi-task model; load it with experiment_multi.py --load_checkpoint (or "
                   f"--pretrained_model to finetune it)")
    assert not (tmp_path / "checkpoints").exists()


def test_load_checkpoint_with_another_k_warns(tmp_path, monkeypatch, capsys, hopper_data):
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes",
        "0")
    ckpt = run_dir(tmp_path) / "model_1.pt"                                   # trained with K=5 (TINY)
    (tmp_path / "eval").mkdir()
    capsys.readouterr()
    run(tmp_path / "eval", monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "0",
        "--num_eval_episodes", "0", "--load_checkpoint", str(ckpt), "--K", "3")
    assert f"warning: {ckpt} was trained with K=5; this run uses K=3 (--K)" in capsys.readouterr().err
    (tmp_path / "same").mkdir()                                               # the checkpoint's own K: no warning
    run(tmp_path / "same", monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "0",
        "--num_eval_episodes", "0", "--load_checkpoint", str(ckpt))
    assert "was trained with K" not in capsys.readouterr().err


def test_a_resume_whose_state_changed_before_it_held_the_lock_writes_nothing(tmp_path, monkeypatch, capsys,
                                                                               hopper_data):
    """--resume reads the training state before it holds the run folder's lock (it needs the run's model first): a
    process that trained the run in that window was overwritten by a continuation of the older state, and the folder
    mixed two runs. The resume now stops with one line once it holds the lock, and writes nothing."""
    import contextlib

    from decision_transformer import sweep

    flags = ["--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes", "0"]
    run(tmp_path, monkeypatch, hopper_data, *flags)
    st = run_dir(tmp_path) / "train_state.pt"
    before = {p.name: p.read_bytes() for p in run_dir(tmp_path).iterdir() if p.is_file()}
    real_lock = sweep.run_lock

    @contextlib.contextmanager
    def late_lock(path, program):
        t = st.stat().st_mtime_ns + 10**9                   # another process saved the state meanwhile
        os.utime(st, ns=(t, t))
        with real_lock(path, program):
            yield

    monkeypatch.setattr(sweep, "run_lock", late_lock)
    msg = expect_error(capsys, ["--data_path", str(hopper_data), *TINY, *flags[:1], "2", *flags[2:], "--resume"])
    assert msg == (f"error: {st.relative_to(tmp_path)} changed while this --resume was starting (another process "
                   f"trained this run, or started it afresh, meanwhile); nothing was written: run the --resume again")
    assert {p.name: p.read_bytes() for p in run_dir(tmp_path).iterdir() if p.is_file()} == before


@pytest.mark.parametrize("flag, value, needle", [("--mode", "foo", "unknown --mode 'foo'"),
                                                 ("--pct_traj", "0", "--pct_traj must be in (0, 1], got 0.0"),
                                                 ("--pct_traj", "nan", "--pct_traj must be in (0, 1], got nan")])
def test_mode_and_pct_traj_are_checked_before_a_missing_dataset_is_generated(tmp_path, monkeypatch, capsys, flag,
                                                                             value, needle):
    """The dataset refused them only once loaded, so a missing one was generated first (minutes); the sweep
    planner, which runs the same flag checks, listed such a grid point as valid."""
    from decision_transformer import generation
    from decision_transformer.cli import experiment_parser
    from decision_transformer.errors import UserError
    from decision_transformer.run import EXPERIMENT, check_run_flags

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(generation, "generate_dataset", lambda *a, **k: pytest.fail("generated before the check"))
    empty = tmp_path / "no_data"
    empty.mkdir()
    assert needle in expect_error(capsys, ["--data_path", str(empty), *TINY, flag, value])
    assert not any(empty.iterdir())
    with pytest.raises(UserError, match=re.escape(needle)):
        check_run_flags(experiment_parser().parse_args([flag, value]), EXPERIMENT)


def test_K_is_bounded_by_the_envs_own_episode_length(tmp_path, monkeypatch, capsys):
    """reacher2d's episodes are 100 steps: --K 101 only adds padding there, and the bound named the longest env's
    1000 steps (--K 1000 was accepted)."""
    monkeypatch.chdir(tmp_path)
    msg = expect_error(capsys, ["--env", "reacher2d", "--dataset", "medium", "--data_path", str(tmp_path),
                                "--K", "101"])
    assert msg.endswith("--K 101 exceeds the episode length 100 of reacher2d")
    assert not any(tmp_path.iterdir())


def test_resume_from_another_folder_matches_relative_paths_by_the_runs_folder(tmp_path, monkeypatch, hopper_data):
    """A run records the folder it was started in: a resume from another folder that names the same
    --load_checkpoint file by another relative path continues the run (the recorded path is relative to the run's
    folder, not to the resuming process's)."""
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "2",
        "--num_eval_episodes", "0")
    shutil.copy(run_dir(tmp_path) / "model_1.pt", tmp_path / "init.pt")
    (tmp_path / "a").mkdir()
    run(tmp_path / "a", monkeypatch, hopper_data, "--max_iters", "1", "--num_steps_per_iter", "2",
        "--num_eval_episodes", "0", "--load_checkpoint", "../init.pt", "--outdir", "out")
    folder = tmp_path / "a" / "out" / "dt_medium_hopper_666_K5"
    config = json.loads((folder / "config.json").read_text())
    assert config["working_dir"] == str(tmp_path / "a") and config["load_checkpoint"] == "../init.pt"
    run(tmp_path, monkeypatch, hopper_data, "--max_iters", "2", "--num_steps_per_iter", "2",
        "--num_eval_episodes", "0", "--load_checkpoint", "init.pt", "--outdir", "a/out", "--resume")
    assert (folder / "model_2.pt").is_file()
    assert json.loads((folder / "config.json").read_text())["working_dir"] == str(tmp_path)


def test_resume_takes_the_freeze_subset_in_any_order(tmp_path, monkeypatch, capsys, hopper_data):
    """--freeze_subset (like --include / --exclude) is a set of substrings: the same ones in another order are the same
    run to resume; another set is a changed flag."""
    from decision_transformer.checkpoint import same_flag_value

    args = ["--num_steps_per_iter", "1", "--num_eval_episodes", "0"]
    run(tmp_path, monkeypatch, hopper_data, *args, "--max_iters", "1", "--freeze_subset", "embed_timestep", "ln_f")
    run(tmp_path, monkeypatch, hopper_data, *args, "--max_iters", "2", "--freeze_subset", "ln_f", "embed_timestep",
        "--resume")
    assert "resuming" in capsys.readouterr().err
    assert same_flag_value("include", ["mlp", "attn"], ["attn", "mlp"])
    assert not same_flag_value("freeze_subset", ["ln_f"], ["ln_f", "wpe"])
    assert not same_flag_value("env_targets", [1, 2], [2, 1])       # (the first target is the one a run selects by)
