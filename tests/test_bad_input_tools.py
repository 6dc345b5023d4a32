"""Bad input to the stand-alone tools (merge_cli, precompute_fisher.py, legacy_import, results_table): one error line,
exit 2, and nothing already saved destroyed or replaced by a broken file."""
import hashlib
import os
import types
from pathlib import Path

import pytest
import torch

import precompute_fisher
from decision_transformer import fisher, legacy_import, merge_cli, results_table
from conftest import fails, write_source_models
from test_legacy_import import LDecisionTransformer, LMultiDecisionTransformer, save_original


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Hopper and halfcheetah datasets and one tiny checkpoint per env (stored config, shared initialisation)."""
    return write_source_models(tmp_path_factory.mktemp("bad_input"), ("hopper", "halfcheetah"), n=200, max_ep_len=40,
                               id_base=200000)


def snapshot(folder) -> dict:
    """{relative path: sha256} of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- Fisher cache ----------------------------------------------------------------------------------------------------

def test_bad_K_never_poisons_the_fisher_cache(tiny, capsys):
    root, data, paths = tiny
    h, c = str(paths["hopper"]), str(paths["halfcheetah"])
    info_dir = paths["hopper"].parent / "info"
    fisher_args = ["--include", "attn", "mlp", "--merge_method", "fisher", "--data_path", str(data),
                   "--f_batch_size", "4", "--f_num_batches", "2", "--out", str(root / "m.pt")]
    for bad in (["--K", "0"], ["--K", "-3"], ["--f_batch_size", "0"], ["--f_num_batches", "-1"]):
        msg = fails(merge_cli.main, ["--models", h, c, *fisher_args, *bad], capsys)
        assert f"{bad[0]} must be >= 1" in msg
    assert not info_dir.exists() and not (root / "m.pt").exists()

    pre = ["--model", h, "--data_path", str(data), "--f_batch_size", "4", "--f_num_batches", "2", "--device", "cpu"]
    precompute_fisher.main([*pre, "--K", "5"])
    before = snapshot(info_dir)
    assert len(before) == 1
    for bad in (["--K", "0", "--force"], ["--K", "-3"], ["--K", "-3", "--force"], ["--f_batch_size", "0", "--force"],
                ["--K", "5", "--dataset", "foo", "--force"]):
        msg = fails(precompute_fisher.main, [*pre, *bad], capsys)
        assert "must be >= 1" in msg or "unknown dataset 'foo'" in msg
    assert snapshot(info_dir) == before                                    # the valid info file is untouched

    # a cache poisoned before this fix (zero everywhere) is refused, not merged with
    poisoned = paths["halfcheetah"].parent / "info" / (paths["halfcheetah"].name[:-3] + "-bs4-nb2")
    good = fisher.load_fisher(info_dir / next(iter(before)))
    poisoned.parent.mkdir()
    torch.save({k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in good.items()}, poisoned)
    msg = fails(merge_cli.main, ["--models", h, c, *fisher_args, "--K", "5"], capsys)
    assert "the Fisher is zero everywhere" in msg and str(poisoned) in msg and "--force" in msg
    assert not (root / "m.pt").exists()


# ---- merge_cli -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, expect", [
    (["--p", "nan"], "--p must be in [0, 1] (got nan)"),
    (["--p", "2"], "--p must be in [0, 1] (got 2.0)"),
    (["--p", "-0.1"], "--p must be in [0, 1]"),
    (["--merge_method", "task_arithmetic", "--merge_lambda", "nan"], "--merge_lambda must be finite"),
    (["--merge_method", "ties", "--merge_lambda", "inf"], "--merge_lambda must be finite"),
    (["--merge_method", "fisher", "--fisher_floor", "-1"], "--fisher_floor must be finite and >= 0"),
    (["--merge_method", "fisher", "--fisher_floor", "nan"], "--fisher_floor must be finite and >= 0"),
    (["--merge_method", "greedy_soup", "--batch_size", "-1"], "--batch_size must be >= 1"),
    (["--merge_method", "regmean", "--regmean_n_windows", "0"], "--regmean_n_windows must be >= 1"),
    (["--K", "0"], "--K must be >= 1"),
    (["--merge_method", "ties", "--ties_density", "7"], "--ties_density must be a number in (0, 1]"),
    (["--merge_method", "fisher", "--no_trace_norm", "--fisher_norm", "l2"],
     "--no_trace_norm (= --fisher_norm none) contradicts --fisher_norm l2"),
    (["--merge_method", "fisher", "--no_trace_norm", "--fisher_norm", "trace"],       # trace given, not the default
     "--no_trace_norm (= --fisher_norm none) contradicts --fisher_norm trace"),
    (["--merge_method", "regmean", "--regmean_alpha", "nan"], "--regmean_alpha must be a number in [0, 1]"),
    (["--dataset", "foo"], "unknown dataset 'foo'"),
    (["--include", "nomatch"], "--include nomatch matches no tensor"),
    (["--include", "attn", "--exclude", "attn"], "--include attn --exclude attn matches no tensor"),
])
def test_merge_cli_rejects_bad_options(tiny, tmp_path, capsys, extra, expect):
    root, data, paths = tiny
    out = tmp_path / "m.pt"
    argv = ["--models", str(paths["hopper"]), str(paths["halfcheetah"]), "--include", "attn", "mlp",
            "--data_path", str(data), "--K", "5", "--out", str(out), *extra]
    assert expect in fails(merge_cli.main, argv, capsys)
    assert not out.exists()


