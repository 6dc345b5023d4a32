"""merge_setup's wiring of merges to flags: --p in a Fisher merge, --no_trace_norm, the task-vector defaults and bases
(λ = 0.8, --merge_base, the fresh --pretrained_lm model), RegMean's Gram data, the greedy-soup score, every block of
a multi-task merge, --flip, --regmean_n_windows batching and the iteration-0 evaluation, each against an explicit
computation on tiny checkpoints."""
import json

import pytest
import torch

import experiment
from conftest import fails, listed, merge_with_evaluations_recorded, write_source_models
from decision_transformer import merge_cli, merge_setup, merging
from decision_transformer.checkpoint import atomic_save, load_checkpoint, make_checkpoint
from test_fisher import copies, fake_batch, fisher_file, tiny_model
from test_merging import tiny_lm

SMALL = ["--embed_dim", "16", "--n_layer", "1", "--K", "5", "--batch_size", "8", "--warmup_steps", "10"]
NO_TRAINING = ["--max_iters", "1", "--num_steps_per_iter", "0", "--num_eval_episodes", "0"]


@pytest.fixture(scope="module")
def srcs(tmp_path_factory):
    """Datasets and tiny checkpoints (16 x 1, seed 666, blocks perturbed per env) for hopper, halfcheetah, walker2d."""
    return write_source_models(tmp_path_factory.mktemp("wiring"), ("hopper", "halfcheetah", "walker2d"), n=250,
                               max_ep_len=50, id_base=200000)


def state(path):
    return load_checkpoint(path)["state_dict"]


def shared_init(path):
    """The seeded initialisation a write_source_models checkpoint was perturbed from."""
    from decision_transformer.models import DecisionTransformer, DTConfig

    cfg = DTConfig.from_dict(load_checkpoint(path)["config"]["model_config"])
    return DecisionTransformer(cfg, seed=666).state_dict()


def assert_trained_mean_of(m0, trained, other):
    """``m0`` holds the mean of ``trained`` and ``other`` in their attn / mlp tensors and ``trained``'s elsewhere."""
    assert set(m0) == set(trained)
    for k in m0:
        if k in attn_mlp(trained):
            torch.testing.assert_close(m0[k], 0.5 * trained[k] + 0.5 * other[k], rtol=0, atol=1e-7)
        else:
            assert torch.equal(m0[k], trained[k]), k


def attn_mlp(sd):
    return [k for k in sd if ("attn" in k or "mlp" in k) and sd[k].is_floating_point()]


# ---- Fisher: --p and --no_trace_norm (items 1, 8) --------------------------------------------------------------------

def test_fisher_merge_coeffs_weight_each_model():
    g = torch.Generator().manual_seed(3)
    a, b = {"w": torch.randn(4, 3, generator=g)}, {"w": torch.randn(4, 3, generator=g)}
    Fa, Fb = {"w": torch.rand(4, 3, generator=g) + 0.1}, {"w": torch.rand(4, 3, generator=g) + 0.1}
    out = merging.merge_fisher([a, b], [Fa, Fb], ["w"], norm="none", floor=0.0, coeffs=[0.8, 0.2])
    expect = (0.8 * Fa["w"] * a["w"] + 0.2 * Fb["w"] * b["w"]) / (0.8 * Fa["w"] + 0.2 * Fb["w"])
    torch.testing.assert_close(out["w"], expect, rtol=1e-6, atol=1e-6)


def fisher_pair(srcs, tmp_path):
    """Copies of the halfcheetah and walker2d models with hand-made Fisher files (bs4-nb2) that differ element by
    element and in their traces; returns (paths, states, Fishers)."""
    root, data, paths = srcs
    a, b = copies(paths, tmp_path, "halfcheetah", "walker2d")
    fisher_file(a, lambda F: None)
    fisher_file(b, lambda F: [v.pow_(3).mul_(7.0) for v in F.values()])
    Fs = [{k: v for k, v in torch.load(merge_setup.fisher_mod.fisher_info_path(p, 4, 2), weights_only=True).items()
           if not k.startswith("_")} for p in (a, b)]
    return (a, b), [state(a), state(b)], Fs


FISHER_FLAGS = ["--merge_method", "fisher", "--include", "attn", "mlp", "--f_batch_size", "4", "--f_num_batches", "2",
                "--fisher_floor", "0", "--K", "5", "--device", "cpu"]


