"""Per-sample gradients (torch.func) against an explicit per-sample loop, gradient confusion and norms, and the
attention distance on hand-built attention maps."""
import math

import numpy as np
import pytest
import torch
from test_analysis_support import tiny_config, tiny_runs  # noqa: F401

from decision_transformer.analysis.attention import (
    attention_distance,
    legacy_attention_distance,
    model_attention_distances,
)
from decision_transformer.analysis.grads import (
    GradStats,
    full_batch_param_norms,
    grad_confusion,
    mean_pairwise_cosine,
    per_sample_grad_stats,
    used_parameters,
)
from decision_transformer.data import Batch
from decision_transformer.models import DecisionTransformer
from decision_transformer.training import masked_action_mse



def _batch(B=5, K=4, seed=0, action_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, K)
    mask[0, :2] = 0
    mask[1, :1] = 0
    return Batch(torch.randn(B, K, 11, generator=g), action_scale * (torch.rand(B, K, 3, generator=g) * 2 - 1),
                 torch.zeros(B, K, 1), torch.zeros(B, K), torch.rand(B, K + 1, 1, generator=g),
                 torch.randint(0, 50, (B, K), generator=g), mask)


def _loop_grads(model, batch, clip):
    """The originals' loop: each sample alone, masked MSE, backward, clip_grad_norm_(all, clip), flatten h."""
    model.eval()
    out = []
    for i in range(batch.states.shape[0]):
        model.zero_grad()
        sl = slice(i, i + 1)
        pred = model(batch.states[sl], batch.actions[sl], batch.rtg[sl, :-1], batch.timesteps[sl],
                     attention_mask=batch.mask[sl]).action_preds
        masked_action_mse(pred, batch.actions[sl], batch.mask[sl]).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        out.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n.startswith("transformer.h.")]))
    model.zero_grad()
    return torch.stack(out).double()


@pytest.fixture(scope="module")
def model():
    return DecisionTransformer(tiny_config(n_layer=2), seed=0)


def test_cosine_eps_is_the_originals_additive_term(model):
    """--eps e divides by ‖gᵢ‖‖gⱼ‖ + e (the original's 1e-6, which shrinks the cosines of small clipped gradients);
    the default divides by the product alone."""
    batch = _batch(action_scale=30.0)
    st = per_sample_grad_stats(model, batch, train_mode=False)
    g = _loop_grads(model, batch, 0.25)
    dot, n = g @ g.T, g.norm(dim=1)
    prod = n[:, None] * n[None, :]
    torch.testing.assert_close(st.cosine(0.25), (dot / prod).to(st.cosine(0.25).dtype), rtol=1e-5, atol=1e-6)
    e = 1e-2                                               # large enough to be seen next to clipped norms <= 0.25
    torch.testing.assert_close(st.cosine(0.25, eps=e), (dot / (prod + e)).to(st.cosine(0.25).dtype), rtol=1e-5,
                               atol=1e-6)
    assert (st.cosine(0.25, eps=e).abs() < st.cosine(0.25).abs() - 1e-4).all()


