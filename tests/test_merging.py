"""Merging: merged tensors against explicit formulas on toy state dicts, and experiment.py's merge + finetune runs
(the Merging-DT seed's command as written) on checkpoints trained here with tiny budgets."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, listed

import experiment
from decision_transformer import merging
from decision_transformer.checkpoint import load_checkpoint
from decision_transformer.errors import UserError

ENVS = ("hopper", "halfcheetah", "walker2d")
SMALL = ["--embed_dim", "16", "--n_layer", "1", "--K", "5", "--batch_size", "8", "--warmup_steps", "10"]




# ---- toy state dicts -------------------------------------------------------------------------------------------------

def toy(seed, shape=(3, 4)):
    g = torch.Generator().manual_seed(seed)
    return {"a.attn.w": torch.randn(shape, generator=g), "a.mlp.b": torch.randn(shape[1], generator=g),
            "emb.w": torch.randn(shape, generator=g), "a.attn.mask": torch.tensor([1, 0, 1], dtype=torch.uint8)}


def test_select_keys():
    keys = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.mlp.c_fc.bias",
            "embed_state.weight"]
    assert merging.select_keys(keys, ["attn", "mlp"]) == [keys[0], keys[2]]
    assert merging.select_keys(keys, []) == keys
    assert merging.select_keys(keys, ["attn", "mlp"], ["c_fc"]) == [keys[0]]


def test_mean_two_models_is_lerp_and_rest_from_model_1():
    a, b = toy(0), toy(1)
    b["a.attn.mask"] = torch.tensor([0, 0, 0], dtype=torch.uint8)
    before = {k: v.clone() for k, v in a.items()}
    keys = merging.select_keys(list(a), ["attn", "mlp"])
    out = merging.merge_mean([a, b], keys, p=0.3)
    assert torch.allclose(out["a.attn.w"], 0.7 * a["a.attn.w"] + 0.3 * b["a.attn.w"])
    assert torch.allclose(out["a.mlp.b"], 0.7 * a["a.mlp.b"] + 0.3 * b["a.mlp.b"])
    assert torch.equal(out["emb.w"], a["emb.w"]) and out["emb.w"] is not a["emb.w"]   # outside S: model 1, copied
    assert torch.equal(out["a.attn.mask"], a["a.attn.mask"]) and out["a.attn.mask"].dtype == torch.uint8  # int: copy
    assert all(torch.equal(a[k], before[k]) for k in a)                                 # inputs untouched


def test_mean_many_models_ignores_p():
    sds = [toy(i) for i in range(4)]
    out = merging.merge_mean(sds, ["a.attn.w"], p=0.9)
    assert torch.allclose(out["a.attn.w"], sum(s["a.attn.w"] for s in sds) / 4)


def test_fisher_merge_formula_with_floor():
    a, b = toy(0), toy(1)
    Fa = {"a.attn.w": torch.rand(3, 4), "a.mlp.b": torch.zeros(4), "other": torch.ones(2)}
    Fb = {"a.attn.w": torch.rand(3, 4), "a.mlp.b": torch.zeros(4), "other": torch.ones(2)}
    Fa["a.attn.w"][0, 0] = Fb["a.attn.w"][0, 0] = 0.0
    keys = ["a.attn.w", "a.mlp.b"]
    eps = 1e-3
    out = merging.merge_fisher([a, b], [Fa, Fb], keys, norm="trace", floor=eps)
    # explicit: trace over every tensor of the file, floor = eps * mean normalised element over both models
    fa = {k: Fa[k] / sum(v.sum() for v in Fa.values()) for k in keys}
    fb = {k: Fb[k] / sum(v.sum() for v in Fb.values()) for k in keys}
    fbar = (sum(v.sum() for v in fa.values()) + sum(v.sum() for v in fb.values())) / (2 * (12 + 4))
    for k in keys:
        wa, wb = fa[k] + eps * fbar, fb[k] + eps * fbar
        assert torch.allclose(out[k], (wa * a[k] + wb * b[k]) / (wa + wb), atol=1e-6)
    # zero Fisher everywhere -> the floor makes it a plain average
    assert torch.allclose(out["a.mlp.b"], (a["a.mlp.b"] + b["a.mlp.b"]) / 2)
    # floor 0 reproduces the original's 0/0
    legacy = merging.merge_fisher([a, b], [Fa, Fb], keys, floor=0.0)
    assert torch.isnan(legacy["a.mlp.b"]).all() and torch.isnan(legacy["a.attn.w"][0, 0])
    assert torch.isfinite(legacy["a.attn.w"].flatten()[1:]).all()
    # favour the target: where both are ~0, model 1 wins
    fav = merging.merge_fisher([a, b], [Fa, Fb], keys, floor=eps, favor_target=True)
    assert torch.allclose(fav["a.mlp.b"], a["a.mlp.b"])
    assert torch.allclose(fav["a.attn.w"][0, 0], a["a.attn.w"][0, 0])
    assert torch.equal(out["emb.w"], a["emb.w"])


def test_fisher_norms():
    a, b = toy(0), toy(1)
    Fa = {"a.attn.w": torch.rand(3, 4) + 0.1}
    Fb = {"a.attn.w": 5 * torch.rand(3, 4) + 0.1}
    for norm, f in (("l2", lambda F: F / F.norm()), ("none", lambda F: F)):
        out = merging.merge_fisher([a, b], [Fa, Fb], ["a.attn.w"], norm=norm, floor=0.0)
        wa, wb = f(Fa["a.attn.w"]), f(Fb["a.attn.w"])
        assert torch.allclose(out["a.attn.w"], (wa * a["a.attn.w"] + wb * b["a.attn.w"]) / (wa + wb), atol=1e-6)


def test_task_arithmetic_formula():
    base, sds = toy(9), [toy(i) for i in range(3)]
    out = merging.merge_task_arithmetic(sds, base, ["a.attn.w", "a.mlp.b"], lam=0.8)
    for k in ("a.attn.w", "a.mlp.b"):
        assert torch.allclose(out[k], base[k] + 0.8 * sum(s[k] - base[k] for s in sds), atol=1e-6)
    assert torch.equal(out["emb.w"], sds[0]["emb.w"])
    mean = merging.merge_task_arithmetic(sds, base, ["a.attn.w"], lam=1 / 3)
    assert torch.allclose(mean["a.attn.w"], sum(s["a.attn.w"] for s in sds) / 3, atol=1e-6)


def test_ties_on_toy_task_vectors():
    base = {"w": torch.zeros(6)}
    t1 = torch.tensor([4.0, -1.0, 0.5, 3.0, 0.0, -2.0])
    t2 = torch.tensor([-1.0, -3.0, 0.2, 2.0, 5.0, 1.0])
    t3 = torch.tensor([2.0, 0.1, -0.3, -6.0, 1.0, 1.5])
    out = merging.merge_ties([{"w": t1}, {"w": t2}, {"w": t3}], base, ["w"], density=0.5, lam=1.0)
    # trim to the top 3 magnitudes of each: t1 -> [4, 0, 0, 3, 0, -2], t2 -> [0, -3, 0, 2, 5, 0], t3 -> [2, 0, 0, -6, 0, 1.5]
    # elected sign of the sums [6, -3, 0, -1, 5, -0.5] -> [+, -, 0, -, +, -]
    # disjoint means: [ (4+2)/2, -3, 0, -6, 5, -2 ]
    assert torch.allclose(out["w"], torch.tensor([3.0, -3.0, 0.0, -6.0, 5.0, -2.0]))
    out2 = merging.merge_ties([{"w": t1}, {"w": t2}, {"w": t3}], {"w": torch.ones(6)},
                              ["w"], density=1.0, lam=0.5)
    tau = [t1 - 1, t2 - 1, t3 - 1]
    stack = torch.stack(tau)
    sign = torch.sign(stack.sum(0))
    agree = torch.sign(stack) == sign
    expect = 1 + 0.5 * (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
    assert torch.allclose(out2["w"], expect)


def test_regmean_formula():
    g = torch.Generator().manual_seed(0)
    W = [torch.randn(4, 3, generator=g) for _ in range(2)]          # Conv1D layout [in, out]
    X = [torch.randn(20, 4, generator=g) for _ in range(2)]
    G = [x.T @ x / 20 for x in X]
    alpha = 0.3
    out = merging.merge_regmean([{"l.weight": W[0], "l.bias": torch.ones(3)}, {"l.weight": W[1], "l.bias": torch.zeros(3)}],
                                [{"l": G[0]}, {"l": G[1]}], ["l.weight", "l.bias"], alpha=alpha)
    Gt = [alpha * Gi + (1 - alpha) * torch.diag(torch.diag(Gi)) for Gi in G]
    expect = torch.linalg.inv(Gt[0] + Gt[1]) @ (Gt[0] @ W[0] + Gt[1] @ W[1])
    assert torch.allclose(out["l.weight"], expect, atol=1e-5)
    assert torch.allclose(out["l.bias"], torch.full((3,), 0.5))
    # equal Grams -> the plain mean; nn.Linear layout [out, in] is transposed in and out
    same = merging.merge_regmean([{"l.weight": W[0].T}, {"l.weight": W[1].T}], [{"l": G[0]}, {"l": G[0]}],
                                 ["l.weight"], alpha=alpha, conv1d={"l": False})
    assert torch.allclose(same["l.weight"], (W[0].T + W[1].T) / 2, atol=1e-5)


def test_collect_grams_match_inputs():
    from types import SimpleNamespace

    from decision_transformer.models.gpt2 import Conv1D

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l = Conv1D(2, 3)

        def forward(self, x):
            return self.l(x)

    net = Net()
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1.0, 1, 0, 1], [0, 1, 1, 1]])
    grams = merging.collect_grams(net, ["l.weight"], [SimpleNamespace(x=x, mask=mask)], lambda m, b: m(b.x))
    rows = x.reshape(-1, 3)[mask.reshape(-1) > 0].double()
    assert torch.allclose(grams["l"], rows.T @ rows / rows.shape[0])


def test_greedy_soup_keeps_only_improving_models():
    sds = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}, {"w": torch.tensor([10.0])}]
    # score peaks at w = 2: model 1 (1) and 2 (3) average to 2; adding 10 hurts
    merged, kept = merging.greedy_soup(sds, ["w"], lambda sd: -abs(float(sd["w"]) - 2.0))
    assert sorted(kept) == [0, 1] and torch.allclose(merged["w"], torch.tensor([2.0]))


def test_identity_values():
    sd = {"h.ln_1.weight": torch.randn(3), "h.ln_1.bias": torch.randn(3), "h.attn.c_attn.weight": torch.randn(2)}
    out = merging.identity_values(sd, ["h.ln_1.weight", "h.ln_1.bias"])
    assert torch.equal(out["h.ln_1.weight"], torch.ones(3)) and torch.equal(out["h.ln_1.bias"], torch.zeros(3))
    with pytest.raises(UserError, match="neither a weight nor a bias"):
        merging.identity_values({"x.scale": torch.ones(1)}, ["x.scale"])


# ---- experiment.py merge + finetune ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three single-task models (hopper, halfcheetah, walker2d) trained here with experiment.py, tiny budgets, same
    seed (so their blocks share an initialisation)."""
    from decision_transformer.synthetic import make_dataset

    root = tmp_path_factory.mktemp("merge")
    data = root / "data"
    for i, env in enumerate(ENVS):
        make_dataset(data, env, "medium", 300, seed=i, max_ep_len=50)
    paths = {}
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    try:
        for env in ENVS:
            experiment.main(["--env", env, "--data_path", str(data), *SMALL, "--max_iters", "1",
                             "--num_steps_per_iter", "4", "--num_eval_episodes", "0", "--save_model",
                             "--save_mode", "last", "--outdir", ""])
            (p,) = (root / "models" / env).glob("dt_gym-experiment-*.pt")
            paths[env] = p
    finally:
        mp.undo()
    return root, data, paths


