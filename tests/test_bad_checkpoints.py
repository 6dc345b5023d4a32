"""Damaged or mismatched checkpoints: weights that do not fit the env the file records or its path names, a config that
is not a dict, an original pickle with NaN weights, stored state statistics that cannot normalise the env's states.
Each is refused where it is read, with one ``error:`` line naming the file, never a traceback later."""
import collections

import pytest
import torch

import precompute_fisher
from decision_transformer import legacy_import, merge_cli, results_table
from decision_transformer.checkpoint import atomic_save, make_checkpoint
from decision_transformer.errors import UserError
from decision_transformer.legacy_import import import_legacy, load_model_file
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig
from decision_transformer.models.multi_decision_transformer import MODEL_CLASS, MultiDecisionTransformer, MultiDTConfig
from test_bad_input_tools import fails
from test_legacy_import import LDecisionTransformer, save_original

BB = BackboneConfig(n_embd=16, n_layer=1)


def hopper_ckpt(**config) -> dict:
    """A tiny hopper DT (state/action dims 11/3) as our checkpoint, with stored statistics and ``config`` added."""
    cfg = DTConfig(11, 3, max_length=5, backbone=BB)
    return make_checkpoint(DecisionTransformer(cfg, seed=0).state_dict(), {"model_config": cfg.to_dict(), **config},
                           state_mean=torch.zeros(11), state_std=torch.ones(11))


def saved(obj, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(obj, path)
    return path


# ---- weights that do not fit the env ---------------------------------------------------------------------------------

def test_weights_of_another_env_are_refused_at_load(tmp_path, capsys):
    recorded = saved(hopper_ckpt(env="walker2d", dataset="medium"), tmp_path / "recorded.pt")
    by_path = saved(hopper_ckpt(dataset="medium"),
                    tmp_path / "models" / "walker2d" / "dt_gym-experiment-walker2d-medium-100001_best.pt")
    bare = saved(hopper_ckpt()["state_dict"],
                 tmp_path / "models" / "walker2d" / "dt_gym-experiment-walker2d-medium-100002_best.pt")
    for path, by in ((recorded, "its recorded env"), (by_path, "the path's env"), (bare, "the path's env")):
        with pytest.raises(UserError, match=f"{path.name}: state/action dims 11/3, {by} walker2d needs 17/6"):
            load_model_file(path)
    # the tools that used to fail with a shape error deep inside the model
    good = saved(hopper_ckpt(env="hopper", dataset="medium"), tmp_path / "good.pt")
    expect = f"error: {recorded}: state/action dims 11/3, its recorded env walker2d needs 17/6"
    assert fails(precompute_fisher.main, ["--model", str(recorded), "--device", "cpu", "--data_path", str(tmp_path),
                                          "--f_batch_size", "2", "--f_num_batches", "1", "--K", "5"], capsys) == expect
    assert fails(merge_cli.main, ["--models", str(good), str(recorded), "--merge_method", "fisher", "--data_path",
                                  str(tmp_path), "--out", str(tmp_path / "m.pt")], capsys) == expect
    assert fails(results_table.main, ["--row", f"a={by_path}", "--num_eval_episodes", "1"], capsys) == \
        f"error: {by_path}: state/action dims 11/3, the path's env walker2d needs 17/6"
    assert not (tmp_path / "m.pt").exists()
    assert load_model_file(good).env == "hopper"


def test_multi_task_slots_must_fit_their_envs(tmp_path):
    m = MultiDecisionTransformer(MultiDTConfig(envs=["hopper", "halfcheetah"], max_length=5, backbone=BB), seed=0)
    mc = m.config.to_dict()
    ok = saved(make_checkpoint(m.state_dict(), {"model_class": MODEL_CLASS, "model_config": mc}), tmp_path / "ok.pt")
    assert load_model_file(ok).is_multi
    swapped = saved(make_checkpoint(m.state_dict(), {"model_class": MODEL_CLASS, "model_config": {
        **mc, "envs": ["halfcheetah", "hopper"]}}), tmp_path / "swapped.pt")
    with pytest.raises(UserError, match=r"swapped\.pt \(per-env layers 0\): state/action dims 11/3, its env "
                                        r"halfcheetah needs 17/6"):
        load_model_file(swapped)


def test_original_pickle_under_another_envs_folder(tmp_path, capsys):
    d = tmp_path / "models" / "walker2d"
    d.mkdir(parents=True)
    src = d / "dt_gym-experiment-walker2d-medium-100003_best.pt"
    save_original(LDecisionTransformer(), src)                     # hopper dims 11/3
    with pytest.raises(UserError, match="state/action dims 11/3, the path's env walker2d needs 17/6"):
        import_legacy(src)
    with pytest.raises(UserError, match="the path's env walker2d needs 17/6"):
        load_model_file(src)
    out = tmp_path / "conv.pt"
    assert fails(legacy_import.main, [str(src), "--out", str(out)], capsys) == \
        f"error: {src}: state/action dims 11/3, the path's env walker2d needs 17/6"
    assert not out.exists()
    legacy_import.main([str(src), "--out", str(out), "--env", "hopper"])      # --env says what the folder got wrong
    assert torch.load(out, weights_only=True)["config"]["env"] == "hopper"


# ---- damaged configs and weights -------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, expect", [
    ("oops", "its config is a str, not a dict"),
    ({"env": "hopper", "model_config": [1, 2]}, "its config['model_config'] is a list, not a dict"),
])
def test_a_config_that_is_not_a_dict(tmp_path, capsys, config, expect):
    ckpt = hopper_ckpt()
    ckpt["config"] = config
    path = saved(ckpt, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"bad\.pt: damaged checkpoint: " + expect.replace("[", r"\[")):
        load_model_file(path)
    assert fails(results_table.main, ["--row", f"a={path}", "--num_eval_episodes", "1"], capsys).endswith(expect)


