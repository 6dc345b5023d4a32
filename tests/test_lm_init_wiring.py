"""How the flags wire an LM-initialised or random DT together (model.md §2, §8-§12): dropout and attention settings
of each path, the --pretrained_block override and range check, the refusals of --gpt_kmeans, the sum of the
auxiliary losses, and what ``locate_lm`` / the weight copy refuse (missing tensors, unsupported architectures and
attention variants).

The pretrained models are tiny ``save_pretrained`` folders written here (config + safetensors, no tokenizer).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import aux_losses

from decision_transformer.errors import UserError
from decision_transformer.model_factory import build_model_from_args, make_extra_loss
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig
from decision_transformer.models.gpt2 import ImageGPTNorm, attention_bias
from decision_transformer.models.pretrained import PretrainedLM, load_lm_into_backbone, locate_lm
from test_lm import HOPPER, args_for, materialised, nontrivial_norms_and_biases


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    """``gpt2``: a 2-layer GPT-2 (hidden 32, 2 heads) whose own dropouts (embd 0.05, attn 0.3, resid 0.3) and
    epsilon (1e-4) differ from every value the DT sets; ``igpt``: a 2-layer ImageGPT (hidden 24, 3 heads). Both have
    non-trivial norms and biases."""
    from transformers import GPT2Config, GPT2Model, ImageGPTConfig, ImageGPTModel

    root = tmp_path_factory.mktemp("lms")
    torch.manual_seed(0)
    gpt = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=40, vocab_size=50, embd_pdrop=0.05,
                               attn_pdrop=0.3, resid_pdrop=0.3, layer_norm_epsilon=1e-4))
    igpt = ImageGPTModel(ImageGPTConfig(n_embd=24, n_layer=2, n_head=3, n_positions=64, vocab_size=17))
    for m in (gpt, igpt):
        nontrivial_norms_and_biases(m)
    gpt.save_pretrained(root / "gpt2")
    igpt.save_pretrained(root / "igpt")
    return root


# ---- dropout / attention settings of each path (F2, F3, P3) --------------------------------------------------------

def test_random_init_takes_dropout_for_the_residuals_and_disable_attention():
    model = build_model_from_args(args_for("--dropout", "0.2", "--embed_dim", "16", "--n_layer", "1",
                                        "--disable_attention"), HOPPER)
    cfg = model.config.backbone
    assert (cfg.resid_pdrop, cfg.attn_pdrop, cfg.disable_attention) == (0.2, 0.1, True)
    blk = model.transformer.h[0]
    assert (blk.disable_attention, blk.mlp.dropout.p, blk.attn.resid_dropout.p, blk.attn.attn_pdrop) == \
        (True, 0.2, 0.2, 0.1)
    plain = build_model_from_args(args_for("--dropout", "0.2", "--embed_dim", "16", "--n_layer", "1"), HOPPER)
    assert plain.config.backbone.disable_attention is False and plain.transformer.h[0].disable_attention is False


def test_lm_init_takes_dropout_for_the_residuals_and_disable_attention(lms):
    """The LM's own attn/resid dropouts (0.3) are replaced: attention 0.1, residual --dropout; embedding dropout and
    epsilon are the LM's own."""
    model = build_model_from_args(args_for("--pretrained_lm", str(lms / "gpt2"), "--dropout", "0.2",
                                        "--disable_attention"), HOPPER)
    cfg = model.config.backbone
    assert (cfg.resid_pdrop, cfg.attn_pdrop, cfg.embd_pdrop, cfg.disable_attention, cfg.layer_norm_epsilon) == \
        (0.2, 0.1, 0.05, True, 1e-4)
    bb = model.transformer
    assert bb.drop.p == 0.05
    assert all((b.disable_attention, b.mlp.dropout.p, b.attn.attn_pdrop) == (True, 0.2, 0.1) for b in bb.h)
    assert bb.h[0].ln_1.eps == 1e-4
    plain = build_model_from_args(args_for("--pretrained_lm", str(lms / "gpt2"), "--dropout", "0.2"), HOPPER)
    assert plain.config.backbone.disable_attention is False