def test_fisher_merge_p_weights_model_2(srcs, tmp_path):
    """merge_cli --merge_method fisher --p 0.2: θ = (0.8 fa θa + 0.2 fb θb) / (0.8 fa + 0.2 fb), f = F / trace(F)."""
    (a, b), (sa, sb), (Fa, Fb) = fisher_pair(srcs, tmp_path)
    out = tmp_path / "f.pt"
    merge_cli.main(["--models", str(a), str(b), *FISHER_FLAGS, "--p", "0.2", "--data_path", str(srcs[1]),
                    "--out", str(out)])
    got = torch.load(out, weights_only=True)["state_dict"]
    ta, tb = sum(v.double().sum() for v in Fa.values()), sum(v.double().sum() for v in Fb.values())
    keys = attn_mlp(sa)
    assert len(keys) == 8
    for k in keys:
        fa, fb = (Fa[k].double() / ta), (Fb[k].double() / tb)
        expect = (0.8 * fa * sa[k].double() + 0.2 * fb * sb[k].double()) / (0.8 * fa + 0.2 * fb)
        torch.testing.assert_close(got[k], expect.float(), rtol=1e-5, atol=1e-6)
    for k in sa:
        if k not in keys:
            assert torch.equal(got[k], sa[k]), k


def test_no_trace_norm_uses_the_raw_fishers(srcs, tmp_path):
    """merge_cli --merge_method fisher --no_trace_norm: θ = (Fa θa + Fb θb) / (Fa + Fb), the Fishers not normalised
    (their traces differ, so a trace-normalised merge is another tensor)."""
    (a, b), (sa, sb), (Fa, Fb) = fisher_pair(srcs, tmp_path)
    out = tmp_path / "f.pt"
    merge_cli.main(["--models", str(a), str(b), *FISHER_FLAGS, "--no_trace_norm", "--data_path", str(srcs[1]),
                    "--out", str(out)])
    got = torch.load(out, weights_only=True)["state_dict"]
    ta, tb = sum(v.double().sum() for v in Fa.values()), sum(v.double().sum() for v in Fb.values())
    assert not torch.isclose(ta, tb, rtol=0.5)
    for k in attn_mlp(sa):
        Fa_k, Fb_k = Fa[k].double(), Fb[k].double()
        expect = (Fa_k * sa[k].double() + Fb_k * sb[k].double()) / (Fa_k + Fb_k)
        torch.testing.assert_close(got[k], expect.float(), rtol=1e-5, atol=1e-6)


# ---- task vectors: the default λ, --merge_base, the fresh --pretrained_lm model (items 6, 7, 12) ---------------------

def test_task_arithmetic_default_lambda_is_0_8(srcs, tmp_path):
    root, data, paths = srcs
    models = [paths[e] for e in ("hopper", "halfcheetah", "walker2d")]
    out = tmp_path / "ta.pt"
    merge_cli.main(["--models", *map(str, models), "--merge_method", "task_arithmetic", "--include", "attn", "mlp",
                    "--device", "cpu", "--out", str(out)])
    got = torch.load(out, weights_only=True)["state_dict"]
    base, sds = shared_init(models[0]), [state(p) for p in models]
    for k in attn_mlp(sds[0]):
        expect = base[k] + 0.8 * sum(s[k] - base[k] for s in sds)
        torch.testing.assert_close(got[k], expect, rtol=1e-5, atol=1e-6)


def test_merge_base_is_the_task_vector_base(srcs, tmp_path):
    """--merge_base X.pt with X's blocks zero and λ = 1: the merged tensors are Σ θᵢ (not relative to the rebuilt
    shared initialisation)."""
    root, data, paths = srcs
    models = [paths[e] for e in ("hopper", "halfcheetah")]
    ck = load_checkpoint(models[0])
    zero = {k: torch.zeros_like(v) if k.startswith("transformer.h.") else v for k, v in ck["state_dict"].items()}
    base_path = tmp_path / "zero.pt"
    atomic_save(make_checkpoint(zero, ck["config"]), base_path)
    out = tmp_path / "ta.pt"
    merge_cli.main(["--models", *map(str, models), "--merge_method", "task_arithmetic", "--merge_lambda", "1",
                    "--merge_base", str(base_path), "--include", "attn", "mlp", "--device", "cpu", "--out", str(out)])
    got = torch.load(out, weights_only=True)["state_dict"]
    sds = [state(p) for p in models]
    keys = attn_mlp(sds[0])
    assert len(keys) == 8
    for k in keys:
        torch.testing.assert_close(got[k], sds[0][k] + sds[1][k], rtol=1e-5, atol=1e-6)