def test_no_trace_norm_with_an_explicit_trace_norm_is_refused_everywhere(tiny, tmp_path, capsys, monkeypatch):
    """--no_trace_norm --fisher_norm trace was taken as 'none' without a word (trace is the default, so only the
    flags given tell); a recipe's fisher_norm counts as given; either flag alone is fine."""
    import experiment
    import experiment_multi

    root, data, paths = tiny
    monkeypatch.chdir(tmp_path)                                          # a run that went ahead would write here
    expect = "error: --no_trace_norm (= --fisher_norm none) contradicts --fisher_norm trace"
    for main in (experiment.main, experiment_multi.main):
        assert fails(main, ["--no_trace_norm", "--fisher_norm", "trace", "--max_iters", "0"], capsys) == expect
    recipe = tmp_path / "r.yaml"
    recipe.write_text("fisher_norm: trace\n")
    argv = ["--models", str(paths["hopper"]), str(paths["halfcheetah"]), "--out", str(tmp_path / "m.pt")]
    assert fails(merge_cli.main, argv + ["--recipe", str(recipe), "--no_trace_norm"], capsys) == expect
    from decision_transformer.cli import check_trace_norm

    args = types.SimpleNamespace(no_trace_norm=True, fisher_norm="trace")
    check_trace_norm({"no_trace_norm"}, args)                            # the default trace: --no_trace_norm wins
    check_trace_norm({"fisher_norm"}, types.SimpleNamespace(no_trace_norm=False, fisher_norm="trace"))


def test_merge_cli_checks_its_output_path_before_any_fisher(tiny, tmp_path, capsys):
    root, data, paths = tiny
    models = [tmp_path / "h.pt", tmp_path / "c.pt"]
    for m, e in zip(models, ("hopper", "halfcheetah")):
        m.write_bytes(paths[e].read_bytes())
    (tmp_path / "afile").write_bytes(b"x")
    msg = fails(merge_cli.main, ["--models", *map(str, models), "--merge_method", "fisher", "--include", "attn",
                                 "--data_path", str(data), "--K", "5", "--f_num_batches", "1",
                                 "--out", str(tmp_path / "afile" / "m.pt")], capsys)
    assert msg == f"error: --out {tmp_path / 'afile' / 'm.pt'}: {tmp_path / 'afile'} is a file, not a folder"
    assert not (tmp_path / "info").exists()                      # no Fisher was computed (and cached) first


def test_merge_cli_replaces_an_existing_out_file_only_with_force(tiny, tmp_path, capsys):
    """An --out that exists (another env's trained model, an earlier merge) used to be replaced without a word."""
    root, data, paths = tiny
    out = tmp_path / "walker.pt"
    out.write_bytes(b"a trained walker2d model")
    merge = ["--models", str(paths["hopper"]), str(paths["halfcheetah"]), "--include", "attn", "--out", str(out)]
    msg = fails(merge_cli.main, merge, capsys)
    assert msg == (f"error: --out {out} exists (a trained model or an earlier merge); name another file, or pass "
                   f"--force to replace it")
    assert out.read_bytes() == b"a trained walker2d model"
    merge_cli.main([*merge, "--force"])
    assert torch.load(out, weights_only=True)["config"]["merge_info"]["include"] == ["attn"]


