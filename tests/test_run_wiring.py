"""How run.py and multi_run.py wire their flags and results: the gradient clip, which evaluation picks the best model
(and what a resume keeps of it), the evaluation seed, the initial model a resume leaves alone, the data checks of
--resume, init_reg, the return-to-go the multi-task model sees, the multi-task selection metric and interpolation,
--spec_info and the logged per-env losses. Evaluations are replaced by fixed returns: no episode is run."""
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

import experiment
import experiment_multi
from conftest import fails
from decision_transformer.checkpoint import load_checkpoint
from decision_transformer.evaluation import EvalResult
from test_multi import data, save_multi, tiny_multi  # noqa: F401 (data: the module's fixture)

TINY = ["--embed_dim", "16", "--n_layer", "1", "--n_head", "2", "--K", "5", "--batch_size", "4", "--warmup_steps",
        "10", "--num_steps_per_iter", "2"]
MTINY = [*TINY, "--dataset", "medium"]


def fixed_returns(monkeypatch, module, table, seen=None):
    """Replace ``module.evaluate_episodes`` by one returning ``table[target][n]`` at the n-th call for that target
    (one episode of length 10); ``seen`` collects (target, seed) of each call."""
    calls = {}

    def fake(model, env, target, num_episodes, state_mean, state_std, *, seed, **kw):
        n = calls.get(target, 0)
        calls[target] = n + 1
        if seen is not None:
            seen.append((target, seed))
        return EvalResult(target, np.full(num_episodes, float(table[target][n])), np.full(num_episodes, 10))

    monkeypatch.setattr(module, "evaluate_episodes", fake)
    return calls


def models(root, pattern):
    return sorted((root / "models").glob(pattern))


# ---- run.py -------------------------------------------------------------------------------------------------------------

def test_remove_grad_clip_reaches_the_trainer(tmp_path, monkeypatch, hopper_data):
    """Item 10: --remove_grad_clip trains without a clip; without it the trainer clips at GRAD_CLIP."""
    from decision_transformer import run as run_mod
    from decision_transformer.training import GRAD_CLIP

    seen = []
    real = run_mod.Trainer

    class Spy(real):
        def __init__(self, *a, **k):
            seen.append(k["grad_clip"])
            super().__init__(*a, **k)

    monkeypatch.setattr(run_mod, "Trainer", Spy)
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--remove_grad_clip"]):
        experiment.main(["--data_path", str(hopper_data), *TINY, "--max_iters", "0", "--num_eval_episodes", "0",
                         *extra])
    assert GRAD_CLIP is not None and seen == [GRAD_CLIP, None]


def test_best_model_follows_the_first_target_and_the_evaluation_seed(tmp_path, monkeypatch, hopper_data):
    """Items 11, 15, 16 (last model): the best model is chosen by the first target's return (3600: 100 then 50), not
    the last's (1800: 10 then 90), and only when it improves; evaluation gets --seed; the last model records
    --max_iters as its iteration."""
    from decision_transformer import run as run_mod

    seen = []
    fixed_returns(monkeypatch, run_mod, {3600: [100, 50], 1800: [10, 90]}, seen)
    monkeypatch.chdir(tmp_path)
    experiment.main(["--data_path", str(hopper_data), *TINY, "--max_iters", "2", "--num_eval_episodes", "1",
                     "--seed", "42", "--save_model", "--save_mode", "both"])
    assert seen == [(3600, 42), (1800, 42)] * 2
    best = models(tmp_path, "hopper/*_best.pt")
    last = [p for p in models(tmp_path, "hopper/*.pt") if not p.name.endswith("_best.pt")]
    assert len(best) == 1 and len(last) == 1
    assert load_checkpoint(best[0])["iteration"] == 1
    assert load_checkpoint(last[0])["iteration"] == 2
    rows = [json.loads(x) for x in (tmp_path / "checkpoints" / "dt_medium_hopper_42_K5" / "metrics.jsonl")
            .read_text().splitlines()]
    assert [r["evaluation/target_3600_return_mean"] for r in rows] == [100.0, 50.0]


