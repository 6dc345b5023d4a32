"""The multi-task DT: registered per-env layers (the original's plain-list bug fixed), joint training, and the Merging
DT seed's three multi-task commands (train, finetune per env, merge) as written, with tiny budgets."""
import json
import re
from pathlib import Path

import pytest
import torch

import experiment_multi
from decision_transformer.checkpoint import load_checkpoint
from decision_transformer.models import BackboneConfig
from decision_transformer.models.multi_decision_transformer import MULTI_ENVS, MultiDecisionTransformer, MultiDTConfig

ENV_LISTS = ("embed_returns", "embed_states", "embed_actions", "embed_lns", "predict_actions")
TINY = ["--max_iters", "1", "--num_steps_per_iter", "3", "--num_eval_episodes", "1", "--K", "5", "--batch_size", "6",
        "--warmup_steps", "10"]




def tiny_multi(seed=0):
    return MultiDecisionTransformer(MultiDTConfig(max_length=5, backbone=BackboneConfig(n_embd=16, n_layer=1,
                                                                                        n_head=2)), seed=seed)


def test_per_env_layers_are_registered_modules():
    model = tiny_multi()
    keys = set(model.state_dict())
    for i in range(len(MULTI_ENVS)):
        for name in ("embed_returns", "embed_states", "embed_actions", "embed_lns"):
            assert f"{name}.{i}.weight" in keys
        assert f"predict_actions.{i}.0.weight" in keys
    assert model.state_dict()["embed_states.1.weight"].shape == (16, 17)
    names = {n for n, _ in model.named_modules()}
    model.toggle_env("walker2d")
    assert names == {n for n, _ in model.named_modules()}     # toggling registers no aliases
    assert not any(n in names for n in ("embed_state", "embed_action", "embed_ln", "predict_action"))
    ids = {id(p) for p in model.parameters()}
    for name in ENV_LISTS:
        assert all(id(p) in ids for p in getattr(model, name).parameters())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from decision_transformer.synthetic import make_dataset

    d = tmp_path_factory.mktemp("multi_data")
    for i, env in enumerate(MULTI_ENVS):
        make_dataset(d, env, "medium", 300, seed=i, max_ep_len=50)
        make_dataset(d, env, "expert", 300, seed=10 + i, max_ep_len=50)
    return d


def test_every_env_gets_gradients_and_changes(data):
    """One joint step: the summed loss reaches every env's embeddings, embed_ln and head, and all of them move."""
    from decision_transformer.multi_run import EnvData, MultiTrainer, multi_parser
    from decision_transformer.training import make_optimizer, warmup_schedule

    args = multi_parser().parse_args(["--data_path", str(data), "--K", "5"])
    model = tiny_multi()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.0)
    trainer = MultiTrainer(model, opt, warmup_schedule(opt, 1), EnvData(args, "cpu", {}), list(MULTI_ENVS),
                           batch_size=4, K=5, generator=torch.Generator().manual_seed(0))
    trainer.optimizer.zero_grad()
    # gradients of one step, before the optimizer consumes them
    losses = []
    for i, ds in trainer.datasets:
        b = ds.sample_batch(4, 5, trainer.generator)
        out = model(b.states, b.actions, b.rtg[:, :-1], b.timesteps, attention_mask=b.mask, env=i)
        losses.append(((out.action_preds - b.actions) ** 2).mean())
    sum(losses).backward()
    for name in ENV_LISTS:
        for i in range(3):
            for pname, p in getattr(model, name)[i].named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{i}.{pname}"
    trainer.train_iteration(3, 1)
    after = model.state_dict()
    for name in ENV_LISTS:
        for i in range(3):
            assert not torch.equal(before[f"{name}.{i}.weight" if name != "predict_actions" else
                                          f"{name}.{i}.0.weight"], after[f"{name}.{i}.weight" if name !=
                                                                         "predict_actions" else f"{name}.{i}.0.weight"])


def saved(root, dataset):
    return sorted((root / "models" / "multi").glob(f"dt_gym-experiment-multi-{dataset}-*_best.pt"))


