"""experiment_multi.py audit: --resume checks the weights init_reg and --eval_merge_pre measure from, a merge looks each
model's env slots up in its own config, a bare multi-task state dict is named as such, --p is applied or warned about
as merge_cli does, runs that do nothing say so, and --freeze_subset is a set on --resume."""
import json
from types import SimpleNamespace

import pytest
import torch

import experiment_multi
from conftest import fails
from decision_transformer.checkpoint import atomic_save, make_checkpoint
from decision_transformer.models import BackboneConfig
from decision_transformer.models.multi_decision_transformer import (MODEL_CLASS, MULTI_ENVS, MultiDecisionTransformer,
                                                                    MultiDTConfig)

SMALL = ["--K", "5", "--embed_dim", "16", "--n_layer", "1", "--batch_size", "4", "--num_steps_per_iter", "2",
         "--warmup_steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(multi_medium_data):
    return multi_medium_data


def multi_model(seed=0, envs=None):
    cfg = MultiDTConfig(envs=list(envs or MULTI_ENVS), max_length=5, backbone=BackboneConfig(n_embd=16, n_layer=1))
    return MultiDecisionTransformer(cfg, seed=seed)


def save_multi(path, model, specs=(), dataset="medium"):
    """A multi-task checkpoint of ``model`` as experiment_multi.py writes one (config, specialisations, statistics)."""
    st = {e: {"state_mean": torch.zeros(d), "state_std": torch.ones(d)}
          for e, d in zip(model.config.envs, model.config.state_dims)}
    cfg = {"model_class": MODEL_CLASS, "model_config": model.config.to_dict(), "dataset": dataset}
    return atomic_save(make_checkpoint(model.state_dict(), cfg, specializations=list(specs), state_stats=st), path)


def shift_blocks(path, delta=0.5):
    """Add ``delta`` to the transformer.h tensors of the checkpoint at ``path``; returns the original bytes."""
    before = path.read_bytes()
    ck = torch.load(path, weights_only=True)
    ck["state_dict"] = {k: v + delta if k.startswith("transformer.h.") and v.is_floating_point() else v
                        for k, v in ck["state_dict"].items()}
    torch.save(ck, path)
    return before


def fake_scores(monkeypatch):
    """multi_run.evaluate_all without episodes: every score 0.5."""
    from decision_transformer import multi_run

    monkeypatch.setattr(multi_run, "evaluate_all", lambda model, envs, data, args, device, pools, score_envs,
                        prefix="evaluation/": {f"{prefix}average_norm_return_mean": 0.5})


def one_run(root):
    (run,) = (root / "checkpoints" / "multi").glob("gym-*")
    return run


# ---- 1. --resume and the reference weights ------------------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--init_reg", "1e-3", "--num_eval_episodes", "0"], "the --init_reg reference weights"),
    (["--eval_merge_pre", "--p_list", "0.5", "--num_eval_episodes", "1"], 'the --eval_merge_pre "pre" blocks'),
])
def test_resume_refuses_changed_starting_weights(data, tmp_path, monkeypatch, capsys, flags, needle):
    """The pretrained model's blocks changed between the run and its --resume: init_reg would measure from (and
    --eval_merge_pre blend with) other weights; one line, nothing written. Restored, the resume goes on; a training
    state written before the record was kept still resumes."""
    fake_scores(monkeypatch)
    monkeypatch.chdir(tmp_path)
    base = save_multi(tmp_path / "base.pt", multi_model())
    argv = ["--data_path", data, *SMALL, "--seed", "4", "--pretrained_model", base, "--selected_training", "hopper",
            *flags]
    experiment_multi.main([str(a) for a in [*argv, "--max_iters", "1"]])
    run = one_run(tmp_path)
    original = shift_blocks(base)
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    msg = fails(experiment_multi.main, [*argv, "--max_iters", "2", "--resume"], capsys)
    assert needle in msg and "are not those the run started with" in msg, msg
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files
    base.write_bytes(original)                                       # restored: the record matches again
    experiment_multi.main([str(a) for a in [*argv, "--max_iters", "2", "--resume"]])
    # a training state without the record (written before it was kept) resumes as it did
    st = torch.load(run / "train_state.pt", weights_only=True)
    assert st["trainer_extra"]
    st["trainer_extra"] = {}
    torch.save(st, run / "train_state.pt")
    shift_blocks(base)
    experiment_multi.main([str(a) for a in [*argv, "--max_iters", "3", "--resume"]])
    rows = [json.loads(x)["iteration"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]


def test_multi_trainer_records_and_checks_its_references(data):
    """MultiTrainer.extra_state holds the init_reg and --eval_merge_pre fingerprints; load_extra_state refuses others
    and takes a state without them."""
    from decision_transformer.multi_run import EnvData, MultiTrainer, multi_parser
    from decision_transformer.training import make_optimizer, warmup_schedule
    from decision_transformer.training.init_reg import InitReg

    model = multi_model()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0)
    args = multi_parser().parse_args(["--data_path", str(data), "--K", "5"])
    trainer = MultiTrainer(model, opt, warmup_schedule(opt, 1), EnvData(args, "cpu", {}), ["hopper"], batch_size=2,
                           K=5, generator=torch.Generator().manual_seed(0), init_reg=InitReg(model, 1e-3),
                           merge_pre="abc")
    st = trainer.extra_state()
    assert st == {"init_reg_reference": trainer.init_reg.fingerprint, "merge_pre_reference": "abc"}
    trainer.load_extra_state(st)
    trainer.load_extra_state({})
    with pytest.raises(ValueError, match="--init_reg reference weights"):
        trainer.load_extra_state({**st, "init_reg_reference": "0" * 32})
    with pytest.raises(ValueError, match="--eval_merge_pre"):
        trainer.load_extra_state({**st, "merge_pre_reference": "other"})