def test_a_merge_base_of_the_other_kind_is_refused(srcs, tmp_path, capsys):
    """Task vectors against a multi-task base for single-task models (or the reverse) share block names and shapes,
    so nothing else would notice: one line before any merge."""
    from test_multi import save_multi

    root, data, paths = srcs
    multi = save_multi(tmp_path / "multi.pt", 0, ["hopper"])
    msg = fails(merge_cli.main, ["--models", paths["hopper"], paths["halfcheetah"], "--merge_method", "ties",
                                 "--merge_base", multi, "--include", "attn", "--out", tmp_path / "x.pt"], capsys)
    assert msg == (f"error: --merge_base {multi}: a multi-task model, but the models merged are single-task; task "
                   f"vectors need the model they were trained from")
    assert not (tmp_path / "x.pt").exists()
    # a bare state dict records no kind: its keys tell it (a multi-task one is refused, a single-task one taken)
    bare = tmp_path / "bare_multi.pt"
    torch.save(load_checkpoint(multi)["state_dict"], bare)
    assert "a multi-task model" in fails(merge_cli.main, ["--models", paths["hopper"], paths["halfcheetah"],
                                                          "--merge_method", "ties", "--merge_base", bare,
                                                          "--include", "attn", "--out", tmp_path / "x.pt"], capsys)
    bare_single = tmp_path / "bare_single.pt"
    torch.save(load_checkpoint(paths["hopper"])["state_dict"], bare_single)
    merge_cli.main(["--models", str(paths["hopper"]), str(paths["halfcheetah"]), "--merge_method", "ties",
                    "--merge_base", str(bare_single), "--include", "attn", "--out", str(tmp_path / "y.pt")])
    assert (tmp_path / "y.pt").is_file()


def fresh_lm_state(argv):
    """The fresh --pretrained_lm model experiment.py builds for ``argv`` (construction reseeded with --seed)."""
    from decision_transformer.cli import experiment_parser
    from decision_transformer.envs import get_env_spec
    from decision_transformer.model_factory import build_model_from_args

    args = experiment_parser().parse_args(argv)
    return build_model_from_args(args, get_env_spec(args.env)).state_dict()


