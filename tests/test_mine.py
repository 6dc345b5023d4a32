"""The MINE estimator against the analytic mutual information of correlated Gaussians, its corrected gradient and
numerics, and the mutual-information scripts end to end (save_activation -> run_mi_exp -> plots)."""
import math

import numpy as np
import pytest
import torch
from conftest import listed
from test_analysis_support import expect_exit, fake_mine, load_script, tiny_runs  # noqa: F401

from decision_transformer.analysis import mi
from decision_transformer.analysis.mine import (
    Mine,
    _CorrectedLogMeanExp,
    correlated_gaussians,
    estimate_mi,
    gaussian_mi,
    logmeanexp,
)

# 1024 training pairs, 60 passes of 8 minibatches (480 Adam steps) of a 2 x 64 statistics network: ~1 s each.
FAST = {"iters": 60, "batch_size": 128, "hidden": 64, "hidden_layers": 2, "lr": 3e-3}
# Stated tolerance: 0.12 nats (about 12 % of 1 nat), on 4096 held-out pairs. Seeded, so each check is
# deterministic; over seeds 0-2 the errors of this configuration stayed within 0.09 nats.
TOL = 0.12




def test_the_statistics_network_is_built_inside_forked_rng(monkeypatch):
    """Mine seeds torch to build its network inside forked_rng (every GPU's generator too, not only the CPU's)."""
    import contextlib

    from decision_transformer.analysis import mine

    real, entered = mine.forked_rng, []

    @contextlib.contextmanager
    def counting():
        entered.append(1)
        with real():
            yield

    monkeypatch.setattr(mine, "forked_rng", counting)
    state = torch.random.get_rng_state()
    Mine(2, 3, hidden=8, hidden_layers=1, seed=5)
    assert entered == [1]
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("loss,rho,dim", [("mine", 0.8, 2), ("mine_biased", 0.8, 2), ("fdiv", 0.8, 2),
                                          ("mine", 0.9, 1)])
def test_correlated_gaussians(loss, rho, dim):
    """I = -d/2 log(1 - rho²) nats (1.022 for rho 0.8, d 2; 0.830 for rho 0.9, d 1), within TOL on held-out pairs."""
    x, y = correlated_gaussians(1024, dim, rho, seed=0)
    xe, ye = correlated_gaussians(4096, dim, rho, seed=1)
    est = estimate_mi(x, y, loss=loss, seed=0, eval_x=xe, eval_y=ye, **FAST)
    assert est == pytest.approx(gaussian_mi(rho, dim), abs=TOL)


def test_independent():
    x, y = correlated_gaussians(1024, 2, 0.0, seed=0)
    xe, ye = correlated_gaussians(4096, 2, 0.0, seed=1)
    assert abs(estimate_mi(x, y, seed=3, eval_x=xe, eval_y=ye, **FAST)) < TOL


def test_seeded():
    x, y = correlated_gaussians(128, 2, 0.5, seed=0)
    kw = {"iters": 3, "batch_size": 32, "hidden": 16, "seed": 5}
    a = estimate_mi(x, y, **kw)
    assert estimate_mi(x, y, **kw) == a                                        # same seed, same number
    assert estimate_mi(x, y, **{**kw, "seed": 6}) != a


def test_training_pairs_estimate_is_optimistic_but_close():
    """TAKAGI evaluated on the training pairs: with enough pairs the bias is small."""
    x, y = correlated_gaussians(1024, 2, 0.8, seed=0)
    assert estimate_mi(x, y, seed=0, **FAST) == pytest.approx(gaussian_mi(0.8, 2), abs=TOL)


def test_corrected_gradient_and_stability():
    t = torch.tensor([1.0, 2.0, 3.0, 1000.0], dtype=torch.float64, requires_grad=True)
    log_mu = torch.tensor(999.0, dtype=torch.float64)
    out = _CorrectedLogMeanExp.apply(t, log_mu)
    assert torch.isfinite(out) and out.item() == pytest.approx(1000.0 - math.log(4), abs=1e-9)
    out.backward()
    # ∂/∂t_i = e^{t_i} / (n (μ + 1e-6)), evaluated without overflow
    expected = torch.exp(t.detach() - math.log(4) - torch.logaddexp(log_mu, torch.tensor(math.log(1e-6))))
    assert torch.allclose(t.grad, expected) and torch.isfinite(t.grad).all()
    assert logmeanexp(torch.tensor([1e4, 1e4])).item() == pytest.approx(1e4)    # exp-mean-log would overflow