# ---- 2. per-env slots looked up in each model's own envs ----------------------------------------------------------

def merge_args(**kw):
    from decision_transformer.multi_run import multi_parser

    args = multi_parser().parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_merge_copies_each_models_own_env_slot(tmp_path):
    """Model 2 lists its envs in another order (hopper, walker2d, halfcheetah): its walker2d layers (its slot 1) go
    into the merged model's walker2d slot (model 1's slot 2); the blocks are averaged as before."""
    from decision_transformer.legacy_import import load_model_file
    from decision_transformer.merge_setup import merge_multi_states

    a = save_multi(tmp_path / "a.pt", multi_model(seed=1), ["hopper"])
    permuted = ["hopper", "walker2d", "halfcheetah"]
    b = save_multi(tmp_path / "b.pt", multi_model(seed=2, envs=permuted), ["walker2d"])
    sa, sb = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b))
    state, specs = merge_multi_states([load_model_file(a), load_model_file(b)], merge_args(), "cpu")
    assert specs == ["hopper", "walker2d"]
    for name in ("embed_returns", "embed_states", "embed_actions", "embed_lns"):
        for t in ("weight", "bias"):
            assert torch.equal(state[f"{name}.2.{t}"], sb[f"{name}.1.{t}"]), name    # walker2d: model 2's own
            assert torch.equal(state[f"{name}.0.{t}"], sa[f"{name}.0.{t}"]), name    # hopper: model 1's
            assert torch.equal(state[f"{name}.1.{t}"], sa[f"{name}.1.{t}"]), name    # halfcheetah: nobody's: model 1
    assert torch.equal(state["predict_actions.2.0.weight"], sb["predict_actions.1.0.weight"])
    k = "transformer.h.0.mlp.c_fc.weight"
    torch.testing.assert_close(state[k], (sa[k] + sb[k]) / 2)


