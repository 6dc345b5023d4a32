"""Library calls that used to accept a wrong argument silently or fail deep inside torch: per-block overrides keyed
by an int or a missing block, a pretrained block copied into a host block of another architecture, MINE's held-out
samples given by halves or of mismatched sizes, and a Fisher seed that is no integer."""
import json

import numpy as np
import pytest
import torch

from decision_transformer.analysis.mine import Mine, estimate_mi
from decision_transformer.errors import UserError
from decision_transformer.fisher import compute_fisher
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig
from decision_transformer.models.gpt2 import GPT2Backbone
from decision_transformer.models.pretrained import block_override_from_lm, locate_lm, transplant_block


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny GPT-2 (32 units, 2 blocks of 2 heads, gelu_new) written with ``save_pretrained``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path_factory.mktemp("lm") / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=128)).save_pretrained(d)
    return locate_lm(str(d))


# ---- F2: block_overrides keys ----------------------------------------------------------------------------------

def test_an_int_block_override_key_is_applied_and_survives_a_round_trip(lm):
    over = block_override_from_lm(lm, dropout=0.1)
    cfg = BackboneConfig(n_embd=32, n_layer=2, n_head=4, block_overrides={1: over})
    assert cfg.block_overrides == {"1": over}
    net = GPT2Backbone(cfg)
    assert net.h[1].attn.n_head == 2 and type(net.h[1].mlp.act).__name__ == "TanhGELU"  # gelu_new
    assert net.h[0].attn.n_head == 4
    same = BackboneConfig(n_embd=32, n_layer=2, n_head=4, block_overrides={"1": over})
    assert cfg == same
    back = BackboneConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.for_block(1) == cfg.for_block(1)


@pytest.mark.parametrize("key", ["5", 2, -1, "x", "-1", 1.0, None])
def test_a_block_override_key_that_is_no_block_is_refused(lm, key):
    over = block_override_from_lm(lm, dropout=0.1)
    with pytest.raises(ValueError, match="block_overrides key"):
        BackboneConfig(n_embd=32, n_layer=2, n_head=4, block_overrides={key: over})


def test_a_block_override_of_a_field_no_block_has_is_refused_at_construction():
    with pytest.raises(ValueError, match="only .* may differ per block"):
        BackboneConfig(n_embd=32, n_layer=2, n_head=4, block_overrides={"0": {"n_embd": 16}})


def test_a_saved_model_with_a_block_override_reloads_as_the_same_network(lm):
    over = block_override_from_lm(lm, dropout=0.1)
    cfg = DTConfig(11, 3, max_length=4, backbone=BackboneConfig(n_embd=32, n_layer=2, n_head=4,
                                                                block_overrides={0: over}))
    model = DecisionTransformer(cfg, seed=0)
    rebuilt = DecisionTransformer(DTConfig.from_dict(json.loads(json.dumps(model.config.to_dict()))))
    rebuilt.load_state_dict(model.state_dict())
    assert [b.attn.n_head for b in rebuilt.transformer.h] == [b.attn.n_head for b in model.transformer.h] == [2, 4]


# ---- F3: transplant_block checks the host block's architecture ---------------------------------------------------

def test_transplant_into_a_host_block_of_another_architecture_is_refused(lm):
    host = GPT2Backbone(BackboneConfig(n_embd=32, n_layer=2, n_head=4, n_inner=128))   # relu, 4 heads: fits by shape
    before = {k: v.clone() for k, v in host.state_dict().items()}
    with pytest.raises(UserError, match=r"block 1 of the host .*n_head 4.*activation_function 'relu'.*"
                                        r"block_overrides=\{'1': block_override_from_lm"):
        transplant_block(host, lm, 1)
    assert all(torch.equal(v, host.state_dict()[k]) for k, v in before.items())   # nothing copied


def test_transplant_into_a_matching_host_block_copies_it(lm):
    host = GPT2Backbone(BackboneConfig(n_embd=32, n_layer=3, n_head=1,
                                       block_overrides={"1": block_override_from_lm(lm, dropout=0.1)}))
    transplant_block(host, lm, 1)
    sd = lm.state_dict()
    assert all(torch.equal(v, sd["h.1." + k]) for k, v in host.h[1].state_dict().items())


# ---- F5: MINE's held-out samples ---------------------------------------------------------------------------------

def _xy(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2)).astype(np.float32)
    return x, (x + rng.standard_normal((n, 2))).astype(np.float32)