def test_pretrained_block_override_takes_dropout_and_the_lms_block_shape(lms):
    model = build_model_from_args(args_for("--pretrained_lm", str(lms / "gpt2"), "--pretrained_block", "0",
                                        "--embed_dim", "32", "--n_layer", "2", "--dropout", "0.25"), HOPPER)
    cfg = model.config.backbone
    assert cfg.block_overrides == {"0": {"n_head": 2, "n_inner": None, "activation_function": "gelu_new",
                                         "resid_pdrop": 0.25, "attn_pdrop": 0.1, "layer_norm_epsilon": 1e-4,
                                         "norm_type": "layernorm"}}
    assert (cfg.resid_pdrop, cfg.attn_pdrop) == (0.25, 0.1)
    assert (model.transformer.h[0].mlp.dropout.p, model.transformer.h[0].attn.attn_pdrop) == (0.25, 0.1)


# ---- --pretrained_block range (F4) and ImageGPT blocks (P4) --------------------------------------------------------

def test_pretrained_block_beyond_the_host_is_refused(lms):
    """Block 1 exists in the 2-layer LM but not in a 1-layer host."""
    gpt = str(lms / "gpt2")
    with pytest.raises(UserError) as e:
        build_model_from_args(args_for("--pretrained_lm", gpt, "--pretrained_block", "1", "--embed_dim", "32",
                                    "--n_layer", "1"), HOPPER)
    assert str(e.value) == f"--pretrained_block 1 is out of range: the host has 1 blocks and {gpt} has 2"


def test_imagegpt_pretrained_block_keeps_its_norm_and_function(lms):
    from transformers import ImageGPTModel

    model = build_model_from_args(args_for("--pretrained_lm", str(lms / "igpt"), "--pretrained_block", "0",
                                        "--embed_dim", "24", "--n_layer", "2"), HOPPER).eval()
    assert model.config.backbone.block_overrides["0"]["norm_type"] == "imagegpt"
    blk = model.transformer.h[0]
    assert type(blk.ln_1) is ImageGPTNorm and type(blk.ln_2) is ImageGPTNorm
    assert type(model.transformer.h[1].ln_1) is torch.nn.LayerNorm
    assert type(model.transformer.ln_f) is torch.nn.LayerNorm
    hf = ImageGPTModel.from_pretrained(lms / "igpt").eval()
    x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = blk(x, attention_bias(None, 9, x.device, x.dtype))
        ref = hf.h[0](x)[0]
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


# ---- --gpt_kmeans refusals (F5, F6) ---------------------------------------------------------------------------------

def test_gpt_kmeans_refused_with_pretrained_block(lms):
    args = args_for("--pretrained_lm", str(lms / "gpt2"), "--pretrained_block", "0", "--embed_dim", "32",
                 "--n_layer", "1", "--gpt_kmeans", "5", "--gpt_kmeans_const", "0.1")
    model = build_model_from_args(args, HOPPER)
    with pytest.raises(UserError) as e:
        make_extra_loss(args, model)
    assert str(e.value) == ("--gpt_kmeans does not go with --pretrained_block: the centres are of the LM's token "
                            "embeddings, and with one transplanted block the model's token embeddings are random")


def test_gpt_kmeans_without_a_weight_is_refused(lms):
    args = args_for("--pretrained_lm", str(lms / "gpt2"), "--gpt_kmeans", "5")
    model = build_model_from_args(args, HOPPER)
    with pytest.raises(UserError) as e:
        make_extra_loss(args, model)
    assert str(e.value) == "--gpt_kmeans needs --gpt_kmeans_const (the loss weight; the papers use 0.1)"


# ---- the auxiliary loss sum (F1) ------------------------------------------------------------------------------------

