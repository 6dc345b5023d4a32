"""run.py's resume and flag rules: path flags compared as files when a run is resumed, a damaged step count in a
training state, the K warning when K grows, the closed ends of the merge numbers' ranges; and the counts in the LM
weight messages."""
import json
import types

import pytest
import torch

from decision_transformer.cli import experiment_parser
from decision_transformer.errors import UserError
from decision_transformer.run import (MERGE_NUMBER_RULES, TRAIN_STATE, check_numbers, restore_train_state,
                                      resumable_run, resume_mismatches, save_train_state)


# ---- path flags are compared as files --------------------------------------------------------------------------------

def test_resumable_run_matches_path_flags_as_files(tmp_path, monkeypatch):
    """experiment_multi.py --resume --pretrained_model ./m.pt continues the run recorded with m.pt."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run_1"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"pretrained_model": "m.pt"}))
    (run / TRAIN_STATE).write_bytes(b"")
    assert resumable_run(tmp_path, "run_", {"pretrained_model": "./m.pt"}) == run
    with pytest.raises(UserError, match=r"the newest, run_1, differs in --pretrained_model 'other\.pt' "
                                        r"\(the run: 'm\.pt'\)$"):
        resumable_run(tmp_path, "run_", {"pretrained_model": "other.pt"})


def test_resume_mismatches_compares_path_flags_as_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = experiment_parser().parse_args(["--pretrained_lm", "./lm"])
    assert resume_mismatches(args, {"pretrained_lm": "lm"}) == []
    assert resume_mismatches(args, {"pretrained_lm": str(tmp_path / "lm")}) == []
    assert resume_mismatches(args, {"pretrained_lm": "other"}) == ["--pretrained_lm './lm' (the run: 'other')"]


# ---- a damaged training state ----------------------------------------------------------------------------------------

def _train_objects():
    from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig

    model = DecisionTransformer(DTConfig(state_dim=11, act_dim=3, max_length=5,
                                         backbone=BackboneConfig(n_embd=16, n_layer=1)), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, types.SimpleNamespace(step=0), optimizer, scheduler, torch.Generator()


def test_resume_refuses_a_damaged_step_count(tmp_path):
    """The step count is checked as the iteration count is (test_experiment's test_resume_bad_training_state): a
    negative one would restart the learning-rate schedule's warm-up from before its start."""
    model, trainer, optimizer, scheduler, generator = _train_objects()
    trainer.step = 3
    path = tmp_path / TRAIN_STATE
    save_train_state(path, model, {}, trainer, optimizer, scheduler, generator, iteration=1, best_score=0.0,
                     exp_id=7)
    fresh = _train_objects()
    assert restore_train_state(path, *fresh)["iteration"] == 1 and fresh[1].step == 3
    good = torch.load(path, weights_only=True)
    for bad in (-1, 0.5, True):
        torch.save({**good, "step": bad}, path)
        with pytest.raises(UserError) as e:
            restore_train_state(path, *_train_objects())
        assert str(e.value) == (f"{path}: cannot restore the training state (ValueError: its step {bad!r} is not a "
                                f"non-negative integer)")


def test_a_resume_keeps_the_optimizer_implementation_it_was_built_with(tmp_path):
    """A state saved by a CPU run (AdamW unfused) and resumed on a GPU (fused AdamW) took the saved groups' fused /
    foreach settings, silently dropping the fused step; the rest of the groups (lr, weight decay ...) and the moments
    are the saved ones."""
    model, trainer, optimizer, scheduler, generator = _train_objects()
    optimizer.param_groups[0].update(foreach=False, weight_decay=0.3)
    path = tmp_path / TRAIN_STATE
    save_train_state(path, model, {}, trainer, optimizer, scheduler, generator, iteration=1, best_score=0.0, exp_id=7)
    fresh = _train_objects()
    fresh[2].param_groups[0]["foreach"] = True
    restore_train_state(path, *fresh)
    group = fresh[2].param_groups[0]
    assert group["foreach"] is True and group["weight_decay"] == 0.3


def test_a_cpu_saved_optimizer_state_goes_to_the_device_of_a_fused_optimizer():
    """torch places each saved ``step`` by the saved groups' settings: on the parameters' device only where fused or
    capturable. Marking the group fused after the load left a CPU run's steps on the CPU, which a fused CUDA AdamW
    refuses on its first step. The settings go into the saved groups first (a parameter on the meta device stands in
    for the GPU here)."""
    from decision_transformer.run import load_optimizer_state

    p = torch.nn.Parameter(torch.ones(3))
    cpu = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones(3)
    cpu.step()
    saved = cpu.state_dict()
    q = torch.nn.Parameter(torch.ones(3, device="meta"))
    gpu = torch.optim.AdamW([q], lr=1e-3)
    gpu.param_groups[0]["fused"] = True                            # (as built with fused=True on CUDA)
    load_optimizer_state(gpu, saved)
    st = gpu.state[q]
    assert gpu.param_groups[0]["fused"] is True
    assert st["step"].device == q.device and st["exp_avg"].device == q.device and st["step"].dtype == torch.float32


# ---- the K a loaded checkpoint was trained with ----------------------------------------------------------------------

def test_load_checkpoint_with_a_longer_k_warns(tmp_path, monkeypatch, capsys, hopper_data):
    """A checkpoint trained with K=5 run with --K 8 is warned of, as with a shorter K."""
    from decision_transformer.checkpoint import atomic_save, make_checkpoint
    from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig

    import experiment

    cfg = DTConfig(state_dim=11, act_dim=3, max_length=5, backbone=BackboneConfig(n_embd=16, n_layer=1, n_head=1))
    ckpt = tmp_path / "k5.pt"
    atomic_save(make_checkpoint(DecisionTransformer(cfg, seed=0).state_dict(), {"model_config": cfg.to_dict(),
                                                                               "env": "hopper"}), ckpt)
    monkeypatch.chdir(tmp_path)
    experiment.main(["--data_path", str(hopper_data), "--embed_dim", "16", "--n_layer", "1", "--n_head", "1",
                     "--batch_size", "8", "--max_iters", "1", "--num_steps_per_iter", "0", "--num_eval_episodes", "0",
                     "--load_checkpoint", str(ckpt), "--K", "8"])
    assert f"warning: {ckpt} was trained with K=5; this run uses K=8 (--K)" in capsys.readouterr().err
    same = tmp_path / "same"                                                  # the checkpoint's own K: no warning
    same.mkdir()
    monkeypatch.chdir(same)
    experiment.main(["--data_path", str(hopper_data), "--embed_dim", "16", "--n_layer", "1", "--n_head", "1",
                     "--batch_size", "8", "--max_iters", "1", "--num_steps_per_iter", "0", "--num_eval_episodes", "0",
                     "--load_checkpoint", str(ckpt), "--K", "5"])
    assert "was trained with K" not in capsys.readouterr().err


# ---- the closed ends of the merge numbers' ranges --------------------------------------------------------------------

def test_merge_numbers_accept_the_ends_of_their_ranges():
    """--ties_density 1 (keep every entry) and --regmean_alpha 0 are valid, for experiment.py's checks and
    merge_cli's; just outside them is refused."""
    ok = experiment_parser().parse_args(["--ties_density", "1", "--regmean_alpha", "0"])
    for rules in (None, MERGE_NUMBER_RULES):
        check_numbers(ok, rules)
        for flags, expect in ((["--ties_density", "0"], "--ties_density must be a number in (0, 1] (the fraction "
                                                         "of each task vector kept), got 0.0"),
                              (["--regmean_alpha", "-0.5"], "--regmean_alpha must be a number in [0, 1], got -0.5")):
            with pytest.raises(UserError) as e:
                check_numbers(experiment_parser().parse_args(flags), rules)
            assert str(e.value) == expect


# ---- a pretrained LM's weight files that do not fit its config -------------------------------------------------------

def test_lm_weight_files_name_the_first_bad_tensor_and_count_the_rest(tmp_path):
    """Shapes that do not fit config.json, or NaN weights: the first tensor is named and the others counted."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2Model

    from decision_transformer.models.pretrained import locate_lm

    torch.manual_seed(0)
    GPT2Model(GPT2Config(n_embd=8, n_layer=1, n_head=2, n_positions=16, vocab_size=10, bos_token_id=0,
                         eos_token_id=0)).save_pretrained(tmp_path / "lm")
    good = load_file(str(tmp_path / "lm" / "model.safetensors"))

    def damaged(name, change, keys):
        d = tmp_path / name
        shutil.copytree(tmp_path / "lm", d)
        sd = {k: v.clone() for k, v in good.items()}
        for k in keys:
            sd[k] = change(sd[k])
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(UserError) as e:
            locate_lm(str(d)).state_dict()
        return d, str(e.value)

    for n, tail in ((1, ""), (2, " (and 1 more)"), (3, " (and 2 more)")):
        d, msg = damaged(f"shapes{n}", lambda v: torch.zeros(5), ("h.0.ln_1.bias", "h.0.ln_2.bias", "ln_f.bias")[:n])
        assert msg == f"{d}: its weight files do not fit its config.json: h.0.ln_1.bias is [5] in the files, [8] by " \
                      f"the config{tail}"

    def nan_first(v):
        v[0] = float("nan")
        return v

    for n, tail in ((1, ""), (2, " and 1 more tensor")):
        d, msg = damaged(f"nan{n}", nan_first, ("h.0.ln_1.bias", "ln_f.bias")[:n])
        assert msg == f"{d}: the weights hold NaN or inf values, in h.0.ln_1.bias{tail} (a damaged model)"


def test_a_warmup_longer_than_the_run_is_said(capsys):
    """The default 10k warm-up steps in a 100-step first run end at 1% of the learning rate: a run that learns little
    is said to, not left to look broken; a run as long as its warm-up, or that trains nothing, is not warned about."""
    from decision_transformer.run import warn_short_warmup

    warn_short_warmup(experiment_parser().parse_args(["--max_iters", "1", "--num_steps_per_iter", "100"]))
    assert capsys.readouterr().err == ("warning: --warmup_steps 10000 is longer than this run's 100 training steps: "
                                       "the learning rate rises to 1% of --learning_rate by the end (a shorter "
                                       "--warmup_steps reaches it)\n")
    for argv in (["--max_iters", "1", "--num_steps_per_iter", "10000"], ["--num_steps_per_iter", "0"],
                 ["--max_iters", "1", "--num_steps_per_iter", "100", "--warmup_steps", "50"]):
        warn_short_warmup(experiment_parser().parse_args(argv))
        assert capsys.readouterr().err == "", argv
