"""CKA against published and hand-derived values, its invariances, and the per-block activation hooks."""
import math

import numpy as np
import pytest
import torch
from test_analysis_support import tiny_config

from decision_transformer.analysis.activations import (
    BLOCK_ENTRIES,
    get_activations,
    hooked_modules,
)
from decision_transformer.analysis.cka import (
    cka,
    cka_matrix,
    gram_linear,
    gram_rbf,
    linear_cka,
    select_tokens,
    token_features,
)
from decision_transformer.data import Batch
from decision_transformer.errors import UserError
from decision_transformer.models import DecisionTransformer
from decision_transformer.models.gpt2 import eager_attention


@pytest.fixture(scope="module")
def xy():
    # Kornblith et al.'s demo data (google-research representation_similarity), numpy's legacy seeding.
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = x + np.random.randn(100, 10)
    return x, y


def test_published_values(xy):
    """The values printed by the reference notebook for this data: linear 0.55761, debiased 0.51346, RBF(0.5)
    0.65483 (analysis.md §2)."""
    x, y = xy
    assert linear_cka(x, y) == pytest.approx(0.55761, abs=5e-6)
    assert linear_cka(x, y, debiased=True) == pytest.approx(0.51346, abs=5e-6)
    assert cka(gram_rbf(x, 0.5), gram_rbf(y, 0.5)) == pytest.approx(0.65483, abs=5e-6)


def test_hand_derived_values():
    rng = np.random.default_rng(0)
    # 1-D representations: K~ = x~x~ᵀ, so linear CKA = (x~·y~)² / (|x~|²|y~|²) = squared Pearson correlation.
    a, b = rng.standard_normal(50), rng.standard_normal(50)
    assert linear_cka(a[:, None], b[:, None]) == pytest.approx(np.corrcoef(a, b)[0, 1] ** 2, rel=1e-10)
    # X = [u], Y = [u, v] with centred u ⟂ v, |u| = |v|: <K~, L~> = |u|⁴, |L~| = √2 |u|² -> CKA = 1/√2.
    q, _ = np.linalg.qr(rng.standard_normal((40, 3)))
    u = q[:, 1] - q[:, 1].mean()
    v = q[:, 2] - q[:, 2].mean()
    v = v - (v @ u) / (u @ u) * u            # exactly orthogonal after centring
    v = v / np.linalg.norm(v) * np.linalg.norm(u)
    assert linear_cka(u[:, None], np.stack([u, v], 1)) == pytest.approx(1 / math.sqrt(2), rel=1e-10)


@pytest.mark.parametrize("kind", ["linear", "debiased", "rbf"])
def test_invariances(xy, kind):
    x, y = xy

    def f(a, b):
        if kind == "rbf":
            return cka(gram_rbf(a, 0.5), gram_rbf(b, 0.5))
        return linear_cka(a, b, debiased=kind == "debiased")

    base = f(x, y)
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((10, 10)))
    assert f(x, x) == pytest.approx(1.0, abs=1e-12)                     # self-similarity
    assert f(3.7 * x, y) == pytest.approx(base, rel=1e-9)                  # isotropic scaling
    assert f(x @ q, y) == pytest.approx(base, rel=1e-9)                    # orthogonal transform
    assert f(x + 5.0, y) == pytest.approx(base, rel=1e-9)                  # translation (centring)
    assert f(y, x) == pytest.approx(base, rel=1e-12)                       # symmetry
    # and not invariant to an anisotropic scaling, so the checks above are not vacuous
    assert abs(f(x * np.r_[10.0, np.ones(9)], y) - base) > 1e-2


