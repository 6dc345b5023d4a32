"""Unit tests of merging.py, fisher.py and checkpoint.py details that the end-to-end tests do not pin down: greedy
soup ranking, Gram rows and eval mode in RegMean, shape and dtype rules, chunked per-example Fishers, the batch
estimator's train mode, and checkpoint loading, run lookup and naming."""
import json
import os
import time
from types import SimpleNamespace

import pytest
import torch

from decision_transformer import checkpoint, fisher, merging
from decision_transformer.errors import UserError
from decision_transformer.models.gpt2 import Conv1D
from test_fisher import block_params, fake_batch, tiny_model
from test_merging import toy


# ---- merging.py ---------------------------------------------------------------------------------------------------

def test_greedy_soup_starts_from_the_best_candidate():
    sds = [{"w": torch.tensor([10.0])}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}]
    # alone: -8, -1, -1 -> start from model 2 (index 1), add model 3 (mean 2, score 0), model 1 would give 14/3
    merged, kept = merging.greedy_soup(sds, ["w"], lambda sd: -abs(float(sd["w"]) - 2.0))
    assert kept == [1, 2]
    assert torch.equal(merged["w"], torch.tensor([2.0]))


class _GramNet(torch.nn.Module):
    """A Conv1D layer behind an optional dropout, fed 3 tokens per step (like the DT's interleaved R, s, a)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.drop = torch.nn.Dropout(p)
        self.l = Conv1D(2, 3)

    def forward(self, x):
        return self.l(self.drop(x))


def test_collect_grams_repeats_the_step_mask_per_token():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 3, generator=g)                      # K = 4 steps, 3 tokens each, step-major
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 1]])
    grams = merging.collect_grams(_GramNet(), ["l.weight"], [SimpleNamespace(x=x, mask=mask)], lambda m, b: m(b.x))
    rows = x[mask.repeat_interleave(3, 1) > 0].double()
    assert rows.shape == (15, 3)
    assert torch.allclose(grams["l"], rows.T @ rows / 15, rtol=0, atol=1e-12)


def test_collect_grams_runs_in_eval_mode_and_restores_train_mode():
    torch.manual_seed(0)
    net = _GramNet(p=0.5)
    net.train()
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 4)
    grams = merging.collect_grams(net, ["l.weight"], [SimpleNamespace(x=x, mask=mask)], lambda m, b: m(b.x))
    rows = x.reshape(-1, 3).double()
    assert torch.allclose(grams["l"], rows.T @ rows / 8, rtol=0, atol=1e-12)   # no dropout noise
    assert net.training and net.drop.training


def test_task_arithmetic_checks_the_base_shape():
    a, b = {"w": torch.ones(3, 4)}, {"w": torch.zeros(3, 4)}
    with pytest.raises(UserError) as e:
        merging.merge_task_arithmetic([a, b], {"w": torch.zeros(4, 3)}, ["w"])
    assert str(e.value) == "the merge base's tensor w has shape [4, 3], the models [3, 4]"


def test_merged_fraction_counts_float_elements():
    state = {"a": torch.ones(3), "b": torch.ones(1), "i": torch.ones(5, dtype=torch.long)}
    assert merging.merged_fraction(state, ["a"]) == (1, 2, 0.75)


def test_merge_keeps_the_stored_dtype():
    a, b = toy(0), toy(1)
    ah, bh = {k: v.half() if v.is_floating_point() else v for k, v in a.items()}, \
        {k: v.half() if v.is_floating_point() else v for k, v in b.items()}
    out = merging.merge_mean([ah, bh], ["a.attn.w", "a.mlp.b"], p=0.25)
    for k in ("a.attn.w", "a.mlp.b"):
        assert out[k].dtype == torch.float16
        assert torch.equal(out[k], (0.75 * ah[k].float() + 0.25 * bh[k].float()).half())
    assert out["emb.w"].dtype == torch.float16 and torch.equal(out["emb.w"], ah["emb.w"])


def _count_forked_rng(monkeypatch, module) -> dict:
    """Wraps ``module.forked_rng``: {"entered": how often, "depth": how many are open now}."""
    import contextlib

    real, state = module.forked_rng, {"entered": 0, "depth": 0}

    @contextlib.contextmanager
    def counting():
        state["entered"] += 1
        state["depth"] += 1
        try:
            with real():
                yield
        finally:
            state["depth"] -= 1

    monkeypatch.setattr(module, "forked_rng", counting)
    return state


def test_rebuilt_initialisations_and_fisher_estimates_fork_every_devices_rng(monkeypatch, tmp_path):
    """The merge base rebuilt from a seed, the LM initialisation rebuilt from the run's flags and the Fisher
    estimates run inside forked_rng (every GPU's generator too, not only the CPU's), leaving the run's streams."""
    from decision_transformer import merge_setup, model_factory

    rng = _count_forked_rng(monkeypatch, merge_setup)
    model = tiny_model(seed=3)
    first = SimpleNamespace(is_multi=False, path="m1.pt", config={"seed": 3, "model_config": model.config.to_dict()})
    base = merge_setup.resolve_base(SimpleNamespace(merge_base=None, pretrained_lm=None), [first])
    assert rng == {"entered": 1, "depth": 0}
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items())

    inside = []
    monkeypatch.setattr(model_factory, "build_model_from_args", lambda a, spec: inside.append(rng["depth"]) or model)
    lm_run = SimpleNamespace(is_multi=False, path="m2.pt", config={"seed": 3, "env": "hopper", "pretrained_lm": "gpt2"})
    merge_setup.resolve_base(SimpleNamespace(merge_base=None, pretrained_lm=None), [lm_run])
    assert inside == [1]

    monkeypatch.setattr(fisher, "compute_fisher", lambda *a, **k: inside.append(rng["depth"]) or {})
    monkeypatch.setattr(fisher, "fisher_tensors", lambda info: {"w": torch.ones(1)})
    args = SimpleNamespace(fisher_type="batch", f_batch_size=2, f_num_batches=1, K=4, seed=0)
    merge_setup.multi_fisher(model, ["hopper", "walker2d"], [None, None], args)
    assert inside == [1, 1, 1]

    monkeypatch.setattr(merge_setup, "build_model", lambda mf, device, max_length: model)
    monkeypatch.setattr(merge_setup, "source_env_dataset", lambda mf: ("hopper", "medium"))
    monkeypatch.setattr(fisher, "training_context", lambda mf: 4)
    monkeypatch.setattr(fisher, "save_fisher", lambda info, path: None)
    monkeypatch.setattr(fisher, "describe", lambda info: "")
    monkeypatch.setattr(merge_setup, "log", lambda msg: None)
    mf = SimpleNamespace(path=str(tmp_path / "model_1.pt"), dataset="medium", state_dict=model.state_dict())
    merge_setup.fisher_for_file(mf, args, SimpleNamespace(get=lambda env, ds: None), "cpu")
    assert inside == [1, 1, 1, 1]


