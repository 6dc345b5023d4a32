"""Fisher information: the three estimators against explicit loops, info files, precompute_fisher.py and
experiment.py --use_fisher (computed when missing, then used)."""
import pytest
import torch

import experiment
import precompute_fisher
from decision_transformer import fisher, merging
from conftest import listed, write_source_models
from decision_transformer.checkpoint import atomic_save, load_checkpoint
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig
from decision_transformer.training.losses import masked_action_mse

SMALL = ["--embed_dim", "16", "--n_layer", "1", "--K", "5", "--batch_size", "8", "--warmup_steps", "10"]




def tiny_model(seed=0, dropout=0.0):
    cfg = DTConfig(11, 3, max_length=4, backbone=BackboneConfig(n_embd=8, n_layer=1, n_head=2, resid_pdrop=dropout,
                                                                attn_pdrop=dropout, embd_pdrop=dropout))
    return DecisionTransformer(cfg, seed=seed)


def fake_batch(B=5, K=4, seed=0):
    from decision_transformer.data import Batch

    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, K)
    mask[0, :2] = 0
    mask[B - 1, :1] = 0
    return Batch(states=torch.randn(B, K, 11, generator=g), actions=torch.rand(B, K, 3, generator=g) * 2 - 1,
                 rewards=torch.zeros(B, K, 1), dones=torch.zeros(B, K, dtype=torch.long),
                 rtg=torch.randn(B, K + 1, 1, generator=g), timesteps=torch.randint(0, 50, (B, K), generator=g),
                 mask=mask)


def block_params(model):
    return {n: p for n, p in model.named_parameters() if "transformer.h" in n}


def test_empirical_fisher_matches_per_sample_loop():
    model = tiny_model()
    batches = [fake_batch(seed=0), fake_batch(seed=1)]
    F, n = fisher.fisher_empirical(model, batches)
    assert n == 10
    acc = {k: torch.zeros_like(v) for k, v in block_params(model).items()}
    model.eval()
    for b in batches:
        for i in range(b.states.shape[0]):
            model.zero_grad()
            out = model(b.states[i:i + 1], b.actions[i:i + 1], b.rtg[i:i + 1, :-1], b.timesteps[i:i + 1],
                        attention_mask=b.mask[i:i + 1])
            loss = (((out.action_preds[0] - b.actions[i]) ** 2) * b.mask[i][:, None]).sum()
            loss.backward()
            for k, p in block_params(model).items():
                acc[k] += p.grad ** 2
    for k in acc:
        assert torch.allclose(F[k], acc[k] / n, rtol=1e-4, atol=1e-10), k


def test_gaussian_fisher_matches_jacobian_loop():
    model = tiny_model(seed=1)
    b = fake_batch(B=3, seed=2)
    F, n = fisher.fisher_gaussian(model, [b])
    acc = {k: torch.zeros_like(v) for k, v in block_params(model).items()}
    model.eval()
    for i in range(3):
        for t in range(4):
            if b.mask[i, t] == 0:
                continue
            for a in range(3):
                model.zero_grad()
                out = model(b.states[i:i + 1], b.actions[i:i + 1], b.rtg[i:i + 1, :-1], b.timesteps[i:i + 1],
                            attention_mask=b.mask[i:i + 1])
                out.action_preds[0, t, a].backward()
                for k, p in block_params(model).items():
                    acc[k] += p.grad ** 2
    for k in acc:
        assert torch.allclose(F[k], acc[k] / 3, rtol=1e-4, atol=1e-10), k