def test_cka_matrix_matches_pairs(xy):
    x, y = xy
    feats = [torch.tensor(x), torch.tensor(y), torch.tensor(x[:, :3])]
    m = cka_matrix(feats, feats[:2], debiased=True, eps=0.0)
    assert m.shape == (3, 2)
    for i, a in enumerate(feats):
        for j, b in enumerate(feats[:2]):
            assert m[i, j] == pytest.approx(cka(gram_linear(a), gram_linear(b), debiased=True), rel=1e-12)
    assert np.allclose(np.diag(cka_matrix(feats, feats)), 1.0, atol=1e-12)
    # TAKAGI's eps = 1e-6 breaks scale invariance for small activations; the default (eps 0) does not
    tiny = [1e-5 * f for f in feats]
    assert np.allclose(cka_matrix(tiny, tiny), cka_matrix(feats, feats), atol=1e-12)
    assert cka_matrix(tiny, tiny, eps=1e-6)[0, 0] < 0.5
    assert abs(cka_matrix([torch.ones(100, 3)], feats[:1])[0, 0]) < 1e-9   # constant representation: 0, not NaN
    for a, b in (([], feats), (feats, [])):                                 # (was a torch.stack traceback)
        with pytest.raises(UserError, match="^CKA needs at least one layer's features on each side, got"):
            cka_matrix(a, b)


def test_token_selection_positions_and_legacy_axis():
    B, T, D = 4, 15, 8                        # K = 5 steps -> 15 tokens
    act = torch.arange(B * T * D, dtype=torch.float32).reshape(B, T, D)
    sel = select_tokens(act)
    assert torch.equal(token_features(sel, "reward"), act[:, -3])       # R̂_K
    assert torch.equal(token_features(sel, "state"), act[:, -2])        # s_K
    assert torch.equal(token_features(sel, "action"), act[:, -1])       # a_K
    leg = select_tokens(act, legacy_feature_index=True)
    assert torch.equal(token_features(leg, "state", True), act[:, :, -2])  # TAKAGI: a hidden unit over positions
    assert token_features(leg, "state", True).shape == (B, T)


def _batch(B=3, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, K)
    mask[0, :2] = 0
    return Batch(torch.randn(B, K, 11, generator=g), torch.rand(B, K, 3, generator=g) * 2 - 1, torch.zeros(B, K, 1),
                 torch.zeros(B, K), torch.rand(B, K + 1, 1, generator=g), torch.randint(0, 50, (B, K), generator=g),
                 mask)


def test_activation_hooks_per_block():
    model = DecisionTransformer(tiny_config(n_layer=3), seed=0).eval()
    batch = _batch()
    acts = get_activations(model, batch)
    assert list(acts) == [f"{i}.{e}" for i in range(3) for e in BLOCK_ENTRIES]  # 9 per block, original order
    H = 16
    assert acts["0.attn.c_attn"].shape == (3, 12, 3 * H) and acts["2.mlp.act"].shape == (3, 12, 4 * H)
    # mlp.dropout is the MLP branch before the residual add: h_{i+1} = h_i + attn branch + MLP branch
    with eager_attention(model):   # the masking get_activations uses (they differ at left-padded steps only)
        out = model(*[batch.states, batch.actions, batch.rtg[:, :-1], batch.timesteps], attention_mask=batch.mask,
                    output_hidden_states=True)
    hs = out.hidden_states
    for i in range(2):
        assert torch.allclose(hs[i + 1], hs[i] + acts[f"{i}.attn.resid_dropout"] + acts[f"{i}.mlp.dropout"],
                              atol=1e-5)
    # every block's activation module is its own: the mlp.act entries differ between blocks
    assert not torch.allclose(acts["0.mlp.act"], acts["2.mlp.act"])
    assert torch.equal(acts["1.mlp.act"], torch.relu(acts["1.mlp.c_fc"]))
    # hooks are removed afterwards
    assert all(not m._forward_hooks for m in hooked_modules(model).values())


def test_shared_module_is_refused():
    model = DecisionTransformer(tiny_config(n_layer=2), seed=0)
    model.transformer.h[1].mlp.act = model.transformer.h[0].mlp.act   # the transformers 4.17-4.23 aliasing
    with pytest.raises(UserError, match="same object"):
        hooked_modules(model)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [True, False], ids=["debiased", "biased"])