def test_multi_task_sources_finetuned_from_another_model_than_model_1s_are_warned_about(monkeypatch, capsys):
    """Task arithmetic / TIES of multi-task models take model 1's recorded --pretrained_model as the base; a source
    finetuned from another model (or recording none) has a task vector against a model it never came from: a
    warning names it (the single-task path warns alike for another seed). The same base spelled ./ is no warning."""
    from decision_transformer import merge_setup

    monkeypatch.setattr(merge_setup, "load_model_file", lambda p: SimpleNamespace(state_dict={"w": torch.ones(1)}))
    args = SimpleNamespace(merge_base=None, pretrained_lm=None)
    mk = lambda path, pre: SimpleNamespace(is_multi=True, path=path, config={"pretrained_model": pre})  # noqa: E731
    base = merge_setup.resolve_base(args, [mk("a.pt", "pre/m.pt"), mk("b.pt", "./pre/m.pt")])
    assert torch.equal(base["w"], torch.ones(1)) and "warning" not in capsys.readouterr().err
    merge_setup.resolve_base(args, [mk("a.pt", "pre/m.pt"), mk("b.pt", "./pre/m.pt"), mk("c.pt", "pre/other.pt"),
                                    mk("d.pt", None)])
    err = capsys.readouterr().err
    assert "warning: c.pt was finetuned from pre/other.pt, not from pre/m.pt as model 1" in err
    assert "warning: d.pt was finetuned from no recorded --pretrained_model" in err and "b.pt" not in err


# ---- fisher.py ----------------------------------------------------------------------------------------------------