def test_moving_average_and_no_anomaly_detection():
    x, y = correlated_gaussians(64, 1, 0.5, seed=0)
    m = Mine(1, 1, hidden=8, hidden_layers=1, lr=1e-3, seed=0)
    m.fit(x, y, iters=3, batch_size=32)
    assert m.log_mu is not None and torch.isfinite(m.log_mu)
    assert len(m.history) == 6                                                  # 3 passes x 64 // 32 batches
    assert not torch.is_anomaly_enabled()


def test_fewer_samples_than_a_batch_train_on_one_batch_of_all():
    """40 pairs, --batch_size 50: one minibatch of 40 per pass (the original took no step), and the network moves."""
    x, y = correlated_gaussians(40, 1, 0.5, seed=0)
    m = Mine(1, 1, hidden=8, hidden_layers=1, lr=1e-3, seed=0)
    before = [p.detach().clone() for p in m.net.parameters()]
    m.fit(x, y, iters=3, batch_size=50)
    assert len(m.history) == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, m.net.parameters()))


def test_divergence_gives_nan():
    x = np.full((8, 1), np.nan, dtype=np.float32)
    assert math.isnan(estimate_mi(x, x, iters=1, batch_size=4, hidden=4))


# ---- the scripts ------------------------------------------------------------------------------------------------

def test_exp_types_use_the_right_pairs(tmp_path, monkeypatch):
    """Which variables each experiment pairs, and --exclude_padding, with a recording stand-in for MINE."""
    B, K, D = 6, 3, 5
    rng = np.random.default_rng(0)
    mask = np.ones((B, K))
    mask[:2, 0] = 0                                                     # two samples padded at t = 0
    data = {"states": rng.standard_normal((B, K, 11)), "actions": rng.standard_normal((B, K, 3)),
            "rtg": rng.standard_normal((B, K + 1, 1)), "timesteps": np.zeros((B, K)), "attention_mask": mask}
    acts = {f"{i}.mlp.dropout": rng.standard_normal((B, 3 * K, D)).astype(np.float32) for i in range(4)}
    from decision_transformer.analysis.common import save_npz

    save_npz(mi.data_file(tmp_path, "hopper", "medium", 666), **data)
    save_npz(mi.activation_file(tmp_path, 40, "gpt2", "hopper", "medium", 666), **acts)
    calls = []

    def fake(x, y, **kw):
        calls.append((x.copy(), y.copy()))
        return float(len(x))

    fake_mine(monkeypatch, fake)
    io = ["-psm", tmp_path, "-pd", tmp_path, "-pa", tmp_path, "--device", "cpu"]
    mi.run_mi(mi.build_mi_parser().parse_args([str(a) for a in io + ["--exclude_padding"]]))
    layers = sorted(int(f.name.split("_")[2]) for f in tmp_path.glob("mi_xy_*.npz"))
    assert layers == [0, 2, 3]                                          # 0, depth // 2, depth - 1
    r = np.load(tmp_path / "mi_xy_2_40_gpt2_hopper_medium_666_nopad.npz")         # tagged: a variant
    assert list(r["position"]) == list(range(3 * K - 1))                # every token but a_K
    assert list(r["x"][:3]) == [4, 4, 4] and list(r["x"][3:]) == [6] * (3 * K - 4)  # padded samples dropped at t=0
    # I(X;T): x_t of each type vs the s_K token (position -2); I(Y;T): a_K vs the token at 3t + i
    first = [c for c in calls if c[0].shape[0] == 4]
    assert np.allclose(first[0][0], data["rtg"][2:, 0]) and np.allclose(first[0][1], acts["0.mlp.dropout"][2:, -2])
    assert np.allclose(first[1][0], data["actions"][2:, -1]) and np.allclose(first[1][1], acts["0.mlp.dropout"][2:, 0])
    calls.clear()
    mi.run_mi(mi.build_mi_parser().parse_args([str(a) for a in io + ["--exp_type", "no_context"]]))
    nc = np.load(tmp_path / "mi_40_gpt2_hopper_medium_666.npz")
    assert sorted(nc.files) == [f"{i}.mlp.dropout" for i in range(4)] + [mi.BATCH_KEY]
    assert nc["0.mlp.dropout"].shape == (2, K) and str(nc[mi.BATCH_KEY]) == mi.batch_digest(data)
    assert np.allclose(calls[1][0], data["states"][:, 1]) and np.allclose(calls[1][1], acts["0.mlp.dropout"][:, 4])
    calls.clear()
    mi.run_mi(mi.build_mi_parser().parse_args([str(a) for a in io + ["--exp_type", "data"]]))
    assert np.load(tmp_path / "mi_data_state_action_hopper_medium_666.npy").shape == (K,)
    assert np.allclose(calls[0][0], data["states"][:, 0]) and np.allclose(calls[0][1], data["actions"][:, 0])
    assert np.allclose(calls[K][0], data["rtg"][:, 0]) and np.allclose(calls[K][1], data["actions"][:, 0])


