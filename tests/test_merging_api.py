"""merging.py used as a library (not through merge_cli / experiment.py, which check first): an empty selection, models
that do not fit together, weights that are not a convex combination, RegMean without the Conv1D map, bad Fisher
inputs, each a one-line ``UserError`` instead of a wrong merge or a raw traceback; and merge_cli's report line."""
from types import SimpleNamespace

import pytest
import torch

from conftest import fails
from decision_transformer import merge_cli, merge_setup, merging
from decision_transformer.checkpoint import atomic_save, load_checkpoint, make_checkpoint
from decision_transformer.errors import UserError
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig


def dt_config(n_layer=1):
    return DTConfig(11, 3, max_length=4, backbone=BackboneConfig(n_embd=16, n_layer=n_layer, n_head=2))


def dt_state(n_layer=1, seed=0):
    return DecisionTransformer(dt_config(n_layer), seed=seed).state_dict()


def blocks(sd):
    return [k for k in sd if k.startswith("transformer.h.")]


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# Every merge method as f(states, keys), with what else it needs made from the states.
def _fishers(states, keys):
    return [{k: torch.ones_like(sd[k]) for k in keys if k in sd and sd[k].is_floating_point()} for sd in states]


def _zero_base(states, keys):
    return {k: torch.zeros_like(v) for k, v in states[0].items()}


METHODS = {
    "mean": lambda states, keys: merging.merge_mean(states, keys),
    "fisher": lambda states, keys: merging.merge_fisher(states, _fishers(states, keys), keys),
    "task_arithmetic": lambda states, keys: merging.merge_task_arithmetic(states, _zero_base(states, keys), keys),
    "ties": lambda states, keys: merging.merge_ties(states, _zero_base(states, keys), keys),
    "regmean": lambda states, keys: merging.merge_regmean(states, [{} for _ in states], keys),
    "greedy_soup": lambda states, keys: merging.greedy_soup(states, keys, lambda sd: 0.0),
}


# ---- 1. an empty selection ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(METHODS))
def test_an_empty_selection_is_refused_by_every_method(method):
    a, b = dt_state(seed=0), dt_state(seed=1)
    keys = merging.select_keys(list(a), include=["atention"])   # a typo: matches nothing
    assert keys == []
    with pytest.raises(UserError) as e:
        METHODS[method]([a, b], keys)
    assert one_line(e).startswith("nothing to merge: ")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_selection_of_integer_buffers_only_is_refused(method):
    a = {"h.0.attn.bias": torch.ones(2, 2, dtype=torch.uint8), "h.0.w": torch.zeros(3)}
    b = {"h.0.attn.bias": torch.ones(2, 2, dtype=torch.uint8), "h.0.w": torch.ones(3)}
    with pytest.raises(UserError) as e:
        METHODS[method]([a, b], ["h.0.attn.bias"])
    assert "nothing to merge" in one_line(e) and "floating-point" in str(e.value)


# ---- 2. compatibility inside the merge functions -----------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_model_with_an_extra_layer_is_refused_in_both_orders(method):
    one, two = dt_state(1, seed=0), dt_state(2, seed=1)
    # model 2 has a block model 1 lacks (used to drop it silently)
    with pytest.raises(UserError) as e:
        METHODS[method]([one, two], blocks(one))
    assert one_line(e) == ("model 2: cannot merge with model 1: tensor transformer.h.1.ln_1.weight does not exist in "
                           "model 1 (different layer count?)")
    # model 2 lacks a block of S (used to be a raw KeyError)
    with pytest.raises(UserError) as e:
        METHODS[method]([two, one], blocks(two))
    assert one_line(e) == ("model 2: cannot merge with model 1: tensor transformer.h.1.ln_1.weight is missing "
                           "(different layer count or architecture?)")