def test_batch_fisher_is_the_originals_estimate():
    """Σ_b (∇ of the batch-mean masked MSE)² / number of unmasked timesteps (dropout 0 makes it deterministic)."""
    model = tiny_model(seed=2)
    batches = [fake_batch(seed=3), fake_batch(seed=4)]
    F = fisher.fisher_batch(model, batches)
    assert all(p.grad is None for p in model.parameters())  # gradients cleared afterwards
    acc = {k: torch.zeros_like(v) for k, v in block_params(model).items()}
    for b in batches:
        model.zero_grad()
        out = model(b.states, b.actions, b.rtg[:, :-1], b.timesteps, attention_mask=b.mask)
        masked_action_mse(out.action_preds, b.actions, b.mask).backward()
        for k, p in block_params(model).items():
            acc[k] += p.grad ** 2
    n_tok = sum(float(b.mask.sum()) for b in batches)
    for k in acc:
        assert torch.allclose(F[k], acc[k] / n_tok, rtol=1e-5, atol=1e-12), k


def test_a_fisher_estimate_runs_without_tf32_and_draws_its_windows_on_the_cpu(monkeypatch, hopper_data):
    """experiment.py turns TF32 on for training and precompute_fisher.py does not: the estimate now runs with TF32
    off either way (then restores the setting), and its windows come from a CPU generator (a GPU's gives another
    stream), so a cached file is the same whichever tool, or device, made it."""
    from decision_transformer.data import TrajectoryDataset, load_dataset

    data = TrajectoryDataset(load_dataset(hopper_data, "hopper", "medium")[1], "hopper")
    seen = []

    def batch_fisher(model, batches, **kw):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                     [b.states for b in batches]))
        return {k: torch.ones_like(p) for k, p in block_params(model).items()}

    monkeypatch.setattr(fisher, "fisher_batch", batch_fisher)
    # set and restored by hand: torch's cuBLAS module keeps allow_tf32 outside its __dict__, and pytest 9.2's
    # monkeypatch then undoes the patch with a delattr it refuses (an error at teardown, the flag left on)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        fisher.compute_fisher(tiny_model(), data, batch_size=3, num_batches=2, K=4, seed=7)
        restored = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    (matmul, cudnn, states), = seen
    assert (matmul, cudnn) == (False, False)
    assert restored == (True, True)                                                        # restored
    g = torch.Generator().manual_seed(7)
    for got in states:
        assert torch.equal(got, data.get_windows(*data.sample_indices(3, g), 4).states)


def test_info_path_names():
    assert str(fisher.fisher_info_path("models/hopper/dt_x-1_best.pt", 64, 750)) == "models/hopper/info/dt_x-1_best-bs64-nb750"
    assert str(fisher.fisher_info_path("/a/b/m.pt", 8, 3, "empirical")).endswith("/a/b/info/m-bs8-nb3-empirical")


def test_a_zero_or_non_finite_fisher_is_never_saved(tmp_path):
    """A Fisher that is zero everywhere (e.g. --K 0: no timestep, no gradient) or NaN would poison the info-file cache
    that later runs load: saving it is refused, an existing file stays as it was, and loading such a file fails."""
    from decision_transformer.errors import UserError

    good = {"transformer.h.0.w": torch.rand(3, 2), "_stats": {"sum": 1.0, "mean": 0.1}}
    path = tmp_path / "info" / "m-bs4-nb2"
    fisher.save_fisher(good, path)
    before = path.read_bytes()
    for bad in ({"transformer.h.0.w": torch.zeros(3, 2)}, {"transformer.h.0.w": torch.full((3, 2), float("nan"))},
                {"transformer.h.0.w": torch.rand(3, 2), "transformer.h.0.b": torch.tensor([1.0, float("inf")])}):
        with pytest.raises(UserError, match="not written"):
            fisher.save_fisher(bad, path)
        assert path.read_bytes() == before
    torch.save({"transformer.h.0.w": torch.zeros(3, 2)}, tmp_path / "poisoned")
    with pytest.raises(UserError, match="zero everywhere.*delete it"):
        fisher.load_fisher(tmp_path / "poisoned")
    (tmp_path / "empty").write_bytes(b"")          # torch's EOFError has no message: it was an IndexError traceback
    with pytest.raises(UserError) as e:
        fisher.load_fisher(tmp_path / "empty")
    assert str(e.value) == f"{tmp_path / 'empty'}: not a readable Fisher file (EOFError)"
    with pytest.raises(UserError, match="--K must be >= 1"):
        fisher.compute_fisher(tiny_model(), None, K=0)