@pytest.mark.parametrize("bare", [False, True], ids=["recorded_start", "bare_state_dicts"])
def test_task_arithmetic_with_pretrained_lm_is_relative_to_the_models_start(srcs, tmp_path, monkeypatch, capsys,
                                                                            bare):
    """2 models + --pretrained_lm + task arithmetic (λ = 1): θ = θ₀ + Σ (θᵢ − θ₀) on the merged tensors, θ₀ being the
    initialisation the models started from as their runs record it (here their seeded random one, with a warning that
    it is not this run's LM: as merge_cli takes it); models that record no run (bare state dicts) take the fresh
    --pretrained_lm model as θ₀."""
    root, data, paths = srcs
    lm = tiny_lm(tmp_path / "lm")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    models = [paths["hopper"], paths["walker2d"]]
    if bare:
        for i, p in enumerate(list(models)):
            models[i] = work / f"bare{i}.pt"
            torch.save(state(p), models[i])
    argv = ["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models", *map(str, models),
            "--pretrained_lm", str(lm), "--merge_method", "task_arithmetic", "--merge_lambda", "1", "--include",
            "attn", "mlp", "--copy_model", *NO_TRAINING]
    capsys.readouterr()
    experiment.main(argv)
    err = capsys.readouterr().err
    (rd,) = listed(work / "checkpoints")
    m0 = state(rd / "model_0.pt")
    sds = [state(p) for p in models]
    base = fresh_lm_state(argv) if bare else shared_init(paths["hopper"])
    keys = attn_mlp(sds[0])
    assert len(keys) == 8 and not torch.allclose(fresh_lm_state(argv)[keys[0]], shared_init(paths["hopper"])[keys[0]])
    assert ("started from a random initialisation, not from this run's --pretrained_lm" in err) == (not bare)
    assert m0.keys() == sds[0].keys()
    for k in m0:
        if k in keys:
            torch.testing.assert_close(m0[k], base[k] + sum(s[k] - base[k] for s in sds), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(m0[k], sds[0][k]), k


# ---- one model + --pretrained_lm + --flip (item 11) ------------------------------------------------------------------

def test_flip_with_one_model_and_pretrained_lm_makes_the_loaded_model_model_1(srcs, tmp_path, monkeypatch, capsys):
    """--pretrained_models A --pretrained_lm lm --flip --p 0.25 --include attn: 0.75·A + 0.25·fresh on attn, A's
    values elsewhere (A: an LM-shaped model, every tensor moved away from the fresh model's)."""
    root, data, paths = srcs
    lm = tiny_lm(tmp_path / "lm")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = ["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_lm", str(lm), "--flip", "--p", "0.25",
            "--include", "attn", *NO_TRAINING]
    fresh = fresh_lm_state(argv)
    g = torch.Generator().manual_seed(11)
    a = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
         for k, v in fresh_lm_state([*argv, "--seed", "1"]).items()}
    from decision_transformer.cli import experiment_parser
    from decision_transformer.envs import get_env_spec
    from decision_transformer.model_factory import build_model_from_args

    cfg = build_model_from_args(experiment_parser().parse_args(argv), get_env_spec("hopper")).config.to_dict()
    a_path = tmp_path / "models" / "hopper" / "dt_gym-experiment-hopper-medium-300000_best.pt"
    atomic_save(make_checkpoint(a, {"env": "hopper", "dataset": "medium", "seed": 1, "model_config": cfg}), a_path)
    capsys.readouterr()
    experiment.main([*argv, "--pretrained_models", str(a_path)])
    # the log names the models in --flip's order (it used to say the fresh model had 0.75 and gave the rest)
    err = capsys.readouterr().err
    assert f"merge: mean of {a_path} and the fresh --pretrained_lm {lm} model weighted 0.75 : 0.25 (--p 0.25) over " \
        in err and f"the rest from {a_path}\n" in err
    (rd,) = listed(work / "checkpoints")
    m0 = state(rd / "model_0.pt")
    keys = [k for k in a if "attn" in k and a[k].is_floating_point()]
    assert len(keys) == 4 and m0.keys() == a.keys()
    for k in m0:
        if k in keys:
            torch.testing.assert_close(m0[k], 0.75 * a[k] + 0.25 * fresh[k], rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(m0[k], a[k]), k
    info = json.loads((rd / "config.json").read_text())["merge_info"]
    assert info["base"] == "loaded"


# ---- flag checks (items 9, 10) ---------------------------------------------------------------------------------------

def test_use_fisher_contradicts_another_merge_method(srcs, tmp_path, monkeypatch, capsys):
    root, data, paths = srcs
    monkeypatch.chdir(tmp_path)
    msg = fails(experiment.main, ["--env", "hopper", "--data_path", str(tmp_path / "absent"), "--no_generate", *SMALL,
                                  "--pretrained_models", str(paths["hopper"]), str(paths["walker2d"]), "--include",
                                  "attn", "--use_fisher", "--merge_method", "ties", *NO_TRAINING], capsys)
    assert msg == "error: --use_fisher contradicts --merge_method ties"
    assert not any(tmp_path.iterdir())


def test_flip_needs_exactly_two_models(srcs, tmp_path, monkeypatch, capsys):
    root, data, paths = srcs
    monkeypatch.chdir(tmp_path)
    msg = fails(experiment.main, ["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models",
                                  *[str(paths[e]) for e in ("hopper", "halfcheetah", "walker2d")], "--include", "attn",
                                  "--flip", *NO_TRAINING], capsys)
    assert msg == "error: --flip needs exactly 2 --pretrained_models, got 3"


def test_flip_with_copy_model_trains_model_2_with_the_merged_tensors(srcs, tmp_path, monkeypatch, capsys):
    """--flip --copy_model combine as in the original: the merged tensors go into model 2, and that model is trained
    (here model 2 is halfcheetah's, model 1 hopper's: other dims, same blocks). --flip stays limited to 2 models."""
    root, data, paths = srcs
    monkeypatch.chdir(tmp_path)
    experiment.main(["--env", "halfcheetah", "--data_path", str(data), *SMALL, "--pretrained_models",
                     str(paths["hopper"]), str(paths["halfcheetah"]), "--include", "attn", "mlp", "--flip",
                     "--copy_model", *NO_TRAINING])
    err = capsys.readouterr().err
    assert "takes precedence" not in err and "--flip has no effect" not in err
    (rd,) = listed(tmp_path / "checkpoints")
    assert_trained_mean_of(state(rd / "model_0.pt"), state(paths["halfcheetah"]), state(paths["hopper"]))
    msg = fails(experiment.main, ["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models",
                                  *[str(paths[e]) for e in ("hopper", "halfcheetah", "walker2d")], "--include", "attn",
                                  "--flip", "--copy_model", *NO_TRAINING], capsys)
    assert msg == "error: --flip needs exactly 2 --pretrained_models, got 3"


@pytest.mark.parametrize("flip", [False, True])
def test_a_bare_state_dict_to_finetune_is_sized_from_its_tensors(srcs, tmp_path, monkeypatch, capsys, flip):
    """--copy_model / --flip finetune a model of the merge; given as a bare state dict (no config) it is rebuilt from
    its own tensors, with the head count and activation of the command's flags and a warning, not with the sizes of
    the flags (128 x 3 here against a 16 x 1 model: it used to stop with a shape mismatch). Where the flags build
    its shapes, they are its config and nothing is said."""
    root, data, paths = srcs
    monkeypatch.chdir(tmp_path)
    bare = {}
    for env in ("hopper", "halfcheetah"):
        bare[env] = tmp_path / f"bare_{env}.pt"
        torch.save(state(paths[env]), bare[env])
    order = [bare["halfcheetah"], bare["hopper"]] if flip else [bare["hopper"], bare["halfcheetah"]]
    experiment.main(["--env", "hopper", "--data_path", str(data), "--K", "5", "--batch_size", "8", "--n_head", "2",
                     "--pretrained_models", *map(str, order), "--include", "attn", "mlp", "--copy_model",
                     *(["--flip"] if flip else []), *NO_TRAINING])
    err = capsys.readouterr().err
    assert f"warning: {bare['hopper']}: a bare state dict, sized unlike the model this command's flags build; " \
           f"rebuilt from its tensors (16 wide, 1 layers) with 2 head(s) and relu" in err
    (rd,) = listed(tmp_path / "checkpoints")
    assert_trained_mean_of(state(rd / "model_0.pt"), state(paths["hopper"]), state(paths["halfcheetah"]))
    backbone = json.loads((rd / "config.json").read_text())["model_config"]["backbone"]
    assert (backbone["n_embd"], backbone["n_layer"], backbone["n_head"]) == (16, 1, 2)
    experiment.main(["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models",
                     *map(str, order), "--include", "attn", "mlp", "--copy_model", *(["--flip"] if flip else []),
                     *NO_TRAINING])
    assert "sized unlike" not in capsys.readouterr().err


def test_a_nan_copied_from_model_1_is_blamed_on_its_file_not_the_merge(srcs, tmp_path, monkeypatch, capsys):
    """Tensors outside the merged set come from model 1: a NaN there is model 1's, and the line names its file (it
    used to say "the mean merge: tensor ... contains NaN or inf"); in experiment.py and merge_cli alike."""
    root, data, paths = srcs
    monkeypatch.chdir(tmp_path)
    ck = load_checkpoint(paths["hopper"])
    ck["state_dict"]["embed_state.weight"][0, 0] = float("nan")
    bad = atomic_save(ck, tmp_path / "nan_hopper.pt")
    expect = f"error: {bad}: tensor embed_state.weight contains NaN or inf"     # (refused before the merge)
    assert fails(experiment.main, ["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models", bad,
                                   paths["walker2d"], "--include", "attn", "mlp", "--copy_model", *NO_TRAINING],
                 capsys) == expect
    assert not (tmp_path / "checkpoints").exists()
    out = tmp_path / "merged.pt"
    assert fails(merge_cli.main, ["--models", bad, paths["walker2d"], "--include", "attn", "--device", "cpu",
                                  "--out", out], capsys) == expect
    assert not out.exists()


def test_load_checkpoint_and_pretrained_models_exclude_each_other(srcs, tmp_path, monkeypatch, capsys):
    """The checkpoint would replace the merged weights (the original skipped the merge without a word): one line,
    before any merge, and nothing written."""
    root, data, paths = srcs
    monkeypatch.chdir(tmp_path)
    msg = fails(experiment.main, ["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models",
                                  str(paths["hopper"]), str(paths["walker2d"]), "--include", "ln_1", "--copy_model",
                                  "--identity_layers", "--load_checkpoint", str(paths["hopper"]), *NO_TRAINING], capsys)
    assert msg == ("error: --load_checkpoint and --pretrained_models exclude each other: the checkpoint's weights "
                   "would replace the merged model's")
    assert not any(tmp_path.iterdir())


def test_the_model_to_finetune_must_fit_env_before_any_merge(srcs, tmp_path, monkeypatch, capsys):
    """--copy_model trains model 1, --flip model 2: one that does not fit --env stops the run before the merge (no
    Fisher estimated), and the hint says which position the env's model belongs in."""
    root, data, paths = srcs
    monkeypatch.chdir(tmp_path)
    common = ["--data_path", str(data), *SMALL, "--include", "attn", "--use_fisher", "--f_batch_size", "2",
              "--f_num_batches", "1", *NO_TRAINING]
    for flags, models, hint in ((["--flip", "--copy_model"], ("walker2d", "hopper"), "list the walker2d model second "
                                 "(--flip trains model 2)"),
                                (["--flip"], ("walker2d", "hopper"), "list the walker2d model second (--flip "
                                 "trains model 2)"),
                                (["--copy_model"], ("hopper", "walker2d"), "list the walker2d model first"),
                                (["--flip", "--copy_model", "--copy_include"], ("walker2d", "hopper"),
                                 "list the walker2d model second (--flip trains model 2)")):
        msg = fails(experiment.main, ["--env", "walker2d", *common, *flags, "--pretrained_models",
                                      *[str(paths[e]) for e in models]], capsys)
        assert msg.startswith(f"error: {paths['hopper']}: this model has state/action dims 11/3, --env walker2d needs "
                              "17/6") and msg.endswith(hint), msg
    assert not list(root.rglob("info"))                                  # no Fisher file computed
    assert not (tmp_path / "checkpoints").exists()
    # all three flags: --copy_model wins over --copy_include, so --flip trains model 2, which fits here
    experiment.main(["--env", "walker2d", *common, "--flip", "--copy_model", "--copy_include", "--pretrained_models",
                     str(paths["hopper"]), str(paths["walker2d"])])
    assert "--flip: training model 2" in capsys.readouterr().err
    # one model: --flip has nothing to flip, and there is no position to name: the hint asks for the env's model
    msg = fails(experiment.main, ["--env", "walker2d", "--data_path", str(data), *SMALL, "--flip", "--copy_model",
                                  "--pretrained_models", str(paths["hopper"]), *NO_TRAINING], capsys)
    assert msg.endswith("this model has state/action dims 11/3, --env walker2d needs 17/6; give a walker2d model"), msg


def test_a_first_model_of_another_env_merged_into_the_fresh_model_names_the_env(srcs, tmp_path, monkeypatch, capsys):
    """Without --copy_model the merge goes into the fresh model --env builds, its unmerged tensors (the embeddings
    among them) from model 1: a model 1 of another env is named with the env's dims, not sent to --copy_model."""
    root, data, paths = srcs
    monkeypatch.chdir(tmp_path)
    msg = fails(experiment.main, ["--env", "walker2d", "--data_path", str(data), *SMALL, "--include", "attn",
                                  "--pretrained_models", str(paths["hopper"]), str(paths["walker2d"]), *NO_TRAINING],
                capsys)
    assert msg == (f"error: {paths['hopper']}: this model has state/action dims 11/3, --env walker2d needs 17/6; "
                   "list the walker2d model first")
    assert not (tmp_path / "checkpoints").exists()


def test_one_model_without_an_lm_checks_the_selection_it_copies(srcs, tmp_path, monkeypatch, capsys):
    """One --pretrained_models model and no --pretrained_lm: nothing is merged. With --copy_include the selection is
    what is copied into the fresh model, so a misspelt substring is refused; otherwise the model is loaded whole and
    a selection given is said to have no effect."""
    root, data, paths = srcs
    monkeypatch.chdir(tmp_path)
    one = ["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models", str(paths["hopper"])]
    msg = fails(experiment.main, [*one, "--copy_include", "--include", "attn", "mlpp", *NO_TRAINING], capsys)
    assert msg.startswith(f"error: --include mlpp matches no tensor of {paths['hopper']}; check its spelling"), msg
    assert not (tmp_path / "checkpoints").exists()
    experiment.main([*one, "--include", "attn", *NO_TRAINING])
    assert "warning: --include/--exclude have no effect here: the one model is loaded whole" in capsys.readouterr().err


def test_a_damaged_embedding_in_the_model_to_finetune_is_one_line(srcs, tmp_path, monkeypatch, capsys):
    root, data, paths = srcs
    monkeypatch.chdir(tmp_path)
    ck = load_checkpoint(paths["hopper"])
    ck["state_dict"]["embed_state.weight"] = ck["state_dict"]["embed_state.weight"].flatten()
    bad = tmp_path / "bad_hopper.pt"
    atomic_save(ck, bad)
    msg = fails(experiment.main, ["--env", "hopper", "--data_path", str(data), *SMALL, "--include", "attn",
                                  "--copy_model", "--pretrained_models", str(bad), str(paths["hopper"]), *NO_TRAINING],
                capsys)
    assert msg.startswith(f"error: {bad}") and "embed_state.weight" in msg, msg


def test_flip_has_no_effect_with_copy_include(srcs, tmp_path, capsys):
    """--copy_include copies the merged tensors into the fresh model, which --flip does not change: the same weights
    as without --flip, and a warning saying so."""
    root, data, paths = srcs
    runs = []
    for extra in (["--flip"], []):
        work = tmp_path / f"run{len(runs)}"
        work.mkdir()
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(work)
            experiment.main(["--env", "walker2d", "--data_path", str(data), *SMALL, "--pretrained_models",
                             str(paths["halfcheetah"]), str(paths["walker2d"]), "--include", "mlp",
                             "--copy_include", *extra, *NO_TRAINING])
        (rd,) = listed(work / "checkpoints")
        runs.append(state(rd / "model_0.pt"))
        err = capsys.readouterr().err
        assert ("warning: --flip has no effect with --copy_include" in err) == bool(extra)
    flipped, plain = runs
    assert all(torch.equal(flipped[k], plain[k]) for k in plain)
    one, two = state(paths["halfcheetah"]), state(paths["walker2d"])
    for k in plain:
        if "mlp" in k:
            torch.testing.assert_close(plain[k], 0.5 * one[k] + 0.5 * two[k], rtol=0, atol=1e-7)
        elif k.startswith("transformer.h."):
            assert not torch.equal(plain[k], two[k]) and not torch.equal(plain[k], one[k]), k  # the fresh model's


# ---- RegMean end to end (item 2) -------------------------------------------------------------------------------------

def test_regmean_grams_come_from_each_models_own_dataset(srcs, tmp_path):
    from decision_transformer.data import TrajectoryDataset, load_dataset
    from decision_transformer.legacy_import import build_model, load_model_file

    root, data, paths = srcs
    models = [paths["halfcheetah"], paths["walker2d"]]
    out = tmp_path / "rm.pt"
    merge_cli.main(["--models", *map(str, models), "--include", "attn", "mlp", "--merge_method", "regmean",
                    "--regmean_n_windows", "20", "--regmean_alpha", "0.3", "--batch_size", "8", "--K", "5",
                    "--data_path", str(data), "--device", "cpu", "--out", str(out)])
    got = torch.load(out, weights_only=True)["state_dict"]

    def fwd(m, b):
        return m(b.states, b.actions, b.rtg[:, :-1], b.timesteps, attention_mask=b.mask)

    sds, grams, conv1d = [], [], {}
    for p, env in zip(models, ("halfcheetah", "walker2d")):
        mf = load_model_file(p)
        sds.append(mf.state_dict)
        model = build_model(mf, "cpu", max_length=5)
        keys = merging.select_keys(list(mf.state_dict), ["attn", "mlp"])
        _, trajs = load_dataset(str(data), env, "medium")
        ds = TrajectoryDataset(trajs, env, device="cpu")
        grams.append(merging.collect_grams(model, keys, merge_setup.windows(ds, 20, 8, 5, 666), fwd))
        conv1d = {n: c for n, (_, c) in merging.linear_modules(model, keys).items()}
    assert sorted(grams[0]) == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    expect = merging.merge_regmean(sds, grams, keys, alpha=0.3, conv1d=conv1d)      # --regmean_alpha's, not 0.1
    for k in keys:
        torch.testing.assert_close(got[k], expect[k], rtol=1e-5, atol=1e-6)
    w = "transformer.h.0.mlp.c_fc.weight"
    default = merging.merge_regmean(sds, grams, keys, alpha=0.1, conv1d=conv1d)
    assert not torch.allclose(got[w], default[w], rtol=1e-4, atol=1e-5)          # the alpha makes a difference
    assert not torch.allclose(got[w], (sds[0][w] + sds[1][w]) / 2, atol=1e-4)      # really Gram-weighted


# ---- greedy-soup score (item 3) --------------------------------------------------------------------------------------

def test_action_mse_score_is_minus_the_mean_masked_mse():
    from decision_transformer.training.losses import masked_action_mse

    model = tiny_model(seed=4)
    batches = [fake_batch(seed=5), fake_batch(seed=6)]
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = tiny_model(seed=4).eval()
    with torch.no_grad():
        mses = [float(masked_action_mse(ref(b.states, b.actions, b.rtg[:, :-1], b.timesteps,
                                            attention_mask=b.mask).action_preds, b.actions, b.mask)) for b in batches]
    score = merge_setup.action_mse_score(model, batches)
    assert score(sd) == pytest.approx(-(mses[0] + mses[1]) / 2, rel=1e-6)
    noisy = {k: v + 3.0 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7))
             if k.startswith("predict_action") else v for k, v in sd.items()}
    assert score(noisy) < score(sd) < 0