def test_a_different_hidden_size_is_refused_with_the_callers_names():
    a = {"w": torch.zeros(3, 4)}
    b = {"w": torch.zeros(4, 3)}
    with pytest.raises(UserError) as e:
        merging.merge_mean([a, b], ["w"], names=["a.pt", "b.pt"])
    assert one_line(e) == ("b.pt: cannot merge with a.pt: tensor w is [4, 3] in this model and [3, 4] in a.pt "
                           "(different hidden size or architecture?)")
    # models of two envs: their state and action layers differ, and the hint is to merge the shared blocks
    with pytest.raises(UserError) as e:
        merging.merge_mean([{"embed_state.weight": torch.zeros(16, 11)}, {"embed_state.weight": torch.zeros(16, 17)}],
                           ["embed_state.weight"], names=["cheetah.pt", "hopper.pt"])
    assert one_line(e) == ("hopper.pt: cannot merge with cheetah.pt: tensor embed_state.weight is [16, 17] in this "
                           "model and [16, 11] in cheetah.pt (models of envs with other state or action sizes: select "
                           "the shared blocks, e.g. --include attn mlp)")


def test_the_task_vector_base_must_hold_the_keys_with_the_models_shapes():
    one, two = dt_state(1, seed=0), dt_state(2, seed=1)
    two_b = dt_state(2, seed=2)
    for merge in (merging.merge_task_arithmetic, merging.merge_ties):
        with pytest.raises(UserError) as e:
            merge([two, two_b], one, blocks(two), names=["x.pt", "y.pt"])
        assert one_line(e) == "the merge base has no tensor transformer.h.1.ln_1.weight"


def test_a_fisher_merge_of_incompatible_models_is_a_user_error():
    one, two = dt_state(1, seed=0), dt_state(2, seed=1)
    keys = blocks(two)
    with pytest.raises(UserError) as e:        # used to be a raw KeyError
        merging.merge_fisher([two, one], [_fishers([two], keys)[0]] * 2, keys)
    assert "tensor transformer.h.1.ln_1.weight is missing" in one_line(e)


def test_fisher_coefficients_are_one_per_model_finite_and_not_negative():
    sds = [{"w": torch.full((2,), float(i))} for i in range(3)]
    F = [{"w": torch.ones(2)}] * 3
    with pytest.raises(UserError) as e:        # used to merge the first model only (zip truncated)
        merging.merge_fisher(sds, F, ["w"], coeffs=[1.0])
    assert one_line(e) == "1 Fisher merge coefficients for 3 models"
    for bad in ([1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, float("nan"), 1.0]):
        with pytest.raises(UserError):
            merging.merge_fisher(sds, F, ["w"], coeffs=bad)
    out = merging.merge_fisher(sds, F, ["w"], norm="none", floor=0.0, coeffs=[0.0, 1.0, 1.0])
    assert torch.allclose(out["w"], torch.full((2,), 1.5))


def test_a_fisher_of_the_wrong_shape_or_kind_is_a_user_error():
    a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    with pytest.raises(UserError) as e:
        merging.merge_fisher([a, b], [{"w": torch.ones(2)}, {"w": torch.ones(3)}], ["w"])
    assert one_line(e) == "the Fisher of model 2: tensor w has shape [3], the model [2]"
    with pytest.raises(UserError) as e:        # used to be a raw AttributeError
        merging.merge_fisher([a, b], [{"w": torch.ones(2)}, {"w": 1.0}], ["w"])
    assert one_line(e) == "the Fisher of model 2: entry w is a float, not a tensor"


# ---- 3. merge_mean's weights ---------------------------------------------------------------------------------------------

def test_merge_mean_weights_must_sum_to_1():
    a, b = {"w": torch.ones(2)}, {"w": torch.ones(2)}
    with pytest.raises(UserError) as e:        # used to return θ1 + θ2
        merging.merge_mean([a, b], ["w"], weights=[1, 1])
    assert one_line(e) == "merge weights must sum to 1, got [1.0, 1.0] (sum 2)"


@pytest.mark.parametrize("weights", [[1.5, -0.5], [float("nan"), 1.0], [float("inf"), 0.0]])
def test_merge_mean_weights_must_be_finite_and_not_negative(weights):
    with pytest.raises(UserError) as e:
        merging.merge_mean([{"w": torch.ones(2)}, {"w": torch.zeros(2)}], ["w"], weights=weights)
    assert "merge weight" in one_line(e)


@pytest.mark.parametrize("p", [1.5, -0.1, float("nan")])
def test_merge_mean_p_must_be_in_0_1(p):
    with pytest.raises(UserError) as e:
        merging.merge_mean([{"w": torch.ones(2)}, {"w": torch.zeros(2)}], ["w"], p=p)
    assert "the merge weight p must be" in one_line(e)