def test_aux_losses_total_is_the_weighted_sum_of_the_terms():
    model = DecisionTransformer(DTConfig(11, 3, max_length=5, backbone=BackboneConfig(n_embd=16, n_layer=1)), seed=0)
    model.eval()                                                   # no dropout: the LM loss can be recomputed
    aux = aux_losses(model)
    aux.kmeans.anneal_steps = 100                                  # weight 0.1 * sigmoid(5 - 10 s / 100)
    aux.lm.linear_decay, aux.lm.total_steps = True, 10             # weight 0.5 * (1 - (s - 1) / 10)
    delta = 0.3
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.add_(delta)      # init_reg: 1e-2 * 0.3 * sqrt(16 * 48)
    g = torch.Generator().manual_seed(5)
    out = model(torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 3, generator=g),
                torch.randn(2, 5, 1, generator=g), torch.arange(5).repeat(2, 1))
    total, logs = aux(model, out, None, step=4)                    # the 5th step: s = 5

    # every term computed independently of the code under test
    w_k = 0.1 / (1.0 + math.exp(-((100 - 5) / 10 - 5)))
    w_l = 0.5 * (1 - 4 / 10)
    centres = torch.randn(7, 16, generator=torch.Generator().manual_seed(2))
    km = materialised(out.all_embs, centres, normalize=False, mean=False)
    reg = 1e-2 * delta * math.sqrt(16 * 48)
    blocks = torch.randint(0, model.transformer.wte.num_embeddings, (9, 12),
                           generator=torch.Generator().manual_seed(1))
    ids = blocks[torch.randperm(9, generator=torch.Generator().manual_seed(3))[:2]]   # TextBatches' first batch of 2
    with torch.no_grad():
        logits = model.transformer.lm_logits(ids)
        ll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    assert logs["training/kmeans_weight"] == pytest.approx(w_k, rel=1e-12)
    assert logs["training/lm_const"] == pytest.approx(w_l, rel=1e-12)
    torch.testing.assert_close(logs["training/kmeans_loss"], km.detach(), atol=1e-6, rtol=1e-5)
    assert logs["training/init_reg_loss"].item() == pytest.approx(reg, rel=1e-5)
    torch.testing.assert_close(logs["training/lm_loss"], ll, atol=1e-5, rtol=1e-5)
    expected = w_k * km.item() + reg + w_l * ll.item()
    assert total.item() == pytest.approx(expected, rel=1e-5)
    # each term matters at this precision (so a dropped weight or term shows)
    assert min(abs((1 - w_k) * km.item()), reg, abs((1 - w_l) * ll.item())) > 1e-2 * abs(expected) > 0
    total.backward()                                               # one graph through all three terms
    assert model.transformer.wte.weight.grad.abs().sum() > 0
    assert model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0


# ---- what locate_lm and the weight copy refuse (P1, P2, P5) ----------------------------------------------------------

def test_weight_files_lacking_tensors_are_refused(lms, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    for drop, tail in ((["h.1.mlp.c_fc.weight"], ""),
                       (["h.1.mlp.c_fc.weight", "h.0.ln_1.bias", "ln_f.weight"], " and 2 more tensors")):
        d = tmp_path / f"lacking{len(drop)}"
        shutil.copytree(lms / "gpt2", d)
        sd = load_file(str(d / "model.safetensors"))
        assert all(k in sd for k in drop)
        save_file({k: v for k, v in sd.items() if k not in drop}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})
        lm = locate_lm(str(d))
        with pytest.raises(UserError) as e:
            lm.state_dict()
        msg = str(e.value)
        assert msg.startswith(f"{d}: the weight files lack ") and msg.endswith(tail), msg
        assert msg[len(f"{d}: the weight files lack "):len(msg) - len(tail)] in drop
    # the complete folder loads
    assert set(locate_lm(str(lms / "gpt2")).state_dict()) == set(load_file(str(lms / "gpt2" / "model.safetensors")))


def test_copy_refuses_a_state_dict_lacking_a_tensor(lms):
    lm = locate_lm(str(lms / "gpt2"))
    model = build_model_from_args(args_for("--pretrained_lm", str(lms / "gpt2")), HOPPER)
    before = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    sd = {k: v for k, v in lm.state_dict().items() if k != "h.1.mlp.c_fc.weight"}
    partial = PretrainedLM(name=lm.name, path=lm.path, source=lm.source, hf_config=lm.hf_config, _state=sd)
    with pytest.raises(UserError) as e:
        load_lm_into_backbone(model.transformer, partial)
    assert str(e.value) == (f"{lm.path}: the pretrained weights do not fit the DT backbone: lacks "
                            f"h.1.mlp.c_fc.weight")
    assert all(torch.equal(v, before[k]) for k, v in model.transformer.state_dict().items())   # nothing copied