# ---- multi-task merge: every layer (item 5) --------------------------------------------------------------------------

def test_multi_task_merge_merges_every_block_layer(tmp_path):
    from decision_transformer.models.multi_decision_transformer import MULTI_ENVS
    from test_multi import ENV_LISTS, save_multi

    a = save_multi(tmp_path / "a.pt", 0, ["hopper"], n_layer=2)
    b = save_multi(tmp_path / "b.pt", 1, ["walker2d"], n_layer=2)
    out = tmp_path / "m.pt"
    merge_cli.main(["--models", str(a), str(b), "--device", "cpu", "--out", str(out)])
    got = torch.load(out, weights_only=True)["state_dict"]
    sa, sb = state(a), state(b)
    blocks = [k for k in sa if k.startswith("transformer.h.") and sa[k].is_floating_point()]
    assert {k.split(".")[2] for k in blocks} == {"0", "1"}
    assert not torch.equal(sa["transformer.h.1.attn.c_attn.weight"], sb["transformer.h.1.attn.c_attn.weight"])
    for k, v in got.items():
        if k in blocks:
            torch.testing.assert_close(v, (sa[k] + sb[k]) / 2, rtol=0, atol=1e-7)
        elif any(k.startswith(f"{n}.{MULTI_ENVS.index('walker2d')}.") for n in ENV_LISTS):  # from the walker2d model
            assert torch.equal(v, sb[k]), k
        else:
            assert torch.equal(v, sa[k]), k