def merge_run_dir(root):
    (d,) = [p for p in (root / "checkpoints").iterdir() if p.name.startswith("dt_medium_hopper_666_K5_")]
    return d


def test_seed_merge_finetune_command(trained, tmp_path):
    """README: merge three models over attn/mlp, freeze the merged tensors, finetune on env 1 — as written, plus tiny
    budgets. The merged tensors are the mean of the three models, stay bit-identical through finetuning, and the
    merged model is evaluated before finetuning."""
    root, data, m = trained
    cmd = [sys.executable, str(ROOT / "experiment.py"), "-w", "--env", "hopper", "--dataset", "medium",
           "--pretrained_models", str(m["hopper"]), str(m["halfcheetah"]), str(m["walker2d"]),
           "--num_eval_episodes=50", "--max_iters=10", "--num_steps_per_iter=10000", "--include", "attn", "mlp",
           "--device=cuda", "--copy_model", "--merge_frozen",
           "--data_path", str(data), "--max_iters", "1", "--num_steps_per_iter", "3", "--num_eval_episodes", "1",
           "--K", "5", "--batch_size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merge: mean of 3 models over 8 of 31 tensors" in proc.stderr
    assert "iter 0 (merged, before finetuning)" in proc.stderr
    rd = merge_run_dir(tmp_path)
    m0 = load_checkpoint(rd / "model_0.pt")["state_dict"]
    m1 = load_checkpoint(rd / "model_1.pt")["state_dict"]
    srcs = [load_checkpoint(m[e])["state_dict"] for e in ENVS]
    merged = [k for k in m0 if ("attn" in k or "mlp" in k)]
    assert len(merged) == 8
    for k in m0:
        if k in merged:
            assert torch.allclose(m0[k], sum(s[k] for s in srcs) / 3, atol=1e-7), k
            assert torch.equal(m0[k], m1[k]), f"{k} changed although --merge_frozen"
        else:
            assert torch.equal(m0[k], srcs[0][k]), k                 # everything else from model 1
    assert not torch.equal(m0["embed_state.weight"], m1["embed_state.weight"])   # the rest is finetuned
    cfg = json.loads((rd / "config.json").read_text())
    info = cfg["merge_info"]
    assert info["method"] == "mean" and info["frozen"] == 8
    assert "evaluation/target_3600_d4rl_score_mean" in info["iteration_0"]
    assert cfg["model_config"]["backbone"]["n_embd"] == 16                      # model 1's architecture
    rows = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]                             # the merge before finetuning first
    assert rows[0]["evaluation/target_3600_return_mean"] == info["iteration_0"]["evaluation/target_3600_return_mean"]
    torch.load(rd / "model_1.pt", weights_only=True)