def test_legacy_import_refuses_non_finite_weights(tmp_path, capsys):
    orig = LDecisionTransformer()
    with torch.no_grad():
        orig.transformer.h[1].mlp.c_fc.weight[0, 0] = float("inf")
    src = tmp_path / "nan.pt"
    save_original(orig, src)
    out = tmp_path / "conv.pt"
    assert fails(legacy_import.main, [str(src), "--out", str(out)], capsys) == \
        f"error: {src}: tensor transformer.h.1.mlp.c_fc.weight contains NaN or inf"
    assert not out.exists()


@pytest.mark.parametrize("state_dict, expect", [
    ([torch.zeros(1)], "its state_dict is a list, not a dict"),
    ({0: torch.zeros(1)}, "state_dict key 0 is an int, not a name"),
    ({"w": torch.zeros(1), ("a", 1): torch.zeros(1)}, "state_dict key ('a', 1) is a tuple, not a name"),
    ({"w": "zeros"}, "state_dict entry 'w' is a str, not a tensor"),
    ({"w": collections.OrderedDict()}, "state_dict entry 'w' is an OrderedDict, not a tensor"),   # nested dict
], ids=["list", "int_key", "tuple_key", "str_value", "nested"])
def test_a_state_dict_that_does_not_map_names_to_tensors(tmp_path, state_dict, expect):
    """A bad key is named as a key (its value may well be a tensor), a bad value as a value."""
    from decision_transformer.checkpoint import load_checkpoint

    path = tmp_path / "bad.pt"
    torch.save({"state_dict": state_dict}, path)
    # (load_model_file reads a state_dict that is not a dict as no checkpoint at all)
    for load in (load_checkpoint,) if isinstance(state_dict, list) else (load_checkpoint, load_model_file):
        with pytest.raises(UserError) as e:
            load(path)
        assert str(e.value) == f"{path}: damaged checkpoint: {expect}"


def test_a_damaged_zip_says_what_torch_found_without_its_advice(tmp_path):
    """torch's zip reader adds sentences of advice after its finding ("This is an internal miniz error. If you..."):
    only the finding is kept."""
    from decision_transformer.checkpoint import load_checkpoint

    path = tmp_path / "b.pt"
    path.write_bytes(b"PK\x03\x04" + bytes(100) + b"PK\x05\x06" + bytes(6) + b"\x01\x00" + bytes(10))   # 0 of 1 entry
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: not a loadable checkpoint (torch.load failed: RuntimeError: ") and \
        msg.endswith("unsupported multidisk archive)"), msg
    assert "internal miniz error" not in msg and "If you" not in msg