def test_merge_takes_a_hopper_slot_that_moved(tmp_path):
    """Model 2 lists hopper (11-dim states, 3-dim actions) second: its hopper slot's tensors are shaped like model 1's
    slot 0, not like model 1's slot 1 (halfcheetah). The merge matches slots by env, so it goes through (it used to
    be refused as 'different hidden size or architecture?'), and the hopper layers are model 2's own."""
    from decision_transformer.legacy_import import load_model_file
    from decision_transformer.merge_setup import merge_multi_states

    a = save_multi(tmp_path / "a.pt", multi_model(seed=1), ["walker2d"])
    b = save_multi(tmp_path / "b.pt", multi_model(seed=2, envs=["walker2d", "hopper", "halfcheetah"]), ["hopper"])
    sa, sb = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b))
    state, specs = merge_multi_states([load_model_file(a), load_model_file(b)], merge_args(), "cpu")
    assert specs == ["walker2d", "hopper"]
    assert torch.equal(state["embed_states.0.weight"], sb["embed_states.1.weight"])       # hopper: model 2's slot 1
    assert torch.equal(state["predict_actions.0.0.weight"], sb["predict_actions.1.0.weight"])
    assert torch.equal(state["embed_states.2.weight"], sa["embed_states.2.weight"])       # walker2d: model 1's
    k = "transformer.h.0.attn.c_attn.weight"
    torch.testing.assert_close(state[k], (sa[k] + sb[k]) / 2)


def test_merge_refuses_an_env_slot_of_another_width(tmp_path):
    """Same envs, but model 2's walker2d slot is 32 wide: named with the env and both shapes, before any merging."""
    from decision_transformer.errors import UserError
    from decision_transformer.legacy_import import ModelFile
    from decision_transformer.merge_setup import check_multi_sources

    m1, m2 = multi_model(seed=1), multi_model(seed=2)
    sd2 = dict(m2.state_dict())
    sd2["embed_states.2.weight"] = torch.zeros(32, 17)
    cfg = {"model_class": MODEL_CLASS, "model_config": m1.config.to_dict()}
    sources = [ModelFile("a.pt", m1.state_dict(), cfg, ["hopper"]), ModelFile("b.pt", sd2, cfg, ["walker2d"])]
    with pytest.raises(UserError, match=r"b.pt: cannot merge with a.pt: its walker2d tensor embed_states.2.weight is "
                                        r"\[32, 17\], model 1's embed_states.2.weight is \[16, 17\]"):
        check_multi_sources(sources, "average")


def test_merge_refuses_a_specialisation_without_a_slot(tmp_path):
    """A model specialised on an env that model 1 (whose layout the merged model takes) has no slot for: one line."""
    from decision_transformer.errors import UserError
    from decision_transformer.legacy_import import ModelFile
    from decision_transformer.merge_setup import merge_multi_states

    m1, m2 = multi_model(seed=1), multi_model(seed=2)
    cfg1 = {"model_class": MODEL_CLASS, "model_config": {**m1.config.to_dict(), "envs": ["hopper", "walker2d",
                                                                                          "halfcheetah"]}}
    cfg2 = {"model_class": MODEL_CLASS, "model_config": {**m2.config.to_dict(), "envs": ["hopper", "walker2d",
                                                                                          "reacher2d"],
                                                         "state_dims": [11, 17, 17], "act_dims": [3, 6, 6]}}
    sources = [ModelFile("a.pt", m1.state_dict(), cfg1, ["hopper"]), ModelFile("b.pt", m2.state_dict(), cfg2,
                                                                               ["reacher2d"])]
    with pytest.raises(UserError, match="b.pt: specialisation 'reacher2d' has no slot in the merged model"):
        merge_multi_states(sources, merge_args(), "cpu")


# ---- 3. a bare multi-task state dict ------------------------------------------------------------------------------