def test_run_from_the_mine_folder_uses_the_projects_mi_folder(tmp_path, monkeypatch):
    """The seed's `cd mine-pytorch; python run_mi_exp.py --exp_type data`: started in the project's mine/ folder, the
    default -psm/-pd/-pa are the project's analysis/section-52-mutual-information/results."""
    from decision_transformer import paths
    from decision_transformer.analysis.common import save_npz

    project = tmp_path / "project"
    monkeypatch.setattr(paths, "PROJECT_ROOT", project)
    results = project / "analysis" / "section-52-mutual-information" / "results"
    rng = np.random.default_rng(0)
    save_npz(mi.data_file(results, "hopper", "medium", 666), states=rng.standard_normal((6, 2, 11)),
             actions=rng.standard_normal((6, 2, 3)), rtg=rng.standard_normal((6, 3, 1)), attention_mask=np.ones((6, 2)))
    (project / "mine").mkdir()
    monkeypatch.chdir(project / "mine")
    fake_mine(monkeypatch, lambda x, y, **kw: 0.5)
    args = mi.build_mi_parser().parse_args(["--exp_type", "data", "--device", "cpu"])
    assert args.path_to_data == args.path_to_save_mi == "../analysis/section-52-mutual-information/results"
    mi.run_mi(args)
    assert np.load(results / "mi_data_state_action_hopper_medium_666.npy").tolist() == [0.5, 0.5]
    assert not (project / "mine" / "analysis").exists()


def test_scripts_end_to_end(tmp_path, tiny_runs, capsys):  # noqa: F811
    res, figs = tmp_path / "res", tmp_path / "figs"
    save = load_script("analysis/section-52-mutual-information/save_activation.py").main
    run_mi = load_script("mine/run_mi_exp.py").main
    save(["--checkpoint_dir", str(tiny_runs), "--model_name", "gpt2", "igpt", "--K", "3", "--batch_size", "8",
          "--results_dir", str(res)])
    batch = "_bs8_ctx3"                                     # --batch_size 8 --K 3 tag every file of the batch
    a = np.load(res / f"activation_40_igpt_hopper_medium_666{batch}.npz")
    blocks = sorted((k for k in a.files if k != mi.BATCH_KEY), key=lambda k: int(k.split(".")[0]))
    assert blocks == [f"{i}.mlp.dropout" for i in range(4)] and len(a.files) == 5
    assert a["3.mlp.dropout"].shape == (8, 9, 16)
    d = np.load(res / f"data_hopper_medium_666{batch}.npz")
    assert d["rtg"].shape == (8, 4, 1) and d["states"].shape == (8, 3, 11)
    assert str(a[mi.BATCH_KEY]) == mi.batch_digest(d)   # the batch the activations were computed on
    io = ["-psm", res, "-pd", res, "-pa", res, "--iters", 1, "--mine_hidden", 8, "--batch_size", 4, "--device", "cpu",
          "--K", 3, "--data_batch_size", 8]                   # (the batch: save_activation.py's --K, --batch_size)
    for m in ("gpt2", "igpt"):
        for exp in ("normal", "no_context"):
            run_mi([str(x) for x in io + ["--model_name", m, "--exp_type", exp]])
    run_mi([str(x) for x in io + ["--exp_type", "data"]])
    tag = "_h8_it1_mb4" + batch                   # --mine_hidden 8 --iters 1 --batch_size 4 and the batch tag the files
    r = np.load(res / f"mi_xy_0_40_gpt2_hopper_medium_666{tag}.npz")
    assert r["x"].shape == (8,) and np.isfinite(r["x"]).all()
    plot = load_script("analysis/section-52-mutual-information/plot_mutual_information.py").main
    setting = ["--mine_hidden", "8", "--iters", "1", "--batch_size", "4", "--K", "3",
               "--data_batch_size", "8"]                                      # the plots read them given the same
    plot(["--results_dir", str(res), "--figs_dir", str(figs), "--model_name_list", "gpt2", "igpt", "dt", *setting])
    plot(["--results_dir", str(res), "--figs_dir", str(figs), "--exp_type", "no_context", *setting])
    load_script("analysis/section-52-mutual-information/plot_mutual_information_data.py").main(
        ["--results_dir", str(res), "--figs_dir", str(figs), *setting])
    for stem in ("mi_xy_40_gpt2_igpt_hopper_medium_666", "mi_no_context_40_gpt2_igpt_hopper_medium_666",
                 "mi_data_hopper_medium_666"):
        assert (figs / f"{stem}{tag}.png").stat().st_size > 1000 and (figs / f"{stem}{tag}.pdf").is_file()
    msg = expect_exit(capsys, run_mi, io + ["--model_name", "dt"])
    assert f"activation_40_dt_hopper_medium_666{batch}.npz" in msg and "not found" in msg
    assert "--batch_size 8 --K 3" in msg                    # (the hint names the batch's save_activation.py flags)