def test_resume_matches_uninterrupted_run(data, tmp_path, monkeypatch, capsys):
    """experiment_multi.py --resume: a run stopped after iteration 1 and resumed (same command, no --seed: the seed the
    run drew is taken) ends with the same weights and metrics as one run straight through; a changed flag finds
    nothing to resume."""
    base = ["--dataset", "medium", "--data_path", str(data), *TINY, "--embed_dim", "16", "--n_layer", "1",
            "--n_head", "2", "--init_reg", "1e-3", "--save_model", "--save_mode", "both"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    monkeypatch.chdir(b)
    experiment_multi.main([*base, "--max_iters", "1"])
    (run_b,) = (b / "checkpoints" / "multi").glob("gym-*")
    seed = json.loads((run_b / "config.json").read_text())["seed"]
    monkeypatch.chdir(a)
    experiment_multi.main([*base, "--max_iters", "2", "--seed", str(seed)])
    monkeypatch.chdir(b)
    capsys.readouterr()
    experiment_multi.main([*base, "--max_iters", "2", "--resume"])
    assert f"resuming {Path('checkpoints') / 'multi' / run_b.name} after iteration 1" in capsys.readouterr().err
    (run_a,) = (a / "checkpoints" / "multi").glob("gym-*")
    last = lambda root, run: torch.load(root / "models" / "multi" / f"dt_{run.name}.pt",  # noqa: E731
                                        weights_only=True)
    sa, sb = last(a, run_a)["state_dict"], last(b, run_b)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = lambda line: {k: v for k, v in json.loads(line).items() if not k.startswith("time/")}  # noqa: E731
    rows_a = [strip(x) for x in (run_a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [strip(x) for x in (run_b / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows_b] == [1, 2] and rows_a == rows_b
    with pytest.raises(SystemExit) as e:
        experiment_multi.main([*base, "--max_iters", "3", "--resume", "--learning_rate", "1e-3"])
    assert e.value.code == 2
    assert "nothing to resume: no run gym-experiment-multi-medium-<id>" in capsys.readouterr().err


def test_seed_commands_train_finetune_merge(data, tmp_path, monkeypatch, capsys):
    from decision_transformer.data import safe_pickle_load

    monkeypatch.chdir(tmp_path)
    # 1. train the multi-task model on medium (README command as written + tiny budgets)
    experiment_multi.main(["--dataset", "medium", "--device=cuda", "--activation_function=gelu_new", "--max_iters=10",
                           "--num_steps_per_iter=10000", "--save_model", "--save_mode=best", "--embed_dim=512",
                           "--n_head", "4", "-w", "--data_path", str(data), *TINY, "--embed_dim", "16",
                           "--n_layer", "1"])
    err = capsys.readouterr().err
    assert "drawn from OS entropy" in err
    (base,) = saved(tmp_path, "medium")
    ck = torch.load(base, weights_only=True)
    assert ck["config"]["model_class"] == "multi_dt" and isinstance(ck["config"]["seed"], int)
    assert ck["config"]["model_config"]["backbone"]["activation_function"] == "gelu_new"
    assert set(ck["state_stats"]) == set(MULTI_ENVS)
    (run,) = (tmp_path / "checkpoints" / "multi").glob("gym-*")
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("evaluation/target_3600_Hopper-v4_return_mean", "evaluation/target_12000_HalfCheetah-v4_d4rl_score_mean",
                "evaluation/target_5000_Walker2d-v4_length_mean", "evaluation/average_norm_return_mean",
                "evaluation/average_d4rl_score_mean", "training/action_error_halfcheetah"):
        assert key in row, key

    # 2. finetune separately on each env (expert data; medium statistics from data/state_stats.pkl)
    import importlib.util
    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("create_state_stats", ROOT / "data" / "create_state_stats.py")
    css = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(css)
    css.main(["--data_path", str(data), "--out", str(tmp_path / "stats" / "state_stats.pkl")])
    table = safe_pickle_load(tmp_path / "stats" / "state_stats.pkl")
    assert set(table["hopper-medium-v2"]) == {"state_mean", "state_std"}
    model_id = base.name.split("-")[-1].split("_")[0]
    finetuned = {}
    for env in MULTI_ENVS:
        extra = ["--eval_merge_pre", "--p_list", "0.5"] if env == "hopper" else []
        experiment_multi.main(["--dataset", "expert", "--device=cuda", "--activation_function=gelu_new",
                               "--max_iters=10", "--num_steps_per_iter=10000", "--freeze_subset", "ln_f", "wpe",
                               "embed_timestep", "--num_eval_episodes=50", "--selected_training", env,
                               f"--pretrained_model=./models/multi/dt_gym-experiment-multi-medium-{model_id}_best.pt",
                               "-lr=1e-4", "-w", "--init_reg=1e-4", "--save_model", "--save_mode=best",
                               "--custom_transformer_decay", "--data_path", str(data), *TINY, *extra])
        new = [p for p in saved(tmp_path, "expert") if p not in finetuned.values()]
        assert len(new) == 1
        finetuned[env] = new[0]
    pre = ck["state_dict"]
    for env, path in finetuned.items():
        c = torch.load(path, weights_only=True)
        assert c["specializations"] == [env]
        sd = c["state_dict"]
        i = MULTI_ENVS.index(env)
        for k in ("transformer.ln_f.weight", "transformer.wpe.weight", "embed_timestep.weight"):
            assert torch.equal(sd[k], pre[k]), k                      # --freeze_subset
        assert not torch.equal(sd[f"embed_states.{i}.weight"], pre[f"embed_states.{i}.weight"])  # own env trained
        other = (i + 1) % 3
        assert torch.equal(sd[f"embed_states.{other}.weight"], pre[f"embed_states.{other}.weight"])  # no gradient
        # medium statistics (the pretrained model's dataset), not expert ones
        assert torch.allclose(c["state_stats"]["hopper"]["state_mean"],
                              torch.as_tensor(table["hopper-medium-v2"]["state_mean"]))
    runs = sorted((tmp_path / "checkpoints" / "multi").glob("gym-experiment-multi-expert-*"))
    rows = [json.loads((r / "metrics.jsonl").read_text().splitlines()[0]) for r in runs]
    # --eval_merge_pre (hopper): only the interpolation is evaluated; it is the model selected and saved
    (hop_run, row), = [(r, x) for r, x in zip(runs, rows) if "evaluation/0.5/average_norm_return_mean" in x]
    assert row["evaluation/best_p"] == 0.5
    assert row["evaluation/average_norm_return_mean"] == row["evaluation/0.5/average_norm_return_mean"]
    post = torch.load(hop_run / "train_state.pt", weights_only=True)["state_dict"]
    best = torch.load(finetuned["hopper"], weights_only=True)["state_dict"]
    blocks = [k for k in best if k.startswith("transformer.h.") and best[k].is_floating_point()]
    assert blocks and any(not torch.equal(pre[k], post[k]) for k in blocks)
    assert all(torch.allclose(best[k], 0.5 * pre[k] + 0.5 * post[k], atol=1e-7) for k in blocks)
    assert all("training/init_reg_loss" in r for r in rows)

    # 3. merge (uniform, then Fisher) and evaluate on all three envs
    models = [str(finetuned[e]) for e in MULTI_ENVS]
    merge_cmd = ["--dataset", "medium", "--norm_env=medium", "--device=cuda", "--activation_function=gelu_new",
                 "--max_iters=1", "--num_steps_per_iter=0", "--num_eval_episodes=50", "--eval_only",
                 "--multi_pretrained_models", *models, "--data_path", str(data), "--num_eval_episodes", "1",
                 "--K", "5", "--save_model", "--save_mode", "last"]
    experiment_multi.main(merge_cmd)
    (merged_path,) = sorted((tmp_path / "models" / "multi").glob("dt_gym-experiment-multi-medium-*[0-9].pt"))
    merged = torch.load(merged_path, weights_only=True)
    srcs = [torch.load(p, weights_only=True)["state_dict"] for p in models]
    for k, v in merged["state_dict"].items():
        if k.startswith("transformer.h."):
            assert torch.allclose(v, sum(s[k] for s in srcs) / 3, atol=1e-7), k
        elif any(k.startswith(f"{n}.") for n in ENV_LISTS):
            i = int(k.split(".")[1])
            assert torch.equal(v, srcs[i][k]), k                        # from the model specialised on env i
        else:
            assert torch.equal(v, srcs[0][k]), k
    assert sorted(merged["specializations"]) == sorted(MULTI_ENVS)
    merged_path.unlink()

    experiment_multi.main([*merge_cmd, "--use_fisher", "--f_batch_size", "4", "--f_num_batches", "2", "--seed", "3"])
    (fisher_path,) = sorted((tmp_path / "models" / "multi").glob("dt_gym-experiment-multi-medium-*[0-9].pt"))
    fm = torch.load(fisher_path, weights_only=True)["state_dict"]
    k = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.allclose(fm[k], sum(s[k] for s in srcs) / 3, atol=1e-7)   # Fisher-weighted
    assert torch.isfinite(fm[k]).all()
    lo = torch.minimum(torch.minimum(srcs[0][k], srcs[1][k]), srcs[2][k])
    hi = torch.maximum(torch.maximum(srcs[0][k], srcs[1][k]), srcs[2][k])
    assert bool(((fm[k] >= lo - 1e-6) & (fm[k] <= hi + 1e-6)).all())       # a convex combination per element


def test_multi_bad_input(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        experiment_multi.main(["--data_path", str(data), "--selected_training", "ant", *TINY])
    assert e.value.code == 2 and "--selected_training 'ant'" in capsys.readouterr().err
    single = tmp_path / "single.pt"
    from decision_transformer.checkpoint import atomic_save, make_checkpoint
    from decision_transformer.models import DecisionTransformer, DTConfig

    cfg = DTConfig(11, 3, backbone=BackboneConfig(n_embd=16, n_layer=1))
    atomic_save(make_checkpoint(DecisionTransformer(cfg).state_dict(), {"model_config": cfg.to_dict()}), single)
    with pytest.raises(SystemExit):
        experiment_multi.main(["--data_path", str(data), "--pretrained_model", str(single), *TINY])
    assert "not a multi-task model" in capsys.readouterr().err
    assert load_checkpoint(single)  # untouched
    # as --load_checkpoint: the same line (it was a shape mismatch, or, with --dataset expert, "stored state_mean has
    # shape (11,), halfcheetah states have 17 dims", as if the checkpoint's statistics were damaged)
    for dataset in ("medium", "expert"):
        with pytest.raises(SystemExit):
            experiment_multi.main(["--data_path", str(data), "--load_checkpoint", str(single), *TINY,
                                   "--dataset", dataset])
        assert capsys.readouterr().err.strip().splitlines()[-1] == \
            f"error: {single}: not a multi-task model (config model_class 'dt')"
    for flags, needle in ((["--seed", "-1"], "--seed must be in"), (["--p_list", "nan"], "--p_list values must be"),
                          (["--p_list", "0.5", "0.25", "0.5"], "--p_list gives 0.5 twice"),
                          (["--init_reg", "-1"], "--init_reg must be a number >= 0"),
                          (["--weight_decay", "nan"], "--weight_decay must be"),
                          (["--learning_rate", "0.1", "--weight_decay", "20"], "lr * wd must be below 1"),
                          (["--save_model", "--save_mode", "best", "--num_eval_episodes", "0"],
                           "--num_eval_episodes 0 evaluates nothing")):
        with pytest.raises(SystemExit) as e:
            experiment_multi.main(["--data_path", str(data), *TINY, *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and needle in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "checkpoints").exists()


def test_last_action_only_matches_the_full_forward():
    model = tiny_multi(seed=3).eval()
    g = torch.Generator().manual_seed(0)
    for env in MULTI_ENVS:
        model.toggle_env(env)
        s = torch.randn(2, 5, model.state_dim, generator=g)
        a, r = torch.rand(2, 5, model.act_dim, generator=g), torch.randn(2, 5, 1, generator=g)
        t, mask = torch.arange(5).repeat(2, 1), torch.tensor([[0., 1, 1, 1, 1], [1, 1, 1, 1, 1]])
        with torch.no_grad():
            full = model(s, a, r, t, attention_mask=mask).action_preds[:, -1]
            last = model(s, a, r, t, attention_mask=mask, last_action_only=True).action_preds
        assert last.shape == (2, 1, model.act_dim)
        torch.testing.assert_close(last[:, 0], full, atol=1e-6, rtol=1e-5)


def test_merge_cli_multi_fisher_uses_stored_statistics(data, tmp_path, monkeypatch):
    """merge_cli's multi-task Fisher normalises each model's data with the state statistics that model stores (those
    it was trained with), not with the Fisher dataset's own."""
    import numpy as np

    from decision_transformer import merge_cli, merge_setup
    from decision_transformer.checkpoint import atomic_save, make_checkpoint
    from decision_transformer.models.multi_decision_transformer import MODEL_CLASS

    paths, stored = [], []
    for i, env in enumerate(("hopper", "walker2d")):
        m = tiny_multi(seed=i)
        st = {e: {"state_mean": torch.full((d,), float(i + 1)), "state_std": torch.full((d,), 2.0)}
              for e, d in (("hopper", 11), ("halfcheetah", 17), ("walker2d", 17))}
        cfg = {"model_class": MODEL_CLASS, "model_config": m.config.to_dict(), "dataset": "medium"}
        paths.append(tmp_path / f"m{i}.pt")
        atomic_save(make_checkpoint(m.state_dict(), cfg, specializations=[env], state_stats=st), paths[-1])
        stored.append(st)
    seen = []

    class Recording(merge_setup.DatasetCache):
        def __init__(self, data_path, device, stats=None):
            seen.append(stats)
            super().__init__(data_path, device, stats)

    monkeypatch.setattr(merge_setup, "DatasetCache", Recording)
    merge_cli.main(["--models", *map(str, paths), "--merge_method", "fisher", "--data_path", str(data), "--K", "5",
                    "--f_batch_size", "4", "--f_num_batches", "2", "--out", str(tmp_path / "merged.pt"),
                    "--device", "cpu"])
    assert len(seen) == 2
    for got, st in zip(seen, stored):
        assert set(got) == set(st)
        for env, (mean, std) in got.items():
            assert np.array_equal(mean, st[env]["state_mean"].numpy())
            assert np.array_equal(std, st[env]["state_std"].numpy())
    assert torch.load(tmp_path / "merged.pt", weights_only=True)["config"]["merge_info"]["method"] == "fisher"


def _multi_trainer(data, model, **kw):
    from decision_transformer.multi_run import EnvData, MultiTrainer, multi_parser
    from decision_transformer.training import make_optimizer, warmup_schedule
    from decision_transformer.training.init_reg import InitReg

    args = multi_parser().parse_args(["--data_path", str(data), "--K", "5"])
    opt = make_optimizer(model, lr=1e-3, weight_decay=1e-4, fused=True)
    return MultiTrainer(model, opt, warmup_schedule(opt, 2), EnvData(args, "cpu", {}), list(MULTI_ENVS), batch_size=4,
                        K=5, generator=torch.Generator().manual_seed(0), init_reg=InitReg(model, 1e-2), **kw)


def test_multi_task_steps_never_wait_for_the_device(data, monkeypatch):
    """A multi-task step (three envs' batches, init_reg, fused AdamW) makes no host-syncing tensor call."""
    from conftest import forbid_host_sync

    model = tiny_multi()
    trainer = _multi_trainer(data, model)
    trainer.train_step()                                    # loads the datasets (file reading is not the step)
    before = model.state_dict()["transformer.h.0.mlp.c_fc.weight"].clone()
    with monkeypatch.context() as m:
        forbid_host_sync(m)
        for _ in range(2):
            trainer.train_step()
    assert not torch.equal(before, model.state_dict()["transformer.h.0.mlp.c_fc.weight"])


def test_multi_task_bf16_autocast_stays_close_to_fp32(data):
    """experiment_multi.py --precision bf16: the forward under bf16 autocast, the losses in fp32. From the same weights
    and batches the losses stay within bf16 rounding of fp32 training and the weights move alike."""
    runs = {}
    for amp in (None, torch.bfloat16):
        model = tiny_multi()
        trainer = _multi_trainer(data, model, amp_dtype=amp)
        w0 = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        losses = [trainer.train_step()[0] for _ in range(8)]
        runs[amp] = torch.stack(losses), w0, torch.cat([p.detach().flatten() for p in model.parameters()])
    (l32, w0, w32), (l16, _, w16) = runs[None], runs[torch.bfloat16]
    assert not torch.equal(l32, l16)                               # bf16 did compute in lower precision
    assert ((l16 - l32).abs() / l32.abs()).max() < 2e-2
    assert (w16 - w32).norm() / (w32 - w0).norm() < 5e-2


def test_multi_task_precision_flag_reaches_the_trainer(data, tmp_path, monkeypatch):
    from decision_transformer import multi_run

    seen = {}
    real = multi_run.MultiTrainer

    class Spy(real):
        def __init__(self, *a, **k):
            seen.update(amp=k.get("amp_dtype"), compile=k.get("compile"))
            super().__init__(*a, **k)

    monkeypatch.setattr(multi_run, "MultiTrainer", Spy)
    monkeypatch.chdir(tmp_path)
    experiment_multi.main(["--data_path", str(data), "--seed", "1", *TINY, "--num_eval_episodes", "0",
                           "--precision", "bf16"])
    assert seen == {"amp": torch.bfloat16, "compile": None}
    (run,) = (tmp_path / "checkpoints" / "multi").glob("gym-*")
    assert json.loads((run / "config.json").read_text())["precision"] == "bf16"


def test_resume_with_a_broken_config_and_a_changed_flag(data, tmp_path, monkeypatch, capsys):
    """experiment_multi.py --resume finds a run whose config.json is broken by the config its training state records
    (the seed it drew included), and a changed flag is named with the run's value."""
    base = ["--dataset", "medium", "--data_path", str(data), *TINY, "--embed_dim", "16", "--n_layer", "1",
            "--n_head", "2", "--num_eval_episodes", "0"]
    monkeypatch.chdir(tmp_path)
    experiment_multi.main([*base, "--max_iters", "1"])
    (run,) = (tmp_path / "checkpoints" / "multi").glob("gym-*")
    seed = json.loads((run / "config.json").read_text())["seed"]
    (run / "config.json").write_text("{not json")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        experiment_multi.main([*base, "--max_iters", "2", "--resume", "--learning_rate", "1e-3"])
    assert f"{run.name}, differs in --learning_rate 0.001 (the run: 0.0001)" in capsys.readouterr().err
    experiment_multi.main([*base, "--max_iters", "2", "--resume"])
    err = capsys.readouterr().err
    assert "is missing or not JSON" in err and "after iteration 1" in err
    assert json.loads((run / "config.json").read_text())["seed"] == seed     # the drawn seed was reused
    assert [json.loads(x)["iteration"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_refuses_another_runs_training_state(data, tmp_path, monkeypatch, capsys):
    """A multi-task run's train_state.pt replaced by another run's (another seed) is one line, and nothing is
    written; the run's own state resumes."""
    import shutil

    base = ["--dataset", "medium", "--data_path", str(data), *TINY, "--embed_dim", "16", "--n_layer", "1",
            "--n_head", "2", "--num_eval_episodes", "0", "--max_iters", "1"]
    for seed, where in ((1, "a"), (2, "b")):
        (tmp_path / where).mkdir()
        monkeypatch.chdir(tmp_path / where)
        experiment_multi.main([*base, "--seed", str(seed)])
    (mine,) = (tmp_path / "a" / "checkpoints" / "multi").glob("gym-*")
    (other,) = (tmp_path / "b" / "checkpoints" / "multi").glob("gym-*")
    own = (mine / "train_state.pt").read_bytes()
    shutil.copy(other / "train_state.pt", mine / "train_state.pt")
    before = {p.name: p.read_bytes() for p in mine.iterdir() if p.is_file()}
    monkeypatch.chdir(tmp_path / "a")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        experiment_multi.main([*base, "--max_iters", "2", "--resume", "--seed", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error: --resume: ") and \
        "was saved by a run with other flags than the run in" in err[-1] and "--seed 2 (this run: 1)" in err[-1]
    assert {p.name: p.read_bytes() for p in mine.iterdir() if p.is_file()} == before
    (mine / "train_state.pt").write_bytes(own)
    experiment_multi.main([*base, "--max_iters", "2", "--resume"])
    assert [json.loads(x)["iteration"] for x in (mine / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_continues_in_the_folder_it_found(data, tmp_path, monkeypatch):
    """A multi-task run folder copied under another run id is continued in place; the original is left as it was."""
    import shutil

    base = ["--dataset", "medium", "--data_path", str(data), *TINY, "--embed_dim", "16", "--n_layer", "1",
            "--n_head", "2", "--num_eval_episodes", "0", "--seed", "3"]
    monkeypatch.chdir(tmp_path)
    experiment_multi.main([*base, "--max_iters", "1"])
    (orig,) = (tmp_path / "checkpoints" / "multi").glob("gym-*")
    copy = orig.with_name("gym-experiment-multi-medium-999999999")
    shutil.copytree(orig, copy)
    experiment_multi.main([*base, "--max_iters", "2", "--resume"])
    rows = lambda d: [json.loads(x)["iteration"] for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(copy) == [1, 2] and rows(orig) == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "multi").glob("gym-*")) == sorted([orig.name, copy.name])


def save_multi(path, seed, specs, n_layer=1, stats=None):
    """A tiny multi-task checkpoint specialised on ``specs``, trained on medium, storing ``stats`` (or (seed + 1, 2))
    as the state statistics of every env."""
    from decision_transformer.checkpoint import atomic_save, make_checkpoint
    from decision_transformer.models.multi_decision_transformer import MODEL_CLASS

    m = MultiDecisionTransformer(MultiDTConfig(max_length=5, backbone=BackboneConfig(n_embd=16, n_layer=n_layer,
                                                                                        n_head=2)), seed=seed)
    mean, std = stats or (float(seed + 1), 2.0)
    st = {e: {"state_mean": torch.full((d,), mean), "state_std": torch.full((d,), std)}
          for e, d in (("hopper", 11), ("halfcheetah", 17), ("walker2d", 17))}
    cfg = {"model_class": MODEL_CLASS, "model_config": m.config.to_dict(), "dataset": "medium"}
    atomic_save(make_checkpoint(m.state_dict(), cfg, specializations=list(specs), state_stats=st), path)
    return path


def test_multi_fisher_data_uses_the_models_statistics(data, tmp_path, monkeypatch):
    """experiment_multi.py --fisher_dataset normalises the Fisher data with the state statistics each model stores
    (those it was trained with), not with that dataset's own, as merge_cli does: both give the same merge."""
    from decision_transformer import merge_cli

    paths = [save_multi(tmp_path / "m0.pt", 0, ["hopper"]), save_multi(tmp_path / "m1.pt", 1, ["walker2d"])]
    monkeypatch.chdir(tmp_path)
    fisher_flags = ["--f_batch_size", "4", "--f_num_batches", "2", "--K", "5", "--data_path", str(data),
                    "--device", "cpu"]
    merge_cli.main(["--models", *map(str, paths), "--merge_method", "fisher", "--dataset", "expert", *fisher_flags,
                    "--out", str(tmp_path / "cli.pt")])
    experiment_multi.main(["--dataset", "medium", "--eval_only", "--max_iters", "1", "--num_steps_per_iter", "0",
                           "--num_eval_episodes", "0", "--multi_pretrained_models", *map(str, paths), "--use_fisher",
                           "--fisher_dataset", "expert", "--seed", "666", "--save_model", "--outdir", "",
                           *fisher_flags])
    (saved_path,) = (tmp_path / "models" / "multi").glob("*.pt")
    by_cli = torch.load(tmp_path / "cli.pt", weights_only=True)["state_dict"]
    by_multi = torch.load(saved_path, weights_only=True)["state_dict"]
    blocks = [k for k in by_cli if k.startswith("transformer.h.")]
    srcs = [torch.load(p, weights_only=True)["state_dict"] for p in paths]
    k = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.allclose(by_cli[k], (srcs[0][k] + srcs[1][k]) / 2)                       # Fisher-weighted
    for k in blocks:
        torch.testing.assert_close(by_multi[k], by_cli[k], rtol=1e-5, atol=1e-6)


def test_multi_merge_checks_its_models_before_any_fisher(data, tmp_path, monkeypatch, capsys):
    """Models that cannot be merged (one model, a repeated or double specialisation, other shapes) are refused
    before any Fisher is computed, by experiment_multi.py and merge_cli alike."""
    from conftest import fails
    from decision_transformer import merge_cli, merge_setup, multi_run

    def no_fisher(*a, **k):
        raise AssertionError("a Fisher was computed before the models were checked")

    monkeypatch.setattr(multi_run, "multi_fisher", no_fisher)
    monkeypatch.setattr(merge_setup, "multi_fisher", no_fisher)
    hop = save_multi(tmp_path / "hop.pt", 0, ["hopper"])
    hop2 = save_multi(tmp_path / "hop2.pt", 1, ["hopper"])
    two = save_multi(tmp_path / "two.pt", 2, ["walker2d", "halfcheetah"])
    deep = save_multi(tmp_path / "deep.pt", 3, ["walker2d"], n_layer=2)
    monkeypatch.chdir(tmp_path)
    flags = ["--f_batch_size", "4", "--f_num_batches", "2", "--K", "5", "--data_path", str(data), "--device", "cpu"]
    for models, needle in (([hop], "--multi_pretrained_models needs at least 2 models"),
                           ([hop, hop2], "the models' specialisations are not distinct"),
                           ([hop, two], "must be specialised on exactly one env"),
                           ([hop, deep], "does not exist in")):
        msg = fails(experiment_multi.main, ["--eval_only", "--max_iters", "1", "--num_steps_per_iter", "0",
                                            "--num_eval_episodes", "0", "--multi_pretrained_models", *models,
                                            "--use_fisher", "--outdir", "", *flags], capsys)
        assert needle in msg, msg
        if len(models) > 1:
            msg = fails(merge_cli.main, ["--models", *models, "--merge_method", "fisher", *flags, "--out",
                                         str(tmp_path / "m.pt")], capsys)
            assert needle in msg, msg
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "models").exists()


def test_norm_env_given_equal_to_dataset_wins_over_the_pretrained_models_dataset(data, tmp_path):
    """An explicit --norm_env equal to --dataset means the loaded data's own statistics, also when the
    --pretrained_model was trained on another dataset (the original's precedence); without --norm_env that model's
    dataset's statistics are used; --norm_env of another dataset reads state_stats.pkl."""
    import types

    from decision_transformer.legacy_import import ModelFile
    from decision_transformer.multi_run import resolve_state_stats

    stats = {e: (torch.full((d,), 7.0), torch.full((d,), 2.0)) for e, d in (("hopper", 11), ("halfcheetah", 17),
                                                                             ("walker2d", 17))}
    from decision_transformer.models.multi_decision_transformer import MODEL_CLASS

    ref = ModelFile("m.pt", {}, {"dataset": "expert", "model_class": MODEL_CLASS},
                    raw={"state_stats": {e: {"state_mean": m, "state_std": s} for e, (m, s) in stats.items()}})
    args = types.SimpleNamespace(dataset="medium", norm_env="medium", data_path=str(tmp_path))
    assert resolve_state_stats(args, list(MULTI_ENVS), ref) == ({}, "computed from the medium data")
    args.norm_env = None
    out, note = resolve_state_stats(args, list(MULTI_ENVS), ref)
    assert set(out) == set(MULTI_ENVS) and "of expert" in note
    args.norm_env = "expert"
    from decision_transformer.errors import UserError

    with pytest.raises(UserError, match="state_stats.pkl"):   # no table in tmp_path: --norm_env needs its entries
        resolve_state_stats(args, list(MULTI_ENVS), None)


def test_load_checkpoint_with_a_pretrained_or_merged_model_is_refused(data, tmp_path, monkeypatch, capsys):
    """--load_checkpoint would replace every weight of the --pretrained_model or of the merge: refused up front."""
    monkeypatch.chdir(tmp_path)
    for other in (["--pretrained_model", "p.pt"], ["--multi_pretrained_models", "a.pt", "b.pt"]):
        with pytest.raises(SystemExit) as e:
            experiment_multi.main(["--data_path", str(data), *TINY, "--load_checkpoint", "c.pt", *other])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and f"--load_checkpoint and {other[0]} exclude each other" in err[-1]
    assert not (tmp_path / "checkpoints").exists()


def test_resume_refuses_a_replaced_dataset(data, tmp_path, monkeypatch, capsys):
    """experiment_multi.py --resume after one env's dataset was replaced: one line naming the env, nothing changed."""
    import shutil

    from decision_transformer.synthetic import make_dataset

    mine = tmp_path / "data"
    shutil.copytree(data, mine)
    base = ["--dataset", "medium", "--data_path", str(mine), *TINY, "--embed_dim", "16", "--n_layer", "1",
            "--seed", "3"]
    monkeypatch.chdir(tmp_path)
    experiment_multi.main([*base, "--max_iters", "1"])
    (run,) = (tmp_path / "checkpoints" / "multi").glob("gym-*")
    before = (run / "train_state.pt").read_bytes()
    make_dataset(tmp_path / "other", "walker2d", "medium", 400, seed=9, max_ep_len=50)
    shutil.copy(tmp_path / "other" / "walker2d-medium-v2.pkl", mine / "walker2d-medium-v2.pkl")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        experiment_multi.main([*base, "--max_iters", "2", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "--resume: the walker2d data" in err[-1] and "is not the data" in err[-1]
    assert (run / "train_state.pt").read_bytes() == before


def test_a_multi_run_another_process_trains_is_refused(data, tmp_path, capsys):
    """experiment_multi.py locks the run folder it trains in: while another process holds that lock, a resume of
    the run (with or without the --seed it was started with) stops with one line and writes nothing; a fresh start
    with the same flags gets a folder of its own and is not stopped."""
    import os

    from conftest import fails
    from decision_transformer import sweep

    argv = ["--dataset", "medium", "--data_path", str(data), *TINY, "--embed_dim", "16", "--n_layer", "1",
            "--n_head", "2", "--seed", "5", "--outdir", str(tmp_path / "ck")]
    experiment_multi.main(argv)
    (run,) = [p for p in (tmp_path / "ck" / "multi").iterdir() if p.is_dir()]
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    lock = sweep.folder_lock_path(run)
    assert lock == run.parent / f".{run.name}.lock"
    taken, fd = sweep._take_lock(lock)
    try:
        msg = fails(experiment_multi.main, [*argv, "--max_iters", "2", "--resume"], capsys)
        i = argv.index("--seed")
        no_seed = argv[:i] + argv[i + 2:]
        msg2 = fails(experiment_multi.main, [*no_seed, "--max_iters", "2", "--resume"], capsys)
        experiment_multi.main([*argv, "--max_iters", "1"])  # a fresh start: a new folder, not stopped
    finally:
        os.close(fd)
    for m in (msg, msg2):
        assert m.startswith("error: experiment_multi.py: this run is being trained by another process"), m
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    assert len(list((tmp_path / "ck" / "multi").glob("gym-*"))) == 2
    experiment_multi.main([*argv, "--max_iters", "2", "--resume"])  # free again: it resumes (the newest run)
    last = {d.name: json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])["iteration"]
            for d in (tmp_path / "ck" / "multi").glob("gym-*")}
    assert sorted(last.values()) == [1, 2] and last[run.name] == 1


def test_a_nan_loss_stops_a_multi_run_within_100_steps(data, tmp_path, monkeypatch, capsys):
    """As the single-task trainer: the losses are checked every 100 steps (one host sync), so a divergence at step 1
    of a long iteration stops the run at step 100 with exit code 3, naming the first bad step."""
    from decision_transformer import multi_run

    real, calls = multi_run.MultiTrainer.train_step, {"n": 0}

    def poisoned(self):
        calls["n"] += 1
        total, per_env, reg = real(self)
        return total * float("nan"), per_env, reg

    monkeypatch.setattr(multi_run.MultiTrainer, "train_step", poisoned)
    argv = ["--dataset", "medium", "--data_path", str(data), *TINY, "--embed_dim", "16", "--n_layer", "1",
            "--n_head", "2", "--seed", "5", "--outdir", str(tmp_path / "ck"), "--num_steps_per_iter", "250"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        experiment_multi.main(argv)
    assert e.value.code == 3 and calls["n"] == 100
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: loss became NaN or inf at iteration 1, step 1; checkpoints of earlier iterations are kept")


def test_multi_resume_counts_time_on_and_past_the_end_writes_nothing(data, tmp_path, capsys):
    """experiment_multi.py --resume: ``time/total`` goes on from the first part's time; a --max_iters below the
    iterations trained writes nothing."""
    argv = ["--dataset", "medium", "--data_path", str(data), *TINY, "--embed_dim", "16", "--n_layer", "1",
            "--n_head", "2", "--seed", "6", "--outdir", str(tmp_path / "ck"), "--num_eval_episodes", "0"]
    experiment_multi.main([*argv, "--max_iters", "1"])
    (run,) = (tmp_path / "ck" / "multi").glob("gym-*")
    init = load_checkpoint(run / "model_0.pt")   # the initial weights: the seeded model, written once
    assert init["iteration"] == 0
    fresh = MultiDecisionTransformer(MultiDTConfig.from_dict(init["config"]["model_config"]), seed=6)
    for k, v in fresh.state_dict().items():
        assert torch.equal(init["state_dict"][k], v), k
    experiment_multi.main([*argv, "--max_iters", "2", "--resume"])
    assert load_checkpoint(run / "model_0.pt")["state_dict"].keys() == init["state_dict"].keys()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2] and rows[1]["time/total"] > rows[0]["time/total"]
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    experiment_multi.main([*argv, "--max_iters", "1", "--resume"])
    assert "it has trained 2 iterations, more than --max_iters 1; nothing to do" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_multi_load_checkpoint_of_another_architecture_is_refused(data, tmp_path, monkeypatch, capsys):
    """experiment_multi.py --load_checkpoint compares the settings no shape shows, as experiment.py does."""
    from conftest import fails

    monkeypatch.chdir(tmp_path)
    argv = ["--dataset", "medium", "--data_path", str(data), *TINY, "--embed_dim", "16", "--n_layer", "1",
            "--seed", "7", "--num_eval_episodes", "0", "--save_model"]
    experiment_multi.main([*argv, "--n_head", "2"])
    (ckpt,) = (tmp_path / "models" / "multi").glob("dt_*.pt")
    msg = fails(experiment_multi.main, [*argv, "--n_head", "1", "--load_checkpoint", ckpt, "--outdir", ""], capsys)
    assert msg == (f"error: {ckpt} was trained with n_head 2; the model these flags build has n_head 1: its weights "
                   f"would run as another network (set --n_head as the checkpoint's run did)")


def test_a_multi_task_model_without_one_of_the_three_envs_is_refused(data, tmp_path, monkeypatch, capsys):
    """A self-consistent multi-task checkpoint of hopper and walker2d only would fail at the first halfcheetah
    evaluation: one line naming the file and the missing env, before any data is loaded, for every way in."""
    from conftest import fails

    from decision_transformer.checkpoint import atomic_save, make_checkpoint
    from decision_transformer.models.multi_decision_transformer import MODEL_CLASS

    m = MultiDecisionTransformer(MultiDTConfig(envs=["hopper", "walker2d"], max_length=5,
                                               backbone=BackboneConfig(n_embd=16, n_layer=1, n_head=2)))
    two = tmp_path / "two.pt"
    atomic_save(make_checkpoint(m.state_dict(), {"model_class": MODEL_CLASS, "model_config": m.config.to_dict(),
                                                 "dataset": "medium"}, specializations=["hopper"]), two)
    other = tmp_path / "two_walker2d.pt"                          # the same, specialised on another env
    atomic_save(make_checkpoint(m.state_dict(), {"model_class": MODEL_CLASS, "model_config": m.config.to_dict(),
                                                 "dataset": "medium"}, specializations=["walker2d"]), other)
    monkeypatch.chdir(tmp_path)
    for way in (["--pretrained_model", str(two)], ["--load_checkpoint", str(two)],
                ["--multi_pretrained_models", str(two), str(other), "--merge_method", "mean"]):
        msg = fails(experiment_multi.main, ["--data_path", str(data), *TINY, "--embed_dim", "16", "--n_head", "2",
                                            "--n_layer", "1", *way], capsys)
        assert msg == (f"error: {two}: a multi-task model of the envs ['hopper', 'walker2d'], without halfcheetah; "
                       f"experiment_multi.py trains and evaluates hopper, halfcheetah, walker2d")
    assert not (tmp_path / "checkpoints").exists()
    # a config that leaves envs out (or gives a tuple) is read as the loader builds it: all three
    from decision_transformer.legacy_import import ModelFile
    from decision_transformer.multi_run import check_covers_envs

    full = tiny_multi().config.to_dict()
    for mc in ({k: v for k, v in full.items() if k != "envs"}, {**full, "envs": tuple(MULTI_ENVS)}):
        check_covers_envs(ModelFile("x.pt", {}, {"model_class": MODEL_CLASS, "model_config": mc}))


@pytest.mark.parametrize("field, value, message", [
    ("max_length", 0, "max_length must be a positive integer, got 0"),
    ("max_ep_len", True, "max_ep_len must be a positive integer, got True"),
    ("state_dims", [11, 0, 17], "each of state_dims must be a positive integer, got 0"),
    ("act_dims", [3, 6.0, 6], "each of act_dims must be a positive integer, got 6.0"),
    ("extend_positions", "false", "extend_positions must be true or false, got 'false'"),
])
def test_multi_config_refuses_sizes_and_switches_no_model_can_use(tmp_path, field, value, message):
    """As the single-task config: a recorded size of 0 or True, or a switch "false", would build a broken model or read
    as on; refused where the config is made, and as one line naming the file when a checkpoint records it."""
    from decision_transformer.checkpoint import atomic_save, make_checkpoint
    from decision_transformer.errors import UserError
    from decision_transformer.legacy_import import load_model_file

    with pytest.raises(ValueError, match=re.escape(message)):
        MultiDTConfig(**{field: value})
    m = tiny_multi()
    cfg = m.config.to_dict()
    cfg[field] = value
    path = atomic_save(make_checkpoint(m.state_dict(), {"model_class": "multi_dt", "model_config": cfg}),
                       tmp_path / "m.pt")
    with pytest.raises(UserError, match=re.escape(f"{path}: invalid model_config ({message})")):
        load_model_file(path)
    with pytest.raises(KeyError):
        m.env_index(True)