def test_constant_representations_get_exactly_zero(xy, kernel, debiased):
    """A constant representation (one activation vector for every example, e.g. a dead layer) has an all-zero
    centred Gram; rounding must not turn it into the cosine of two noise patterns."""
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(1, 64, generator=g) * 3).expand(100, 64)
    b = (torch.randn(1, 64, generator=g) * 3).expand(100, 64)
    x = torch.tensor(xy[0])
    part = x.clone()
    part[:, :4] = 0.1                                     # constant columns beside varying ones: no effect
    m = cka_matrix([a, b, x, part], [b, x, x[:, 4:]], kernel=kernel, debiased=debiased, threshold=0.5)
    assert np.array_equal(m[:2], np.zeros((2, 3))) and np.array_equal(m[:, 0], np.zeros(4))
    assert m[2, 1] == pytest.approx(1.0, abs=1e-12) and m[3, 2] == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(np.zeros((10, 3)), xy[0][:10]) == 0.0


def test_rbf_bandwidth_is_the_median_beyond_torch_quantile_limits():
    from decision_transformer.analysis.cka import _median

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 10):
        v = rng.standard_normal(n)
        assert _median(torch.tensor(v)) == pytest.approx(float(np.median(v)), rel=1e-15)
    x = torch.randn(4100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))   # 4100² > 2^24
    sq = torch.cdist(x, x) ** 2
    expected = torch.exp(-sq / (2 * 0.5 ** 2 * float(np.median(sq.numpy()))))
    torch.testing.assert_close(gram_rbf(x, 0.5), expected, atol=1e-9, rtol=0)


def test_depth_normalisation_pairs_blocks_or_as_the_original_consecutive_entries():
    """iGPT's 24 x 9 diagonal onto 12 blocks: by default the same entry of blocks 2b and 2b+1; with legacy_pairing
    consecutive values of the flattened sequence (TAKAGI's plot_cka.py), whose pairs straddle blocks."""
    from decision_transformer.analysis.cka import normalise_depth

    names = [f"{b}.{e}" for b in range(24) for e in BLOCK_ENTRIES]
    diag = np.random.default_rng(0).random(len(names))
    per = len(BLOCK_ENTRIES)
    ours, ours_names = normalise_depth(diag, names, 12)
    assert ours_names == [f"{b}.{e}" for b in range(12) for e in BLOCK_ENTRIES]
    assert ours[0] == pytest.approx((diag[0] + diag[per]) / 2)                          # 0.ln_1 with 1.ln_1
    assert ours[per * 5 + 3] == pytest.approx((diag[per * 10 + 3] + diag[per * 11 + 3]) / 2)
    legacy, legacy_names = normalise_depth(diag, names, 12, legacy_pairing=True)
    np.testing.assert_allclose(legacy, diag.reshape(-1, 2).mean(axis=1))               # entries 2i and 2i+1
    assert legacy_names[0] == "0.0.ln_1+0.attn.c_attn" and len(legacy_names) == 12 * per
    assert legacy_names[4] == f"0.{names[8]}+{names[9]}"                                 # straddles blocks 0 and 1
    assert [int(n.split(".")[0]) for n in legacy_names] == [i // per for i in range(12 * per)]
    same, same_names = normalise_depth(diag[:12 * per], names[:12 * per], 12, legacy_pairing=True)
    assert same_names == names[:12 * per] and np.array_equal(same, diag[:12 * per])  # 12 blocks: unchanged


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_features_are_refused_not_read_as_cka_0(xy, value):
    x, y = xy
    bad = x.copy()
    bad[0, 0] = value
    for call in (lambda: cka_matrix([bad], [y]), lambda: cka_matrix([x], [y, bad]),
                 lambda: linear_cka(bad, y), lambda: cka(gram_rbf(x), gram_linear(bad))):
        with pytest.raises(UserError, match="^CKA features contain NaN or inf$"):   # cka_matrix used to give 0
            call()
    gram = gram_linear(x)
    gram[0, 1] = value
    with pytest.raises(UserError, match="^a Gram matrix contains NaN or inf$"):
        cka(gram, gram_linear(y))


def test_features_of_other_example_counts_are_refused(xy):
    x, y = xy
    with pytest.raises(UserError, match=r"the same examples: the features hold \[99, 100\] examples"):
        cka_matrix([x], [y[:99]])
    with pytest.raises(UserError, match="the same examples: Grams of 100 and 99 examples"):
        linear_cka(x, y[:99])
    with pytest.raises(UserError, match=r"must be square \[n, n\], got shape \[100, 3\]"):
        cka(gram_linear(x), y[:, :3])