@pytest.mark.parametrize("keep", [4, 100, 5000, -30])
def test_a_checkpoint_cut_short_is_said_to_be(tmp_path, keep):
    """A torch.save file cut short (a copy or save that did not finish) read 'torch.load failed: OSError: [Errno 22]
    Invalid argument' or 'failed finding central directory'; now it is named as cut short, by every loader."""
    from decision_transformer.checkpoint import atomic_save, load_checkpoint, make_checkpoint

    whole = tmp_path / "whole.pt"
    atomic_save(make_checkpoint({"w": torch.ones(2000)}, {"env": "hopper"}), whole)
    path = tmp_path / "train_state.pt"
    path.write_bytes(whole.read_bytes()[:keep])
    for load in (load_checkpoint, load_model_file):
        with pytest.raises(UserError) as e:
            load(path)
        assert str(e.value) == (f"{path}: cut short: it begins as a zip archive (torch.save's format) but its end is "
                                f"missing, as a save or copy that did not finish leaves a file (restore it or delete "
                                f"it)")

# ---- stored state statistics (results_table) -------------------------------------------------------------------------

@pytest.mark.parametrize("mean, std, expect", [
    ("abc", torch.ones(11), "stored state_mean is a str, not numbers"),
    (torch.zeros(5), torch.ones(5), "stored state_mean has shape (5,), hopper states have 11 dims"),
    (torch.zeros(1, 11), torch.ones(1, 11), "stored state_mean has shape (1, 11), hopper states have 11 dims"),
    (torch.full((11,), float("nan")), torch.ones(11), "stored state_mean contains NaN or inf"),
    (torch.zeros(11), torch.full((11,), float("inf")), "stored state_std contains NaN or inf"),
    (torch.zeros(11), torch.zeros(11), "stored state_std has values <= 0 (down to 0)"),
    (torch.zeros(11), -torch.ones(11), "stored state_std has values <= 0 (down to -1)"),
    # a subnormal std passed the check and made training diverge; a complex mean lost its imaginary parts silently
    (torch.zeros(11), torch.full((11,), 1e-45), "stored state_std has values below 1e-06 (down to 1.4e-45): every "
                                                "std is the data's std + 1e-06, and states divided by less blow up"),
    (torch.zeros(11, dtype=torch.complex64) + 1j, torch.ones(11), "stored state_mean holds complex numbers, not real "
                                                                   "ones"),
    (torch.zeros(11), None, "no stored state_std"),
])
def test_results_table_checks_stored_statistics(tmp_path, capsys, mean, std, expect):
    ckpt = hopper_ckpt(env="hopper", dataset="medium")
    ckpt["state_mean"] = mean
    if std is None:
        del ckpt["state_std"]
    else:
        ckpt["state_std"] = std
    path = saved(ckpt, tmp_path / "stats.pt")
    assert fails(results_table.main, ["--row", f"a={path}", "--num_eval_episodes", "1"], capsys) == \
        f"error: {path}: {expect}"


def test_results_table_checks_multi_task_statistics(tmp_path, capsys):
    m = MultiDecisionTransformer(MultiDTConfig(envs=["hopper", "halfcheetah"], max_length=5, backbone=BB), seed=0)
    cfg = {"model_class": MODEL_CLASS, "model_config": m.config.to_dict()}
    good = {"state_mean": torch.zeros(11), "state_std": torch.ones(11)}
    for stats, expect in (({"hopper": good, "halfcheetah": good}, "state_stats['halfcheetah']: stored state_mean has "
                                                                    "shape (11,), halfcheetah states have 17 dims"),
                          ({"hopper": good, "halfcheetah": "x"}, "state_stats['halfcheetah']: a str, not a dict with "
                                                                 "state_mean and state_std"),
                          ({"hopper": {"state_mean": torch.zeros(11)}}, "state_stats['hopper']: no stored state_std"),
                          ([good], "its state_stats is a list, not a dict by env")):
        path = saved(make_checkpoint(m.state_dict(), cfg, state_stats=stats), tmp_path / "multi.pt")
        assert fails(results_table.main, ["--row", f"a={path}", "--num_eval_episodes", "1"], capsys) == \
            f"error: {path}: {expect}"