def test_the_default_cosine_does_not_depend_on_the_gradients_scale():
    """Without --eps the cosine is that of the directions: gradients with norms of 1e-2, 1e-4 or 1e-7 (products far
    below 1e-6, which the product's lower bound of 1e-6 used to shrink towards 0) give the same matrix, with its
    diagonal of ones; a zero gradient's cosines are 0."""
    g = torch.randn(5, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g[4] = 0.0
    expected = torch.nn.functional.cosine_similarity(g[:, None], g[None], dim=-1)   # (0 where a norm is 0)
    for scale in (1e-2, 1e-4, 1e-7):
        gs = g / g[:4].norm(dim=1).max() * scale
        st = GradStats(gram_h=gs @ gs.T, sqnorm_h=(gs * gs).sum(1), sqnorm_all=(gs * gs).sum(1))
        cos = st.cosine(0.25)
        torch.testing.assert_close(cos, expected, rtol=1e-9, atol=1e-12)
        assert torch.allclose(torch.diagonal(cos)[:4], torch.ones(4, dtype=cos.dtype), rtol=1e-12, atol=0)


def test_used_parameters_skip_the_unused_tables(model):
    names = used_parameters(model, _batch())
    assert "transformer.wte.weight" not in names and "transformer.wpe.weight" not in names
    assert "transformer.h.1.mlp.c_proj.bias" in names and "embed_timestep.weight" in names


@pytest.mark.parametrize("action_scale", [1.0, 30.0])  # 30: targets far off, norms above 0.25, the clip acts
def test_vmap_matches_explicit_loop(model, action_scale):
    batch = _batch(action_scale=action_scale)
    st = per_sample_grad_stats(model, batch, train_mode=False)
    g_clip, g_raw = _loop_grads(model, batch, 0.25), _loop_grads(model, batch, None)
    cos = torch.nn.functional.cosine_similarity(g_clip[:, None], g_clip[None], dim=-1)
    assert torch.allclose(st.cosine(0.25), cos, atol=1e-6)
    assert torch.allclose(st.h_norms(0.25), g_clip.norm(dim=1), rtol=1e-5)
    assert torch.allclose(st.h_norms(None), g_raw.norm(dim=1), rtol=1e-5)
    assert torch.allclose(st.gram_h, g_raw @ g_raw.T, rtol=1e-4, atol=1e-10)
    assert (st.h_norms(0.25) <= 0.25 + 1e-6).all()
    if action_scale > 1:
        assert (st.sqnorm_all.sqrt() > 0.25).all()          # the clip was active for every sample
    off = ~torch.eye(5, dtype=torch.bool)
    assert grad_confusion(cos) == pytest.approx(float(cos[off].min()), abs=1e-6)


def test_memory_bounded_passes_are_identical_in_train_mode(model, monkeypatch):
    """Dropout on: the Gram accumulated over one pass per tensor equals the single-pass one (same seeded masks)."""
    from decision_transformer.analysis import grads

    passes = []  # the parameter names of each per-sample-gradient pass
    real = grads.per_sample_grads
    monkeypatch.setattr(grads, "per_sample_grads", lambda m, b, names, **k: (passes.append(list(names)),
                                                                                 real(m, b, names, **k))[1])
    batch = _batch()
    names = used_parameters(model, batch)
    one = per_sample_grad_stats(model, batch, train_mode=True, seed=7)
    assert passes == [names]                                    # the default bound: a single pass
    passes.clear()
    many = per_sample_grad_stats(model, batch, train_mode=True, seed=7, max_bytes=1)
    assert len(names) > 1 and passes == [[k] for k in names]    # max_bytes=1: one pass per tensor
    assert torch.allclose(one.gram_h, many.gram_h, rtol=1e-6, atol=1e-12)
    assert torch.equal(one.sqnorm_all, many.sqnorm_all) or torch.allclose(one.sqnorm_all, many.sqnorm_all, rtol=1e-9)
    ev = per_sample_grad_stats(model, batch, train_mode=False)
    assert not torch.allclose(one.gram_h, ev.gram_h)          # dropout really was on
    other = per_sample_grad_stats(model, batch, train_mode=True, seed=8)
    assert not torch.allclose(one.gram_h, other.gram_h)        # and the seed picks the masks


def test_full_batch_param_norms(model):
    batch = _batch(action_scale=30.0)
    norms = full_batch_param_norms(model, batch, clip=0.25, train_mode=False)
    model.eval()
    model.zero_grad()
    pred = model(batch.states, batch.actions, batch.rtg[:, :-1], batch.timesteps, attention_mask=batch.mask).action_preds
    masked_action_mse(pred, batch.actions, batch.mask).backward()
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
    assert total > 0.25
    for k, p in model.named_parameters():
        if k.startswith("transformer.h."):
            assert norms[k[len("transformer.h."):]] == pytest.approx(float(p.grad.norm()), rel=1e-5)
    assert list(norms)[:2] == ["0.ln_1.weight", "0.ln_1.bias"]
    model.zero_grad()


# ---- attention distance ------------------------------------------------------------------------------------------

def test_attention_distance_on_hand_built_maps():
    T = 6
    eye = torch.eye(T)[None, None]                                             # every query attends to itself
    assert attention_distance(eye).item() == 0.0
    first = torch.zeros(1, 1, T, T)
    first[..., 0] = 1.0                                                        # everyone attends to token 0
    assert attention_distance(first).item() == pytest.approx(sum(range(T)) / T)        # mean q = 2.5
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]  # causal uniform: mean |q-k| = q/2
    assert attention_distance(uniform[None, None]).item() == pytest.approx((T - 1) / 4)
    # padding: the first 3 tokens (one timestep) padded -> only queries 3..5 count
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert attention_distance(first, mask).item() == pytest.approx((3 + 4 + 5) / 3)
    # timestep unit: |q//3 - k//3|
    assert attention_distance(first, unit="timestep").item() == pytest.approx((0 + 0 + 0 + 1 + 1 + 1) / T)
    # two heads, two samples -> [B, H]
    both = torch.cat([torch.cat([eye, first], 1), torch.cat([first, eye], 1)], 0)
    assert torch.allclose(attention_distance(both), torch.tensor([[0.0, 2.5], [2.5, 0.0]], dtype=torch.float64))