def test_resume_keeps_the_best_score_and_the_initial_model(tmp_path, monkeypatch, hopper_data):
    """Items 11 (resume) and 12: a resumed run compares with the best score it restored (50 after 100 is no
    improvement: the best model stays iteration 1's) and leaves model_0.pt (the initial weights) as it was."""
    from decision_transformer import run as run_mod

    args = ["--data_path", str(hopper_data), *TINY, "--num_eval_episodes", "1", "--save_model", "--save_mode", "best"]
    monkeypatch.chdir(tmp_path)
    fixed_returns(monkeypatch, run_mod, {3600: [100], 1800: [10]})
    experiment.main([*args, "--max_iters", "1"])
    m0 = tmp_path / "checkpoints" / "dt_medium_hopper_666_K5" / "model_0.pt"
    before = m0.read_bytes()
    (best,) = models(tmp_path, "hopper/*_best.pt")
    assert load_checkpoint(best)["iteration"] == 1
    fixed_returns(monkeypatch, run_mod, {3600: [50], 1800: [90]})
    experiment.main([*args, "--max_iters", "2", "--resume"])
    assert models(tmp_path, "hopper/*_best.pt") == [best] and load_checkpoint(best)["iteration"] == 1
    assert m0.read_bytes() == before
    assert load_checkpoint(m0)["iteration"] == 0


def test_resume_data_check_names_statistics_and_timesteps():
    """Item 13: other state statistics alone, or another timestep count alone, each stop --resume, saying which."""
    from decision_transformer.errors import UserError
    from decision_transformer.run import check_same_data

    mean, std = np.arange(11, dtype=np.float64), np.ones(11)
    st = {"state_mean": torch.as_tensor(mean), "state_std": torch.as_tensor(std), "data_timesteps": {"hopper": 100}}
    check_same_data(st, "run/train_state.pt", "d.pkl", {"hopper": (mean, std)}, {"hopper": 100})  # the same: passes
    with pytest.raises(UserError) as e:
        check_same_data(st, "run/train_state.pt", "d.pkl", {"hopper": (mean * 2, std)}, {"hopper": 100})
    assert str(e.value) == ("--resume: the hopper data (d.pkl) is not the data run was trained on (other state "
                            "statistics); resume with the run's own dataset, or start a new run")
    with pytest.raises(UserError) as e:
        check_same_data(st, "run/train_state.pt", "d.pkl", {"hopper": (mean, std)}, {"hopper": 200})
    assert str(e.value) == ("--resume: the hopper data (d.pkl) is not the data run was trained on (100 timesteps "
                            "then, 200 now); resume with the run's own dataset, or start a new run")


@pytest.mark.parametrize("flag, value, line", [
    ("--dropout", "1", "error: invalid --dropout 1.0"),
    ("--env_targets", "1e7", "error: --env_targets: 10000000.0 is not a return target (finite, below 1e7 in "
                             "magnitude)"),
])
def test_bad_flag_bounds(tmp_path, monkeypatch, capsys, hopper_data, flag, value, line):
    """Item 16: --dropout 1 and a target of 1e7 are refused (the bounds are exclusive)."""
    monkeypatch.chdir(tmp_path)
    assert fails(experiment.main, ["--data_path", hopper_data, *TINY, "--max_iters", "1", flag, value], capsys) == line


def test_infinite_evaluation_returns_stop_the_run(tmp_path, monkeypatch, capsys, hopper_data):
    """Item 16: an infinite return (not only NaN) stops the run as a divergence, exit 3, nothing of it written."""
    from decision_transformer import run as run_mod

    fixed_returns(monkeypatch, run_mod, {3600: [float("inf")], 1800: [1.0]})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # numpy's "invalid value" warning would print above the error line
        experiment.main(["--data_path", str(hopper_data), *TINY, "--max_iters", "1", "--num_eval_episodes", "1"])
    assert e.value.code == 3
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: the evaluation of iteration 1 gave non-finite returns (evaluation/target_3600_return_mean): the "
        "model's actions are not finite numbers, its weights have diverged; checkpoints of earlier iterations are kept")
    assert not (tmp_path / "checkpoints" / "dt_medium_hopper_666_K5" / "model_1.pt").exists()