def test_merge_methods_end_to_end(trained, monkeypatch):
    """TIES relative to the rebuilt shared initialisation, lerp with --p, --flip and --copy_include."""
    root, data, m = trained
    from decision_transformer.models import DecisionTransformer, DTConfig

    base_cfg = load_checkpoint(m["hopper"])["config"]
    base = DecisionTransformer(DTConfig.from_dict(base_cfg["model_config"]), seed=666).state_dict()
    srcs = [load_checkpoint(m[e])["state_dict"] for e in ENVS]
    work = root / "runs_ties"
    work.mkdir()
    monkeypatch.chdir(work)
    experiment.main(["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models",
                     *[str(m[e]) for e in ENVS], "--include", "attn", "mlp", "--copy_model", "--merge_method", "ties",
                     "--ties_density", "0.5", "--max_iters", "1", "--num_steps_per_iter", "0",
                     "--num_eval_episodes", "0"])
    m0 = load_checkpoint(merge_run_dir(work) / "model_0.pt")["state_dict"]
    keys = [k for k in m0 if "attn" in k or "mlp" in k]
    expect = merging.merge_ties(srcs, base, keys, density=0.5, lam=1.0)
    assert all(torch.allclose(m0[k], expect[k], atol=1e-6) for k in keys)

    # two models, lerp p=0.25, --flip: the merged tensors go into model 2 (walker2d; halfcheetah has the same dims),
    # which is the model trained
    work = root / "runs_flip"
    work.mkdir()
    monkeypatch.chdir(work)
    experiment.main(["--env", "walker2d", "--data_path", str(data), *SMALL, "--pretrained_models",
                     str(m["halfcheetah"]), str(m["walker2d"]), "--include", "mlp", "--p", "0.25", "--flip",
                     "--max_iters", "1", "--num_steps_per_iter", "0", "--num_eval_episodes", "0"])
    (rd,) = listed(work / "checkpoints")
    m0 = load_checkpoint(rd / "model_0.pt")["state_dict"]
    for k in m0:
        if "mlp" in k:
            assert torch.allclose(m0[k], 0.75 * srcs[1][k] + 0.25 * srcs[2][k], atol=1e-7)
        else:
            assert torch.equal(m0[k], srcs[2][k]), k

    # --identity_layers with --include ln_1: the LayerNorms of model 1 become identities (and are frozen)
    work = root / "runs_id"
    work.mkdir()
    monkeypatch.chdir(work)
    experiment.main(["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models",
                     *[str(m[e]) for e in ENVS], "--include", "ln_1", "--copy_model", "--identity_layers",
                     "--merge_frozen", "--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes", "0"])
    (rd,) = listed(work / "checkpoints")
    m1 = load_checkpoint(rd / "model_1.pt")["state_dict"]
    assert torch.equal(m1["transformer.h.0.ln_1.weight"], torch.ones(16))
    assert torch.equal(m1["transformer.h.0.ln_1.bias"], torch.zeros(16))

    # --identity_layers alone sets them but does not freeze them (only --merge_frozen does), as its help says
    work = root / "runs_id_free"
    work.mkdir()
    monkeypatch.chdir(work)
    experiment.main(["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models",
                     *[str(m[e]) for e in ENVS], "--include", "ln_1", "--copy_model", "--identity_layers",
                     "--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes", "0"])
    (rd,) = listed(work / "checkpoints")
    m0, m1 = (load_checkpoint(rd / f"model_{i}.pt")["state_dict"] for i in (0, 1))
    assert torch.equal(m0["transformer.h.0.ln_1.weight"], torch.ones(16))
    assert not torch.equal(m1["transformer.h.0.ln_1.weight"], torch.ones(16))
    from decision_transformer.cli import experiment_parser

    (said,) = [a.help for a in experiment_parser()._actions if "--identity_layers" in a.option_strings]
    assert "frozen" not in said.replace("--merge_frozen", ""), said

    # --copy_include: only the merged tensors go into the fresh model
    work = root / "runs_ci"
    work.mkdir()
    monkeypatch.chdir(work)
    experiment.main(["--env", "hopper", "--data_path", str(data), *SMALL, "--seed", "5", "--pretrained_models",
                     *[str(m[e]) for e in ENVS], "--include", "attn", "--copy_include",
                     "--max_iters", "1", "--num_steps_per_iter", "0", "--num_eval_episodes", "0"])
    (rd,) = listed(work / "checkpoints")
    m0 = load_checkpoint(rd / "model_0.pt")["state_dict"]
    fresh = DecisionTransformer(DTConfig.from_dict(base_cfg["model_config"]), seed=5).state_dict()
    for k in m0:
        expect = sum(s[k] for s in srcs) / 3 if "attn" in k else fresh[k]
        assert torch.allclose(m0[k], expect, atol=1e-7), k