def test_a_bare_multi_task_state_dict_is_named_as_such(data, tmp_path, monkeypatch, capsys):
    """torch.save(MultiDecisionTransformer(cfg).state_dict()): read as a multi-task model without a config. As
    --pretrained_model it is refused saying so (and that --load_checkpoint reads it), as a merge input too, and
    --load_checkpoint loads it into the model the flags build."""
    from decision_transformer.errors import UserError
    from decision_transformer.legacy_import import build_model, load_model_file

    bare = tmp_path / "bare.pt"
    torch.save(multi_model().state_dict(), bare)
    mf = load_model_file(bare)
    assert mf.is_multi and mf.model_class == MODEL_CLASS and mf.bare
    with pytest.raises(UserError, match="a multi-task state dict without a stored config"):
        build_model(mf)
    monkeypatch.chdir(tmp_path)
    argv = ["--data_path", data, *SMALL, "--num_eval_episodes", "0", "--max_iters", "1", "--seed", "2"]
    msg = fails(experiment_multi.main, [*argv, "--pretrained_model", bare], capsys)
    assert msg == (f"error: {bare}: a bare multi-task state dict: it has no stored config (envs, sizes, flags) to "
                   f"build the model from; --load_checkpoint reads bare state dicts (into the model these flags "
                   f"build)")
    other = save_multi(tmp_path / "w.pt", multi_model(seed=3), ["walker2d"])
    msg = fails(experiment_multi.main, [*argv, "--eval_only", "--multi_pretrained_models", bare, other], capsys)
    assert "bare.pt: a bare multi-task state dict" in msg, msg
    from decision_transformer import merge_cli    # merge_cli's multi-task merge says the same

    msg = fails(merge_cli.main, ["--models", bare, other, "--out", tmp_path / "m.pt"], capsys)
    assert msg == (f"error: {bare}: a bare multi-task state dict: it has no stored config (envs, sizes, "
                   f"specialisation) to merge it by")
    experiment_multi.main([str(a) for a in [*argv, "--load_checkpoint", bare, "--outdir", ""]])
    single = tmp_path / "single.pt"   # a bare single-task state dict is named as one
    from decision_transformer.models import DecisionTransformer, DTConfig

    torch.save(DecisionTransformer(DTConfig(11, 3, backbone=BackboneConfig(n_embd=16, n_layer=1))).state_dict(),
               single)
    msg = fails(experiment_multi.main, [*argv, "--pretrained_model", single], capsys)
    assert msg == f"error: {single}: not a multi-task model (a bare state dict of a single-task DT)"


# ---- 4. --p ---------------------------------------------------------------------------------------------------------

def test_p_in_multi_task_merges(data, tmp_path, monkeypatch, capsys):
    """--p weights the two models of a mean merge (the log says so, as merge_cli's) and is warned about with 3."""
    monkeypatch.chdir(tmp_path)
    paths = [save_multi(tmp_path / f"{e}.pt", multi_model(seed=i), [e]) for i, e in enumerate(MULTI_ENVS)]
    argv = ["--data_path", data, *SMALL, "--eval_only", "--max_iters", "1", "--num_eval_episodes", "0",
            "--outdir", "", "--save_model", "--p", "0.3"]
    capsys.readouterr()
    experiment_multi.main([str(a) for a in [*argv, "--multi_pretrained_models", *paths]])
    err = capsys.readouterr().err
    assert "warning: --p 0.3 has no effect on a mean merge of 3 models" in err
    assert "multi merge: mean of 3 models over" in err
    experiment_multi.main([str(a) for a in [*argv, "--multi_pretrained_models", *paths[:2]]])
    err = capsys.readouterr().err
    assert "multi merge: mean of 2 models weighted 0.7 : 0.3 (--p 0.3) over" in err
    assert "--p 0.3 has no effect" not in err
    merged = sorted((tmp_path / "models" / "multi").glob("*.pt"), key=lambda p: p.stat().st_mtime)[-1]
    m = torch.load(merged, weights_only=True)["state_dict"]
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in paths[:2])
    k = "transformer.h.0.attn.c_attn.weight"
    torch.testing.assert_close(m[k], 0.7 * a[k] + 0.3 * b[k])


# ---- 5. runs that do nothing ----------------------------------------------------------------------------------------

