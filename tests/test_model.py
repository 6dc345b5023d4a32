"""Tests of the GPT-2 backbone and the Decision Transformer (CPU, offline, deterministic).

Reference behaviour: /work/shared/reference/model.md (sections cited in the docstrings).
"""
from __future__ import annotations

import contextlib
import math
import os
import pickle
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig
from decision_transformer.models.decision_transformer import MIN_EVAL_ROWS

DS, DA = 11, 3          # hopper dimensions
K = 5
MAX_EP_LEN = 50


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------
def small_cfg(**kw) -> DTConfig:
    bb = dict(n_embd=32, n_layer=2, n_head=2, n_inner=64, activation_function="relu")
    bb.update(kw.pop("backbone", {}))
    base = dict(state_dim=DS, act_dim=DA, max_length=K, max_ep_len=MAX_EP_LEN, backbone=BackboneConfig(**bb))
    base.update(kw)
    return DTConfig(**base)


def make_inputs(B=3, pads=(0, 2, 4), seed=0, junk_padding=True):
    """Left-padded batch: row b has ``pads[b]`` padded steps. Padded steps hold random junk unless ``junk_padding``
    is False (then zeros)."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(B, K, DS, generator=g)
    actions = torch.rand(B, K, DA, generator=g) * 2 - 1
    rtg = torch.randn(B, K, 1, generator=g)
    timesteps = torch.randint(0, MAX_EP_LEN - K, (B, 1), generator=g) + torch.arange(K)
    mask = torch.ones(B, K)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
        if not junk_padding:
            states[b, :p] = 0
            actions[b, :p] = 0
            rtg[b, :p] = 0
            timesteps[b, :p] = 0
    return states, actions, rtg, timesteps, mask


def real(x, mask):
    """Entries of x [B, K, ...] at real (unpadded) steps, flattened to [n_real, ...]."""
    return x[mask.bool()]


# ---------------------------------------------------------------------------------------------------------------------
# 1. equivalence with transformers.DecisionTransformerModel (KZL order: time embedding before the LayerNorm)
# ---------------------------------------------------------------------------------------------------------------------
def _hf_twin(ours: DecisionTransformer, activation: str, attn_impl: str):
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    bb = ours.config.backbone
    hf_cfg = DecisionTransformerConfig(
        state_dim=DS, act_dim=DA, hidden_size=bb.n_embd, max_ep_len=MAX_EP_LEN, n_layer=bb.n_layer, n_head=bb.n_head,
        n_inner=bb.n_inner, activation_function=activation, resid_pdrop=0.1, attn_pdrop=0.1, embd_pdrop=0.1,
        action_tanh=True, vocab_size=bb.vocab_size, n_positions=bb.n_positions, layer_norm_epsilon=1e-5,
        bos_token_id=None, eos_token_id=None,
    )
    hf_cfg._attn_implementation = attn_impl
    hf = DecisionTransformerModel(hf_cfg)
    ours_sd = ours.state_dict()
    mapped = {("encoder." + k[len("transformer."):] if k.startswith("transformer.") else k): v
              for k, v in ours_sd.items()}
    hf_keys = set(hf.state_dict())
    assert hf_keys == set(mapped), (sorted(hf_keys ^ set(mapped)))
    hf.load_state_dict(mapped, strict=True)
    with torch.no_grad():
        # HF's DT passes position_ids = 0 for every token, i.e. adds wpe[0] everywhere (model.md §1); neutralise it.
        hf.encoder.wpe.weight[0].zero_()
    return hf.eval()


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("activation", ["gelu_new", "relu"])
def test_matches_transformers_decision_transformer(activation, attn_impl):
    ours = DecisionTransformer(small_cfg(embed_order="time_then_ln", backbone=dict(activation_function=activation,
                                                                                    vocab_size=1)), seed=0).eval()
    hf = _hf_twin(ours, activation, attn_impl)
    assert hf.config._attn_implementation == attn_impl
    states, actions, rtg, timesteps, mask = make_inputs()
    with torch.no_grad():
        o = ours(states, actions, rtg, timesteps, attention_mask=mask)
        h = hf(states=states, actions=actions, returns_to_go=rtg, timesteps=timesteps,
               attention_mask=mask.long(), return_dict=True)
    assert torch.isfinite(o.action_preds).all() and torch.isfinite(o.state_preds).all()
    for mine, theirs in [(o.state_preds, h.state_preds), (o.action_preds, h.action_preds),
                         (o.return_preds, h.return_preds)]:
        assert mine.shape == theirs.shape
        torch.testing.assert_close(real(mine, mask), real(theirs, mask), atol=1e-5, rtol=0)
    # the comparison has teeth: without zeroing wpe[0] the two models disagree
    with torch.no_grad():
        hf.encoder.wpe.weight[0].normal_(std=0.5)
        h2 = hf(states=states, actions=actions, returns_to_go=rtg, timesteps=timesteps,
                attention_mask=mask.long(), return_dict=True)
    assert (real(o.action_preds, mask) - real(h2.action_preds, mask)).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# 2. golden parameter counts (model.md §2)
# ---------------------------------------------------------------------------------------------------------------------
def test_default_parameter_counts():
    cfg = DTConfig(11, 3)
    assert (cfg.hidden_size, cfg.backbone.n_layer, cfg.backbone.n_head, cfg.backbone.inner_dim,
            cfg.backbone.activation_function) == (128, 3, 1, 512, "relu")
    m = DecisionTransformer(cfg, seed=0)
    blocks = sum(p.numel() for n, p in m.named_parameters() if n.startswith("transformer.h."))
    assert blocks == 594_816
    for blk in m.transformer.h:
        assert sum(p.numel() for p in blk.parameters()) == 198_272
        assert sum(p.numel() for p in blk.attn.parameters()) == 66_048
        assert sum(p.numel() for p in blk.mlp.parameters()) == 131_712
    assert sum(p.numel() for p in m.parameters()) == 7_291_535
    assert m.transformer.wte.weight.shape == (50257, 128)


def test_state_dict_keys_follow_originals():
    """model.md §16: original key names (untied heads)."""
    keys = set(DecisionTransformer(small_cfg(), seed=0).state_dict())
    for k in ["embed_timestep.weight", "embed_return.weight", "embed_state.bias", "embed_action.weight",
              "embed_ln.weight", "transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
              "transformer.h.1.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias", "transformer.h.0.ln_2.bias",
              "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f.weight",
              "predict_state.weight", "predict_action.0.weight", "predict_action.0.bias", "predict_return.bias"]:
        assert k in keys, k
    m = DecisionTransformer(small_cfg(), seed=0)
    # Conv1D layout [in, out]
    assert m.transformer.h[0].attn.c_attn.weight.shape == (32, 96)
    assert m.transformer.h[0].mlp.c_fc.weight.shape == (32, 64)
    assert m.transformer.h[0].mlp.c_proj.weight.shape == (64, 32)


# ---------------------------------------------------------------------------------------------------------------------
# 3. GEGLU (model.md §6)
# ---------------------------------------------------------------------------------------------------------------------
def test_geglu_mlp_by_hand():
    H, inner = 16, 24
    m = DecisionTransformer(small_cfg(backbone=dict(n_embd=H, n_inner=inner, activation_function="geglu")), seed=1)
    mlp = m.transformer.h[0].mlp.eval()
    assert mlp.c_fc.weight.shape == (H, 2 * inner)
    assert mlp.c_proj.weight.shape == (inner, H)
    with torch.no_grad():
        # make the pre-activations large so that erf vs tanh GELU and a value/gate swap are clearly distinguishable
        mlp.c_fc.weight.normal_(std=1.0)
        mlp.c_fc.bias.normal_(std=0.5)
        mlp.c_proj.bias.normal_(std=0.5)
    x = torch.randn(2, 7, H, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = x @ mlp.c_fc.weight + mlp.c_fc.bias
        u, g = z[..., :inner], z[..., inner:]
        gelu_erf = 0.5 * g * (1.0 + torch.erf(g / math.sqrt(2.0)))
        expected = (u * gelu_erf) @ mlp.c_proj.weight + mlp.c_proj.bias
        got = mlp(x)
        swapped = (g * 0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0)))) @ mlp.c_proj.weight + mlp.c_proj.bias
        tanh_gelu = (u * F.gelu(g, approximate="tanh")) @ mlp.c_proj.weight + mlp.c_proj.bias
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - swapped).abs().max() > 1e-2
    assert (got - tanh_gelu).abs().max() > 1e-5
    # the whole model runs with it
    s, a, r, t, mask = make_inputs()
    with torch.no_grad():
        out = m.eval()(s, a, r, t, attention_mask=mask)
    assert out.action_preds.shape == (3, K, DA) and torch.isfinite(out.action_preds).all()


def test_each_block_owns_its_activation_module():
    m = DecisionTransformer(small_cfg(backbone=dict(n_layer=3, activation_function="gelu_new")), seed=0)
    acts = [blk.mlp.act for blk in m.transformer.h]
    assert len({id(a) for a in acts}) == 3


def test_gelu_new_is_transformers_op_sequence_in_fp32_and_the_fused_kernel_under_autocast():
    """gelu_new outside autocast: transformers' NewGELUActivation bit for bit, forward and backward (the originals'
    numbers). Under autocast: torch's fused tanh GELU (one kernel each way), bit for bit, and the same function."""
    from transformers.activations import NewGELUActivation

    from decision_transformer.models.gpt2 import make_activation

    act = make_activation("gelu_new")
    x = (torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * 3).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = act(x), NewGELUActivation()(x_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)
    assert not torch.equal(y, F.gelu(x, approximate="tanh"))   # the two paths are distinguishable in fp32
    xb = x.detach().bfloat16().requires_grad_()
    xb_ref = xb.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = act(xb)
    yb_ref = F.gelu(xb_ref, approximate="tanh")
    yb.backward(g.bfloat16())
    yb_ref.backward(g.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert torch.equal(yb, yb_ref) and torch.equal(xb.grad, xb_ref.grad)
    torch.testing.assert_close(yb.float(), NewGELUActivation()(xb.detach().float()), atol=0.05, rtol=0.01)


def test_gelu_new_model_under_bf16_autocast_tracks_fp32():
    """A gelu_new DT's forward and gradients under CPU bf16 autocast (the fused GELU) stay near its fp32 ones (dropout
    off)."""
    m = DecisionTransformer(small_cfg(backbone=dict(activation_function="gelu_new")), seed=0).eval()
    states, actions, rtg, timesteps, mask = make_inputs()

    def run(amp):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = m(states, actions, rtg, timesteps, attention_mask=mask).action_preds
        real(out.float(), mask).pow(2).mean().backward()
        return real(out.float(), mask).detach(), torch.cat([p.grad.flatten() for p in m.parameters()
                                                           if p.grad is not None])

    (a32, g32), (a16, g16) = run(False), run(True)
    torch.testing.assert_close(a16, a32, atol=0.03, rtol=0)
    assert (g16 - g32).norm() / g32.norm() < 0.05


def test_unknown_activation_rejected():
    with pytest.raises(ValueError, match="unknown activation function 'no_such_act'; choose geglu or one of "):
        DecisionTransformer(small_cfg(backbone=dict(activation_function="no_such_act")))


# ---------------------------------------------------------------------------------------------------------------------
# 4. disable_attention (model.md §7)
# ---------------------------------------------------------------------------------------------------------------------
def _attn_params(m):
    return [(n, p) for n, p in m.named_parameters() if ".attn." in n]


def _perturb_attention(m):
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for _, p in _attn_params(m):
            p.add_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("disable", [True, False])
def test_disable_attention(disable):
    m = DecisionTransformer(small_cfg(backbone=dict(disable_attention=disable)), seed=2).eval()
    s, a, r, t, mask = make_inputs()
    with torch.no_grad():
        before = m(s, a, r, t, attention_mask=mask)
    _perturb_attention(m)
    with torch.no_grad():
        after = m(s, a, r, t, attention_mask=mask)
    changed = max((x - y).abs().max().item() for x, y in [(before.action_preds, after.action_preds),
                                                           (before.state_preds, after.state_preds),
                                                           (before.return_preds, after.return_preds)])
    if disable:
        assert changed == 0.0
    else:
        assert changed > 1e-4

    m.train()
    out = m(s, a, r, t, attention_mask=mask)
    (out.action_preds.sum() + out.state_preds.sum() + out.return_preds.sum()).backward()
    attn = _attn_params(m)
    assert len(attn) == 4 * m.config.backbone.n_layer
    for n, p in attn:
        if disable:
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, n
        else:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, n
    # the MLPs still learn
    assert m.transformer.h[0].mlp.c_fc.weight.grad is not None
    assert torch.count_nonzero(m.transformer.h[0].mlp.c_fc.weight.grad) > 0


def test_disable_attention_block_is_mlp_only():
    """h <- h + MLP(LN2(h)) per block, checked against a manual forward through the backbone."""
    m = DecisionTransformer(small_cfg(backbone=dict(disable_attention=True)), seed=3).eval()
    x = torch.randn(2, 3 * K, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = x
        for blk in m.transformer.h:
            h = h + blk.mlp(blk.ln_2(h))
        expected = m.transformer.ln_f(h)
        got = m.transformer(x, attention_mask=torch.ones(2, 3 * K)).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# 5. share_input_output_proj (model.md §5)
# ---------------------------------------------------------------------------------------------------------------------
def test_share_input_output_proj():
    m = DecisionTransformer(small_cfg(share_input_output_proj=True), seed=4).eval()
    sd = m.state_dict()
    assert not [k for k in sd if k.startswith("predict_")]
    s, a, r, t, mask = make_inputs()
    with torch.no_grad():
        out = m(s, a, r, t, attention_mask=mask, output_hidden_states=True)
    B, H = s.shape[0], m.config.hidden_size
    assert len(out.hidden_states) == m.config.backbone.n_layer + 1
    last = out.hidden_states[-1].reshape(B, K, 3, H)
    with torch.no_grad():
        exp_action = torch.tanh(last[:, :, 1] @ m.embed_action.weight)
        exp_state = last[:, :, 2] @ m.embed_state.weight
        exp_return = last[:, :, 2] @ m.embed_return.weight
    torch.testing.assert_close(out.action_preds, exp_action, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.state_preds, exp_state, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.return_preds, exp_return, atol=1e-6, rtol=1e-6)
    # no bias: a biased head would differ
    assert (out.action_preds - torch.tanh(last[:, :, 1] @ m.embed_action.weight + 0.1)).abs().max() > 1e-3

    # the whole module pickles (the originals' lambdas did not) and round-trips
    m2 = pickle.loads(pickle.dumps(m))
    with torch.no_grad():
        out2 = m2(s, a, r, t, attention_mask=mask)
    assert torch.equal(out2.action_preds, out.action_preds)
    # an untied model does have the head keys
    assert "predict_action.0.weight" in DecisionTransformer(small_cfg(), seed=4).state_dict()


# ---------------------------------------------------------------------------------------------------------------------
# 6. embedding orders (model.md §4)
# ---------------------------------------------------------------------------------------------------------------------
def _manual_embeddings(m, s, a, r, t):
    with torch.no_grad():
        return m.embed_return(r), m.embed_state(s), m.embed_action(a), m.embed_timestep(t)


def test_default_embed_order_is_ln_then_time():
    cfg = DTConfig(DS, DA)
    assert cfg.embed_order == "ln_then_time"
    m = DecisionTransformer(small_cfg(), seed=5).eval()
    assert m.config.embed_order == "ln_then_time"
    s, a, r, t, mask = make_inputs(B=2, pads=(0, 3))
    with torch.no_grad():
        out = m(s, a, r, t, attention_mask=mask, output_hidden_states=True)
    er, es, ea, et = _manual_embeddings(m, s, a, r, t)
    assert out.all_embs.shape == (2, 3 * K, 32)
    with torch.no_grad():
        for step in range(K):
            torch.testing.assert_close(out.all_embs[:, 3 * step], m.embed_ln(er[:, step]), atol=1e-6, rtol=0)
            torch.testing.assert_close(out.all_embs[:, 3 * step + 1], m.embed_ln(es[:, step]), atol=1e-6, rtol=0)
            torch.testing.assert_close(out.all_embs[:, 3 * step + 2], m.embed_ln(ea[:, step]), atol=1e-6, rtol=0)
            # the backbone input (input of block 0; dropout is identity in eval) = LN(e) + time embedding
            for j, e in enumerate((er, es, ea)):
                torch.testing.assert_close(out.hidden_states[0][:, 3 * step + j],
                                           m.embed_ln(e[:, step]) + et[:, step], atol=1e-6, rtol=0)


def test_time_then_ln_order():
    m = DecisionTransformer(small_cfg(embed_order="time_then_ln"), seed=5).eval()
    s, a, r, t, mask = make_inputs(B=2, pads=(0, 3))
    with torch.no_grad():
        out = m(s, a, r, t, attention_mask=mask, output_hidden_states=True)
    er, es, ea, et = _manual_embeddings(m, s, a, r, t)
    with torch.no_grad():
        for step in range(K):
            for j, e in enumerate((er, es, ea)):
                exp = m.embed_ln(e[:, step] + et[:, step])
                torch.testing.assert_close(out.all_embs[:, 3 * step + j], exp, atol=1e-6, rtol=0)
                torch.testing.assert_close(out.hidden_states[0][:, 3 * step + j], exp, atol=1e-6, rtol=0)


def test_embed_orders_differ_and_invalid_rejected():
    s, a, r, t, mask = make_inputs()
    outs = []
    for order in ("ln_then_time", "time_then_ln"):
        m = DecisionTransformer(small_cfg(embed_order=order), seed=6).eval()
        with torch.no_grad():
            outs.append(m(s, a, r, t, attention_mask=mask).action_preds)
    assert (outs[0] - outs[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match=re.escape("embed_order must be one of ('ln_then_time', 'time_then_ln'), "
                                                   "got 'time_only'")):
        DecisionTransformer(small_cfg(embed_order="time_only"))


def test_config_roundtrip():
    cfg = small_cfg(share_input_output_proj=True, backbone=dict(disable_attention=True, activation_function="geglu"))
    cfg2 = DTConfig.from_dict({**cfg.to_dict(), "not_a_field": 1})
    assert cfg2 == cfg
    assert isinstance(cfg2.backbone, BackboneConfig)


# ---------------------------------------------------------------------------------------------------------------------
# 7. attention maps
# ---------------------------------------------------------------------------------------------------------------------
def test_attention_maps():
    m = DecisionTransformer(small_cfg(), seed=7).eval()
    pads = (0, 2, 4)
    s, a, r, t, mask = make_inputs(pads=pads)
    with torch.no_grad():
        out_att = m(s, a, r, t, attention_mask=mask, output_attentions=True)
        out_plain = m(s, a, r, t, attention_mask=mask)
    assert out_plain.attentions is None
    T = 3 * K
    atts = out_att.attentions
    assert isinstance(atts, tuple) and len(atts) == m.config.backbone.n_layer
    tok_mask = mask.repeat_interleave(3, dim=1).bool()          # [B, T]
    future = torch.ones(T, T).triu(1).bool()
    for A in atts:
        assert A.shape == (3, m.config.backbone.n_head, T, T)
        assert (A >= 0).all()
        torch.testing.assert_close(A.sum(-1), torch.ones(3, m.config.backbone.n_head, T), atol=1e-5, rtol=0)
        for b in range(3):
            q_real = tok_mask[b]
            Ab = A[b][:, q_real]                                   # [nh, n_real_q, T] real queries
            # causal: no weight on future keys (for real query rows)
            assert Ab[:, future[q_real]].abs().max() <= 1e-12
            # no weight on padded keys from real queries
            if pads[b]:
                assert Ab[:, :, ~tok_mask[b]].abs().max() <= 1e-12
        # a real query attends somewhere other than itself (the map is not trivially the identity)
        assert A[0, :, -1, :-1].sum() > 1e-3
    # without padding the whole map is lower-triangular
    s2, a2, r2, t2, mask2 = make_inputs(pads=(0, 0, 0))
    with torch.no_grad():
        atts2 = m(s2, a2, r2, t2, attention_mask=mask2, output_attentions=True).attentions
    for A in atts2:
        assert A[:, :, future].abs().max() <= 1e-12
    # eager (output_attentions) and SDPA paths agree at real steps (padded ones follow the originals' masking in the
    # eager path, see the next tests)
    real = mask.bool()
    for x, y in [(out_att.action_preds, out_plain.action_preds), (out_att.state_preds, out_plain.state_preds),
                 (out_att.return_preds, out_plain.return_preds)]:
        torch.testing.assert_close(x[real], y[real], atol=1e-5, rtol=0)


def test_attention_probabilities_match_manual_softmax():
    """Layer-0 map equals softmax(q k^T / sqrt(d) + causal/padding bias) computed by hand from the block input."""
    m = DecisionTransformer(small_cfg(), seed=8).eval()
    s, a, r, t, mask = make_inputs(pads=(0, 1, 3))
    with torch.no_grad():
        out = m(s, a, r, t, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        blk = m.transformer.h[0]
        x = blk.ln_1(out.hidden_states[0])
        q, k, _ = blk.attn.c_attn(x).split(32, dim=2)
        B, T, nh, hd = 3, 3 * K, 2, 16
        q = q.view(B, T, nh, hd).transpose(1, 2)
        k = k.view(B, T, nh, hd).transpose(1, 2)
        w = q @ k.transpose(-1, -2) / math.sqrt(hd)
        tok = mask.repeat_interleave(3, dim=1).bool()
        allowed = torch.ones(T, T).tril().bool()[None] & tok[:, None, :]
        w = w.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(w, -1)
    for b in range(B):
        qr = tok[b]
        torch.testing.assert_close(out.attentions[0][b][:, qr], probs[b][:, qr], atol=1e-6, rtol=0)


def test_eager_attention_masks_as_the_originals_on_padded_rows():
    """Eager attention (attention maps, and the analyses' activations through ``eager_attention``) replaces a future
    key's logit by -1e4 and adds the padding term, as the originals: every row, left-padded query rows included,
    equals softmax(where(causal, w, -1e4) + (1 - m)·(-1e4)); the analyses' activations at padded positions follow."""
    from decision_transformer.analysis.activations import get_activations
    from decision_transformer.data import Batch

    m = DecisionTransformer(small_cfg(), seed=8).eval()
    s, a, r, t, mask = make_inputs(pads=(0, 1, 3))
    with torch.no_grad():
        out = m(s, a, r, t, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        blk = m.transformer.h[0]
        q, k, v = blk.attn.c_attn(blk.ln_1(out.hidden_states[0])).split(32, dim=2)
        B, T, nh, hd = 3, 3 * K, 2, 16
        q, k, v = (x.view(B, T, nh, hd).transpose(1, 2) for x in (q, k, v))
        w = q @ k.transpose(-1, -2) / math.sqrt(hd)
        tok = mask.repeat_interleave(3, dim=1)
        w = torch.where(torch.ones(T, T).tril().bool(), w, -1e4) + ((1 - tok) * -1e4)[:, None, None, :]
        probs = torch.softmax(w, -1)
        y_manual = blk.attn.c_proj((probs @ v).transpose(1, 2).reshape(B, T, 32))
    torch.testing.assert_close(out.attentions[0], probs, atol=1e-6, rtol=0)      # all rows, padded ones included
    batch = Batch(states=s, actions=a, rewards=torch.zeros(B, K, 1), dones=torch.zeros(B, K), rtg=torch.cat(
        [r, torch.zeros(B, 1, 1)], dim=1), timesteps=t, mask=mask)
    acts = get_activations(m, batch, entries=("attn.c_proj",))
    torch.testing.assert_close(acts["0.attn.c_proj"], y_manual, atol=1e-5, rtol=0)
    assert not any(layer.eager for layer in m.modules() if hasattr(layer, "eager"))   # restored afterwards
    with torch.no_grad():                                                          # real rows: as the SDPA path
        plain = m(s, a, r, t, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(out.action_preds[real], plain.action_preds[real], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# 8. seeded construction, causality, padding independence
# ---------------------------------------------------------------------------------------------------------------------
def test_seeded_construction():
    cfg = small_cfg()
    a = DecisionTransformer(cfg, seed=11).state_dict()
    torch.manual_seed(999)  # global RNG state before construction must not matter
    torch.rand(17)
    b = DecisionTransformer(cfg, seed=11).state_dict()
    c = DecisionTransformer(cfg, seed=12).state_dict()
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    differing = [k for k in a if not torch.equal(a[k], c[k])]
    # every randomly initialised tensor differs (biases/LayerNorms of the backbone are constant-initialised)
    for k in ["embed_timestep.weight", "embed_state.weight", "transformer.h.0.attn.c_attn.weight",
              "transformer.h.1.mlp.c_proj.weight", "predict_action.0.weight"]:
        assert k in differing, k


def test_initialisation_statistics():
    """model.md §3: backbone N(0, 0.02), c_proj N(0, 0.02/sqrt(2 n_layer)), biases 0, LN 1/0, timestep table N(0,1)."""
    m = DecisionTransformer(DTConfig(DS, DA, backbone=BackboneConfig(n_embd=128, n_layer=3)), seed=0)
    bb = m.transformer
    assert abs(bb.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(bb.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert abs(bb.h[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(6)) < 0.001
    assert abs(bb.h[0].attn.c_proj.weight.std().item() - 0.02 / math.sqrt(6)) < 0.001
    assert torch.count_nonzero(bb.h[1].attn.c_attn.bias) == 0
    assert torch.equal(bb.ln_f.weight, torch.ones(128))
    assert abs(m.embed_timestep.weight.std().item() - 1.0) < 0.02


def test_causality():
    m = DecisionTransformer(small_cfg(), seed=9).eval()
    s, a, r, t, mask = make_inputs(B=2, pads=(0, 0))
    with torch.no_grad():
        base = m(s, a, r, t, attention_mask=mask)
    t0 = 2
    # perturb everything strictly after step t0
    s2, a2, r2 = s.clone(), a.clone(), r.clone()
    s2[:, t0 + 1:] += 3.0
    a2[:, t0 + 1:] = -a2[:, t0 + 1:]
    r2[:, t0 + 1:] += 5.0
    with torch.no_grad():
        pert = m(s2, a2, r2, t, attention_mask=mask)
    torch.testing.assert_close(pert.action_preds[:, :t0 + 1], base.action_preds[:, :t0 + 1], atol=1e-6, rtol=0)
    assert (pert.action_preds[:, t0 + 1:] - base.action_preds[:, t0 + 1:]).abs().max() > 1e-4
    # the action at step t0 is predicted from the state token: it must not see a_t0 itself, but a_{t0+1} sees it
    a3 = a.clone()
    a3[:, t0] = -a3[:, t0] + 0.5
    with torch.no_grad():
        pert3 = m(s, a3, r, t, attention_mask=mask)
    torch.testing.assert_close(pert3.action_preds[:, :t0 + 1], base.action_preds[:, :t0 + 1], atol=1e-6, rtol=0)
    assert (pert3.action_preds[:, t0 + 1] - base.action_preds[:, t0 + 1]).abs().max() > 1e-5
    # state/return predictions (action token) at t0 do see a_t0
    assert (pert3.state_preds[:, t0] - base.state_preds[:, t0]).abs().max() > 1e-5


def test_padded_steps_do_not_matter():
    m = DecisionTransformer(small_cfg(), seed=10).eval()
    s, a, r, t, mask = make_inputs(pads=(0, 2, 4), junk_padding=False)
    s2, a2, r2, t2, _ = make_inputs(pads=(0, 2, 4), seed=1)   # different junk everywhere ...
    pad = ~mask.bool()
    s2 = torch.where(pad[..., None], s2 * 10, s)                # ... but only padded steps are used
    a2 = torch.where(pad[..., None], a2, a)
    r2 = torch.where(pad[..., None], r2 * 100, r)
    t2 = torch.where(pad, t2 + 7, t)
    with torch.no_grad():
        o1 = m(s, a, r, t, attention_mask=mask)
        o2 = m(s2, a2, r2, t2, attention_mask=mask)
    for x, y in [(o1.action_preds, o2.action_preds), (o1.state_preds, o2.state_preds),
                 (o1.return_preds, o2.return_preds)]:
        torch.testing.assert_close(real(x, mask), real(y, mask), atol=1e-6, rtol=0)
    # ... while the same change with the mask all ones does change those outputs
    with torch.no_grad():
        o3 = m(s2, a2, r2, t2, attention_mask=torch.ones_like(mask))
        o4 = m(s, a, r, t, attention_mask=torch.ones_like(mask))
    assert (real(o3.action_preds, mask) - real(o4.action_preds, mask)).abs().max() > 1e-4


def test_batch_rows_independent():
    """Row b's outputs do not depend on the other rows of the batch (pads differ per row)."""
    m = DecisionTransformer(small_cfg(), seed=13).eval()
    s, a, r, t, mask = make_inputs()
    with torch.no_grad():
        full = m(s, a, r, t, attention_mask=mask).action_preds
        for b in range(3):
            one = m(s[b:b + 1], a[b:b + 1], r[b:b + 1], t[b:b + 1], attention_mask=mask[b:b + 1]).action_preds
            torch.testing.assert_close(real(one, mask[b:b + 1]), real(full[b:b + 1], mask[b:b + 1]),
                                       atol=1e-6, rtol=0)


def test_dropout_active_only_in_train_mode():
    m = DecisionTransformer(small_cfg(), seed=14)
    s, a, r, t, mask = make_inputs()
    m.train()
    torch.manual_seed(0)
    x1 = m(s, a, r, t, attention_mask=mask).action_preds
    x2 = m(s, a, r, t, attention_mask=mask).action_preds
    assert (x1 - x2).abs().max() > 1e-6
    m.eval()
    with torch.no_grad():
        y1 = m(s, a, r, t, attention_mask=mask).action_preds
        y2 = m(s, a, r, t, attention_mask=mask).action_preds
    assert torch.equal(y1, y2)


# ---------------------------------------------------------------------------------------------------------------------
# 9. get_action (model.md §5)
# ---------------------------------------------------------------------------------------------------------------------
def _history(M, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, n, DS, generator=g), torch.rand(M, n, DA, generator=g) * 2 - 1,
            torch.randn(M, n, 1, generator=g), torch.arange(n).repeat(M, 1) + 3)


@pytest.mark.parametrize("n", [1, 3, K])
def test_get_action_left_pads_with_zeros(n):
    m = DecisionTransformer(small_cfg(), seed=15).eval()
    M = 2
    s, a, r, t = _history(M, n)
    pad = K - n
    got = m.get_action(s, a, r, t)
    assert got.shape == (M, DA)
    s_p = torch.cat([torch.zeros(M, pad, DS), s], 1)
    a_p = torch.cat([torch.zeros(M, pad, DA), a], 1)
    r_p = torch.cat([torch.zeros(M, pad, 1), r], 1)
    t_p = torch.cat([torch.zeros(M, pad, dtype=torch.long), t], 1)
    mask = torch.cat([torch.zeros(M, pad), torch.ones(M, n)], 1)
    with torch.no_grad():
        expected = m(s_p, a_p, r_p, t_p, attention_mask=mask).action_preds[:, -1]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)

    # what reaches forward: exactly the zero-padded tensors and the 0/1 mask
    seen = {}
    orig_forward = m.forward

    def spy(states, actions, returns_to_go, timesteps, attention_mask=None, **kw):
        seen.update(states=states, actions=actions, rtg=returns_to_go, timesteps=timesteps, mask=attention_mask)
        return orig_forward(states, actions, returns_to_go, timesteps, attention_mask=attention_mask, **kw)

    m.forward = spy
    m.get_action(s, a, r, t)
    # the M histories, then copies of the first up to MIN_EVAL_ROWS rows (their actions are dropped)
    rows = -(-MIN_EVAL_ROWS // K)
    assert rows > M
    first = [0] * (rows - M)
    for key, want in (("states", s_p), ("actions", a_p), ("rtg", r_p), ("timesteps", t_p), ("mask", mask)):
        assert seen[key].shape[0] == rows, key
        assert torch.equal(seen[key][:M].to(want.dtype), want) and torch.equal(seen[key][M:].to(want.dtype),
                                                                               want[first]), key


def test_get_action_keeps_last_K_steps():
    m = DecisionTransformer(small_cfg(), seed=16).eval()
    s, a, r, t = _history(3, K + 4, seed=2)
    got = m.get_action(s, a, r, t)
    with torch.no_grad():
        expected = m(s[:, -K:], a[:, -K:], r[:, -K:], t[:, -K:], attention_mask=torch.ones(3, K)).action_preds[:, -1]
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert torch.equal(got, m.get_action(s[:, -K:], a[:, -K:], r[:, -K:], t[:, -K:]))
    assert not got.requires_grad
    assert got.abs().max() <= 1.0   # tanh head


# ---------------------------------------------------------------------------------------------------------------------
# 10. last_action_only: evaluation's forward runs the last block on the final tokens only
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [dict(), dict(share_input_output_proj=True),
                                     dict(backbone=dict(disable_attention=True)),
                                     dict(backbone=dict(n_layer=1)), dict(embed_order="time_then_ln")])
def test_last_action_only_matches_the_full_forward(variant):
    m = DecisionTransformer(small_cfg(**variant), seed=21).eval()
    s, a, r, t, mask = make_inputs()
    with torch.no_grad():
        full = m(s, a, r, t, attention_mask=mask)
        last = m(s, a, r, t, attention_mask=mask, last_action_only=True)
    assert last.action_preds.shape == (3, 1, DA) and last.state_preds is None and last.return_preds is None
    torch.testing.assert_close(last.action_preds[:, 0], full.action_preds[:, -1], atol=1e-6, rtol=1e-5)
    assert not torch.equal(full.action_preds[:, -1], full.action_preds[:, -2])  # the last step, not another one


@pytest.mark.parametrize("path", ["eager_attention", "output_attentions"])
def test_last_action_only_matches_the_full_forward_on_the_eager_path(path):
    """The eager path's causal mask for the last query positions only (keys from all positions), with attention
    sharp enough that a wrongly masked key would show."""
    from decision_transformer.models.gpt2 import eager_attention

    m = DecisionTransformer(small_cfg(), seed=21).eval()
    with torch.no_grad():
        for block in m.transformer.h:
            block.attn.c_attn.weight.mul_(30)
    s, a, r, t, mask = make_inputs()
    kw = dict(attention_mask=mask, output_attentions=path == "output_attentions")
    with torch.no_grad(), eager_attention(m) if path == "eager_attention" else contextlib.nullcontext():
        full = m(s, a, r, t, **kw).action_preds
        last = m(s, a, r, t, last_action_only=True, **kw).action_preds
        sdpa = m(s, a, r, t, attention_mask=mask).action_preds
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[:, -1], sdpa[:, -1], atol=1e-5, rtol=1e-5)   # real rows: as the SDPA path


def test_embedding_dropout_is_applied_in_train_mode_only():
    m = DecisionTransformer(small_cfg(backbone=dict(resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.5)), seed=14)
    s, a, r, t, mask = make_inputs()
    torch.manual_seed(0)
    x1, x2 = (m(s, a, r, t, attention_mask=mask).action_preds for _ in range(2))
    assert (x1 - x2).abs().max() > 1e-3
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(s, a, r, t, attention_mask=mask).action_preds,
                           m(s, a, r, t, attention_mask=mask).action_preds)


@pytest.mark.parametrize("overrides", [{}, {"0": {"n_head": 3}}], ids=["model", "block_override"])
def test_hidden_size_not_divisible_by_heads_is_refused_at_build(overrides):
    from decision_transformer.models.gpt2 import GPT2Backbone

    n_head = 2 if overrides else 3
    with pytest.raises(ValueError, match="hidden size 16 is not divisible by n_head 3"):
        GPT2Backbone(BackboneConfig(n_embd=16, n_layer=2, n_head=n_head, block_overrides=overrides))


def test_get_action_rows_are_batch_independent_at_default_size():
    """Evaluation's contract: an episode's action does not depend on which other episodes share the forward."""
    from decision_transformer.models.decision_transformer import LAST_ACTION_TAIL

    assert LAST_ACTION_TAIL >= 16   # the rows from which AVX-512 GEMM kernels round a row alike for any row count
    m = DecisionTransformer(DTConfig(state_dim=11, act_dim=3), seed=5).eval()
    g = torch.Generator().manual_seed(4)
    s, a, r = torch.randn(6, 20, 11, generator=g), torch.rand(6, 20, 3, generator=g) * 2 - 1, torch.randn(6, 20, 1)
    t = torch.arange(20).repeat(6, 1) + 7
    batched = m.get_action(s, a, r, t)
    one = torch.cat([m.get_action(s[i:i + 1], a[i:i + 1], r[i:i + 1], t[i:i + 1]) for i in range(6)])
    assert torch.equal(batched, one)


@pytest.mark.parametrize("field, value, message", [
    ("n_head", 0, "n_head must be a positive integer, got 0"),
    ("n_head", 2.0, "n_head must be a positive integer, got 2.0"),
    ("n_layer", -1, "n_layer must be a non-negative integer"),
    ("n_inner", 0, "n_inner must be a positive integer or None"),
    ("resid_pdrop", 1.0, "resid_pdrop must be a probability in [0, 1)"),
    ("attn_pdrop", float("nan"), "attn_pdrop must be a probability in [0, 1)"),
    ("layer_norm_epsilon", float("nan"), "layer_norm_epsilon must be a finite positive number"),
    ("initializer_range", -0.02, "initializer_range must be a finite positive number"),
    ("layer_norm_epsilon", 0.0, "layer_norm_epsilon must be a finite positive number, got 0.0"),
    ("initializer_range", 0.0, "initializer_range must be a finite positive number, got 0.0"),
    ("activation_function", 7, "activation_function must be a name"),
])
def test_backbone_config_refuses_values_no_model_can_use(field, value, message):
    """A config that would divide by zero (n_head 0) or compute NaN (eps NaN) deep inside torch is refused where it is
    made, also through from_dict (checkpoint configs) and per-block overrides."""
    with pytest.raises(ValueError, match=re.escape(message)):
        BackboneConfig(**{field: value})
    with pytest.raises(ValueError, match=re.escape(message)):
        BackboneConfig.from_dict({**BackboneConfig().to_dict(), field: value})
    if field in BackboneConfig.BLOCK_FIELDS:
        with pytest.raises(ValueError, match=re.escape(message)):
            BackboneConfig(block_overrides={"0": {field: value}}).for_block(0)


def test_a_call_in_the_originals_argument_order_is_a_type_error():
    """The originals' forward(states, actions, rewards, returns_to_go, timesteps): five positional arguments land the
    returns-to-go in ``timesteps``; that is a TypeError naming the signature, as the README says, not a deep embedding
    RuntimeError."""
    from decision_transformer.models.multi_decision_transformer import MultiDecisionTransformer, MultiDTConfig

    s, a, rtg, t, m = make_inputs()
    r = torch.zeros_like(rtg)
    model = DecisionTransformer(small_cfg(), seed=0)
    with pytest.raises(TypeError, match=r"timesteps must be an integer tensor, got torch.float32; .*without the "
                                        r"originals' rewards"):
        model(s, a, r, rtg, t)
    multi = MultiDecisionTransformer(MultiDTConfig(envs=["hopper"], max_length=K,
                                                   backbone=BackboneConfig(n_embd=16, n_layer=1, n_head=2)))
    with pytest.raises(TypeError, match="timesteps must be an integer tensor"):
        multi(s, a, r, rtg, t)
    assert model(s, a, rtg, t, attention_mask=m).action_preds.shape == a.shape