# ---- --regmean_n_windows is exact (item 13) --------------------------------------------------------------------------

def test_windows_batches_add_up_to_n_windows():
    calls = []

    class Stub:
        device = "cpu"

        def sample_batch(self, n, K, gen):
            calls.append((n, K))
            return n

    assert merge_setup.windows(Stub(), 5, 4, 3, 0) == [4, 1]
    assert calls == [(4, 3), (1, 3)]
    calls.clear()
    assert merge_setup.windows(Stub(), 8, 4, 3, 0) == [4, 4]


# ---- no iteration-0 evaluation without finetuning (item 14) ----------------------------------------------------------

def test_no_iteration_0_evaluation_when_nothing_is_finetuned(srcs, tmp_path, monkeypatch, capsys):
    root, data, paths = srcs
    calls = merge_with_evaluations_recorded(monkeypatch, tmp_path, data, paths, *SMALL, "--max_iters", "1",
                                            "--num_steps_per_iter", "0", "--num_eval_episodes", "1")
    err = capsys.readouterr().err
    assert calls == [] and "iter 0 (merged" not in err
    (rd,) = listed(tmp_path / "checkpoints")
    assert "iteration_0" not in json.loads((rd / "config.json").read_text())["merge_info"]


@pytest.mark.parametrize("extra", [[], ["--copy_include"]], ids=["whole_state", "copy_include"])
def test_merged_state_that_cannot_fit_the_fresh_model_fails_before_any_fisher(srcs, tmp_path, monkeypatch, capsys,
                                                                              extra):
    """Random-init checkpoints merged into a fresh --pretrained_lm model (other token and position tables, other
    width): the mismatch is reported before the Fishers are estimated, not after."""
    root, data, paths = srcs
    lm = tiny_lm(tmp_path / "lm")
    monkeypatch.chdir(tmp_path)
    estimated = []
    monkeypatch.setattr(merge_setup, "merge_single_sources", lambda *a, **k: estimated.append(1))
    argv = ["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models", str(paths["hopper"]),
            str(paths["walker2d"]), "--pretrained_lm", str(lm), "--use_fisher", "--include", "wte", *extra,
            *NO_TRAINING]
    msg = fails(experiment.main, argv, capsys)
    if extra:
        assert msg == ("error: --copy_include: merged tensor transformer.wte.weight has shape [50257, 16], the fresh "
                       "model [50, 16]")
    else:
        assert msg == (f"error: the merged model (model 1: {paths['hopper']}) does not match the model: shape mismatch "
                       "for transformer.wte.weight (checkpoint [50257, 16], model [50, 16]) and 1 more; the merge "
                       "is loaded into the model these flags build: add --copy_model to build it from model 1's "
                       "recorded config, or give the models' sizes (--embed_dim, --n_layer, --K, ...)")
    assert estimated == []