# ---- multi_run.py: the trainer -----------------------------------------------------------------------------------------

def _trainer(data, model, init_reg=None):  # noqa: F811 (data: the fixture's value)
    from decision_transformer.multi_run import EnvData, MultiTrainer, multi_parser
    from decision_transformer.models.multi_decision_transformer import MULTI_ENVS
    from decision_transformer.training import make_optimizer, warmup_schedule

    args = multi_parser().parse_args(["--data_path", str(data), "--K", "5"])
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.0)
    return MultiTrainer(model, opt, warmup_schedule(opt, 1), EnvData(args, "cpu", {}), list(MULTI_ENVS), batch_size=4,
                        K=5, generator=torch.Generator().manual_seed(0), init_reg=init_reg)


def test_init_reg_changes_the_multi_task_update(data):  # noqa: F811
    """Item 17: init_reg's term is added to the loss: from the same start and batches, weight 10 and weight 0 end
    with other blocks (the same weight twice with the same ones); the step returns the term."""
    from decision_transformer.training.init_reg import InitReg

    ends = []
    for weight in (10.0, 10.0, 0.0):
        model = tiny_multi()
        trainer = _trainer(data, model, InitReg(model, weight))
        for _ in range(3):
            total, per_env, reg = trainer.train_step()
        torch.testing.assert_close(total, per_env.sum() + reg)  # (the sum's order may round differently)
        ends.append({k: v.clone() for k, v in model.state_dict().items() if k.startswith("transformer.h.")})
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])
    assert not all(torch.equal(ends[0][k], ends[2][k]) for k in ends[0])


def test_multi_task_init_reg_loss_is_the_last_steps(data):  # noqa: F811
    """training/init_reg_loss is the term of the iteration's last step (the original's diagnostic), like
    training/action_error, not the mean over the iteration."""
    from decision_transformer.training.init_reg import InitReg

    model = tiny_multi()
    trainer = _trainer(data, model, InitReg(model, 10.0))
    terms, real_step = [], trainer.train_step

    def step():
        out = real_step()
        terms.append(float(out[2]))
        return out

    trainer.train_step = step
    logs = trainer.train_iteration(4, 1)
    assert len(terms) == 4 and len(set(terms)) == 4      # the term grows as the blocks move away from the start
    assert logs["training/init_reg_loss"] == pytest.approx(terms[-1], rel=1e-6)


def test_multi_task_model_sees_the_batches_rtg_without_its_last_step(data):  # noqa: F811
    """Item 18: the forward's returns-to-go are the batch's rtg[:, :-1] (the conditioning of each step)."""
    model = tiny_multi()
    trainer = _trainer(data, model)
    batches, rtgs = [], []
    for _, ds in trainer.datasets:
        real_sample = ds.sample_batch

        def sample(*a, _real=real_sample, **k):
            b = _real(*a, **k)
            batches.append(b)
            return b

        ds.sample_batch = sample
    real_forward = model.forward

    def forward(states, actions, rtg, *a, **k):
        rtgs.append(rtg)
        return real_forward(states, actions, rtg, *a, **k)

    model.forward = forward
    trainer.train_step()
    assert len(batches) == len(rtgs) == 3
    for b, r in zip(batches, rtgs):
        assert b.rtg.shape[1] == 6 and torch.equal(r, b.rtg[:, :-1])


def test_logged_losses_are_the_last_steps_per_env_and_the_mean_total(data, monkeypatch):  # noqa: F811
    """Item 25: with per-env losses 1, 2, 3 at step 1 and 4, 5, 6 at step 2: action_error_{env} are 4, 5, 6 (the last
    step's), action_error 6 (the last env's), train_loss_mean the mean of the steps' totals (6 and 15)."""
    from decision_transformer import multi_run

    n = {"calls": 0}

    def const(preds, actions, mask):
        n["calls"] += 1
        return preds.sum() * 0 + float(n["calls"])

    monkeypatch.setattr(multi_run, "masked_action_mse", const)
    logs = _trainer(data, tiny_multi()).train_iteration(2, 1)
    assert n["calls"] == 6
    assert {k: v for k, v in logs.items() if k.startswith("training/")} == {
        "training/train_loss_mean": 10.5, "training/train_loss_std": 4.5, "training/action_error": 6.0,
        "training/action_error_hopper": 4.0, "training/action_error_halfcheetah": 5.0,
        "training/action_error_walker2d": 6.0}