def test_save_activation_takes_the_originals_two_output_folders(tmp_path, tiny_runs):  # noqa: F811
    """--path_to_save_data / --path_to_save_activation (the original save_activation.py's) split the two kinds of
    file, which run_mi_exp.py's -pd / -pa then read."""
    data, acts = tmp_path / "data", tmp_path / "acts"
    load_script("analysis/section-52-mutual-information/save_activation.py").main(
        ["--path_to_load_model", str(tiny_runs), "--model_name", "gpt2", "--K", "3", "--batch_size", "8",
         "--path_to_save_data", str(data), "--path_to_save_activation", str(acts), "--results_dir",
         str(tmp_path / "unused")])
    assert [p.name for p in listed(data)] == ["data_hopper_medium_666_bs8_ctx3.npz"]
    assert [p.name for p in listed(acts)] == ["activation_40_gpt2_hopper_medium_666_bs8_ctx3.npz"]
    assert not (tmp_path / "unused").exists() or not listed(tmp_path / "unused")
    load_script("mine/run_mi_exp.py").main([str(x) for x in (
        "-psm", tmp_path / "mi", "-pd", data, "-pa", acts, "--iters", 1, "--mine_hidden", 8, "--batch_size", 4,
        "--device", "cpu", "--model_name", "gpt2", "--K", 3, "--data_batch_size", 8)])
    assert (tmp_path / "mi" / "mi_xy_0_40_gpt2_hopper_medium_666_h8_it1_mb4_bs8_ctx3.npz").is_file()  # (tagged)