def test_merge_cli_never_writes_a_non_finite_merge_or_over_an_input(tiny, tmp_path, capsys):
    root, data, paths = tiny
    sd = torch.load(paths["hopper"], weights_only=True)
    sd["state_dict"]["transformer.h.0.attn.c_attn.weight"][0, 0] = float("nan")
    nan_model = tmp_path / "nan.pt"
    torch.save(sd, nan_model)
    out = tmp_path / "m.pt"
    out.write_bytes(b"an earlier merge")
    msg = fails(merge_cli.main, ["--models", str(nan_model), str(paths["halfcheetah"]), "--include", "attn", "mlp",
                                 "--out", str(out), "--force"], capsys)
    # (refused as an input, before any merge is computed, naming the damaged file)
    assert msg == f"error: {nan_model}: tensor transformer.h.0.attn.c_attn.weight contains NaN or inf"
    assert out.read_bytes() == b"an earlier merge"
    # --out naming an input model would replace it
    before = snapshot(root / "models")
    msg = fails(merge_cli.main, ["--models", str(paths["hopper"]), str(paths["halfcheetah"]), "--include", "attn",
                                 "--out", str(paths["halfcheetah"])], capsys)
    assert "is the input model" in msg
    assert snapshot(root / "models") == before


def test_merge_cli_bad_recipes(tiny, tmp_path, capsys):
    root, data, paths = tiny
    binary = tmp_path / "recipe.pt"
    binary.write_bytes(bytes(range(256)) * 4)
    assert "not a text file" in fails(merge_cli.main, ["--recipe", str(binary)], capsys)
    assert "a directory, not a recipe file" in fails(merge_cli.main, ["--recipe", str(tmp_path)], capsys)
    models = f"models: [{paths['hopper']}, {paths['halfcheetah']}]\nout: {tmp_path / 'm.pt'}\n"
    for body, expect in (("p: [1, 2]", "p must be a single value"), ("K: 2.5", "K must be int, got 2.5"),
                         ("p: .nan", "--p must be in [0, 1] (got nan)"), ("spec_info: 3", "must be true or false"),
                         ("merge_method: foo", "merge_method 'foo' is not one of"),
                         ("include: {a: 1}", "include must be a name or a list of names")):
        r = tmp_path / "r.yaml"
        r.write_text(models + body + "\n")
        assert expect in fails(merge_cli.main, ["--recipe", str(r)], capsys)
    assert not (tmp_path / "m.pt").exists()


# ---- legacy_import ---------------------------------------------------------------------------------------------------

def test_legacy_import_never_overwrites_its_input(tmp_path, capsys):
    d = tmp_path / "leg" / "models" / "hopper"
    d.mkdir(parents=True)
    orig = d / "dt_gym-experiment-hopper-medium-706057_best.pt"
    save_original(LDecisionTransformer(), orig)
    os.link(orig, tmp_path / "alias.pt")
    before = snapshot(tmp_path)
    for argv in ([str(orig), "--out_dir", str(d)], [str(orig), "--out_dir", str(d.parent / ".." / "models" / "hopper")],
                 [str(orig), "--out", str(orig)], [str(orig), "--out", str(tmp_path / "alias.pt")]):
        msg = fails(legacy_import.main, argv, capsys)
        assert "converting would overwrite the original" in msg
    assert snapshot(tmp_path) == before
    # two inputs that would land on one output file
    other = tmp_path / "other"
    other.mkdir()
    save_original(LDecisionTransformer(), other / orig.name)
    before = snapshot(tmp_path)
    msg = fails(legacy_import.main, [str(orig), str(other / orig.name), "--out_dir", str(tmp_path / "conv")], capsys)
    assert "would both be written to" in msg
    assert snapshot(tmp_path) == before and not (tmp_path / "conv").exists()


def test_legacy_import_replaces_an_existing_output_only_with_force(tmp_path, capsys):
    """The README's TAKAGI conversion targets run folders named as experiment.py's own: converting into a folder whose
    model_1.pt is a trained run's replaced it without a word. An output that exists is refused (one line, nothing
    written) unless --force."""
    src = tmp_path / "orig" / "dt_gym-experiment-hopper-medium-706057_best.pt"
    src.parent.mkdir()
    save_original(LDecisionTransformer(), src)
    run = tmp_path / "run"
    run.mkdir()
    (run / src.name).write_bytes(b"a trained run's checkpoint")
    before = snapshot(tmp_path)
    msg = fails(legacy_import.main, [str(src), "--out_dir", str(run)], capsys)
    assert msg == (f"error: {run / src.name} exists: converting would replace it; choose another --out / --out_dir, "
                   f"or --force to replace")
    assert snapshot(tmp_path) == before
    legacy_import.main([str(src), "--out_dir", str(run), "--force"])
    assert torch.load(run / src.name, weights_only=True)["config"]["legacy_class"]