@pytest.mark.parametrize("which", ["eval_x", "eval_y"])
def test_estimate_mi_needs_both_held_out_samples_or_neither(which):
    x, y = _xy(32)
    xe, ye = _xy(32, seed=1)
    with pytest.raises(UserError, match="give both held-out samples or neither"):
        estimate_mi(x, y, iters=1, batch_size=16, hidden=4, hidden_layers=1, **{which: xe if which == "eval_x" else ye})


def test_estimate_mi_refuses_held_out_samples_of_different_sizes():
    x, y = _xy(32)
    xe, ye = _xy(20, seed=1)
    with pytest.raises(UserError, match="eval_x has 20 samples, eval_y has 19"):
        estimate_mi(x, y, iters=1, batch_size=16, hidden=4, hidden_layers=1, eval_x=xe, eval_y=ye[:19])


def test_mine_estimate_refuses_x_and_y_of_different_sizes():
    x, y = _xy(32)
    m = Mine(2, 2, hidden=4, hidden_layers=1)
    with pytest.raises(UserError, match="x has 32 samples, y has 31"):
        m.estimate(x, y[:31])


# ---- F6: compute_fisher's seed -----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [None, 1.5, "3"])
def test_compute_fisher_refuses_a_seed_that_is_no_integer(seed):
    model = DecisionTransformer(DTConfig(11, 3, max_length=4, backbone=BackboneConfig(n_embd=8, n_layer=1, n_head=2)))
    with pytest.raises(UserError, match="seed must be an integer"):
        compute_fisher(model, None, seed=seed)


# ---- load_lm_into_backbone checks the host's architecture like transplant_block ------------------------------------

@pytest.mark.parametrize("host, why", [
    (BackboneConfig(n_embd=32, n_layer=2, n_head=1, vocab_size=100, n_positions=128),
     r"block 0 of the host backbone has n_head 1, activation_function 'relu', the LM's block has n_head 2, "
     r"activation_function 'gelu_new'"),
    (None, r"the LM has 2 blocks, the host backbone 1"),
])
def test_loading_an_lm_into_a_host_that_fits_only_by_shape_is_refused(lm, host, why):
    from decision_transformer.models.pretrained import backbone_config_from_lm, load_lm_into_backbone

    if host is None:   # the LM's own architecture, one block fewer: block 1 used to be dropped silently
        from dataclasses import replace
        host = replace(backbone_config_from_lm(lm, dropout=0.1), n_layer=1)
    net = GPT2Backbone(host)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(UserError, match=why + ": build the host with backbone_config_from_lm"):
        load_lm_into_backbone(net, lm)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())   # nothing copied


def test_loading_an_lm_into_its_own_architecture_copies_every_block(lm):
    from decision_transformer.models.pretrained import backbone_config_from_lm, load_lm_into_backbone

    net = GPT2Backbone(backbone_config_from_lm(lm, dropout=0.1))
    load_lm_into_backbone(net, lm)
    sd = lm.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in net.state_dict().items() if k in sd)


# ---- the analyses and the Fisher refuse a model that is not float32, as evaluate_episodes does -----------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_the_analyses_refuse_a_model_that_is_not_float32(dtype):
    from decision_transformer.analysis.activations import get_activations
    from decision_transformer.analysis.attention import model_attention_distances
    from decision_transformer.analysis.grads import full_batch_param_norms, per_sample_grad_stats
    from decision_transformer.data import Batch

    B, K = 3, 4
    batch = Batch(torch.randn(B, K, 11), torch.randn(B, K, 3), torch.randn(B, K, 1), torch.zeros(B, K),
                  torch.randn(B, K + 1, 1), torch.arange(K).repeat(B, 1), torch.ones(B, K))
    model = DecisionTransformer(DTConfig(11, 3, max_length=K, backbone=BackboneConfig(n_embd=16, n_layer=1, n_head=2)),
                                seed=0).to(dtype)
    for f in (get_activations, model_attention_distances, per_sample_grad_stats, full_batch_param_norms):
        with pytest.raises(UserError, match=rf"^{f.__name__} runs float32 models; this one's parameters are "
                                            rf"{dtype} \(use model.float\(\)\)$"):   # used to fail deep in torch
            f(model, batch)
    with pytest.raises(UserError, match="^compute_fisher runs float32 models"):
        compute_fisher(model, None)
    model.float()
    assert get_activations(model, batch) and model_attention_distances(model, batch).shape == (B, 1, 2)