def test_multi_task_state_statistics_table_is_checked(tmp_path):
    """experiment_multi's --norm_env statistics (data/state_stats.pkl) are checked as stored ones are."""
    import pickle
    from argparse import Namespace

    import numpy as np

    from decision_transformer.multi_run import resolve_state_stats

    good = {"state_mean": np.zeros(11, np.float32), "state_std": np.ones(11, np.float32)}
    args = Namespace(norm_env="expert", dataset="medium", data_path=str(tmp_path))
    for bad, msg in (({**good, "state_std": np.full(11, np.nan)}, "hopper-expert-v2: stored state_std contains NaN"),
                     ({**good, "state_mean": np.zeros(5)}, "hopper-expert-v2: stored state_mean has shape \\(5,\\)"),
                     ({"state_mean": good["state_mean"]}, "hopper-expert-v2: expected a dict with state_mean and")):
        (tmp_path / "state_stats.pkl").write_bytes(pickle.dumps({"hopper-expert-v2": bad}))
        with pytest.raises(UserError, match=msg):
            resolve_state_stats(args, ["hopper"], None)
    (tmp_path / "state_stats.pkl").write_bytes(pickle.dumps({"hopper-expert-v2": good}))
    stats, _ = resolve_state_stats(args, ["hopper"], None)
    assert stats["hopper"][1].tolist() == [1.0] * 11


def test_a_plain_pickle_gives_one_line_without_torchs_warning(tmp_path, capsys):
    """A file of pickle protocol 4 (not torch's own format): torch warns that its reader may not support the
    protocol, then fails; the script prints only its own line naming the file."""
    import warnings

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        msg = fails(precompute_fisher.main, ["--model", str(bad), "--device", "cpu"], capsys)
    assert f"{bad}: not a loadable checkpoint (Unsupported operand 103)" in msg
    assert [str(w.message) for w in caught if "pickle protocol" in str(w.message)] == []


@pytest.mark.parametrize("change, expect", [
    (lambda mc: mc.update(backbone="gpt2"), "invalid model_config ('str' object has no attribute 'items')"),
    (lambda mc: mc.update(max_length=True), "invalid model_config (max_length must be a positive integer, got True)"),
    (lambda mc: mc.update(max_ep_len=10 ** 12), "its config records max_ep_len 1000000000000, but "
                                                "embed_timestep.weight has 1000 rows"),
    (lambda mc: mc["backbone"].update(n_embd=10 ** 9), "its config records n_embd 1000000000, but "
                                                       "transformer.h.0.ln_1.weight has 16 rows"),
], ids=["backbone_str", "K_bool", "huge_max_ep_len", "huge_width"])
def test_a_recorded_config_that_cannot_describe_its_weights_is_one_line(tmp_path, capsys, change, expect):
    """A backbone that is no dict (a traceback), a context length of True (taken as K=1), and sizes far beyond the
    tables of the weights (the model was built, allocating terabytes, before its weights were compared) are refused
    naming the file, before any model is built."""
    from decision_transformer.legacy_import import build_model

    ckpt = hopper_ckpt()
    change(ckpt["config"]["model_config"])
    path = saved(ckpt, tmp_path / "bad.pt")
    with pytest.raises(UserError) as e:
        build_model(load_model_file(path))
    assert str(e.value).startswith(f"{path}: ") and expect in str(e.value)


@pytest.mark.parametrize("kind", ["checkpoint", "bare", "original"])
def test_a_broadcast_view_is_refused_before_it_is_unfolded(tmp_path, capsys, kind):
    """A tensor saved as a stride-0 view of a few bytes (a small file that unfolds into gigabytes when copied or
    checked) is one line naming the file and tensor, in our checkpoints, bare state dicts and the originals' pickles."""
    path = tmp_path / "models" / "hopper" / "dt_gym-experiment-hopper-medium-1.pt"
    path.parent.mkdir(parents=True)
    if kind == "original":
        orig = LDecisionTransformer()
        orig.embed_timestep.weight = torch.nn.Parameter(torch.zeros(1).expand(1000, 16), requires_grad=False)
        save_original(orig, path)
    else:
        ckpt = hopper_ckpt()
        ckpt["state_dict"]["embed_timestep.weight"] = torch.zeros(1).expand(1000, 16)
        saved(ckpt if kind == "checkpoint" else ckpt["state_dict"], path)
    with pytest.raises(UserError) as e:
        load_model_file(path)
    assert str(path) in str(e.value) and "embed_timestep.weight of shape [1000, 16] is a broadcast view of 4 bytes" \
        in str(e.value)