def test_legacy_import_validates_env_and_dataset(tmp_path, capsys):
    src = tmp_path / "legacy.pt"
    save_original(LDecisionTransformer(), src)                      # hopper dims 11/3
    multi = tmp_path / "multi.pt"
    save_original(LMultiDecisionTransformer(), multi)
    out = tmp_path / "conv.pt"
    assert "unknown env 'foo'" in fails(legacy_import.main, [str(src), "--out", str(out), "--env", "foo"], capsys)
    assert "unknown dataset 'bar'" in fails(legacy_import.main, [str(src), "--out", str(out), "--dataset", "bar"],
                                            capsys)
    msg = fails(legacy_import.main, [str(src), "--out", str(out), "--env", "walker2d"], capsys)
    assert "state/action dims 11/3, --env walker2d needs 17/6" in msg
    msg = fails(legacy_import.main, [str(multi), "--out", str(out), "--env", "hopper"], capsys)
    assert "a multi-task model; --env applies to single-task models" in msg
    assert not out.exists()
    legacy_import.main([str(src), "--out", str(out), "--env", "hopper", "--dataset", "expert"])
    ck = torch.load(out, weights_only=True)
    assert (ck["config"]["env"], ck["config"]["dataset"], ck["specializations"]) == ("hopper", "expert", ["hopper"])


# ---- results_table ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, expect", [
    (["--num_eval_episodes", "0"], "--num_eval_episodes must be >= 1"),
    (["--num_eval_episodes", "-1"], "--num_eval_episodes must be >= 1"),
    (["--device", "foo"], "unknown --device 'foo'"),
    (["--envs", "hopper", "foo"], "unknown env 'foo'"),
    (["--dataset", "foo"], "unknown dataset 'foo'"),
    (["--env_version", "v9"], "unsupported --env_version 'v9'"),
    (["--seed", "-1"], "--seed must be in [0, 2^32)"),
])
def test_results_table_rejects_bad_options(tiny, tmp_path, capsys, extra, expect):
    root, data, paths = tiny
    out = tmp_path / "table"
    argv = ["--row", f"h={paths['hopper']}", "--data_path", str(data), "--out", str(out), *extra]
    assert expect in fails(results_table.main, argv, capsys)
    assert not list(tmp_path.iterdir())


# ---- output places with a file in the way: refused before the work that fills them ---------------------------------

def _no_work(monkeypatch, *targets):
    """Replace each ``module.function`` of ``targets`` (the tools' expensive steps) by one that fails the test."""
    import importlib

    for t in targets:
        module, name = t.rsplit(".", 1)
        monkeypatch.setattr(importlib.import_module(module), name,
                            lambda *a, _t=t, **k: pytest.fail(f"{_t} ran before the refusal"))


def test_precompute_fisher_refuses_an_info_place_taken_by_a_file_before_estimating(tiny, tmp_path, monkeypatch,
                                                                                   capsys):
    import shutil

    root, data, paths = tiny
    model = tmp_path / "models" / "hopper" / paths["hopper"].name
    model.parent.mkdir(parents=True)
    shutil.copy(paths["hopper"], model)
    (model.parent / "info").write_text("not a folder\n")
    _no_work(monkeypatch, "decision_transformer.data.load_dataset", "decision_transformer.fisher.compute_fisher")
    before = snapshot(tmp_path)
    msg = fails(precompute_fisher.main, ["--model", model, "--data_path", data], capsys)
    info = model.parent / "info"
    assert msg == f"error: precompute_fisher.py writes to {info}/, but {info} is a file"
    assert snapshot(tmp_path) == before


def test_legacy_import_refuses_a_folder_in_a_later_outputs_place_before_writing_any(tmp_path, capsys):
    srcs = [tmp_path / "leg" / f"model_{i}.pt" for i in range(2)]
    srcs[0].parent.mkdir()
    for s in srcs:
        save_original(LDecisionTransformer(), s)
    (tmp_path / "out" / "model_1.pt").mkdir(parents=True)
    msg = fails(legacy_import.main, [*srcs, "--env", "hopper", "--out_dir", tmp_path / "out", "--force"], capsys)
    assert msg == f"error: cannot write {tmp_path / 'out' / 'model_1.pt'}: it is a folder"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model_1.pt"]