def test_legacy_attention_distance_by_hand():
    """Q = 0: softmax over all T keys is 1/T everywhere, then tril: d = Σ_{i≥j} (i-j) / T / T² = (T²-1)/(6T²)."""
    T, D = 6, 4
    c_attn = torch.cat([torch.zeros(2, T, D), torch.randn(2, T, 2 * D)], dim=-1)
    expected = (T - 1) * T * (T + 1) / 6 / T / T ** 2
    assert torch.allclose(legacy_attention_distance(c_attn), torch.full((2,), expected, dtype=torch.float64))
    # --distance_unit timestep: |i//3 - j//3| (it was ignored, and the file tagged _timestep held token distances)
    steps = sum(i // 3 - j // 3 for i in range(T) for j in range(i + 1)) / T / T ** 2
    assert torch.allclose(legacy_attention_distance(c_attn, "timestep"), torch.full((2,), steps, dtype=torch.float64))


def test_model_attention_is_masked_and_per_head():
    model = DecisionTransformer(tiny_config(K=1, n_layer=2, n_head=2), seed=0).eval()
    batch = _batch(B=3, K=5)                                    # a K=1 model fed 5-step contexts
    d = model_attention_distances(model, batch)
    assert d.shape == (3, 2, 2) and np.isfinite(d).all()
    out = model(batch.states, batch.actions, batch.rtg[:, :-1], batch.timesteps, attention_mask=batch.mask,
                output_attentions=True)
    probs = out.attentions[0]                                   # [B, heads, 15, 15]
    assert torch.allclose(probs.sum(-1), torch.ones(3, 2, 15), atol=1e-5)
    assert probs[0, :, 8, 0:6].max() < 1e-6                     # sample 0: 2 padded steps get no attention
    real_queries = probs[0, :, 6:]                              # sample 0's unpadded query rows
    assert real_queries.triu(7).max() < 1e-6 and probs[2].triu(1).max() < 1e-6   # causal
    # (a padded query row has every key masked, so its softmax also spreads over future keys: such rows are
    # excluded from the distance)
    tm = batch.mask.repeat_interleave(3, 1)
    assert np.allclose(d[:, 0], attention_distance(probs.detach(), tm).numpy())
    legacy = model_attention_distances(model, batch, legacy=True)
    assert legacy.shape == (3, 2, 1) and not math.isclose(float(legacy[0, 0, 0]), float(d[0, 0].mean()))
    legacy_steps = model_attention_distances(model, batch, unit="timestep", legacy=True)
    assert (legacy_steps < legacy).all()                        # |i//3 - j//3| < |i - j| for some pairs of every row


def test_the_confusion_script_applies_eps(tmp_path, tiny_runs):  # noqa: F811
    """compute_grad_confusion.py's --eps reaches the saved cosines (default 0: the plain cosine; the original's
    additive term shrinks every off-diagonal cosine towards 0)."""
    from decision_transformer.analysis import grads

    assert grads.build_confusion_parser().parse_args([]).eps == 0.0
    saved = {}
    for eps in ("0", "1e-2"):
        res = tmp_path / eps
        grads.run_confusion(grads.build_confusion_parser().parse_args([str(a) for a in [
            "--checkpoint_dir", tiny_runs, "--env_name_list", "hopper", "--model_name_list", "dt", "--epoch", "1",
            "--K", "3", "--batch_size", "4", "--results_dir", res, "--figs_dir", tmp_path / "figs", "--eps", eps]]))
        tag = "_bs4" + ("_eps0.01" if eps != "0" else "") + "_ctx3"   # --batch_size 4, --eps and --K tag the name
        saved[eps] = np.load(res / f"gradcossim_1_dt_hopper_medium_666{tag}.npy")
    off = ~np.eye(4, dtype=bool)
    assert (np.abs(saved["1e-2"][off]) < np.abs(saved["0"][off])).all()


def test_confusion_and_mean_cosine_leave_the_diagonal_out():
    assert mean_pairwise_cosine(torch.eye(3)) == 0
    assert mean_pairwise_cosine(torch.tensor([[1., .5], [.5, 1.]])) == .5
    # with eps a small gradient's cosine with itself falls below 1, even below its cosines with the others
    cos = torch.tensor([[.2, .9], [.9, 1.]])
    assert grad_confusion(cos) == pytest.approx(.9)
    assert mean_pairwise_cosine(cos) == pytest.approx(.9)


def test_a_zero_transformer_h_gradient_is_warned_of_once_per_sample(capsys):
    GradStats(None, torch.tensor([0., 1., 1.]), torch.ones(3)).check("src")
    assert capsys.readouterr().err == ("warning: src: 1 of 3 samples have a zero transformer.h gradient (their "
                                       "cosines are 0)\n")
    GradStats(None, torch.ones(3), torch.ones(3)).check("src")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("which", ["confusion", "norms", "attention", "params", "activations"])
def test_a_missing_later_model_stops_the_per_model_scripts_before_any_result(tmp_path, tiny_runs, which):  # noqa: F811
    """--model_name_list dt igpt where igpt has no seed-42 run: one line naming the missing checkpoint, and no
    result of dt (the first model) is written; before, dt's files were saved and then the script stopped."""
    from decision_transformer.analysis import attention, grads, mi, params
    from decision_transformer.errors import UserError

    io = ["--results_dir", tmp_path / "res", "--figs_dir", tmp_path / "figs"]
    batch = ["--K", "3", "--batch_size", "4"]
    build, run, argv, per_model = {
        "confusion": (grads.build_confusion_parser, grads.run_confusion,
                      ["--env_name_list", "hopper", "--model_name_list", "dt", "igpt", "--epoch", "1", *batch],
                      "gradcossim_1_{}_hopper_medium_42_bs4_ctx3.npy"),
        "norms": (grads.build_norm_parser, grads.run_norms,
                  ["--env_name_list", "hopper", "--model_name_list", "dt", "igpt", "--epoch", "1", *batch],
                  "gradnorm_perparam_1_{}_hopper_medium_42_bs4_ctx3.npy"),
        "attention": (attention.build_parser, attention.run,
                      ["--env_name_list", "hopper", "--model_name_list", "dt", "igpt", "--epoch1", "1", "--epoch2",
                       "2", "--run_K", "20", *batch], "att_dist_1_{}_hopper_medium_42_K20_bs4_ctx3.npy"),
        "params": (params.build_parser, params.run,
                   ["--env_name", "hopper", "--model_name_list", "dt", "igpt", "--epoch1", "1", "--epoch2", "2"],
                   "paramdist_1_2_{}_hopper_medium_42.npy"),
        "activations": (mi.build_save_parser, mi.run_save,
                        ["--env_name_list", "hopper", "--model_name", "dt", "igpt", "--epoch", "1", *batch],
                        "{}"),
    }[which]
    argv = ["--checkpoint_dir", tiny_runs, "--seed", "42", *argv, *(io[:2] if which == "activations" else io)]
    with pytest.raises(UserError, match=r"checkpoint not found: .*igpt.*model_1\.pt"):
        run(build().parse_args([str(a) for a in argv]))
    for folder in ("res", "figs"):
        assert not (tmp_path / folder).exists() or [p.name for p in (tmp_path / folder).rglob("*")] == []
    argv[argv.index("igpt")] = "gpt2"                       # with both runs there, both models' results are written
    run(build().parse_args([str(a) for a in argv]))
    written = sorted(p.name for p in (tmp_path / "res").iterdir())
    for m in ("dt", "gpt2"):
        assert (per_model.format(m) in written if which != "activations" else
                any(f"_{m}_hopper_medium_42" in name and name.endswith(".npz") for name in written)), written