# ---- multi_run.py: runs -------------------------------------------------------------------------------------------------

def multi_run_dir(root):
    (run,) = (root / "checkpoints" / "multi").glob("gym-*")
    return run


def test_selection_metric_is_the_mean_return_over_target(data, tmp_path, monkeypatch):  # noqa: F811
    """Item 21, 29 (seed): average_norm_return_mean is the mean of return/target over the envs; with
    --selected_training hopper --score_selected over hopper alone; evaluation gets --seed."""
    from decision_transformer import evaluation
    from decision_transformer.envs import get_env_spec

    returns = {"hopper": 900.0, "halfcheetah": 3000.0, "walker2d": 4000.0}
    targets = {e: get_env_spec(e).targets[0] for e in returns}
    table = {targets[e]: [r] * 4 for e, r in returns.items()}
    assert len(table) == 3
    for i, extra in enumerate(([], ["--selected_training", "hopper", "--score_selected"])):
        seen = []
        fixed_returns(monkeypatch, evaluation, table, seen)
        root = tmp_path / str(i)
        root.mkdir()
        monkeypatch.chdir(root)
        experiment_multi.main(["--data_path", str(data), *MTINY, "--max_iters", "1", "--num_eval_episodes", "1",
                               "--seed", "5", *extra])
        (row,) = [json.loads(x) for x in (multi_run_dir(root) / "metrics.jsonl").read_text().splitlines()]
        want = (returns["hopper"] / targets["hopper"] if extra else
                float(np.mean([returns[e] / targets[e] for e in returns])))
        assert row["evaluation/average_norm_return_mean"] == pytest.approx(want, rel=1e-12)
        assert sorted(seen) == sorted((targets[e], 5) for e in returns)


def _patch_scores(monkeypatch, score):
    """``multi_run.evaluate_all`` returning only ``{prefix}average_norm_return_mean = score(prefix)``."""
    from decision_transformer import multi_run

    def fake(model, envs, data, args, device, pools, score_envs, prefix="evaluation/"):  # noqa: F811
        return {f"{prefix}average_norm_return_mean": float(score(prefix))}

    monkeypatch.setattr(multi_run, "evaluate_all", fake)