def test_runs_that_do_nothing_say_so(data, tmp_path, monkeypatch, capsys):
    fake_scores(monkeypatch)
    monkeypatch.chdir(tmp_path)
    argv = ["--data_path", data, *SMALL, "--seed", "5"]
    capsys.readouterr()
    experiment_multi.main([str(a) for a in [*argv, "--max_iters", "0", "--num_eval_episodes", "1"]])
    run = one_run(tmp_path)
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"--max_iters 0: no iteration trained or evaluated; {run.relative_to(tmp_path) / 'model_0.pt'} holds the "
        f"initial model")
    assert fails(experiment_multi.main, [*argv, "--max_iters", "0", "--outdir", ""], capsys) == (
        "error: --max_iters 0 and --outdir '' without --save_model (--save_mode last or both): nothing would be "
        "trained, evaluated or written")
    assert fails(experiment_multi.main, [*argv, "--max_iters", "1", "--eval_only", "--num_eval_episodes", "0",
                                         "--outdir", ""], capsys) == (
        "error: --eval_only with --num_eval_episodes 0 and --outdir '' without --save_model (--save_mode last or "
        "both): nothing would be trained, evaluated or written")
    experiment_multi.main([str(a) for a in [*argv, "--max_iters", "1", "--num_steps_per_iter", "0",
                                            "--num_eval_episodes", "0", "--outdir", "o"]])
    err = capsys.readouterr().err
    assert "warning: --num_steps_per_iter 0 with --num_eval_episodes 0: nothing is trained or evaluated; the run " \
           "only writes its run folder in o/multi (config.json" in err
    experiment_multi.main([str(a) for a in [*argv, "--max_iters", "1", "--eval_only", "--eval_merge_pre",
                                            "--p_list", "0.5", "1", "--num_eval_episodes", "1", "--outdir", ""]])
    err = capsys.readouterr().err
    assert "warning: --eval_merge_pre with --eval_only: nothing is trained, so every blend" in err
    assert "each p evaluates the same weights" in err


# ---- 6. --freeze_subset on --resume ---------------------------------------------------------------------------------

def test_freeze_subset_order_is_not_a_changed_flag(data, tmp_path, monkeypatch):
    """--freeze_subset names substrings, any of which freezes a parameter: in another order it is the same run, to
    --resume and to the sweep's run lock (a hash of the signature)."""
    from decision_transformer.multi_run import multi_parser, resume_signature
    from decision_transformer.sweep import run_lock_path

    parse = lambda *s: multi_parser().parse_args(["--freeze_subset", *s])  # noqa: E731
    a, b = parse("ln_f", "wpe", "embed_timestep"), parse("wpe", "embed_timestep", "ln_f")
    assert resume_signature(a) == resume_signature(b)
    assert run_lock_path("experiment_multi.py", a) == run_lock_path("experiment_multi.py", b)
    assert resume_signature(a) != resume_signature(parse("ln_f", "wpe"))
    monkeypatch.chdir(tmp_path)
    argv = ["--data_path", str(data), *SMALL, "--num_eval_episodes", "0", "--seed", "6"]
    experiment_multi.main([*argv, "--max_iters", "1", "--freeze_subset", "ln_f", "wpe", "embed_timestep"])
    experiment_multi.main([*argv, "--max_iters", "2", "--resume", "--freeze_subset", "wpe", "embed_timestep", "ln_f"])
    run = one_run(tmp_path)
    rows = [json.loads(x)["iteration"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2]


def test_check_idle_run_is_silent_for_ordinary_runs(capsys):
    from decision_transformer.multi_run import check_idle_run

    check_idle_run(SimpleNamespace(eval_only=False, num_steps_per_iter=2, eval_merge_pre=True, max_iters=1,
                                   num_eval_episodes=1, outdir="", save_model=False, save_mode="last",
                                   multi_pretrained_models=None))
    assert capsys.readouterr().err == ""


def test_a_resume_with_nothing_left_to_train_keeps_the_last_model(data, tmp_path, monkeypatch, capsys):
    """--resume with --max_iters equal to the iterations trained: a last model already written is left as it is; one
    a stop before the end did not write is written."""
    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", "medium", "--data_path", str(data), *SMALL, "--seed", "3", "--num_eval_episodes", "0",
            "--save_model", "--max_iters", "1"]
    experiment_multi.main(argv)
    (last,) = (tmp_path / "models" / "multi").glob("dt_*.pt")
    stamp = last.stat().st_mtime_ns
    capsys.readouterr()
    experiment_multi.main([*argv, "--resume"])
    assert "the last model is written already (no iteration trained since)" in capsys.readouterr().err
    assert last.stat().st_mtime_ns == stamp
    last.unlink()
    experiment_multi.main([*argv, "--resume"])
    assert f"saved {last.relative_to(tmp_path)}" in capsys.readouterr().err and last.is_file()