@pytest.mark.parametrize("setting", [{"scale_attn_by_inverse_layer_idx": True}, {"reorder_and_upcast_attn": True},
                                     {"scale_attn_weights": False}])
def test_unsupported_attention_variants_are_refused(tmp_path, setting):
    from transformers import GPT2Config

    d = tmp_path / "lm"
    GPT2Config(n_embd=16, n_layer=1, n_head=2, **setting).save_pretrained(d)
    with pytest.raises(UserError) as e:
        locate_lm(str(d))
    want = ("scale_attn_weights=False is not supported" if "scale_attn_weights" in setting else
            "scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
    assert str(e.value) == f"{d}: {want}"
    GPT2Config(n_embd=16, n_layer=1, n_head=2).save_pretrained(d)               # the plain config is accepted
    assert locate_lm(str(d)).model_type == "gpt2"


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import BertConfig

    d = tmp_path / "bert"
    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(d)
    with pytest.raises(UserError) as e:
        locate_lm(str(d))
    assert str(e.value) == (f"{d}: unsupported architecture 'bert'; --pretrained_lm supports GPT-2-family (gpt2, "
                            f"ChibiT) and ImageGPT models")


@pytest.mark.parametrize("script,flags,needle", [
    ("experiment", ["--gpt_kmeans", "5", "--gpt_kmeans_const", "0.1"],
     "--gpt_kmeans needs a model initialised from --pretrained_lm"),
    ("experiment", ["--igpt_legacy_ln"], "--igpt_legacy_ln only applies with an ImageGPT --pretrained_lm"),
    ("experiment", ["--pretrained_lm", "{gpt2}", "--pretrained_block", "0", "--embed_dim", "32", "--gpt_kmeans", "5",
                    "--gpt_kmeans_const", "0.1"], "--gpt_kmeans does not go with --pretrained_block"),
    ("experiment", ["--pretrained_lm", "{gpt2}", "--gpt_kmeans", "5", "--gpt_kmeans_const", "0.1", "--kmeans_cache",
                    "{cache}"], "centres have hidden size 7 but the LM's is 32"),
    ("lm_cotraining", ["--pretrained_lm", "{igpt}", "--joint"], "--joint needs a GPT-2-family text LM"),
    ("lm_cotraining", ["--pretrained_lm", "{gpt2}", "--joint"], "not found locally"),
    ("experiment", ["--pretrained_lm", "{gpt2}", "--gpt_kmeans", "5", "--gpt_kmeans_const", "0.1", "--kmeans_cache",
                    "{cache}/c.pt"], "--kmeans_cache writes to {cache}/, but {cache} is a file"),
    ("lm_cotraining", ["--pretrained_lm", "{gpt2}", "--gpt_kmeans", "5", "--gpt_kmeans_const", "0.1",
                       "--kmeans_cache", "{here}"], "cannot write {here}: it is a folder"),
], ids=["kmeans_without_lm", "legacy_ln_without_lm", "kmeans_with_block", "kmeans_cache_of_another_lm",
        "joint_with_igpt", "joint_without_corpus", "kmeans_cache_under_a_file", "kmeans_cache_a_folder"])
def test_lm_flag_mistakes_stop_the_run_before_the_data(lms, tmp_path, monkeypatch, capsys, script, flags, needle):
    """Auxiliary-loss and LM flags that cannot work are one line before the dataset is loaded or generated (which
    takes minutes), as the other flag checks are."""
    import experiment
    from conftest import fails
    from decision_transformer import run
    from lm_cotraining import experiment as lm_experiment

    monkeypatch.chdir(tmp_path)
    torch.save(torch.randn(5, 7), tmp_path / "centres.pt")
    loaded = []
    monkeypatch.setattr(run, "load_dataset", lambda *a, **k: loaded.append(a) or pytest.fail("data loaded"))
    names = {"gpt2": lms / "gpt2", "igpt": lms / "igpt", "cache": tmp_path / "centres.pt", "here": tmp_path}
    argv = ["--env", "hopper", "--data_path", str(tmp_path / "none"), "--outdir", "out", "--max_iters", "1",
            *[f.format(**names) for f in flags]]
    msg = fails((experiment if script == "experiment" else lm_experiment).main, argv, capsys)
    assert needle.format(**names) in msg and loaded == []
    assert not (tmp_path / "none").exists() and not (tmp_path / "out").exists()


def test_the_lm_scripts_flag_errors_name_it(capsys):
    """A flag the LM script does not have is refused naming lm_cotraining/experiment.py (whose --help lacks it), not
    experiment.py (whose --help has it)."""
    from conftest import fails
    from lm_cotraining import experiment as lm_experiment

    msg = fails(lm_experiment.main, ["--pretrained_lm", "gpt2", "--pretrained_block", "0"], capsys)
    assert msg == ("error: lm_cotraining/experiment.py: unrecognized arguments: --pretrained_block 0 (see "
                   "lm_cotraining/experiment.py --help)")


def test_a_checkpoint_of_another_lm_is_sent_to_that_lm(lms, tmp_path, monkeypatch, capsys, hopper_data):
    """--load_checkpoint into a model built from a whole --pretrained_lm: the LM's config sets the heads and sizes, so
    the advice is the --pretrained_lm the checkpoint's run used, not --n_head (which the LM overrides)."""
    import experiment
    from transformers import GPT2Config, GPT2Model

    from conftest import fails

    monkeypatch.chdir(tmp_path)
    GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=40, vocab_size=50,
                         layer_norm_epsilon=1e-4)).save_pretrained("four")
    GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=40, vocab_size=50,
                         layer_norm_epsilon=1e-4)).save_pretrained("small")
    common = ["--env", "hopper", "--data_path", str(hopper_data), "--K", "5", "--batch_size", "4", "--max_iters", "1",
              "--num_steps_per_iter", "1", "--num_eval_episodes", "0"]
    experiment.main([*common, "--pretrained_lm", str(lms / "gpt2"), "--outdir", "o"])
    (ckpt,) = (tmp_path / "o").glob("gpt2_*/model_1.pt")
    msg = fails(experiment.main, [*common, "--pretrained_lm", "four", "--n_head", "2", "--outdir", "p",
                                  "--load_checkpoint", str(ckpt)], capsys)
    assert "n_head 2; the model these flags build has n_head 4" in msg, msg
    assert msg.endswith(f"(set --pretrained_lm as the checkpoint's run did); its run used --pretrained_lm "
                        f"{lms / 'gpt2'}"), msg
    msg = fails(experiment.main, [*common, "--pretrained_lm", "small", "--outdir", "p", "--load_checkpoint",
                                  str(ckpt)], capsys)
    assert "set --pretrained_lm as its run did" in msg and "--embed_dim" not in msg, msg
    assert msg.endswith(f"; its run used --pretrained_lm {lms / 'gpt2'}"), msg
    # a model of another token table (the LM it started from) loaded without that LM, its sizes given: the advice
    # named only the other shape settings (--extend_positions), whose fix then failed on wte alone
    GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=40, vocab_size=50)).save_pretrained("plain")
    experiment.main([*common, "--pretrained_lm", "plain", "--outdir", "s"])
    (small_ckpt,) = (tmp_path / "s").glob("plain_*/model_1.pt")
    msg = fails(experiment.main, [*common, "--n_head", "2", "--embed_dim", "16", "--n_layer", "1",
                                  "--activation_function", "gelu_new", "--outdir", "q", "--load_checkpoint",
                                  str(small_ckpt)], capsys)
    assert "shape mismatch for transformer.wte.weight (checkpoint [50, 16], model [50257, 16])" in msg, msg
    assert "vocab_size 50" in msg and "set --pretrained_lm" in msg, msg
    msg = fails(experiment.main, [*common, "--n_head", "4", "--embed_dim", "32", "--n_layer", "2", "--outdir", "p",
                                  "--load_checkpoint", str(ckpt)], capsys)
    assert "set --activation_function, --n_head, --pretrained_lm as the checkpoint's run did" in msg and msg.endswith(
        f"; its run used --pretrained_lm {lms / 'gpt2'}"), msg