def test_merge_run_resume_matches_uninterrupted(trained, tmp_path, monkeypatch, capsys):
    """A merge + finetune run stopped after iteration 1 and resumed with ``--resume`` ends with the same weights and
    metrics as one run straight through; the merge is not evaluated again and its iteration-0 evaluation is kept.
    Another merge of the same models with other flags is not taken for the one to resume."""
    root, data, m = trained
    base = ["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models", *[str(m[e]) for e in ENVS],
            "--include", "attn", "mlp", "--copy_model", "--merge_frozen", "--num_steps_per_iter", "3",
            "--num_eval_episodes", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    monkeypatch.chdir(a)
    experiment.main([*base, "--max_iters", "2"])
    monkeypatch.chdir(b)
    experiment.main([*base, "--max_iters", "1"])
    # a different merge (attn only) of the same models, written later: --resume must not pick it
    experiment.main([*base, "--max_iters", "1", "--include", "attn"])
    capsys.readouterr()
    # the same model files, spelled relative to the working directory (and with ./): the same run
    spelled = [f"./{os.path.relpath(m[e], b)}" for e in ENVS]
    at = base.index("--pretrained_models") + 1
    experiment.main([*base[:at], *spelled, *base[at + len(ENVS):], "--max_iters", "2", "--resume"])
    err = capsys.readouterr().err
    assert "iter 0 (merged, before finetuning)" not in err
    ra = merge_run_dir(a)
    (rb,) = [d for d in (b / "checkpoints").iterdir() if (d / "model_2.pt").is_file()]
    assert f"resuming {Path('checkpoints') / rb.name} after iteration 1" in err      # the run's own _<id> folder
    sa = load_checkpoint(ra / "model_2.pt")["state_dict"]
    sb = load_checkpoint(rb / "model_2.pt")["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = lambda line: {k: v for k, v in json.loads(line).items() if not k.startswith("time/")}  # noqa: E731
    rows_a = [strip(x) for x in (ra / "metrics.jsonl").read_text().splitlines()]
    rows_b = [strip(x) for x in (rb / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows_b] == [0, 1, 2] and rows_a == rows_b
    assert json.loads((rb / "config.json").read_text())["merge_info"]["iteration_0"] == \
        json.loads((ra / "config.json").read_text())["merge_info"]["iteration_0"]
    # nothing to resume in a folder without this merge: one error line, exit 2
    monkeypatch.chdir(tmp_path)
    msg = expect_error(capsys, [*base, "--max_iters", "2", "--resume"])
    assert "nothing to resume: no merge run dt_medium_hopper_666_K5_<id>" in msg and "finished an iteration" in msg


def test_merge_resume_takes_the_run_of_all_these_flags_and_reads_a_lost_config_from_the_state(trained, tmp_path,
                                                                                                 monkeypatch, capsys):
    """Two merge runs of the same models and merge flags that differ in another flag (-lr) sit side by side
    ({run}_{id} each): --resume continues the one made with every flag given, not refusing the newest; and a run
    whose config.json was lost is found by the config its training state records, as the README says."""
    root, data, m = trained
    monkeypatch.chdir(tmp_path)
    base = ["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models", *[str(m[e]) for e in ENVS],
            "--include", "attn", "--copy_model", "--num_steps_per_iter", "2", "--num_eval_episodes", "0"]
    experiment.main([*base, "--max_iters", "1", "-lr", "1e-4"])
    experiment.main([*base, "--max_iters", "1", "-lr", "3e-4"])
    runs = sorted(d for d in (tmp_path / "checkpoints").iterdir() if d.is_dir())
    first = [d for d in runs if json.loads((d / "config.json").read_text())["learning_rate"] == 1e-4][0]
    capsys.readouterr()
    experiment.main([*base, "--max_iters", "2", "-lr", "1e-4", "--resume"])
    assert f"resuming {Path('checkpoints') / first.name} after iteration 1" in capsys.readouterr().err
    assert (first / "model_2.pt").is_file()
    (first / "config.json").unlink()
    experiment.main([*base, "--max_iters", "3", "-lr", "1e-4", "--resume"])
    err = capsys.readouterr().err
    assert f"resuming {Path('checkpoints') / first.name} after iteration 2" in err and "read from its" in err
    assert (first / "model_3.pt").is_file()


def expect_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        experiment.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_incompatible_checkpoints_name_first_tensor(trained, tmp_path, monkeypatch, capsys):
    from decision_transformer.checkpoint import atomic_save, make_checkpoint
    from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig

    root, data, m = trained
    monkeypatch.chdir(tmp_path)
    wide = tmp_path / "wide.pt"
    cfg = DTConfig(17, 6, backbone=BackboneConfig(n_embd=32, n_layer=1))
    atomic_save(make_checkpoint(DecisionTransformer(cfg, seed=0).state_dict(), {"model_config": cfg.to_dict()}), wide)
    deep = tmp_path / "deep.pt"
    cfg = DTConfig(17, 6, backbone=BackboneConfig(n_embd=16, n_layer=2))
    atomic_save(make_checkpoint(DecisionTransformer(cfg, seed=0).state_dict(), {"model_config": cfg.to_dict()}), deep)
    base = ["--env", "hopper", "--data_path", str(data), *SMALL, "--include", "attn", "mlp", "--copy_model",
            "--max_iters", "1", "--num_steps_per_iter", "0", "--num_eval_episodes", "0", "--pretrained_models",
            str(m["hopper"])]
    msg = expect_error(capsys, [*base, str(wide)])
    assert "wide.pt" in msg and "transformer.h.0.attn.c_attn.weight is [32, 96] in this model" in msg
    msg = expect_error(capsys, [*base, str(deep)])
    assert "deep.pt" in msg and "transformer.h.1.ln_1.weight does not exist" in msg
    # model 1 for another env: its dims do not fit --env
    msg = expect_error(capsys, ["--env", "hopper", "--data_path", str(data), *SMALL, "--copy_model",
                                "--pretrained_models", str(m["walker2d"]), str(m["hopper"]), "--include", "attn",
                                "--num_eval_episodes", "0", "--max_iters", "1"])
    assert "list the hopper model first" in msg
    # --merge_frozen / --identity_layers without --include would act on every tensor of the model
    for flag in ("--merge_frozen", "--identity_layers"):
        msg = expect_error(capsys, ["--env", "hopper", "--data_path", str(data), *SMALL, "--copy_model", flag,
                                    "--pretrained_models", str(m["hopper"]), str(m["walker2d"]),
                                    "--num_eval_episodes", "0", "--max_iters", "1"])
        assert f"{flag} needs --include" in msg


def test_merge_cli_recipe_and_results_table(trained, tmp_path, capsys):
    from decision_transformer import merge_cli, results_table

    root, data, m = trained
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: [{m['hopper']}, {m['halfcheetah']}, {m['walker2d']}]\nmerge_method: task_arithmetic\n"
                      f"include: [attn, mlp]\nmerge_lambda: 0.5\nout: {tmp_path / 'ta.pt'}\n")
    merge_cli.main(["--recipe", str(recipe), "--K", "5"])
    ck = torch.load(tmp_path / "ta.pt", weights_only=True)
    srcs = [load_checkpoint(m[e])["state_dict"] for e in ENVS]
    from decision_transformer.models import DecisionTransformer, DTConfig

    base = DecisionTransformer(DTConfig.from_dict(ck["config"]["model_config"]), seed=666).state_dict()
    k = "transformer.h.0.mlp.c_fc.weight"
    assert torch.allclose(ck["state_dict"][k], base[k] + 0.5 * sum(s[k] - base[k] for s in srcs), atol=1e-6)
    assert ck["config"]["merge_info"]["method"] == "task_arithmetic" and ck["specializations"] == ["hopper"]
    merge_cli.main(["--models", str(m["hopper"]), str(m["walker2d"]), "--include", "attn", "--dataset", "expert",
                    "--out", str(tmp_path / "mean.pt")])   # --dataset is for multi-task models: said, not silently ignored
    assert "warning: --dataset expert is for multi-task models" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [a.pt]\nout: x.pt\nlambda_typo: 1\n")
    with pytest.raises(SystemExit):
        merge_cli.main(["--recipe", str(bad)])

    rows = {"source": {"hopper": 10.0, "halfcheetah": 20.0, "walker2d": 30.0}, "merge": {"hopper": 5.0}}
    header, body = results_table.build_table(rows)
    md = results_table.to_markdown(header, body)
    assert "| source | 10.0 | 20.0 | 30.0 | 20.0 |" in md and "| merge | 5.0 | — | — | 5.0* |" in md
    assert md.rstrip().endswith("average over the envs that have a score only")     # the * explained
    # the CSV average is a number, with the count of envs it averages in a column of its own
    assert results_table.to_csv(rows).splitlines()[2] == "merge,5.0,,,5.0,1"
    out = tmp_path / "table"
    results_table.main(["--row", f"merged={tmp_path / 'ta.pt'}", "--num_eval_episodes", "1", "--out", str(out)])
    rows = (tmp_path / "table.csv").read_text().splitlines()
    assert rows[0] == "model,hopper,halfcheetah,walker2d,average,envs_averaged" and rows[1].startswith("merged,")
    assert (tmp_path / "table.md").is_file()


def test_results_table_statistics_of_the_models_own_dataset(tmp_path, capsys):
    """A checkpoint without stored state statistics (like an original pickle) is evaluated with the statistics of the
    dataset it was trained on, not of medium; --dataset overrides."""
    from decision_transformer import results_table
    from decision_transformer.checkpoint import atomic_save, make_checkpoint
    from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig
    from decision_transformer.synthetic import make_dataset

    data = tmp_path / "data"
    make_dataset(data, "hopper", "medium", 200, seed=0, max_ep_len=30)
    make_dataset(data, "hopper", "expert", 200, seed=1, max_ep_len=30)
    cfg = DTConfig(11, 3, max_length=5, backbone=BackboneConfig(n_embd=16, n_layer=1))
    path = tmp_path / "dt_gym-experiment-hopper-expert-123456.pt"
    atomic_save(make_checkpoint(DecisionTransformer(cfg, seed=0).state_dict(), {"model_config": cfg.to_dict()}), path)
    capsys.readouterr()
    results_table.evaluate_checkpoint(str(path), num_episodes=1, data_path=str(data))
    assert "using those of " + str(data / "hopper-expert-v2.pkl") in capsys.readouterr().err
    results_table.evaluate_checkpoint(str(path), num_episodes=1, data_path=str(data), dataset="medium")
    assert "using those of " + str(data / "hopper-medium-v2.pkl") in capsys.readouterr().err


# ---- merges that cannot be done as asked are refused before any work -------------------------------------------------

def tiny_lm(folder: Path) -> Path:
    """A GPT-2 directory with the trained models' block shapes (16 wide, 1 layer, 1 head)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=1, n_positions=64, vocab_size=50)).save_pretrained(folder)
    return folder


def test_one_pretrained_model_takes_only_the_mean(trained, tmp_path, monkeypatch, capsys):
    """One --pretrained_models model is merged uniformly with the fresh --pretrained_lm model, or loaded without a
    merge: another method is refused (one line, nothing written) instead of being silently replaced."""
    from conftest import fails

    root, data, m = trained
    lm = tiny_lm(tmp_path / "lm")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    base = ["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models", str(m["hopper"]),
            "--include", "attn", "mlp", "--max_iters", "1", "--num_steps_per_iter", "0", "--num_eval_episodes", "0"]
    msg = fails(experiment.main, [*base, "--pretrained_lm", str(lm), "--use_fisher"], capsys)
    assert "--use_fisher merges 2 or more --pretrained_models" in msg and "by the uniform mean (--p) only" in msg
    msg = fails(experiment.main, [*base, "--pretrained_lm", str(lm), "--merge_method", "ties"], capsys)
    assert "--merge_method ties merges 2 or more --pretrained_models" in msg
    msg = fails(experiment.main, [*base, "--merge_method", "ties"], capsys)
    assert "--merge_method ties merges 2 or more" in msg and "without --pretrained_lm is loaded without a merge" in msg
    no_data = [*base, "--merge_method", "ties", "--no_generate"]
    no_data[no_data.index("--data_path") + 1] = str(tmp_path / "absent")
    assert "--merge_method ties merges 2 or more" in fails(experiment.main, no_data, capsys)  # before the data
    assert not any(work.iterdir())
    experiment.main([*base, "--pretrained_lm", str(lm)])           # the uniform merge with the LM model still runs
    assert json.loads(next((work / "checkpoints").rglob("config.json")).read_text())["merge_info"]["method"] == "mean"


def test_degenerate_merges_are_refused(trained, tmp_path, monkeypatch, capsys):
    """A merge of one model (merge_cli) and an --include that matches nothing (experiment.py, as merge_cli) are
    errors before any work: no copy written, no Fisher computed, no run folder."""
    from conftest import fails
    from decision_transformer import merge_cli

    root, data, m = trained
    src = tmp_path / m["hopper"].name
    src.write_bytes(m["hopper"].read_bytes())
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--merge_method", "fisher", "--f_batch_size", "4", "--f_num_batches", "2"]):
        msg = fails(merge_cli.main, ["--models", str(src), "--include", "attn", "mlp", "--data_path", str(data),
                                     "--K", "5", "--out", str(tmp_path / "one.pt"), *extra], capsys)
        assert msg == "error: a merge needs at least 2 models; --models lists 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]
    nomatch = ["--include", "nomatch", "--out", str(tmp_path / "none.pt")]
    expect = fails(merge_cli.main, ["--models", str(m["hopper"]), str(m["walker2d"]), *nomatch], capsys)
    assert expect == f"error: --include nomatch matches no tensor of {m['hopper']}; nothing to merge"
    # a misspelt substring next to one that matches: refused too, instead of merging more or less than asked
    for flags, bad in ((["--include", "attn", "--exclude", "ln1"], "--exclude ln1"),
                       (["--include", "attn", "mlpp"], "--include mlpp")):
        msg = fails(merge_cli.main, ["--models", str(m["hopper"]), str(m["walker2d"]), *flags, "--out",
                                     str(tmp_path / "typo.pt")], capsys)
        assert msg.startswith(f"error: {bad} matches no tensor of {m['hopper']}; check its spelling (the selection "
                              f"holds ") and msg.endswith(" tensors without it)")
    assert not (tmp_path / "typo.pt").exists()
    msg = fails(experiment.main, ["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models",
                                  str(m["hopper"]), str(m["walker2d"]), "--include", "nomatch", "--copy_model",
                                  "--max_iters", "1", "--num_steps_per_iter", "0", "--num_eval_episodes", "0"], capsys)
    assert msg == expect
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


def test_models_with_other_heads_or_activation_merge_with_a_warning(trained, tmp_path, monkeypatch, capsys):
    """n_head, activation_function and the embedding order do not show in the tensor shapes: models differing in them
    still merge, with one warning naming the settings and which model has which."""
    import copy

    from decision_transformer import merge_cli
    from decision_transformer.checkpoint import atomic_save, make_checkpoint

    root, data, m = trained
    ck = load_checkpoint(m["hopper"])
    bb = ck["config"]["model_config"]["backbone"]
    cfg = copy.deepcopy(ck["config"])
    cfg["model_config"]["backbone"].update(n_head=2, activation_function="gelu_new")
    cfg["model_config"]["embed_order"] = "time_then_ln"
    other = tmp_path / "heads.pt"
    atomic_save(make_checkpoint(ck["state_dict"], cfg), other)
    expect = (f"warning: the merged models differ in n_head ({bb['n_head']}: {m['hopper']}; 2: {other}) and "
              f"activation_function ({bb['activation_function']}: {m['hopper']}; gelu_new: {other}) and "
              f"embed_order (ln_then_time: {m['hopper']}; time_then_ln: {other})")
    capsys.readouterr()
    merge_cli.main(["--models", str(m["hopper"]), str(other), "--include", "attn", "mlp", "--out",
                    str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert err.count("warning: the merged models differ") == 1 and expect in err
    monkeypatch.chdir(tmp_path)
    experiment.main(["--env", "hopper", "--data_path", str(data), *SMALL, "--pretrained_models", str(m["hopper"]),
                     str(other), "--include", "attn", "--copy_model", "--max_iters", "1", "--num_steps_per_iter", "0",
                     "--num_eval_episodes", "0", "--outdir", ""])
    err = capsys.readouterr().err
    assert err.count("warning: the merged models differ") == 1 and expect in err
    # models that agree: no warning
    merge_cli.main(["--models", str(m["hopper"]), str(m["walker2d"]), "--include", "attn", "--out",
                    str(tmp_path / "same.pt")])
    assert "differ in" not in capsys.readouterr().err


@pytest.mark.parametrize("favor_target", [False, True])
def test_fisher_merge_with_every_fisher_zero_is_the_plain_or_target_merge(favor_target):
    """Fishers that are 0 on every merged tensor (a branch no loss reaches): the floor's f̄ was 0, so every element
    came out 0/0 = NaN; now the plain average (model 1's values when favouring the target)."""
    g = torch.Generator().manual_seed(0)
    a = {"transformer.h.0.attn.c_attn.weight": torch.randn(4, 12, generator=g)}
    b = {"transformer.h.0.attn.c_attn.weight": torch.randn(4, 12, generator=g)}
    keys = list(a)
    # (the trace covers the whole file: a tensor outside the merged ones has Fisher information)
    zero = {keys[0]: torch.zeros(4, 12), "transformer.h.0.ln_1.weight": torch.ones(4)}
    out = merging.merge_fisher([a, b], [zero, dict(zero)], keys, favor_target=favor_target)
    k = keys[0]
    expected = a[k] if favor_target else (a[k] + b[k]) / 2
    torch.testing.assert_close(out[k], expected)