@pytest.mark.parametrize("entry", ["transformer.h.0.w", "_stats.sum"])
def test_a_fisher_file_with_a_broadcast_view_is_refused_before_it_is_unfolded(tmp_path, entry):
    """A Fisher tensor (or a tensor among its metadata) saved as a stride-0 view of 4 bytes would unfold into
    gigabytes when it is checked or merged: one line naming the file and tensor."""
    from decision_transformer.errors import UserError

    huge = torch.ones(1).expand(100_000, 100_000)
    info = {"transformer.h.0.w": torch.rand(3, 2), "_stats": {"sum": 1.0, "mean": 0.1}}
    if entry == "_stats.sum":
        info["_stats"]["sum"] = huge
    else:
        info[entry] = huge
    torch.save(info, tmp_path / "inflated")
    assert (tmp_path / "inflated").stat().st_size < 10_000
    with pytest.raises(UserError) as e:
        fisher.load_fisher(tmp_path / "inflated")
    assert str(e.value) == (f"{tmp_path / 'inflated'}: damaged Fisher file: tensor {entry} of shape [100000, 100000] "
                            f"is a broadcast view of 4 bytes, not a Fisher estimate")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Datasets for the three envs and one checkpoint per env with a stored config (equal seeds: shared blocks init)."""
    return write_source_models(tmp_path_factory.mktemp("fisher"), ("hopper", "halfcheetah", "walker2d"), n=250,
                               max_ep_len=50, id_base=100000)


def test_precompute_fisher_reads_env_and_dataset_from_a_takagi_run_folder(setup, tmp_path, capsys):
    """A bare state dict has no config: the run folder {model}_{dataset}_{env}_{seed} names its env and dataset, as
    legacy_import reads it (before, the error's advice, --dataset, could not help: the env stayed unknown)."""
    root, data, paths = setup
    run = tmp_path / "dt_medium_hopper_666_K5"
    run.mkdir()
    torch.save(load_checkpoint(paths["hopper"])["state_dict"], run / "model_1.pt")
    precompute_fisher.main(["--model", str(run / "model_1.pt"), "--data_path", str(data), "--f_batch_size", "4",
                            "--f_num_batches", "2", "--K", "5", "--device", "cpu"])
    out = fisher.fisher_info_path(run / "model_1.pt", 4, 2)
    assert fisher.load_fisher(out)["_source"]["env"] == "hopper"
    assert fisher.load_fisher(out)["_source"]["dataset"] == "medium"


def test_precompute_fisher_cli(setup, monkeypatch):
    root, data, paths = setup
    monkeypatch.chdir(root)
    rel = f"./models/hopper/{paths['hopper'].name}"
    precompute_fisher.main(["--model", rel, "--data_path", str(data), "--f_batch_size", "4", "--f_num_batches", "2",
                            "--K", "5"])
    out = root / "models" / "hopper" / "info" / (paths["hopper"].name[:-3] + "-bs4-nb2")
    info = torch.load(out, weights_only=True)
    F = fisher.fisher_tensors(info)
    assert set(F) == {n for n, _ in DecisionTransformer(DTConfig(11, 3, backbone=BackboneConfig(
        n_embd=16, n_layer=1))).named_parameters() if "transformer.h" in n}
    assert info["_stats"]["sum"] == pytest.approx(sum(float(v.sum()) for v in F.values()), rel=1e-6)
    assert "fisher_type" not in info                      # the original layout for the batch type
    precompute_fisher.main(["--model", rel, "--data_path", str(data), "--f_batch_size", "4", "--f_num_batches", "2",
                            "--K", "5", "--fisher_type", "empirical"])
    emp = torch.load(out.with_name(out.name + "-empirical"), weights_only=True)
    assert emp["fisher_type"] == "empirical" and emp["n_examples"] == 8 and emp["train_mode"] is False

    # a bare state dict in the original layout: env and dataset parsed from the path, as the original did
    bare = root / "models" / "walker2d" / "dt_gym-experiment-walker2d-medium-555555_best.pt"
    torch.save(load_checkpoint(paths["walker2d"])["state_dict"], bare)
    precompute_fisher.main(["--model", f"./models/walker2d/{bare.name}", "--data_path", str(data),
                            "--f_batch_size", "4", "--f_num_batches", "1", "--K", "5"])
    assert (bare.parent / "info" / (bare.name[:-3] + "-bs4-nb1")).is_file()


def test_use_fisher_computes_missing_info_and_uses_it(setup, monkeypatch, capsys):
    root, data, paths = setup
    monkeypatch.chdir(root)
    envs = ("hopper", "halfcheetah", "walker2d")
    argv = ["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models", *[str(paths[e]) for e in envs],
            "--include", "attn", "mlp", "--copy_model", "--use_fisher", "--f_batch_size", "4", "--f_num_batches", "3",
            "--max_iters", "1", "--num_steps_per_iter", "0", "--num_eval_episodes", "0"]
    experiment.main(argv)
    err = capsys.readouterr().err
    assert err.count("not found; computing it") == 3
    infos = [fisher.load_fisher(fisher.fisher_info_path(paths[e], 4, 3)) for e in envs]
    (rd,) = [p for p in (root / "checkpoints").iterdir() if p.name.startswith("dt_medium_hopper_666_K5_")]
    m0 = load_checkpoint(rd / "model_0.pt")["state_dict"]
    srcs = [load_checkpoint(paths[e])["state_dict"] for e in envs]
    keys = [k for k in m0 if "attn" in k or "mlp" in k]
    expect = merging.merge_fisher(srcs, [fisher.fisher_tensors(i) for i in infos], keys, norm="trace", floor=1e-6)
    for k in keys:
        assert torch.allclose(m0[k], expect[k], atol=1e-6), k
    plain = sum(s[keys[0]] for s in srcs) / 3
    assert not torch.allclose(m0[keys[0]], plain, atol=1e-6)   # really Fisher-weighted, not the plain mean
    # second run: the saved infos are loaded, not recomputed
    experiment.main(argv)
    assert "computing it" not in capsys.readouterr().err


def test_fisher_windows_use_the_models_own_context(setup, monkeypatch, capsys, tmp_path):
    """The info file's name does not record K: precompute_fisher.py and a merge run computing a missing file both use
    the K the model was trained with (5 here) whatever --K says, and the same seed whatever the run's --seed, so the
    cached file is the same whichever made it; a merge run with another --K warns."""
    root, data, paths = setup
    monkeypatch.chdir(root)
    src = tmp_path / paths["hopper"].name
    src.write_bytes(paths["hopper"].read_bytes())
    out = fisher.fisher_info_path(src, 4, 2)
    precompute_fisher.main(["--model", str(src), "--data_path", str(data), "--f_batch_size", "4",
                            "--f_num_batches", "2", "--device", "cpu"])
    assert "windows of K=5)" in capsys.readouterr().err
    by_precompute = fisher.fisher_tensors(fisher.load_fisher(out))
    out.unlink()
    other = tmp_path / paths["halfcheetah"].name
    other.write_bytes(paths["halfcheetah"].read_bytes())
    experiment.main(["--env", "hopper", "--data_path", str(data), *SMALL, "--K", "8", "--pretrained_models", str(src),
                     str(other), "--include", "attn", "--copy_model", "--use_fisher", "--f_batch_size", "4",
                     "--f_num_batches", "2", "--max_iters", "1", "--num_steps_per_iter", "0",
                     "--num_eval_episodes", "0", "--outdir", "", "--seed", "1"])  # the run's seed is not the cache's
    err = capsys.readouterr().err
    assert f"warning: {src} was trained with K=5; this run uses K=8 (--K)" in err and "windows of K=5 of" in err
    by_merge = fisher.fisher_tensors(fisher.load_fisher(out))
    assert by_merge.keys() == by_precompute.keys()
    assert all(torch.equal(by_merge[k], by_precompute[k]) for k in by_merge)


def test_a_cached_fisher_records_what_it_was_estimated_on(setup, monkeypatch, capsys, tmp_path):
    """The info file's name records neither the dataset nor K: the file does (``_source``). precompute_fisher.py
    refuses to call a file estimated on other data or another K "existing" (one line; --force recomputes), and a
    merge run that loads such a file says so."""
    from conftest import fails

    root, data, paths = setup
    monkeypatch.chdir(root)
    src = tmp_path / paths["hopper"].name
    src.write_bytes(paths["hopper"].read_bytes())
    mixed = tmp_path / "data"
    mixed.mkdir()
    (mixed / "hopper-medium-v2.pkl").write_bytes((data / "hopper-medium-v2.pkl").read_bytes())
    (mixed / "hopper-expert-v2.pkl").write_bytes((data / "hopper-medium-v2.pkl").read_bytes())
    base = ["--model", str(src), "--data_path", str(mixed), "--f_batch_size", "4", "--f_num_batches", "2",
            "--device", "cpu"]
    out = fisher.fisher_info_path(src, 4, 2)
    computed = []
    real_compute = fisher.compute_fisher
    monkeypatch.setattr(fisher, "compute_fisher", lambda *a, **k: (computed.append(1), real_compute(*a, **k))[1])
    precompute_fisher.main(base)
    assert fisher.load_fisher(out)["_source"] == {"env": "hopper", "dataset": "medium", "K": 5, "seed": 666,
                                                  "weights": fisher.weights_digest(load_checkpoint(src)["state_dict"])}
    assert len(computed) == 1
    stamp = out.stat().st_mtime_ns
    precompute_fisher.main(base)
    assert "exists" in capsys.readouterr().err
    assert len(computed) == 1 and out.stat().st_mtime_ns == stamp  # the cached file is reused, not recomputed
    before = out.read_bytes()
    msg = fails(precompute_fisher.main, base + ["--dataset", "expert"], capsys)
    assert "computed on hopper-medium with K=5, not on hopper-expert with K=5" in msg and "--force" in msg
    assert "K=5, not on hopper-medium with K=8" in fails(precompute_fisher.main, base + ["--K", "8"], capsys)
    assert "computed with --seed 666, not 1" in fails(precompute_fisher.main, base + ["--seed", "1"], capsys)
    assert out.read_bytes() == before
    precompute_fisher.main(base + ["--dataset", "expert", "--force"])
    assert fisher.load_fisher(out)["_source"]["dataset"] == "expert" and len(computed) == 2
    other = tmp_path / paths["halfcheetah"].name
    other.write_bytes(paths["halfcheetah"].read_bytes())
    precompute_fisher.main(["--model", str(other), "--data_path", str(data), "--f_batch_size", "4",
                            "--f_num_batches", "2", "--device", "cpu"])
    capsys.readouterr()
    experiment.main(["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models", str(src), str(other),
                     "--include", "attn", "--copy_model", "--use_fisher", "--f_batch_size", "4",
                     "--f_num_batches", "2", "--max_iters", "1", "--num_steps_per_iter", "0",
                     "--num_eval_episodes", "0", "--outdir", ""])
    err = capsys.readouterr().err
    assert err.count("fisher: loaded") == 2 and err.count("estimated on expert, not the model's own medium") == 1


def test_a_merge_refuses_a_cached_fisher_of_another_env_and_notes_another_K(setup, monkeypatch, capsys, tmp_path):
    """A Fisher file whose record says another env (a copied file: the info file's name records none; walker2d and
    halfcheetah models share every shape, so the shape check cannot tell) is one line naming the file, not merged
    with; one estimated on another K is used with the difference said, as for another dataset."""
    from conftest import fails

    root, data, paths = setup
    monkeypatch.chdir(root)
    srcs = []
    for env in ("walker2d", "halfcheetah"):
        srcs.append(tmp_path / paths[env].name)
        srcs[-1].write_bytes(paths[env].read_bytes())
        precompute_fisher.main(["--model", str(srcs[-1]), "--data_path", str(data), "--f_batch_size", "4",
                                "--f_num_batches", "2", "--device", "cpu"])
    walker = fisher.fisher_info_path(srcs[0], 4, 2)
    info = fisher.load_fisher(walker)
    argv = ["--env", "walker2d", "--data_path", str(data), *SMALL, "--pretrained_models", *map(str, srcs),
            "--include", "attn", "--copy_model", "--use_fisher", "--f_batch_size", "4", "--f_num_batches", "2",
            "--max_iters", "1", "--num_steps_per_iter", "0", "--num_eval_episodes", "0", "--outdir", ""]
    fisher.save_fisher({**info, "_source": {**info["_source"], "K": 8}}, walker)
    capsys.readouterr()
    experiment.main(argv)
    assert "on windows of K=8, not the model's own K=5" in capsys.readouterr().err
    fisher.save_fisher({**info, "_source": {**info["_source"], "env": "halfcheetah"}}, walker)
    before = walker.read_bytes()
    msg = fails(experiment.main, argv, capsys)
    assert f"{walker}: a Fisher estimated on halfcheetah data, but {srcs[0]} is a walker2d model" in msg
    assert walker.read_bytes() == before


def test_a_cached_fisher_of_weights_the_model_file_no_longer_holds_is_recomputed(setup, monkeypatch, capsys,
                                                                                 tmp_path):
    """A model file rewritten after its Fisher was cached (a resumed run's _best.pt, a merge saved to the same path):
    the file records the weights it was estimated on, so precompute_fisher.py and a merge run recompute it instead of
    using the old estimate without a word."""
    root, data, paths = setup
    monkeypatch.chdir(root)
    src = tmp_path / paths["hopper"].name
    src.write_bytes(paths["hopper"].read_bytes())
    base = ["--model", str(src), "--data_path", str(data), "--f_batch_size", "4", "--f_num_batches", "2",
            "--device", "cpu"]
    precompute_fisher.main(base)
    out = fisher.fisher_info_path(src, 4, 2)
    before = fisher.load_fisher(out)
    ckpt = load_checkpoint(src)
    k = next(k for k in ckpt["state_dict"] if k.endswith("attn.c_attn.weight"))
    ckpt["state_dict"][k] = ckpt["state_dict"][k] * 1.5
    atomic_save(ckpt, src)
    capsys.readouterr()
    precompute_fisher.main(base)
    assert "was estimated on other weights than" in capsys.readouterr().err
    after = fisher.load_fisher(out)
    assert after["_source"]["weights"] == fisher.weights_digest(ckpt["state_dict"]) != before["_source"]["weights"]
    assert not torch.equal(after[k], before[k])
    ckpt["state_dict"][k] = ckpt["state_dict"][k] * 2
    atomic_save(ckpt, src)
    other = tmp_path / paths["halfcheetah"].name
    other.write_bytes(paths["halfcheetah"].read_bytes())
    capsys.readouterr()
    experiment.main(["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models", str(src), str(other),
                     "--include", "attn", "--copy_model", "--use_fisher", "--f_batch_size", "4",
                     "--f_num_batches", "2", "--max_iters", "1", "--num_steps_per_iter", "0",
                     "--num_eval_episodes", "0", "--outdir", ""])
    assert f"fisher: {out} estimated on other weights than {src} holds now" in capsys.readouterr().err
    assert fisher.load_fisher(out)["_source"]["weights"] == fisher.weights_digest(ckpt["state_dict"])


def copies(paths, folder, *envs):
    """Copies of the setup's checkpoints in ``folder`` (their Fisher files go to ``folder/info``)."""
    out = []
    for e in envs:
        out.append(folder / paths[e].name)
        out[-1].write_bytes(paths[e].read_bytes())
    return out


def test_fisher_merge_counts_and_freezes_only_the_tensors_with_a_fisher(setup, monkeypatch, capsys, tmp_path):
    """The Fisher covers transformer.h only: tensors of the --include set outside it keep model 1's values. The log,
    the merge record and --merge_frozen count only the tensors really merged, and one warning names the others."""
    import json

    from decision_transformer import merge_cli

    root, data, paths = setup
    a, b = copies(paths, tmp_path, "halfcheetah", "walker2d")
    monkeypatch.chdir(tmp_path)
    experiment.main(["--env", "halfcheetah", "--data_path", str(data), *SMALL, "--pretrained_models", str(a), str(b),
                     "--include", "attn", "mlp", "embed", "--copy_model", "--use_fisher", "--merge_frozen",
                     "--f_batch_size", "4", "--f_num_batches", "2", "--max_iters", "1", "--num_steps_per_iter", "2",
                     "--num_eval_episodes", "0"])
    err = capsys.readouterr().err
    assert "merge: fisher of 2 models over 8 of 31 tensors" in err
    assert [line for line in err.splitlines() if "no Fisher" in line] == [
        "warning: 9 tensors of the merged set have no Fisher (it covers transformer.h only) and keep model 1's "
        "values: embed_timestep, embed_return, embed_state, embed_action, embed_ln"]
    assert "merge_frozen: 8 merged parameter tensors frozen" in err
    (rd,) = listed(tmp_path / "checkpoints")
    info = json.loads((rd / "config.json").read_text())["merge_info"]
    assert info["merged_tensors"] == 8 and info["frozen"] == 8
    m0 = load_checkpoint(rd / "model_0.pt")["state_dict"]
    m1 = load_checkpoint(rd / "model_1.pt")["state_dict"]
    src = load_checkpoint(a)["state_dict"]
    assert all(torch.equal(m0[k], src[k]) for k in m0 if "embed" in k)                      # model 1's
    assert all(torch.equal(m0[k], m1[k]) for k in m0 if "attn" in k or "mlp" in k)         # merged: frozen
    assert not torch.equal(m0["embed_state.weight"], m1["embed_state.weight"])             # not merged: trained

    # merge_cli without --include: every tensor is in the set, the blocks' are merged
    merge_cli.main(["--models", str(a), str(b), "--merge_method", "fisher", "--data_path", str(data), "--K", "5",
                    "--f_batch_size", "4", "--f_num_batches", "2", "--out", str(tmp_path / "f.pt")])
    err = capsys.readouterr().err
    assert "merge: fisher of 2 models over 12 of 31 tensors" in err
    assert "warning: 19 tensors of the merged set have no Fisher" in err and "transformer.wte, transformer.wpe" in err
    ck = torch.load(tmp_path / "f.pt", weights_only=True)
    assert ck["config"]["merge_info"]["merged_tensors"] == 12
    assert all(torch.equal(ck["state_dict"][k], src[k]) for k in src if not k.startswith("transformer.h."))


def fisher_file(model_path, edit, f_batch_size=4, f_num_batches=2):
    """Write the Fisher info file of ``model_path`` by hand: random block tensors, changed by ``edit(F)``."""
    sd = load_checkpoint(model_path)["state_dict"]
    g = torch.Generator().manual_seed(0)
    F = {k: torch.rand(v.shape, generator=g) for k, v in sd.items() if k.startswith("transformer.h.")}
    edit(F)
    F["_stats"] = {"sum": sum(float(v.sum()) for v in F.values()), "mean": 0.5}
    path = fisher.fisher_info_path(model_path, f_batch_size, f_num_batches)
    path.parent.mkdir(exist_ok=True)
    torch.save(F, path)
    return path


def test_a_fisher_file_must_fit_its_model(setup, tmp_path, capsys):
    """A Fisher file that lacks some of the model's block tensors, holds tensors the model has not, has another
    shape, or has negative entries is refused with one line naming the file (not merged with)."""
    from conftest import fails
    from decision_transformer import merge_cli
    from decision_transformer.errors import UserError

    root, data, paths = setup
    a, b = copies(paths, tmp_path, "hopper", "halfcheetah")
    fisher_file(a, lambda F: None)
    out = tmp_path / "m.pt"
    argv = ["--models", str(a), str(b), "--include", "attn", "mlp", "--merge_method", "fisher", "--data_path",
            str(data), "--K", "5", "--f_batch_size", "4", "--f_num_batches", "2", "--out", str(out)]

    def drop_mlp(F):
        for k in [k for k in F if ".mlp." in k]:
            del F[k]

    def negative(F):
        F["transformer.h.0.attn.c_attn.weight"][0, 0] = -1.0

    cases = [(drop_mlp, "no Fisher for 4 of the 12 block tensors of"),
             (lambda F: F.update({"transformer.h.1.attn.c_attn.weight": torch.rand(16, 48)}),
              "Fisher tensor transformer.h.1.attn.c_attn.weight is not a block tensor of"),
             (lambda F: F.update({"transformer.h.0.mlp.c_fc.bias": torch.rand(32)}),
              "Fisher tensor transformer.h.0.mlp.c_fc.bias has shape [32], [64] in"),
             (negative, "Fisher tensor transformer.h.0.attn.c_attn.weight has negative entries")]
    for edit, needle in cases:
        path = fisher_file(b, edit)
        msg = fails(merge_cli.main, argv, capsys)
        assert msg.startswith(f"error: {path}: ") and needle in msg, msg
        assert not out.exists()
    with pytest.raises(UserError, match="a diagonal Fisher is >= 0"):
        fisher.save_fisher({"transformer.h.0.w": torch.tensor([1.0, -0.5])}, tmp_path / "neg")


def test_a_nan_fisher_merge_names_the_merge_and_the_floor(setup, tmp_path, monkeypatch, capsys):
    """--fisher_floor 0 (the original's division): an element whose Fisher is zero in every model gives 0/0. The error
    names the merge and --fisher_floor, not model 1's file; nothing is written."""
    from conftest import fails
    from decision_transformer import merge_cli

    root, data, paths = setup
    a, b = copies(paths, tmp_path, "hopper", "halfcheetah")
    for p in (a, b):
        fisher_file(p, lambda F: F["transformer.h.0.mlp.c_fc.bias"].zero_())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    flags = ["--include", "attn", "mlp", "--fisher_floor", "0", "--f_batch_size", "4", "--f_num_batches", "2"]
    msg = fails(experiment.main, ["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models", str(a),
                                  str(b), "--copy_model", "--use_fisher", *flags, "--max_iters", "1",
                                  "--num_steps_per_iter", "0", "--num_eval_episodes", "0"], capsys)
    assert msg.startswith("error: the fisher merge: tensor transformer.h.0.mlp.c_fc.bias contains NaN or inf")
    assert "--fisher_floor 0" in msg and str(a) not in msg
    assert not any(work.iterdir())
    msg = fails(merge_cli.main, ["--models", str(a), str(b), "--merge_method", "fisher", *flags, "--data_path",
                                 str(data), "--out", str(work / "m.pt")], capsys)
    assert msg.startswith("error: the fisher merge: tensor transformer.h.0.mlp.c_fc.bias contains NaN or inf")
    assert "--fisher_floor 0" in msg and msg.endswith(f"{work / 'm.pt'} not written")
    assert not any(work.iterdir())