def test_experiment_refuses_a_multi_task_source(srcs, tmp_path, monkeypatch, capsys):
    """As merge_cli: a multi-task model among experiment.py's --pretrained_models is one line before any merge, also
    where only the shared blocks are copied (whose merge would otherwise run on per-env layouts)."""
    from test_multi import save_multi

    root, data, paths = srcs
    multi = save_multi(tmp_path / "multi.pt", 0, ["hopper"])
    monkeypatch.chdir(tmp_path)
    for order in ((paths["hopper"], multi), (multi, paths["hopper"])):
        msg = fails(experiment.main, ["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models",
                                      *map(str, order), "--include", "attn", "--copy_include", *NO_TRAINING], capsys)
        assert msg == (f"error: {multi}: a multi-task model; experiment.py merges single-task models (merge multi-task "
                       f"ones with experiment_multi.py --multi_pretrained_models)")
    assert listed(tmp_path) == [multi]


def test_merge_cli_warns_when_its_windows_are_not_the_models_k(srcs, tmp_path, capsys):
    """RegMean and greedy soup (and a multi-task Fisher) read data in --K windows (default 20): models trained with
    another K are named (a single-task Fisher uses each model's own K: tests/test_doc_claims.py)."""
    root, data, paths = srcs
    models = [str(paths["halfcheetah"]), str(paths["walker2d"])]
    flags = ["--include", "attn", "--merge_method", "regmean", "--regmean_n_windows", "8", "--batch_size", "8",
             "--data_path", str(data), "--device", "cpu"]
    capsys.readouterr()
    merge_cli.main(["--models", *models, *flags, "--out", str(tmp_path / "a.pt")])
    err = capsys.readouterr().err
    assert all(f"warning: {m} was trained with K=5; this run uses K=20 (--K)" in err for m in models)
    merge_cli.main(["--models", *models, *flags, "--K", "5", "--out", str(tmp_path / "b.pt")])
    assert "was trained with K=" not in capsys.readouterr().err