def test_valid_weights_still_merge_exactly():
    sds = [{"w": torch.full((2,), float(i))} for i in range(3)]
    out = merging.merge_mean(sds, ["w"], weights=[0.2, 0.3, 0.5])
    assert torch.allclose(out["w"], torch.full((2,), 0.3 + 1.0))
    # the greedy soup's weight lists (0, 1/m, ..., 1/m) sum to 1 up to rounding: accepted
    kept_mean = merging.merge_mean(sds + sds[1:], ["w"], weights=[0.0] + [1 / 3] * 3 + [0.0])
    assert torch.allclose(kept_mean["w"], torch.full((2,), 4 / 3))
    # greedy soup: 0.5 and 1.5 average to the peak 1; trying 10 merges with weights (0, 1/3, 1/3, 1/3)
    soup = [{"w": torch.full((2,), v)} for v in (0.5, 1.5, 10.0)]
    merged, kept = merging.greedy_soup(soup, ["w"], lambda sd: -abs(float(sd["w"][0]) - 1.0))
    assert kept == [0, 1] and torch.allclose(merged["w"], torch.ones(2))


# ---- 4. RegMean and the Conv1D / nn.Linear layout ----------------------------------------------------------------------

class _LinearNet(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.l = torch.nn.Linear(3, 5)                   # weight [out, in] = [5, 3]

    def forward(self, x):
        return self.l(x)


def _linear_grams(seed):
    g = torch.Generator().manual_seed(seed)
    batch = SimpleNamespace(x=torch.randn(2, 4, 3, generator=g), mask=torch.ones(2, 4))
    net = _LinearNet(seed)
    return net, merging.collect_grams(net, ["l.weight"], [batch], lambda m, b: m(b.x))


def test_regmean_of_linear_layers_without_the_conv1d_map_is_refused():
    (n1, g1), (n2, g2) = _linear_grams(0), _linear_grams(1)
    states, grams = [n1.state_dict(), n2.state_dict()], [g1, g2]
    with pytest.raises(UserError) as e:        # used to crash in a matmul (wrong layout)
        merging.merge_regmean(states, grams, ["l.weight", "l.bias"])
    msg = one_line(e)
    assert msg.startswith("merge_regmean: the Gram matrix of l for model 1 has shape [3, 3], but its weight [5, 3] ")
    assert "conv1d" in msg and "linear_modules" in msg
    # with the map from linear_modules the merge is RegMean's formula in the nn.Linear layout
    conv1d = {name: is_conv for name, (_, is_conv) in merging.linear_modules(n1, ["l.weight"]).items()}
    assert conv1d == {"l": False}
    out = merging.merge_regmean(states, grams, ["l.weight", "l.bias"], alpha=0.5, conv1d=conv1d)
    Gt = [0.5 * G + 0.5 * torch.diag(torch.diag(G)) for G in (g1["l"], g2["l"])]
    W = [sd["l.weight"].double().T for sd in states]
    expect = torch.linalg.solve(Gt[0] + Gt[1], Gt[0] @ W[0] + Gt[1] @ W[1]).T
    torch.testing.assert_close(out["l.weight"], expect.float(), rtol=1e-5, atol=1e-6)


def test_regmean_of_a_dt_needs_the_conv1d_map_for_its_linear_heads():
    from test_fisher import fake_batch

    models = [DecisionTransformer(dt_config(1), seed=s) for s in (0, 1)]
    keys = ["transformer.h.0.mlp.c_fc.weight", "embed_state.weight"]
    grams = []
    for m in models:
        g, conv1d = merge_setup.gram_matrices(m, keys, [fake_batch(K=4)])
        grams.append(g)
    states = [m.state_dict() for m in models]
    with pytest.raises(UserError) as e:
        merging.merge_regmean(states, grams, keys)
    assert "the Gram matrix of embed_state for model 1 has shape [11, 11], but its weight [16, 11]" in one_line(e)
    out = merging.merge_regmean(states, grams, keys, conv1d=conv1d)
    assert out["embed_state.weight"].shape == (16, 11)


def test_regmean_needs_one_gram_set_per_model():
    (n1, g1), (n2, _) = _linear_grams(0), _linear_grams(1)
    with pytest.raises(UserError) as e:        # zip used to drop model 2 from the solve
        merging.merge_regmean([n1.state_dict(), n2.state_dict()], [g1], ["l.weight"], conv1d={"l": False})
    assert one_line(e) == "1 Gram matrix sets for 2 models"


def test_regmean_with_a_singular_gram_is_a_user_error():
    W = [torch.randn(3, 2, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    G = torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))   # input 2 never non-zero
    with pytest.raises(UserError) as e:        # used to be a raw torch LinAlgError
        merging.merge_regmean([{"l.weight": W[0]}, {"l.weight": W[1]}], [{"l": G}, {"l": G}], ["l.weight"])
    assert one_line(e).startswith("merge_regmean: the summed Gram matrix of l is singular")


def test_collect_grams_refuses_inputs_that_do_not_fit_the_step_mask():
    batch = SimpleNamespace(x=torch.randn(2, 5, 3), mask=torch.ones(2, 4))   # 5 tokens for 4 steps
    with pytest.raises(UserError) as e:        # used to be a raw IndexError
        merging.collect_grams(_LinearNet(0), ["l.weight"], [batch], lambda m, b: m(b.x))
    assert one_line(e) == ("collect_grams: the input of l has shape [2, 5, 3], not [B, r*K, in] for the step mask's "
                           "[2, 4] [B, K]")


# ---- 5. merge_cli reports the fraction without the token table --------------------------------------------------------

def test_merge_cli_reports_the_merged_fraction_with_and_without_wte(tmp_path, capsys):
    cfg = dt_config(1)
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"m{seed}.pt"
        atomic_save(make_checkpoint(dt_state(1, seed), {"env": "hopper", "dataset": "medium", "seed": seed,
                                                        "model_config": cfg.to_dict()}), path)
        paths.append(str(path))
    out = tmp_path / "merged.pt"
    capsys.readouterr()
    merge_cli.main(["--models", *paths, "--include", "attn", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    sd = load_checkpoint(paths[0])["state_dict"]
    keys = merging.select_keys(list(sd), ["attn"])
    _, tot, frac = merging.merged_fraction(sd, keys)
    _, _, frac_used = merging.merged_fraction({k: v for k, v in sd.items() if k != "transformer.wte.weight"}, keys)
    assert frac_used > 10 * frac
    assert (f"merge: mean of 2 models over 4 of {tot} tensors ({frac:.1%} of the parameters, {frac_used:.1%} without "
            f"the unused token table wte); the rest from {paths[0]}") in err
    info = load_checkpoint(out)["config"]["merge_info"]
    assert info["merged_fraction"] == pytest.approx(frac)
    assert info["merged_fraction_without_wte"] == pytest.approx(frac_used)
    # an unequal weight is said, and one that gives a model all of it is said plainly
    for p, words in (("0.2", "mean of 2 models weighted 0.8 : 0.2 (--p 0.2)"),
                     ("0", "mean of 2 models weighted 1 : 0 (--p 0) (model 1 alone)"),
                     ("1", "mean of 2 models weighted 0 : 1 (--p 1) (model 2 alone)")):
        merge_cli.main(["--models", *paths, "--include", "attn", "--device", "cpu", "--out", str(out), "--p", p,
                        "--force"])
        err = capsys.readouterr().err
        assert f"merge: {words} over 4 of {tot} tensors" in err and f"merged checkpoint ({words})" in err
    assert merge_setup.merge_words("fisher", 3, 0.0) == "fisher of 3 models"     # --p weighs two models only
    assert merge_setup.merge_words("ties", 2, 0.0) == "ties of 2 models"


# ---- 6. --p where it weights nothing, --out a folder -------------------------------------------------------------------

def test_p_that_weights_nothing_is_warned_about_and_an_out_folder_is_refused_before_loading(tmp_path, capsys):
    """--p weights the two models of a mean or Fisher merge: with 3 models (or task arithmetic) it changes nothing,
    which a warning says (the merge stays the uniform one); --out naming a folder is one line before any model is
    read (it failed only after the merge was computed)."""
    cfg = dt_config(1)
    paths = []
    for seed in (0, 1, 2):
        path = tmp_path / f"m{seed}.pt"
        atomic_save(make_checkpoint(dt_state(1, seed), {"env": "hopper", "dataset": "medium", "seed": 0,
                                                        "model_config": cfg.to_dict()}), path)
        paths.append(str(path))
    base = ["--include", "attn", "--device", "cpu"]
    merge_cli.main(["--models", *paths, *base, "--out", str(tmp_path / "plain.pt")])
    capsys.readouterr()
    merge_cli.main(["--models", *paths, *base, "--p", "0.9", "--out", str(tmp_path / "p.pt")])
    assert "warning: --p 0.9 has no effect on a mean merge of 3 models" in capsys.readouterr().err
    a, b = (load_checkpoint(tmp_path / f)["state_dict"] for f in ("plain.pt", "p.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    merge_cli.main(["--models", *paths[:2], *base, "--p", "0.9", "--out", str(tmp_path / "two.pt")])
    assert "warning" not in capsys.readouterr().err                  # two models: --p weights them
    merge_cli.main(["--models", *paths[:2], *base, "--p", "0.9", "--merge_method", "task_arithmetic",
                    "--merge_base", paths[2], "--out", str(tmp_path / "ta.pt")])
    assert "warning: --p 0.9 has no effect on a task_arithmetic merge of 2 models" in capsys.readouterr().err
    folder = tmp_path / "outdir"
    folder.mkdir()
    with pytest.raises(SystemExit) as e:
        merge_cli.main(["--models", *paths, *base, "--out", str(folder)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: --out {folder} is a folder; name the merged checkpoint's file" in err and "merge:" not in err


def test_experiment_merge_flags_warn_about_a_p_that_weights_nothing(capsys):
    from decision_transformer.cli import experiment_parser
    from decision_transformer.merge_setup import check_experiment_merge

    for models, extra, warned in ((["a", "b", "c"], [], True), (["a", "b"], [], False),
                                  (["a", "b"], ["--merge_method", "ties"], True),
                                  (["a"], ["--pretrained_lm", "gpt2"], False), (["a"], [], False)):
        check_experiment_merge(experiment_parser().parse_args(["--pretrained_models", *models, "--p", "0.9", *extra]))
        assert ("warning: --p 0.9 has no effect" in capsys.readouterr().err) == warned, (models, extra)


@pytest.mark.parametrize("method", ["mean", "ties", "task_arithmetic"])
def test_a_source_with_a_nan_weight_is_refused_by_every_method(tmp_path, capsys, method):
    """TIES trimmed a NaN away and wrote a merge of a damaged file; every method now refuses it, naming the file and
    the tensor, before anything is computed."""
    cfg = dt_config(1)
    paths = []
    for seed in (0, 1, 2):
        sd = dt_state(1, seed)
        if seed == 1:
            k = next(k for k in sd if k.endswith("attn.c_attn.weight"))
            sd[k][0, 0] = float("nan")
        path = tmp_path / f"m{seed}.pt"
        atomic_save(make_checkpoint(sd, {"env": "hopper", "dataset": "medium", "seed": 0,
                                         "model_config": cfg.to_dict()}), path)
        paths.append(str(path))
    out = tmp_path / "merged.pt"
    with pytest.raises(SystemExit) as e:
        merge_cli.main(["--models", paths[0], paths[1], "--include", "attn", "--device", "cpu", "--merge_method",
                        method, "--merge_base", paths[2], "--out", str(out)])
    assert e.value.code == 2
    assert f"error: {paths[1]}: tensor {k} contains NaN or inf" in capsys.readouterr().err
    assert not out.exists()


# ---- 6. non-finite inputs through the library ------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_model_tensor_is_refused_by_every_method_called_directly(method, value):
    states = [dt_state(seed=0), dt_state(seed=1)]
    keys = blocks(states[0])
    states[1]["transformer.h.0.mlp.c_fc.weight"][0, 0] = value   # TIES used to trim it away, silently
    with pytest.raises(UserError) as e:
        METHODS[method](states, keys)
    assert one_line(e) == "model 2: tensor transformer.h.0.mlp.c_fc.weight contains NaN or inf"


@pytest.mark.parametrize("merge", [merging.merge_task_arithmetic, merging.merge_ties])
def test_a_non_finite_task_vector_base_is_refused(merge):
    states = [dt_state(seed=0), dt_state(seed=1)]
    base = dt_state(seed=2)
    base["transformer.h.0.attn.c_attn.weight"][1, 2] = float("inf")
    with pytest.raises(UserError) as e:
        merge(states, base, blocks(states[0]))
    assert one_line(e) == "the merge base: tensor transformer.h.0.attn.c_attn.weight contains NaN or inf"


def test_a_fisher_with_a_nan_or_a_negative_entry_is_refused():
    a, b = {"w": torch.zeros(2), "v": torch.ones(2)}, {"w": torch.ones(2), "v": torch.ones(2)}
    good = {"w": torch.ones(2), "v": torch.ones(2)}
    for bad, why in ((float("nan"), "contains NaN or inf"), (-0.5, "has negative entries; a diagonal Fisher is >= 0")):
        F = {"w": torch.ones(2), "v": torch.tensor([1.0, bad])}   # v is outside the merged keys: it still normalises
        with pytest.raises(UserError) as e:                         # (a NaN used to turn every merged tensor NaN)
            merging.merge_fisher([a, b], [good, F], ["w"])
        assert one_line(e) == f"the Fisher of model 2: tensor v {why}"
    assert torch.allclose(merging.merge_fisher([a, b], [good, good], ["w"])["w"], torch.full((2,), 0.5))


def test_regmean_refuses_a_non_finite_gram():
    W = [torch.randn(3, 2, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    G = torch.eye(3, dtype=torch.float64)
    bad = G.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(UserError) as e:
        merging.merge_regmean([{"l.weight": W[0]}, {"l.weight": W[1]}], [{"l": G}, {"l": bad}], ["l.weight"])
    assert one_line(e) == "merge_regmean: the Gram matrices of model 2: tensor l contains NaN or inf"


def test_favor_target_with_p_1_is_refused_before_any_model_is_read(tmp_path, capsys):
    """--fisher_favor_target floors model 1's Fisher only; --p 1 gives model 1 no weight, so where model 2's Fisher is
    0 the merge was 0/0 (a NaN stop after the Fisher estimates, without the reason). Refused up front, in the
    library, merge_cli and experiment.py alike."""
    from decision_transformer.cli import experiment_parser
    from decision_transformer.merge_setup import check_experiment_merge

    a, b = dt_state(1, 0), dt_state(1, 1)
    keys = [k for k in a if ".attn.c_attn.weight" in k]
    fa, fb = {k: torch.rand_like(a[k]) for k in keys}, {k: torch.rand_like(b[k]) for k in keys}
    fb[keys[0]][0, 0] = 0.0
    with pytest.raises(UserError, match="favor_target floors only model 1's Fisher, whose merge coefficient is 0"):
        merging.merge_fisher([a, b], [fa, fb], keys, favor_target=True, coeffs=[0.0, 1.0])
    out = merging.merge_fisher([a, b], [fa, fb], keys, favor_target=True, coeffs=[0.01, 0.99])
    assert all(torch.isfinite(out[k]).all() for k in keys)
    msg = ("error: --fisher_favor_target floors only model 1's Fisher, and --p 1 gives model 1 no weight: where model "
           "2's Fisher is 0 the merge would be 0/0; use --p below 1 or leave out --fisher_favor_target")
    missing = [str(tmp_path / "no_such_a.pt"), str(tmp_path / "no_such_b.pt")]   # (never read: refused first)
    assert fails(merge_cli.main, ["--models", *missing, "--merge_method", "fisher", "--fisher_favor_target", "--p", "1",
                                  "--out", tmp_path / "m.pt"], capsys) == msg
    with pytest.raises(UserError) as e:
        check_experiment_merge(experiment_parser().parse_args(["--pretrained_models", "a", "b", "--use_fisher",
                                                               "--fisher_favor_target", "--p", "1"]))
    assert f"error: {e.value}" == msg
    for flags in (["--use_fisher", "--fisher_favor_target", "--p", "0.9"], ["--use_fisher", "--p", "1"],
                  ["--fisher_favor_target", "--p", "1"]):                  # (the last: a mean merge, no Fisher)
        check_experiment_merge(experiment_parser().parse_args(["--pretrained_models", "a", "b", *flags]))