# ---- architecture flags a --pretrained_model overrides ------------------------------------------------------------

def test_architecture_flags_a_pretrained_model_overrides_are_warned_about(data, tmp_path, monkeypatch, capsys):
    """--pretrained_model gives the architecture (as the original's whole pickled models did): --embed_dim 32,
    --n_head 2 and --activation_function gelu_new given against a 16-wide, 1-head relu model are named in one
    warning; flags left at their defaults, or equal to the model's, are not."""
    monkeypatch.chdir(tmp_path)
    pre = save_multi(tmp_path / "pre.pt", multi_model(seed=1), ["hopper"])
    base = ["--data_path", data, "--K", "5", "--batch_size", "4", "--num_steps_per_iter", "1", "--max_iters", "1",
            "--warmup_steps", "1", "--device", "cpu", "--num_eval_episodes", "0", "--pretrained_model", pre]
    experiment_multi.main([str(a) for a in [*base, "--embed_dim", "32", "--n_head", "2",
                                            "--activation_function", "gelu_new", "--n_layer", "1"]])
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "no effect, the architecture" in ln]
    assert warnings == [f"warning: --embed_dim 32 (the model has 16), --n_head 2 (the model has 1), "
                        f"--activation_function gelu_new (the model has relu): no effect, the architecture is "
                        f"{pre}'s"], warnings
    experiment_multi.main([str(a) for a in [*base, "--embed_dim", "16", "--outdir", ""]])
    assert "no effect, the architecture" not in capsys.readouterr().err


def test_training_only_flags_in_a_run_that_trains_nothing_are_warned_about(data, tmp_path, monkeypatch, capsys):
    """--eval_only (or --num_steps_per_iter 0) with --init_reg, --freeze_subset and -lr given: one warning naming
    them; flags at their defaults, or a run that trains, give none."""
    monkeypatch.chdir(tmp_path)
    i = SMALL.index("--warmup_steps")
    small = SMALL[:i] + SMALL[i + 2:]
    base = ["--data_path", data, *small, "--max_iters", "1", "--num_eval_episodes", "1", "--outdir", ""]
    experiment_multi.main([str(a) for a in [*base, "--eval_only", "--init_reg", "1e-3", "--freeze_subset", "ln",
                                            "--learning_rate", "1e-3"]])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "nothing is trained" in ln]
    assert lines == ["warning: --init_reg, --freeze_subset, --learning_rate have no effect with --eval_only: nothing "
                     "is trained"], lines
    experiment_multi.main([str(a) for a in [*base, "--num_steps_per_iter", "0"]])
    assert "no effect with" not in capsys.readouterr().err
    experiment_multi.main([str(a) for a in [*base, "--init_reg", "1e-3"]])
    assert "no effect with" not in capsys.readouterr().err


def test_favor_target_with_p_1_is_refused_before_the_models_are_read(tmp_path, capsys):
    """As in merge_cli and experiment.py: model 1's floor is its only one, and --p 1 gives it no weight (0/0)."""
    missing = [tmp_path / "a.pt", tmp_path / "b.pt"]
    msg = fails(experiment_multi.main, ["--multi_pretrained_models", *missing, "--use_fisher", "--fisher_favor_target",
                                        "--p", "1"], capsys)
    assert msg.startswith("error: --fisher_favor_target floors only model 1's Fisher, and --p 1 gives model 1 no")