def test_chunked_per_example_fishers_match_unchunked(monkeypatch):
    import torch.func

    sizes = []  # the leading (vmapped) size of each vmapped call: windows (empirical), Jacobian rows (Gaussian)
    real_vmap = torch.func.vmap

    def vmap(fn, *a, **k):
        mapped = real_vmap(fn, *a, **k)

        def call(*args):
            sizes.append(next(x.shape[0] for x in args if isinstance(x, torch.Tensor)))
            return mapped(*args)
        return call

    monkeypatch.setattr(torch.func, "vmap", vmap)

    def calls(f, *args):
        sizes.clear()
        out = f(*args)
        return out, list(sizes)

    model = tiny_model(seed=3)
    batches = [fake_batch(B=5, seed=5), fake_batch(B=5, seed=6)]
    rows = [int(b.mask.sum()) * 3 for b in batches]                   # one Jacobian row per unmasked action element
    (full_e, n_e), seen = calls(fisher.fisher_empirical, model, batches)
    assert seen == [5, 5]                                             # unchunked: one call per batch
    (full_g, n_g), seen = calls(fisher.fisher_gaussian, model, batches)
    assert seen == rows
    n_params = sum(p.numel() for p in block_params(model).values())
    monkeypatch.setattr(fisher, "_CHUNK_FLOATS", 2 * n_params)      # 2 windows / 2 Jacobian rows per chunk
    assert fisher._window_chunk(n_params) == 2
    (chunk_e, m_e), seen = calls(fisher.fisher_empirical, model, batches)
    assert seen == [2, 2, 1, 2, 2, 1]
    (chunk_g, m_g), seen = calls(fisher.fisher_gaussian, model, batches)
    assert seen == [2] * (rows[0] // 2) + [1] * (rows[0] % 2) + [2] * (rows[1] // 2) + [1] * (rows[1] % 2)
    assert (n_e, n_g, m_e, m_g) == (10, 10, 10, 10)
    assert set(chunk_e) == set(full_e) == set(chunk_g) == set(full_g) == set(block_params(model))
    for k in full_e:
        assert torch.allclose(chunk_e[k], full_e[k], rtol=1e-5, atol=1e-12), k
        assert torch.allclose(chunk_g[k], full_g[k], rtol=1e-5, atol=1e-12), k


def test_batch_fisher_runs_in_train_mode_and_restores_eval_mode():
    model = tiny_model(seed=4)
    model.eval()
    seen = []

    def forward(m, *args, **kw):
        seen.append(m.training)
        return fisher.default_forward(m, *args, **kw)

    fisher.fisher_batch(model, [fake_batch(seed=7), fake_batch(seed=8)], forward=forward)
    assert seen == [True, True]
    assert not model.training and not any(m.training for m in model.modules())


@pytest.mark.parametrize("bs, nb", [(0, 100), (64, 0)])
def test_compute_fisher_checks_batch_counts(bs, nb):
    with pytest.raises(UserError) as e:
        fisher.compute_fisher(tiny_model(), None, batch_size=bs, num_batches=nb)
    assert str(e.value) == f"--f_batch_size and --f_num_batches must be >= 1 (got {bs}, {nb})"


# ---- checkpoint.py ------------------------------------------------------------------------------------------------

def test_set_aside_twice_keeps_previous_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20240102-030405")
    run = tmp_path / "run"
    run.mkdir()
    (run / "a.pt").write_text("first")
    first = checkpoint.set_aside_previous_run(run)
    (run / "b.json").write_text("second")
    second = checkpoint.set_aside_previous_run(run)
    assert first == run / "previous" / "20240102-030405"
    assert second == run / "previous" / "20240102-030405-1"
    assert sorted(p.name for p in run.iterdir()) == ["previous"]
    assert sorted(p.name for p in (run / "previous").iterdir()) == ["20240102-030405", "20240102-030405-1"]
    assert [p.name for p in first.iterdir()] == ["a.pt"] and (first / "a.pt").read_text() == "first"
    assert [p.name for p in second.iterdir()] == ["b.json"] and (second / "b.json").read_text() == "second"
    assert checkpoint.set_aside_previous_run(run) is None       # only previous/ left: nothing to set aside


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_load_state_into_refuses_non_finite_weights():
    model = tiny_model(seed=0)
    sd = _state(tiny_model(seed=1))
    before = _state(model)
    k = "transformer.h.0.attn.c_proj.weight"
    sd[k] = torch.full_like(sd[k], float("nan"))
    with pytest.raises(UserError) as e:
        checkpoint.load_state_into(model, sd, "x.pt")
    assert str(e.value) == f"x.pt: tensor {k} contains NaN or inf"
    assert all(torch.equal(v, before[k2]) for k2, v in model.state_dict().items())   # nothing loaded


def test_load_state_into_ignores_the_originals_mask_buffers():
    model = tiny_model(seed=0)
    sd = _state(tiny_model(seed=1))
    assert "transformer.h.0.attn.bias" not in sd and "transformer.h.0.attn.masked_bias" not in sd
    extra = {"transformer.h.0.attn.bias": torch.tril(torch.ones(12, 12, dtype=torch.uint8)).view(1, 1, 12, 12),
             "transformer.h.0.attn.masked_bias": torch.tensor(-1e4)}
    checkpoint.load_state_into(model, {**sd, **extra}, "x.pt")
    got = model.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_find_run_picks_the_newest_matching_run(tmp_path):
    cfg = json.dumps({"merge_method": "mean", "p": 0.5})
    old, new = tmp_path / "merge_222222", tmp_path / "merge_111111"   # the newer run has the smaller id
    for d, t in ((old, 1_000_000_000), (new, 1_000_000_500)):
        d.mkdir()
        (d / "config.json").write_text(cfg)
        (d / "model.pt").write_text("x")
        for f in d.iterdir():
            os.utime(f, (t, t))
    assert checkpoint.find_run(tmp_path, "merge_", {"merge_method": "mean", "p": 0.5}) == new
    os.utime(old / "model.pt", (1_000_001_000, 1_000_001_000))
    assert checkpoint.find_run(tmp_path, "merge_", {"merge_method": "mean", "p": 0.5}) == old
    assert checkpoint.find_run(tmp_path, "merge_", {"merge_method": "mean", "p": 0.3}) is None


def test_load_checkpoint_refuses_a_dict_of_non_tensors(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"a": 1, "b": "x"}, p)
    with pytest.raises(UserError) as e:
        checkpoint.load_checkpoint(p)
    assert str(e.value) == f"{p}: not a checkpoint (expected a dict with a 'state_dict' or a state dict)"