def test_merge_pre_keeps_the_best_interpolation(data, tmp_path, monkeypatch):  # noqa: F811
    """Items 19, 20: with --eval_merge_pre --p_list 0.2 0.8 and the score = p, p = 0.8 wins and the best model's
    blocks are 0.2 * initial + 0.8 * trained."""
    from decision_transformer.models.multi_decision_transformer import MultiDecisionTransformer, MultiDTConfig

    _patch_scores(monkeypatch, lambda prefix: float(prefix.split("/")[1]))
    monkeypatch.chdir(tmp_path)
    experiment_multi.main(["--data_path", str(data), *MTINY, "--max_iters", "1", "--num_eval_episodes", "1",
                           "--seed", "7", "--eval_merge_pre", "--p_list", "0.2", "0.8", "--save_model",
                           "--save_mode", "both"])
    (row,) = [json.loads(x) for x in (multi_run_dir(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    assert row["evaluation/best_p"] == 0.8 and row["evaluation/average_norm_return_mean"] == 0.8
    (best,) = models(tmp_path, "multi/*_best.pt")
    (last,) = [p for p in models(tmp_path, "multi/*.pt") if p != best]
    best, last = load_checkpoint(best), load_checkpoint(last)
    pre = MultiDecisionTransformer(MultiDTConfig.from_dict(last["config"]["model_config"]), seed=7).state_dict()
    blocks = [k for k in pre if k.startswith("transformer.h.")]
    assert blocks
    for k in blocks:
        assert not torch.equal(pre[k], last["state_dict"][k]) or "bias" in k
        torch.testing.assert_close(best["state_dict"][k], 0.2 * pre[k] + 0.8 * last["state_dict"][k])
    others = [k for k in pre if k not in blocks]
    assert all(torch.equal(best["state_dict"][k], last["state_dict"][k]) for k in others)


def test_multi_best_model_is_kept_when_scores_fall(data, tmp_path, monkeypatch):  # noqa: F811
    """Items 22, 29 (last model): scores 0.9 then 0.5: the best model stays iteration 1's; the last model records
    --max_iters."""
    scores = iter([0.9, 0.5])
    _patch_scores(monkeypatch, lambda prefix: next(scores))
    monkeypatch.chdir(tmp_path)
    experiment_multi.main(["--data_path", str(data), *MTINY, "--max_iters", "2", "--num_eval_episodes", "1",
                           "--seed", "7", "--save_model", "--save_mode", "both"])
    (best,) = models(tmp_path, "multi/*_best.pt")
    (last,) = [p for p in models(tmp_path, "multi/*.pt") if p != best]
    assert load_checkpoint(best)["iteration"] == 1 and load_checkpoint(last)["iteration"] == 2


def test_norm_env_of_another_dataset_ignores_the_stored_statistics(tmp_path):
    """Item 23: --norm_env expert with a reference model trained on medium (storing statistics) and no
    state_stats.pkl: the medium statistics the model stores are not expert's, so the run stops."""
    from decision_transformer.errors import UserError
    from decision_transformer.legacy_import import load_model_file
    from decision_transformer.models.multi_decision_transformer import MULTI_ENVS
    from decision_transformer.multi_run import multi_parser, resolve_state_stats

    ref = load_model_file(save_multi(tmp_path / "m.pt", 0, ["hopper"]))
    assert ref.dataset == "medium"
    args = multi_parser().parse_args(["--data_path", str(tmp_path), "--norm_env", "expert"])
    assert args.dataset != "expert"
    with pytest.raises(UserError) as e:
        resolve_state_stats(args, list(MULTI_ENVS), ref)
    assert str(e.value) == (f"{tmp_path / 'state_stats.pkl'}: no entry hopper-expert-v2 (create it with python "
                            f"data/create_state_stats.py --data_path {tmp_path})")
    # the model's own dataset: its stored statistics are used
    args = multi_parser().parse_args(["--data_path", str(tmp_path), "--dataset", "expert"])
    out, _ = resolve_state_stats(args, list(MULTI_ENVS), ref)
    assert sorted(out) == sorted(MULTI_ENVS) and float(np.asarray(out["hopper"][0])[0]) == 1.0


def test_spec_info_takes_each_models_own_env(data, tmp_path, monkeypatch):  # noqa: F811
    """Item 24: --spec_info computes each model's Fisher on its specialisation env only; without it on all envs."""
    from decision_transformer import multi_run
    from decision_transformer.models.multi_decision_transformer import MULTI_ENVS

    paths = [save_multi(tmp_path / f"m{i}.pt", i, [env]) for i, env in enumerate(("hopper", "walker2d"))]
    seen, real = [], multi_run.multi_fisher

    def spy(model, envs, datasets, args):
        seen.append(list(envs))
        return real(model, envs, datasets, args)

    monkeypatch.setattr(multi_run, "multi_fisher", spy)
    for extra in (["--spec_info"], []):
        args = multi_run.multi_parser().parse_args(
            ["--data_path", str(data), "--K", "5", "--multi_pretrained_models", *map(str, paths), "--merge_method",
             "fisher", "--f_batch_size", "2", "--f_num_batches", "1", "--seed", "0", *extra])
        multi_run.merged_model(args, multi_run.EnvData(args, "cpu", {}), "cpu")
    assert seen == [["hopper"], ["walker2d"], list(MULTI_ENVS), list(MULTI_ENVS)]


def test_multi_flag_conflicts(tmp_path, monkeypatch, capsys, data):  # noqa: F811
    """Items 26, 28: --pretrained_model with --multi_pretrained_models, and --resume with --eval_only, are refused."""
    monkeypatch.chdir(tmp_path)
    base = ["--data_path", data, *MTINY, "--max_iters", "1", "--num_eval_episodes", "0"]
    assert fails(experiment_multi.main, [*base, "--pretrained_model", "a.pt", "--multi_pretrained_models", "b.pt",
                                         "c.pt"], capsys) == \
        "error: --pretrained_model and --multi_pretrained_models exclude each other"
    assert fails(experiment_multi.main, [*base, "--resume", "--eval_only"], capsys) == \
        ("error: --resume continues training: it cannot be combined with --eval_only or --num_steps_per_iter 0")
    assert not (tmp_path / "checkpoints").exists()


def test_multi_resume_never_generates_missing_data(data, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Item 27: a resume whose walker2d dataset was deleted stops with "dataset not found" and generates none."""
    mine = tmp_path / "data"
    shutil.copytree(data, mine)
    base = ["--data_path", str(mine), *MTINY, "--num_eval_episodes", "0", "--seed", "3"]
    monkeypatch.chdir(tmp_path)
    experiment_multi.main([*base, "--max_iters", "1"])
    for f in mine.glob("walker2d-medium*"):               # the pkl (and its stand-in mark)
        f.unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        experiment_multi.main([*base, "--max_iters", "2", "--resume"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and last.startswith(f"error: dataset not found: {mine / 'walker2d-medium-v2.pkl'}")
    assert not list(mine.glob("walker2d-medium*"))


def test_the_rng_states_a_resume_restores_include_pythons_gaussian_cache(tmp_path):
    """random.gauss draws two values at a time and caches the second: a state saved between the two restored without
    the cache gave another next value than the uninterrupted run. The state goes through a training-state file;
    one saved before the cache was recorded still loads."""
    import random

    from decision_transformer.checkpoint import atomic_save
    from decision_transformer.run import rng_state, set_rng_state

    random.seed(3)
    random.gauss(0.0, 1.0)                                  # the second value of the pair is now cached
    atomic_save({"rng": rng_state()}, tmp_path / "st.pt")
    expected = [random.gauss(0.0, 1.0), random.random()]
    random.seed(99)
    set_rng_state(torch.load(tmp_path / "st.pt", weights_only=True)["rng"])
    assert [random.gauss(0.0, 1.0), random.random()] == expected
    old = rng_state()
    old["python"] = old["python"][:2]
    set_rng_state(old)


@pytest.mark.parametrize("typed", [b"q\n", b""])
def test_end_break_quit_or_no_input_ends_the_finished_run_normally(tmp_path, hopper_data, typed):
    """--end_break opens the debugger after the run; quitting it (q), or a closed stdin (a batch job), raised BdbQuit
    through the script: a traceback and exit 1 for a run that had finished. Now it exits 0."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k != "PYTHONBREAKPOINT"} | {"PYTHONPATH": str(ROOT),
                                                                               "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "experiment.py"), "--data_path", str(hopper_data), "--K", "5",
                        "--batch_size", "4", "--embed_dim", "16", "--n_layer", "1", "--max_iters", "1",
                        "--num_steps_per_iter", "1", "--num_eval_episodes", "0", "--end_break", "--outdir", ""],
                       input=typed, capture_output=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode()[-800:]
    assert b"(Pdb)" in r.stdout                                       # the debugger did open


def test_a_learning_rate_whose_step_overflows_float32_stops_as_a_divergence(tmp_path, monkeypatch, capsys,
                                                                             hopper_data):
    """-lr 1e38 is finite and passes the flag checks, but Adam's first step size lr / (1 - beta1) overflows float32:
    a RuntimeError traceback (exit 1) before; now the divergence line and exit 3, as a NaN loss gives."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        experiment.main(["--data_path", str(hopper_data), *TINY, "--max_iters", "1", "--num_steps_per_iter", "3",
                         "-lr", "1e38", "--weight_decay", "0", "--warmup_steps", "0", "--num_eval_episodes", "0"])
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: the optimiser's step overflowed float32")