@pytest.mark.parametrize("script, argv, work", [
    ("data/create_state_stats.py", ["--data_path", "{data}", "--out", "{file}/s.pkl"],
     ["decision_transformer.data.load_dataset"]),
    ("data/generate_datasets.py", ["--env", "hopper", "--dataset", "random", "--data_path", "{file}",
                                   "--num_transitions", "100"], ["decision_transformer.generation.generate_flat"]),
    ("data/reacher2d_scripted_data.py", ["--data_path", "{file}/d", "--episodes", "2"],
     ["decision_transformer.reacher2d.scripted_trajectories"]),
    ("data/minari_datasets.py", ["import", "mujoco/hopper/medium-v0", "--dataset", "medium", "--data_path", "{file}"],
     ["decision_transformer.minari_io.load_minari_trajectories"]),
])
def test_dataset_tools_refuse_a_data_place_under_a_file_before_the_work(tiny, tmp_path, monkeypatch, capsys, script,
                                                                         argv, work):
    from conftest import load_script

    _no_work(monkeypatch, *work)
    (tmp_path / "afile").write_text("not a folder\n")
    monkeypatch.chdir(tmp_path)
    names = {"data": tiny[1], "file": tmp_path / "afile"}
    msg = fails(load_script(script).main, [a.format(**names) for a in argv], capsys)
    assert msg.endswith(f"but {tmp_path / 'afile'} is a file"), msg
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_merge_cli_refuses_a_missing_merge_base(tiny, tmp_path, capsys):
    """experiment.py refuses it; merge_cli merged without it (a mean does not use the base) and recorded the path."""
    root, data, paths = tiny
    for base, why in ((tmp_path / "nope.pt", "model file not found"), (tmp_path, "is a folder, not a model file")):
        msg = fails(merge_cli.main, ["--models", paths["hopper"], paths["halfcheetah"], "--include", "attn", "mlp",
                                     "--merge_base", base, "--out", tmp_path / "m.pt"], capsys)
        assert msg == f"error: {base}: {why}"
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_merge_cli_finds_model_2s_missing_dataset_before_model_1s_fisher_or_grams(tiny, tmp_path, monkeypatch,
                                                                                  capsys, method):
    import shutil

    from decision_transformer import merge_setup

    root, data, paths = tiny
    only_hopper = tmp_path / "data"
    only_hopper.mkdir()
    shutil.copy(data / "hopper-medium-v2.pkl", only_hopper)
    models = []
    for env in ("hopper", "halfcheetah"):
        (tmp_path / env).mkdir()
        models.append(Path(shutil.copy(paths[env], tmp_path / env)))
    for name in ("compute_fisher", "gram_matrices"):
        mod = fisher if name == "compute_fisher" else merge_setup
        monkeypatch.setattr(mod, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran before the refusal"))
    msg = fails(merge_cli.main, ["--models", *models, "--include", "attn", "mlp", "--merge_method", method,
                                 "--data_path", only_hopper, "--out", tmp_path / "m.pt"], capsys)
    assert msg.startswith(f"error: dataset not found: {only_hopper / 'halfcheetah-medium-v2.pkl'}"), msg
    assert not (tmp_path / "hopper" / "info").exists() and not (tmp_path / "m.pt").exists()


def test_a_folder_given_as_a_model_file_is_called_a_folder(tmp_path, capsys):
    msg = fails(precompute_fisher.main, ["--model", tmp_path], capsys)
    assert msg == f"error: {tmp_path}: is a folder, not a model file"
    with pytest.raises(legacy_import.UserError, match="is a folder, not a model file"):
        legacy_import.unpickle_legacy(tmp_path)
    # a run folder: its newest model_{i}.pt is named (by number: model_10 after model_9)
    run = tmp_path / "dt_medium_hopper_666"
    run.mkdir()
    for i in (0, 9, 10):
        (run / f"model_{i}.pt").write_bytes(b"x")
    (run / "model_best.pt").write_bytes(b"x")
    hint = f"is a folder, not a model file (a run folder: name one of its model_{{i}}.pt, e.g. {run / 'model_10.pt'})"
    assert fails(precompute_fisher.main, ["--model", run], capsys) == f"error: {run}: {hint}"
    import experiment

    msg = fails(experiment.main, ["--pretrained_models", run, "--data_path", tmp_path], capsys)
    assert msg == f"error: {run}: {hint}"
    assert fails(experiment.main, ["--load_checkpoint", run, "--data_path", tmp_path], capsys) == \
        f"error: {run}: {hint.replace('model file', 'checkpoint')}"