def test_the_originals_pickled_npy_dicts_are_read_without_running_code(tmp_path, monkeypatch, capsys):
    """Where the .npz is absent, a pickled .npy dict under the originals' name is read (numpy arrays, torch tensors,
    dicts and scalars only); code inside, also inside a tensor's storage bytes, is refused with one line, and
    nothing runs."""
    import os

    from decision_transformer.analysis.common import load_npz
    from decision_transformer.errors import UserError

    rng = np.random.default_rng(0)
    data = {"states": rng.standard_normal((6, 2, 11)), "actions": rng.standard_normal((6, 2, 3)),
            "rtg": rng.standard_normal((6, 3, 1)), "attention_mask": np.ones((6, 2))}
    np.save(mi.data_file(tmp_path, "hopper", "medium", 666).with_suffix(".npy"), data, allow_pickle=True)
    fake_mine(monkeypatch, lambda x, y, **kw: 0.25)
    mi.run_mi(mi.build_mi_parser().parse_args(["-pd", str(tmp_path), "-psm", str(tmp_path), "--exp_type", "data",
                                               "--device", "cpu"]))
    assert np.load(tmp_path / "mi_data_state_action_hopper_medium_666.npy").tolist() == [0.25, 0.25]
    assert "read the original's data_hopper_medium_666.npy" in capsys.readouterr().err

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    np.save(tmp_path / "evil.npy", {"a": Evil()}, allow_pickle=True)
    with pytest.raises(UserError, match="evil.npy: refused to load"):
        load_npz(tmp_path / "evil.npz")
    np.save(tmp_path / "lists.npy", {"a": [1.0, 2.0]}, allow_pickle=True)
    with pytest.raises(UserError, match="lists.npy: entry 'a' is a list, not an array"):
        load_npz(tmp_path / "lists.npz")
    (tmp_path / "cut.npy").write_bytes((tmp_path / "lists.npy").read_bytes()[:150])
    with pytest.raises(UserError, match="cut.npy: not a readable pickled .npy dict"):
        load_npz(tmp_path / "cut.npz")
    capsys.readouterr()
    # torch tensors, as the originals' save_activation.py pickled them (CPU copies; bf16 as float32)
    acts = {"layer_0": torch.randn(5, 4), "layer_1": torch.randn(4, 6, dtype=torch.float64)[:, ::2],
            "layer_2": torch.randn(3).bfloat16()}
    np.save(tmp_path / "tensors.npy", acts, allow_pickle=True)
    back = load_npz(tmp_path / "tensors.npz")
    assert set(back) == set(acts) and "read the original's tensors.npy" in capsys.readouterr().err
    for k in ("layer_0", "layer_1"):
        assert back[k].dtype == acts[k].numpy().dtype
        np.testing.assert_array_equal(back[k], acts[k].numpy())
    assert back["layer_2"].dtype == np.float32
    np.testing.assert_array_equal(back["layer_2"], acts["layer_2"].float().numpy())
    # a "storage" whose bytes would run code: torch.load(weights_only=True) refuses it
    import io

    buf = io.BytesIO()
    torch.save(Evil(), buf, _use_new_zipfile_serialization=False)

    class EvilStorage:
        def __reduce__(self):
            from torch.storage import _load_from_bytes

            return _load_from_bytes, (buf.getvalue(),)

    np.save(tmp_path / "evil_storage.npy", {"a": EvilStorage()}, allow_pickle=True)
    refused = r"evil_storage.npy: refused to load \(forbidden global (posix|os).system in a tensor storage\)"
    with pytest.raises(UserError, match=refused):
        load_npz(tmp_path / "evil_storage.npz")
    assert not (tmp_path / "pwned").exists() and "note:" not in capsys.readouterr().err   # no note when it fails
    # views that reach beyond their storage (torch's set_ would grow it, handing back uninitialised memory), or
    # broadcast views a tiny file blows up to terabytes, are refused; conjugate views are resolved
    from collections import OrderedDict

    from torch._utils import _rebuild_tensor_v2

    class View:
        def __init__(self, size, stride, offset=0):
            self.args = (offset, size, stride)

        def __reduce__(self):
            offset, size, stride = self.args
            return _rebuild_tensor_v2, (torch.arange(4.0).storage(), offset, size, stride, False, OrderedDict())

    for name, view, why in (("beyond", View((100,), (1,)), "reaches beyond its storage of 16 bytes"),
                            ("offset", View((2,), (1,), 3), "reaches beyond its storage"),
                            ("negative", View((2,), (-1,), 3), "malformed tensor view"),
                            ("broadcast", View((10 ** 6, 10 ** 6), (0, 0)), "a broadcast tensor of shape")):
        np.save(tmp_path / f"{name}.npy", {"a": view}, allow_pickle=True)
        with pytest.raises(UserError, match=f"{name}.npy: .*{why}"):
            load_npz(tmp_path / f"{name}.npz")
    np.save(tmp_path / "inside.npy", {"a": View((2, 2), (1, 2)), "c": torch.tensor([1 + 2j]).conj()},
            allow_pickle=True)
    back = load_npz(tmp_path / "inside.npz")
    np.testing.assert_array_equal(back["a"], [[0.0, 2.0], [1.0, 3.0]])
    np.testing.assert_array_equal(back["c"], [1 - 2j])