def test_wandb_run_name():
    assert checkpoint.wandb_run_name("hopper", "medium", "dt", 0, remove_grad_clip=True) == \
        "gym-experiment-hopper-medium-dt-0-no-grad-clip"
    assert checkpoint.wandb_run_name("hopper", "medium", "gpt2", 3, K=5, remove_grad_clip=True, pretrained_block=2) == \
        "gym-experiment-hopper-medium-gpt2-3-K5-no-grad-clip-block2"
    assert checkpoint.run_dir_name("gpt2", "medium", "hopper", 3, K=5, remove_grad_clip=True, pretrained_block=2) == \
        "gpt2_medium_hopper_3_K5_no_grad_clip_block2"


def test_block_runs_of_different_lms_get_different_names():
    """A GPT-2 block run is TAKAGI's dt_...; a block of any other LM names its run dt-{lm}, so an iGPT block run no
    longer replaces the GPT-2 one of the same block."""
    assert [checkpoint.model_name(lm, b) for lm, b in (
        (None, None), ("gpt2", None), ("gpt2", 0), ("checkpoints/gpt2/", 3), ("openai/imagegpt-small", None),
        ("openai/imagegpt-small", 0), ("checkpoints/ChibiT", 1))] == \
        ["dt", "gpt2", "dt", "dt", "igpt", "dt-igpt", "dt-ChibiT"]


def test_an_lm_given_as_dot_names_its_run_by_the_folder(tmp_path, monkeypatch):
    """``--pretrained_lm .`` (or ``..``) from inside the LM's folder names the run by that folder, not by an empty
    name (a run folder ``_medium_hopper_666`` that no analysis finds)."""
    (tmp_path / "gpt2" / "sub").mkdir(parents=True)
    (tmp_path / "imagegpt-small").mkdir()
    monkeypatch.chdir(tmp_path / "gpt2")
    assert [checkpoint.model_name(p) for p in (".", "./", "sub/..", "sub/../")] == ["gpt2"] * 4
    monkeypatch.chdir(tmp_path / "gpt2" / "sub")
    assert checkpoint.model_name("..") == "gpt2" and checkpoint.model_name("..", 0) == "dt"
    monkeypatch.chdir(tmp_path / "imagegpt-small")
    assert checkpoint.model_name(".") == "igpt"


def test_a_run_id_already_naming_files_is_drawn_again(tmp_path, monkeypatch):
    """Two runs drawing one id overwrote each other's models/{env}/ files; an id some file or folder of the given
    folders ends in is drawn again."""
    models = tmp_path / "models" / "hopper"
    models.mkdir(parents=True)
    (models / "dt_gym-experiment-hopper-medium-223456_best.pt").write_bytes(b"x")
    (tmp_path / "dt_medium_hopper_666_323456").mkdir()                      # a merge run's folder
    draws = iter([123456, 223456, 323456, 423456])
    monkeypatch.setattr(checkpoint.secrets, "randbelow", lambda n: next(draws) - 100000)
    assert checkpoint.new_exp_id([models, tmp_path, tmp_path / "absent"]) == 123456
    assert checkpoint.new_exp_id([models, tmp_path]) == 423456            # 223456 and 323456 are taken
