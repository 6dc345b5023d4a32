"""LM-initialised Decision Transformers (model.md §2, §8-§13): loading GPT-2 / ImageGPT / ChibiT offline, extended
positions, block transplant, k-means alignment, init_reg, LM co-training, the LM script and the ChibiT maker.

Every pretrained model here is a tiny model of the real class, written with ``save_pretrained`` into a temporary
folder or a hand-built Hugging Face cache; nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, listed

import experiment
from decision_transformer.checkpoint import load_checkpoint
from decision_transformer.cli import experiment_parser
from decision_transformer.envs import get_env_spec
from decision_transformer.errors import UserError
from decision_transformer.model_factory import AuxLosses, build_model_from_args, make_extra_loss
from decision_transformer.models import DecisionTransformer, DTConfig
from decision_transformer.models.pretrained import locate_lm, tile_positions
from decision_transformer.training.kmeans import (KMeansAlignment, anneal, cosine_kmeans,
                                                  load_or_compute_centres)

HOPPER = get_env_spec("hopper")
RUN = ["--K", "5", "--batch_size", "4", "--warmup_steps", "10", "--num_eval_episodes", "0"]




# ---- tiny pretrained models -------------------------------------------------------------------------------------

def corpus_text(n_lines=400, seed=0) -> str:
    """Pseudo-text over a random lexicon: enough distinct pairs for a BPE vocabulary of ~1000+."""
    import random

    rng = random.Random(seed)
    lex = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(2500)]
    return "".join(" ".join(rng.choice(lex) for _ in range(rng.randint(5, 14))) + ".\n" for _ in range(n_lines))


def nontrivial_norms_and_biases(model):
    """Norm weights around 1 and biases away from 0 (not the fresh 1 and 0), so a wrong norm or a dropped tensor
    shows in a comparison."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".ln_" in n or "ln_f" in n:
                p.normal_(1.0 if n.endswith("weight") else 0.0, 0.3)
            elif n.endswith("bias"):
                p.normal_(0.0, 0.05)


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    """save_pretrained folders: a GPT-2 with its own BPE tokenizer (n_positions 40, so extended positions tile)
    and an ImageGPT; plus a Hugging Face cache holding them as ``gpt2`` and ``openai/imagegpt-small``."""
    from transformers import (GPT2Config, GPT2LMHeadModel, ImageGPTConfig, ImageGPTForCausalImageModeling)

    from decision_transformer.training.lm_pretrain import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("lms")
    (root / "corpus.txt").write_text(corpus_text())
    tok = train_bpe_tokenizer([root / "corpus.txt"], 400)
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=40, vocab_size=len(tok),
                                     bos_token_id=0, eos_token_id=0, embd_pdrop=0.0))
    nontrivial_norms_and_biases(gpt)
    gpt.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    igpt = ImageGPTForCausalImageModeling(ImageGPTConfig(n_embd=24, n_layer=2, n_head=3, n_positions=1024,
                                                         vocab_size=17))
    with torch.no_grad():
        for n, p in igpt.named_parameters():
            if ".ln_" in n or "ln_f" in n:
                p.normal_(1.0, 0.3)
            if n.endswith("wpe.weight"):
                p.normal_(0.0, 0.5)
    igpt.save_pretrained(root / "igpt")
    hub = root / "hf" / "hub"
    for repo, src in (("gpt2", "gpt2"), ("openai/imagegpt-small", "igpt")):
        folder = hub / ("models--" + repo.replace("/", "--"))
        commit = "0123456789abcdef0123456789abcdef01234567"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(commit)
        shutil.copytree(root / src, folder / "snapshots" / commit)
    return root


@pytest.fixture
def hf_home(lm_dirs, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(lm_dirs / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return lm_dirs / "hf"


def args_for(*argv) -> Namespace:
    return experiment_parser().parse_args(["--dropout", "0.0", *argv])


# ---- backbones: same function as the transformers classes ------------------------------------------------------

def test_gpt2_backbone_and_lm_head_match_transformers(lm_dirs):
    from transformers import GPT2LMHeadModel

    from decision_transformer.training.lm_cotrain import lm_loss

    hf = GPT2LMHeadModel.from_pretrained(lm_dirs / "gpt2").eval()
    model = build_model_from_args(args_for("--pretrained_lm", str(lm_dirs / "gpt2")), HOPPER).eval()
    bb = model.transformer
    assert bb.config.n_embd == 32 and bb.config.n_head == 2 and bb.config.activation_function == "gelu_new"
    assert bb.config.attn_pdrop == 0.1 and bb.config.resid_pdrop == 0.0          # dropout overrides
    ids = torch.randint(0, hf.config.vocab_size, (2, 12))
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=ids)
        torch.testing.assert_close(bb.lm_logits(ids), ref.logits, atol=1e-4, rtol=1e-4)    # with positions
        torch.testing.assert_close(lm_loss(bb, ids), ref.loss, atol=1e-5, rtol=1e-5)
        # the DT path adds no position embedding: equal to HF with wpe zeroed
        x = torch.randn(2, 9, 32)
        hf.transformer.wpe.weight.zero_()
        torch.testing.assert_close(bb(x).last_hidden_state, hf.transformer(inputs_embeds=x).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_imagegpt_uses_its_own_norm_and_legacy_ln_reproduces_the_misload(lm_dirs):
    from transformers import ImageGPTModel

    hf = ImageGPTModel.from_pretrained(lm_dirs / "igpt").eval()
    with torch.no_grad():
        hf.wpe.weight.zero_()
    x = torch.randn(2, 9, 24)
    model = build_model_from_args(args_for("--pretrained_lm", str(lm_dirs / "igpt")), HOPPER).eval()
    cfg = model.config.backbone
    assert (cfg.norm_type, cfg.n_embd, cfg.n_head, cfg.activation_function, cfg.vocab_size) == \
        ("imagegpt", 24, 3, "quick_gelu", 17)
    keys = model.state_dict().keys()
    assert "transformer.h.0.ln_1.weight" in keys and not any(k.endswith(("ln_1.bias", "ln_f.bias"))
                                                             for k in keys)
    with torch.no_grad():
        ours = model.transformer(x).last_hidden_state
        torch.testing.assert_close(ours, hf(inputs_embeds=x).last_hidden_state, atol=1e-5, rtol=1e-5)
    legacy = build_model_from_args(args_for("--pretrained_lm", str(lm_dirs / "igpt"), "--igpt_legacy_ln"),
                                   HOPPER).eval()
    assert legacy.config.backbone.norm_type == "layernorm"
    sd = legacy.state_dict()
    assert torch.equal(sd["transformer.h.1.ln_2.weight"], model.state_dict()["transformer.h.1.ln_2.weight"])
    assert torch.count_nonzero(sd["transformer.h.1.ln_2.bias"]) == 0
    with torch.no_grad():
        assert not torch.allclose(legacy.transformer(x).last_hidden_state, ours, atol=1e-3)
    with pytest.raises(UserError, match="igpt_legacy_ln"):
        build_model_from_args(args_for("--pretrained_lm", str(lm_dirs / "gpt2"), "--igpt_legacy_ln"), HOPPER)


# ---- extend_positions ---------------------------------------------------------------------------------------------

def test_tile_positions_formula():
    old = torch.arange(6.0).unsqueeze(1)                   # P = 6: rows 0, 1, then 2..5 repeated
    assert tile_positions(old, 13).squeeze(1).tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 2, 3, 4]
    assert tile_positions(old, 4) is old


def test_extend_positions_tiles_and_shares_the_lm_table(lm_dirs):
    lm = locate_lm(str(lm_dirs / "gpt2"))
    P = lm.n_positions
    assert P == 40
    model = build_model_from_args(args_for("--pretrained_lm", str(lm_dirs / "gpt2"), "--extend_positions"), HOPPER)
    assert model.embed_timestep is model.transformer.wpe
    wpe = model.transformer.wpe.weight
    assert wpe.shape == (HOPPER.max_ep_len, 32)
    src = lm.state_dict()["wpe.weight"]
    for i in (0, 1, 2, 39, 40, 41, 77, 999):
        j = i if i < 2 else 2 + (i - 2) % (P - 2)
        assert torch.equal(wpe[i], src[j]), i
    sd = model.state_dict()
    assert sd["embed_timestep.weight"].data_ptr() == sd["transformer.wpe.weight"].data_ptr()
    # the stored config alone rebuilds the shared structure, and the weights load strictly
    rebuilt = DecisionTransformer(DTConfig.from_dict(json.loads(json.dumps(model.config.to_dict()))))
    rebuilt.load_state_dict(sd)
    assert rebuilt.embed_timestep is rebuilt.transformer.wpe
    assert torch.equal(rebuilt.embed_timestep.weight, wpe)
    # and the timestep embedding really is the LM's table: timestep 45 reads row 2 + 43 % 38 = 7
    t = torch.tensor([[45]])
    assert torch.equal(model.embed_timestep(t)[0, 0], src[7])


def test_extend_positions_with_random_init_uses_the_random_wpe():
    model = build_model_from_args(args_for("--embed_dim", "16", "--n_layer", "1", "--extend_positions"), HOPPER)
    assert model.embed_timestep is model.transformer.wpe and model.transformer.wpe.weight.shape == (1024, 16)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.1)       # GPT-2 init, not N(0, 1)
    assert sum(p.numel() for p in model.parameters()) == \
        sum(p.numel() for p in build_model_from_args(args_for("--embed_dim", "16", "--n_layer", "1"),
                                                     HOPPER).parameters()) - 1000 * 16  # no separate table


# ---- block transplant ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b", [0, 1])
def test_pretrained_block_transplant(lm_dirs, b):
    lm = locate_lm(str(lm_dirs / "gpt2"))
    host = ["--embed_dim", "32", "--n_layer", "3", "--n_head", "1"]
    model = build_model_from_args(args_for("--pretrained_lm", str(lm_dirs / "gpt2"), "--pretrained_block", str(b),
                                           *host), HOPPER)
    plain = build_model_from_args(args_for(*host), HOPPER)       # the same seed, no LM
    lm_sd, sd, plain_sd = lm.state_dict(), model.state_dict(), plain.state_dict()
    for i in range(3):
        names = [k for k in sd if k.startswith(f"transformer.h.{i}.")]
        same_as_lm = [torch.equal(sd[k], lm_sd[k[len("transformer."):]]) for k in names if i < 2]
        if i == b:
            assert all(same_as_lm) and len(same_as_lm) == 12
        else:
            assert not any(same_as_lm)
            assert all(torch.equal(sd[k], plain_sd[k]) for k in names)   # other blocks: the seeded random init
    # everything outside block b is the random-init model, untouched
    for k in sd:
        if not k.startswith(f"transformer.h.{b}."):
            assert torch.equal(sd[k], plain_sd[k]), k
    blk = model.transformer.h[b]
    assert blk.attn.n_head == 2 and type(blk.mlp.act).__name__ == "TanhGELU"   # gelu_new
    assert model.transformer.h[(b + 1) % 3].attn.n_head == 1 and model.transformer.h[2].attn.n_head == 1
    rebuilt = DecisionTransformer(DTConfig.from_dict(json.loads(json.dumps(model.config.to_dict()))))
    rebuilt.load_state_dict(sd)
    assert rebuilt.transformer.h[b].attn.n_head == 2


def test_a_block_replacement_run_gets_the_no_lm_optimiser(lm_dirs):
    """The original switched --pretrained_lm off for a --pretrained_block run before building its optimiser: AdamW
    eps 1e-8 in one group, as a random-init run; a whole-LM run keeps eps 1e-6."""
    from decision_transformer.training.optim import optimizer_from_args

    host = ["--embed_dim", "32", "--n_layer", "3", "--n_head", "1"]
    for extra, eps in ((["--pretrained_block", "1"], 1e-8), (["--pretrained_block", "0"], 1e-8), ([], 1e-6)):
        args = args_for("--pretrained_lm", str(lm_dirs / "gpt2"), *extra, *(host if extra else []))
        model = build_model_from_args(args, HOPPER)
        opt, _, _ = optimizer_from_args(model, args, torch.device("cpu"))
        assert [g["eps"] for g in opt.param_groups] == [eps]
        assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("legacy", [False, True])
def test_an_imagegpt_block_transplants_with_its_own_norm_or_the_legacy_layernorm(lm_dirs, legacy):
    """--pretrained_block with an ImageGPT: the block keeps its RMS-style norm, or (--igpt_legacy_ln) goes into a
    LayerNorm block whose biases, absent from the checkpoint, are zero as in the whole-model legacy load."""
    lm = locate_lm(str(lm_dirs / "igpt"))
    host = ["--embed_dim", "24", "--n_layer", "2", "--n_head", "1"]
    flags = ["--pretrained_lm", str(lm_dirs / "igpt"), "--pretrained_block", "1", *host]
    model = build_model_from_args(args_for(*flags, *(["--igpt_legacy_ln"] if legacy else [])), HOPPER)
    plain = build_model_from_args(args_for(*host), HOPPER)
    lm_sd, sd, plain_sd = lm.state_dict(), model.state_dict(), plain.state_dict()
    block = {k[len("transformer.h.1."):]: v for k, v in sd.items() if k.startswith("transformer.h.1.")}
    from_lm = [k for k in block if "h.1." + k in lm_sd]
    assert from_lm and all(torch.equal(block[k], lm_sd["h.1." + k]) for k in from_lm)
    biases = sorted(k for k in block if k.endswith(("ln_1.bias", "ln_2.bias")))
    assert sorted(set(block) - set(from_lm)) == biases
    assert biases == (["ln_1.bias", "ln_2.bias"] if legacy else [])
    assert all(torch.count_nonzero(block[k]) == 0 for k in biases)
    assert model.config.backbone.for_block(1).norm_type == ("layernorm" if legacy else "imagegpt")
    for k in sd:
        if not k.startswith("transformer.h.1."):
            assert torch.equal(sd[k], plain_sd[k]), k


def test_pretrained_block_errors(lm_dirs):
    gpt = str(lm_dirs / "gpt2")
    with pytest.raises(UserError, match="--embed_dim"):
        build_model_from_args(args_for("--pretrained_lm", gpt, "--pretrained_block", "0"), HOPPER)  # 128 != 32
    with pytest.raises(UserError, match="out of range"):
        build_model_from_args(args_for("--pretrained_lm", gpt, "--pretrained_block", "2", "--embed_dim", "32"),
                              HOPPER)
    with pytest.raises(UserError, match="needs --pretrained_lm"):
        build_model_from_args(args_for("--pretrained_block", "0"), HOPPER)


def test_an_lm_config_no_model_can_use_is_one_line_naming_the_folder(lm_dirs, tmp_path):
    """A save_pretrained folder whose config.json says n_head 0, 3 heads for 32 units or a NaN epsilon: refused
    naming the folder (it was a ValueError traceback, or a line without the folder)."""
    import json
    import shutil

    for field, value in (("n_head", 0), ("layer_norm_epsilon", float("nan")), ("n_head", 3)):
        bad = tmp_path / f"lm_{field}_{value}"
        shutil.copytree(lm_dirs / "gpt2", bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg[field] = value
        (bad / "config.json").write_text(json.dumps(cfg))
        says = rf"^{bad}: its config.json describes no usable model \(({field} must|hidden size 32 is not divisible "
        says += r"by n_head 3)"
        with pytest.raises(UserError, match=says):
            build_model_from_args(args_for("--pretrained_lm", str(bad)), HOPPER)
        with pytest.raises(UserError, match=says):   # (the scripts read the weights first: not "damaged weights")
            locate_lm(str(bad)).state_dict()
    # weights that do not fit the config: the tensor and both shapes are named; a config of fewer blocks than the
    # files hold (the extra blocks would be dropped without a word) names the first extra tensor
    for field, value, says in (
            ("n_inner", 7, r"do not fit its config.json: h\.0\.mlp\.c_fc\.bias is \[128\] in the files, \[7\] by "
                           r"the config"),
            ("n_layer", 1, r"hold h\.1\..* and \d+ more tensors, blocks beyond the 1 its config.json builds")):
        bad = tmp_path / f"lm_{field}"
        shutil.copytree(lm_dirs / "gpt2", bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg[field] = value
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(UserError, match=rf"^{bad}: its weight files {says}"):
            build_model_from_args(args_for("--pretrained_lm", str(bad)), HOPPER)


def _config_only(lm_dirs, folder):
    """``folder`` holding the test GPT-2's config.json and no weights."""
    import shutil

    folder.mkdir()
    shutil.copy(lm_dirs / "gpt2" / "config.json", folder / "config.json")
    return folder


def _lm_with_weight(lm_dirs, folder, suffix: str, index: tuple, value: float):
    """A copy of the test GPT-2 in ``folder`` whose tensor ``*suffix`` holds ``value`` at ``index``."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(lm_dirs / "gpt2", folder)
    weights = load_file(folder / "model.safetensors")
    weights[next(k for k in weights if k.endswith(suffix))][index] = value
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_lm_weight_files_that_are_junk_or_hold_nan_are_one_line_naming_them(lm_dirs, tmp_path):
    """A weight file of junk bytes names the file and says it is damaged (it was a bare "(543911541)"); weights
    holding NaN are refused when read, naming the tensor (they trained to a NaN loss, exit 3)."""
    import shutil

    junk = tmp_path / "lm_junk"
    shutil.copytree(lm_dirs / "gpt2", junk)
    for f in junk.glob("model*.safetensors"):
        f.unlink()
    (junk / "pytorch_model.bin").write_bytes(b"junk bytes here" * 10)
    with pytest.raises(UserError, match=rf"^{junk}: cannot load the model weights from pytorch_model.bin, damaged or "
                                        r"not a weight file \(\w+"):
        build_model_from_args(args_for("--pretrained_lm", str(junk)), HOPPER)

    bare = _config_only(lm_dirs, tmp_path / "lm_no_weights")
    with pytest.raises(UserError, match=rf"^{bare}: no weight file \(model.safetensors or pytorch_model.bin\) beside "
                                        r"its config.json$"):
        build_model_from_args(args_for("--pretrained_lm", str(bare)), HOPPER)   # nothing damaged: nothing there

    nan = _lm_with_weight(lm_dirs, tmp_path / "lm_nan", "h.1.mlp.c_proj.weight", (0, 0), float("nan"))
    with pytest.raises(UserError, match=rf"^{nan}: the weights hold NaN or inf values, in h\.1\.mlp\.c_proj\.weight "
                                        r"\(a damaged model\)$"):
        build_model_from_args(args_for("--pretrained_lm", str(nan)), HOPPER)


def test_damaged_safetensors_files_and_inf_weights_are_named(lm_dirs, tmp_path):
    """A damaged model.safetensors alone is damaged, not missing; every damaged file is named, with the loader's
    reason; an inf weight is refused as NaN is."""
    import json

    from safetensors.torch import load_file

    junk = _config_only(lm_dirs, tmp_path / "lm_junk_st")
    (junk / "model.safetensors").write_bytes(b"junk bytes here" * 10)
    with pytest.raises(UserError, match=rf"^{junk}: cannot load the model weights from model.safetensors, damaged or "
                                        r"not a weight file \(\w+: .+\)$"):
        build_model_from_args(args_for("--pretrained_lm", str(junk)), HOPPER)

    shards = _config_only(lm_dirs, tmp_path / "lm_shards")
    names = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    keys = list(load_file(lm_dirs / "gpt2" / "model.safetensors"))
    (shards / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: names[i % 2] for i, k in enumerate(keys)}}))
    for n in names:
        (shards / n).write_bytes(b"junk bytes here" * 10)
    with pytest.raises(UserError, match=rf"^{shards}: cannot load the model weights from {names[0]}, {names[1]}, "
                                        r"model.safetensors.index.json, damaged or not a weight file \(\w+: .+\)$"):
        build_model_from_args(args_for("--pretrained_lm", str(shards)), HOPPER)

    inf = _lm_with_weight(lm_dirs, tmp_path / "lm_inf", "h.0.attn.c_attn.weight", (1, 2), float("-inf"))
    with pytest.raises(UserError, match=rf"^{inf}: the weights hold NaN or inf values, in h\.0\.attn\.c_attn\.weight "
                                        r"\(a damaged model\)$"):
        build_model_from_args(args_for("--pretrained_lm", str(inf)), HOPPER)


# ---- k-means alignment --------------------------------------------------------------------------------------------

def materialised(e, c, normalize, mean):
    """The originals' computation: the full [B, 3K, N, H] product, max (or mean) over clusters, mean over the rest."""
    if normalize:
        e, c = e / e.norm(dim=-1, keepdim=True), c / c.norm(dim=-1, keepdim=True)
    prod = torch.einsum("iaj,bj->iabj", e, c)
    return -(prod.mean(dim=2) if mean else prod.max(dim=2).values).mean()


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mean", [False, True])
def test_kmeans_dim_loss_equals_materialised(normalize, mean):
    g = torch.Generator().manual_seed(1)
    e = (torch.randn(3, 12, 16, generator=g) + 0.3).requires_grad_()
    c = torch.randn(7, 16, generator=g) + 0.5      # offsets: the mean variant is not ~0
    km = KMeansAlignment(c, const=0.1, form="dim", mean=mean, normalize=normalize)
    got = km.loss(e)
    (g1,) = torch.autograd.grad(got, e)
    ref = materialised(e, c, normalize, mean)
    (g2,) = torch.autograd.grad(ref, e)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g1, g2, atol=1e-7, rtol=1e-5)
    assert got.abs() > 1e-3


@pytest.mark.parametrize("mean", [False, True])
def test_kmeans_cosine_form(mean):
    g = torch.Generator().manual_seed(2)
    e, c = torch.randn(2, 6, 8, generator=g), torch.randn(5, 8, generator=g)
    km = KMeansAlignment(c, const=1.0, form="cosine", mean=mean)
    cos = torch.stack([torch.stack([F.cosine_similarity(e[i, a], c, dim=-1) for a in range(6)]) for i in range(2)])
    ref = -(cos.mean(-1) if mean else cos.max(-1).values).mean()
    torch.testing.assert_close(km.loss(e), ref, atol=1e-6, rtol=1e-5)
    # the two forms are different losses
    assert not torch.allclose(km.loss(e), KMeansAlignment(c, const=1.0, form="dim", mean=mean).loss(e))
    with torch.autocast("cpu", dtype=torch.bfloat16):                 # a bf16 run: the loss stays fp32
        inside = km.loss(e)
    assert inside.dtype == torch.float32 and torch.equal(inside, km.loss(e))


def test_anneal_schedules():
    assert anneal(1, 5000) == pytest.approx(0.99331, abs=1e-4)
    assert anneal(2500, 5000) == pytest.approx(0.5)
    assert anneal(5000, 5000) == pytest.approx(0.006693, abs=1e-5)
    assert anneal(7500, 15000) == pytest.approx(0.5)
    km = KMeansAlignment(torch.randn(3, 4), const=0.1, anneal_steps=15000)
    assert km.weight(7500) == pytest.approx(0.05)
    assert KMeansAlignment(torch.randn(3, 4), const=0.1, anneal_steps=None).weight(10**6) == 0.1


def test_each_script_gets_its_kmeans_variant(lm_dirs, tmp_path):
    """experiment.py: L2-normalised, anneal horizon 5000; lm_cotraining: unnormalised, 15000 or constant."""
    from decision_transformer.cli_lm import lm_cotraining_parser

    common = ["--pretrained_lm", str(lm_dirs / "gpt2"), "--gpt_kmeans", "10", "--gpt_kmeans_const", "0.1",
              "--kmeans_cache", str(tmp_path / "c.pt")]
    model = build_model_from_args(args_for(*common), HOPPER)
    main = make_extra_loss(args_for(*common), model).kmeans
    lm = make_extra_loss(lm_cotraining_parser().parse_args(common), model, script="lm_cotraining").kmeans
    flat = make_extra_loss(lm_cotraining_parser().parse_args([*common, "--disable_k_annealing"]), model,
                           script="lm_cotraining").kmeans
    assert (main.normalize, main.anneal_steps, lm.normalize, lm.anneal_steps) == (True, 5000, False, 15000)
    assert flat.weight(1) == flat.weight(10**5) == 0.1
    e = model(*[torch.zeros(2, 5, d) for d in (11, 3, 1)], torch.zeros(2, 5, dtype=torch.long)).all_embs
    assert not torch.allclose(main.loss(e), lm.loss(e))
    with pytest.raises(UserError, match="needs a model initialised from --pretrained_lm"):
        make_extra_loss(args_for("--gpt_kmeans", "10", "--gpt_kmeans_const", "0.1"), model)


def test_cosine_kmeans_recovers_directions():
    g = torch.Generator().manual_seed(0)
    dirs = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    scale = torch.rand(300, 1, generator=g) * 3 + 0.5            # cosine k-means ignores the length
    x = dirs.repeat(100, 1) * scale + 0.02 * torch.randn(300, 8, generator=g)
    c = cosine_kmeans(x, 3, seed=0)
    sim = F.normalize(c, dim=1) @ dirs.t()
    assert sorted(sim.argmax(1).tolist()) == [0, 1, 2] and sim.max(1).values.min() > 0.99


def test_kmeans_cache_created_reused_and_checked(tmp_path, monkeypatch):
    from decision_transformer.training.kmeans import table_fingerprint as km_table

    wte = torch.randn(50, 8)
    cache = tmp_path / "deep" / "er" / "c.pt"
    c = load_or_compute_centres(wte, 6, str(cache), seed=0)
    stored = torch.load(cache, weights_only=True)   # (with a record of the token table it was made from)
    assert set(stored) == {"centres", "token_table"} and stored["token_table"] == km_table(wte)
    stored = stored["centres"]
    assert stored.shape == (6, 8) and stored.dtype == torch.float32 and torch.equal(stored, c)
    from decision_transformer.training import kmeans as km_mod

    monkeypatch.setattr(km_mod, "cosine_kmeans", lambda *a, **k: pytest.fail("recomputed despite the cache"))
    assert torch.equal(load_or_compute_centres(wte, 6, str(cache), seed=1), c)
    with pytest.raises(UserError, match="hidden size 8 but the LM's is 16"):
        load_or_compute_centres(torch.randn(50, 16), 6, str(cache), seed=0)
    with pytest.raises(UserError, match="holds 6 centres"):
        load_or_compute_centres(wte, 7, str(cache), seed=0)
    for bad in (torch.ones(6, 8, dtype=torch.bool), torch.ones(6, 8, dtype=torch.complex64)):
        torch.save(bad, cache)                                     # (cast silently, or with a torch warning)
        with pytest.raises(UserError, match=r"expected a \[N, H\] float tensor of k-means centres"):
            load_or_compute_centres(wte, 6, str(cache), seed=0)
    # another LM's table of the same sizes: its centres were used without a word (the seed names one fixed
    # kmeans_cache/chibi_1000.pt for every run); a bare tensor, as the originals' caches are, records no table
    other = torch.randn(50, 8)
    torch.save({"centres": c, "token_table": km_table(wte)}, cache)
    with pytest.raises(UserError) as e:
        load_or_compute_centres(other, 6, str(cache), seed=0)
    assert str(e.value) == (f"{cache}: centres of another language model (its token table's digest {km_table(wte)}, "
                            f"this LM's {km_table(other)}); delete the file or point --kmeans_cache elsewhere")
    torch.save(c, cache)
    assert torch.equal(load_or_compute_centres(other, 6, str(cache), seed=0), c)
    cache.write_text("garbage\n")
    with pytest.raises(UserError, match=r"not a k-means centre file \(Unsupported operand 103\)$"):
        load_or_compute_centres(wte, 6, str(cache), seed=0)
    # more centres than tokens: one line before the cache's folder is made (it was left behind, empty)
    fresh = tmp_path / "new_folder" / "c.pt"
    with pytest.raises(UserError, match="--gpt_kmeans 51 must be between 1 and the LM's vocabulary size 50"):
        load_or_compute_centres(wte, 51, str(fresh), seed=0)
    assert not fresh.parent.exists()


# ---- init_reg -----------------------------------------------------------------------------------------------------

def test_init_reg_is_a_sum_of_unsquared_per_tensor_norms(lm_dirs):
    from decision_transformer.training.init_reg import InitReg

    model = build_model_from_args(args_for("--pretrained_lm", str(lm_dirs / "gpt2")), HOPPER)
    reg = InitReg(model, 1e-2)
    assert len(reg.params) == 2 * 12 and all(n.startswith("transformer.h.") for n, _ in reg.params)
    loss = reg.loss()
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for _, p in reg.params)  # 0, not NaN
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.add_(0.3)       # ||d||_F = 0.3 * sqrt(32 * 96)
        model.transformer.h[1].mlp.c_fc.bias.sub_(0.4)            # ||d||_F = 0.4 * sqrt(128)
        model.transformer.ln_f.weight.add_(5.0)                   # not regularised
        model.transformer.wte.weight.add_(5.0)
    expected = 1e-2 * (0.3 * (32 * 96) ** 0.5 + 0.4 * 128 ** 0.5)
    assert reg.loss().item() == pytest.approx(expected, rel=1e-5)


# ---- LM co-training -----------------------------------------------------------------------------------------------

def test_cotraining_step_trains_the_lm_head(lm_dirs, hopper_data):
    from decision_transformer.data import TrajectoryDataset, load_dataset
    from decision_transformer.training import Trainer, make_optimizer, warmup_schedule

    _, trajs = load_dataset(hopper_data, "hopper", "medium")
    ds = TrajectoryDataset(trajs, "hopper")

    def one_step(joint: bool):
        extra = ["--joint", "--nlp_dataset_name", str(lm_dirs / "corpus.txt"), "--max_iters", "4",
                 "--num_steps_per_iter", "5", "--gpt_lm_const", "0.5", "--lm_const_linear_decay",
                 "--no_token_cache"] if joint else []   # (its cache would go to the project's data/ folder)
        from decision_transformer.cli_lm import lm_cotraining_parser

        args = lm_cotraining_parser().parse_args(["--pretrained_lm", str(lm_dirs / "gpt2"), "--K", "5", *extra])
        model = build_model_from_args(args, HOPPER)
        aux = make_extra_loss(args, model, script="lm_cotraining")
        opt = make_optimizer(model, lr=1e-3, weight_decay=1e-4, pretrained_lm=True)
        trainer = Trainer(model, opt, warmup_schedule(opt, 1), ds, batch_size=4, K=5,
                          generator=torch.Generator().manual_seed(0), extra_loss=aux)
        before = model.transformer.wte.weight.detach().clone()
        logs = trainer.train_iteration(2, 1)
        return aux, logs, before, model.transformer.wte.weight.detach()

    aux, logs, before, after = one_step(True)
    assert isinstance(aux, AuxLosses) and aux.lm is not None
    assert aux.lm.batches.blocks.shape[1] == 40                  # blocks of min(1024, n_positions) tokens
    # the original LM script's decay: full weight at the first step, const / S at the last (its step - 1)
    assert aux.lm.weight(1) == 0.5 and aux.lm.weight(20) == pytest.approx(0.5 / 20)
    assert 3.0 < logs["training/lm_loss"] < 8.0                  # ~log(vocab) for a barely trained LM
    assert logs["training/lm_const"] == pytest.approx(0.5 * (1 - 1 / 20))     # the last step's (step 2) weight
    assert not torch.equal(before, after)                        # the tied head/embedding is trained
    aux_none, logs, before, after = one_step(False)
    # without --joint wte gets no gradient
    assert aux_none is None and torch.equal(before, after) and "training/lm_loss" not in logs


def test_fp16_trainer_path_equals_the_fp32_step_off_cuda(lm_dirs, hopper_data):
    """On CPU autocast and loss scaling are off, so the LM script's fp16 trainer must reproduce the plain step
    exactly, auxiliary losses (k-means, init_reg) and gradient clipping included."""
    from decision_transformer.cli_lm import lm_cotraining_parser
    from decision_transformer.data import TrajectoryDataset, load_dataset
    from decision_transformer.training import Trainer, make_optimizer, warmup_schedule
    from decision_transformer.training.lm_cotrain import AmpTrainer

    _, trajs = load_dataset(hopper_data, "hopper", "medium")
    ds = TrajectoryDataset(trajs, "hopper")
    args = lm_cotraining_parser().parse_args(["--pretrained_lm", str(lm_dirs / "gpt2"), "--K", "5", "--fp16",
                                              "--gpt_kmeans", "20", "--gpt_kmeans_const", "0.1", "--init_reg", "0.1"])
    states = []
    for cls in (Trainer, AmpTrainer):
        model = build_model_from_args(args, HOPPER)
        opt = make_optimizer(model, lr=1e-3, weight_decay=1e-4, pretrained_lm=True)
        trainer = cls(model, opt, warmup_schedule(opt, 1), ds, batch_size=4, K=5,
                      generator=torch.Generator().manual_seed(0),
                      extra_loss=make_extra_loss(args, model, script="lm_cotraining"))
        trainer.train_iteration(3, 1)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["transformer.h.0.attn.c_attn.weight"],
                           locate_lm(str(lm_dirs / "gpt2")).state_dict()["h.0.attn.c_attn.weight"])


def test_fp16_loss_scaler_survives_resume(tmp_path):
    """The fp16 trainer's GradScaler state (scale, growth tracker) goes into train_state.pt and comes back on resume.
    A CPU GradScaler stands in for the CUDA one (the scaler is off on CPU): it scales, unscales and grows the same
    way."""
    from conftest import tiny_trajectories

    from decision_transformer.data import TrajectoryDataset
    from decision_transformer.run import restore_train_state, save_train_state
    from decision_transformer.training import make_optimizer, warmup_schedule
    from decision_transformer.training.lm_cotrain import AmpTrainer

    def trainer():
        model = DecisionTransformer(DTConfig(11, 3, max_length=5), seed=0)
        opt = make_optimizer(model, lr=1e-3, weight_decay=1e-4)
        t = AmpTrainer(model, opt, warmup_schedule(opt, 2), TrajectoryDataset(tiny_trajectories(), "hopper"),
                       batch_size=4, K=5, generator=torch.Generator().manual_seed(0))
        t.scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=2)
        return t

    a = trainer()
    a.train_iteration(3, 1)
    saved = a.scaler.state_dict()
    assert saved["scale"] == 16.0 and saved["_growth_tracker"] == 1   # grown once in three finite steps
    save_train_state(tmp_path / "train_state.pt", a.module, {}, a, a.optimizer, a.scheduler, a.generator,
                     iteration=1, best_score=0.0, exp_id=1)
    a.train_iteration(3, 2)
    b = trainer()
    assert b.scaler.state_dict() != saved
    restore_train_state(tmp_path / "train_state.pt", b.module, b, b.optimizer, b.scheduler, b.generator)
    assert b.scaler.state_dict() == saved
    b.train_iteration(3, 2)
    assert b.scaler.state_dict() == a.scaler.state_dict() and b.scaler.get_scale() == 64.0
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_file_in_the_token_caches_place_is_refused_before_the_data(lm_dirs, tmp_path, monkeypatch, capsys):
    from conftest import fails
    from decision_transformer import run
    from lm_cotraining import experiment as lm_experiment

    data = tmp_path / "data"
    data.mkdir()
    (data / "token_cache").write_text("not a folder\n")
    monkeypatch.setattr(run, "load_dataset", lambda *a, **k: pytest.fail("the data step was reached"))
    monkeypatch.chdir(tmp_path)
    msg = fails(lm_experiment.main, ["--pretrained_lm", lm_dirs / "gpt2", "--joint", "--nlp_dataset_name",
                                     lm_dirs / "corpus.txt", "--data_path", data, "--outdir", "out"], capsys)
    cache = data / "token_cache"
    assert msg == f"error: --joint's token cache (--no_token_cache: none) writes to {cache}/, but {cache} is a file"
    assert listed(tmp_path) == [data]


def test_a_token_cache_that_cannot_be_written_is_a_warning_and_the_run_goes_on(lm_dirs, tmp_path, monkeypatch,
                                                                                capsys):
    """A read-only --data_path (a shared mount): the cache only saves time, so the tokens are used without it; the
    run used to stop, either before the data (a missing cache folder) or after tokenising (an existing one)."""
    import errno

    from decision_transformer import checkpoint
    from decision_transformer.training import lm_cotrain
    from decision_transformer.training.lm_cotrain import cached_tokenize_corpus, load_tokenizer

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((lm_dirs / "corpus.txt").read_text()[:5000])
    tok = load_tokenizer(lm_dirs / "gpt2", None)
    monkeypatch.setattr(checkpoint.torch, "save", read_only)
    blocks = cached_tokenize_corpus([corpus], tok, 16, 400, tmp_path / "cache")
    assert torch.equal(blocks, lm_cotrain.tokenize_corpus([corpus], tok, 16, 400))
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"warning: cannot write {tmp_path / 'cache'}/joint_") and "\n" not in err
    assert err.endswith("; the tokens are used without a cache (--no_token_cache: none, and no warning)")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == []          # no temporary file left
    # the up-front check leaves a folder that cannot be written alone (a file in the cache's place is still refused)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if mode & os.W_OK else real(p, mode, *a, **k))
    assert not os.access(tmp_path, os.W_OK)
    args = Namespace(pretrained_block=None, nlp_dataset_name=str(corpus), nlp_dataset_config_name=None,
                     data_path=str(tmp_path / "ro"), no_token_cache=False, pretrained_lm="gpt2", tokenizer_name=None)
    lm = Namespace(model_type="gpt2", path=lm_dirs / "gpt2")
    assert lm_cotrain.joint_sources(args, lm)[0] == [corpus]
    (tmp_path / "ro").write_text("a file\n")
    with pytest.raises(UserError, match="token cache .* but .* is a file"):
        lm_cotrain.joint_sources(args, lm)


def test_joint_token_cache(lm_dirs, tmp_path, monkeypatch, capsys):
    import os

    from decision_transformer.training import lm_cotrain
    from decision_transformer.training.lm_cotrain import cached_tokenize_corpus, load_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((lm_dirs / "corpus.txt").read_text()[:20000])
    tok = load_tokenizer(lm_dirs / "gpt2", None)
    calls = []
    real = lm_cotrain.tokenize_corpus
    monkeypatch.setattr(lm_cotrain, "tokenize_corpus", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = tmp_path / "cache"
    first = cached_tokenize_corpus([corpus], tok, 16, 400, cache)
    again = cached_tokenize_corpus([corpus], tok, 16, 400, cache)
    assert len(calls) == 1 and torch.equal(first, again) and torch.equal(first, real([corpus], tok, 16, 400))
    assert "from the cache" in capsys.readouterr().err
    cached_tokenize_corpus([corpus], tok, 8, 400, cache)                  # another block size: another entry
    assert len(calls) == 2 and len(list(cache.glob("joint_*.pt"))) == 2
    corpus.write_text(corpus.read_text() + "a changed corpus line.\n")   # a changed corpus is tokenised again
    os.utime(corpus, ns=(1, 2))
    cached_tokenize_corpus([corpus], tok, 16, 400, cache)
    assert len(calls) == 3
    for f in cache.glob("joint_*.pt"):                                    # damaged entries are recomputed
        f.write_bytes(b"garbage")
    assert torch.equal(cached_tokenize_corpus([corpus], tok, 16, 400, cache), real([corpus], tok, 16, 400))
    assert len(calls) == 4 and "unreadable token cache" in capsys.readouterr().err
    # ids no embedding has (negative) or of another dtype would crash the LM's forward: tokenised again
    f = max(cache.glob("joint_*.pt"), key=lambda p: p.stat().st_mtime_ns)   # the entry just rewritten (16 tokens)
    good = torch.load(f, weights_only=True)
    assert good["blocks"].shape[1] == 16
    for blocks in (good["blocks"] - 500, good["blocks"].float()):
        torch.save({**good, "blocks": blocks}, f)
        assert torch.equal(cached_tokenize_corpus([corpus], tok, 16, 400, cache), good["blocks"])
        assert "unreadable token cache" in capsys.readouterr().err
    assert len(calls) == 6
    # an LM with fewer embeddings than the cached ids: refused at once (the same tokenizer gives the same ids), not
    # called unreadable and tokenised again
    top = int(good["blocks"].max())
    with pytest.raises(UserError, match=rf"^--joint: the tokenizer produces id {top} \(tokens from the cache .*joint_"
                                        rf".*\.pt\) but the LM has only {top} embeddings"):
        cached_tokenize_corpus([corpus], tok, 16, top, cache)
    assert len(calls) == 6 and "unreadable" not in capsys.readouterr().err


def test_joint_needs_a_local_corpus(lm_dirs, tmp_path, monkeypatch):
    from decision_transformer.cli_lm import lm_cotraining_parser

    monkeypatch.chdir(tmp_path)
    args = lm_cotraining_parser().parse_args(["--pretrained_lm", str(lm_dirs / "gpt2"), "--joint"])
    model = build_model_from_args(args, HOPPER)
    with pytest.raises(UserError, match="wikitext.*not found locally.*wiki.train.raw"):
        make_extra_loss(args, model, script="lm_cotraining")
    # a folder that exists but holds no text file is said as such, not "not found"
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "notes.md").write_text("no corpus")
    args = lm_cotraining_parser().parse_args(["--pretrained_lm", str(lm_dirs / "gpt2"), "--joint",
                                              "--nlp_dataset_name", "corpus"])
    with pytest.raises(UserError, match=r"the folder corpus holds no \.txt/\.raw/\.tokens/\.text file; corpora are"):
        make_extra_loss(args, model, script="lm_cotraining")


# ---- scripts ------------------------------------------------------------------------------------------------------

def expect_error(capsys, main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_missing_model_is_one_line_saying_where_and_how(tmp_path, monkeypatch, capsys, hopper_data):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    msg = expect_error(capsys, experiment.main, ["--data_path", str(hopper_data), *RUN, "--pretrained_lm",
                                                 "openai/imagegpt-small"])
    for needle in ("'openai/imagegpt-small' not found", str(tmp_path / "checkpoints" / "openai" / "imagegpt-small"),
                   str(tmp_path / "empty_hf" / "hub"), "hf download openai/imagegpt-small",
                   "checkpoints/imagegpt-small"):
        assert needle in msg, needle
    from lm_cotraining import experiment as lm_experiment

    msg = expect_error(capsys, lm_experiment.main, ["--data_path", str(hopper_data), *RUN])
    assert "needs --pretrained_lm" in msg


def test_lookup_order_local_then_checkpoints_then_cache(lm_dirs, hf_home, tmp_path, monkeypatch):
    from decision_transformer.models.pretrained import find_model_dir

    def where(name):
        path, source = find_model_dir(name)
        return path.resolve(), source

    monkeypatch.chdir(tmp_path)
    snapshot = (hf_home / "hub" / "models--openai--imagegpt-small" / "snapshots" /
                "0123456789abcdef0123456789abcdef01234567")
    assert where("openai/imagegpt-small") == (snapshot.resolve(), "hf-cache")
    shutil.copytree(lm_dirs / "igpt", tmp_path / "checkpoints" / "imagegpt-small")
    assert where("openai/imagegpt-small") == (tmp_path / "checkpoints" / "imagegpt-small", "local")
    shutil.copytree(lm_dirs / "gpt2", tmp_path / "checkpoints" / "ChibiT")
    assert where("chibit") == where("./checkpoints/CHIBIT") == (tmp_path / "checkpoints" / "ChibiT", "local")
    assert where("gpt2")[1] == "hf-cache"
    shutil.copytree(lm_dirs / "gpt2", tmp_path / "gpt2")
    assert where("gpt2") == (tmp_path / "gpt2", "local")          # a local folder wins over the cache


def test_an_originals_parent_path_is_found_below_this_folder_or_the_project(lm_dirs, tmp_path, monkeypatch, capsys):
    """The Merging-DT seed passes ``--pretrained_lm ../checkpoints/chibiT`` (its script ran from a sub-folder): the
    path as given wins; where it is absent, checkpoints/ChibiT below the working folder, then below the project."""
    from decision_transformer import paths
    from decision_transformer.models.pretrained import find_model_dir

    root, project = tmp_path / "work", tmp_path / "project"
    root.mkdir()
    monkeypatch.chdir(root)
    monkeypatch.setattr(paths, "PROJECT_ROOT", project)
    with pytest.raises(UserError, match=r"at .*/work/\.\./checkpoints/chibiT and .*/work/checkpoints/chibiT and "
                                        r".*/project/checkpoints/chibiT") as e:
        find_model_dir("../checkpoints/chibiT")
    # the ChibiT it suggests making goes into the project (where it is found), not beside it as ../checkpoints/ did
    assert str(e.value).endswith("lm_cotraining/pretrain_chibit.py --text FILE --out ../project/checkpoints/chibiT); "
                                 "see checkpoints/README.md"), str(e.value)
    shutil.copytree(lm_dirs / "gpt2", project / "checkpoints" / "ChibiT")
    assert find_model_dir("../checkpoints/chibiT")[0] == project / "checkpoints" / "ChibiT"
    assert capsys.readouterr().err == f"--pretrained_lm ../checkpoints/chibiT: using {project}/checkpoints/ChibiT\n"
    shutil.copytree(lm_dirs / "gpt2", root / "checkpoints" / "ChibiT")
    assert find_model_dir("../checkpoints/chibiT")[0] == Path("checkpoints/ChibiT")
    shutil.copytree(lm_dirs / "gpt2", tmp_path / "checkpoints" / "chibiT")
    assert find_model_dir("../checkpoints/chibiT")[0] == Path("../checkpoints/chibiT")   # the path as given
    assert capsys.readouterr().err.count("using") == 1


def test_a_bare_name_is_found_in_the_projects_checkpoints_from_a_sub_folder(lm_dirs, tmp_path, monkeypatch):
    """``--pretrained_lm ChibiT`` started from a sub-folder of the project finds the project's checkpoints/ChibiT (it
    looked in checkpoints/ below the working folder only); one below the working folder still wins."""
    from decision_transformer import paths
    from decision_transformer.models.pretrained import find_model_dir

    project = tmp_path / "project"
    (project / "lm_cotraining").mkdir(parents=True)
    monkeypatch.chdir(project / "lm_cotraining")
    monkeypatch.setattr(paths, "PROJECT_ROOT", project)
    shutil.copytree(lm_dirs / "gpt2", project / "checkpoints" / "ChibiT")
    assert find_model_dir("ChibiT") == (project / "checkpoints" / "ChibiT", "local")
    assert find_model_dir("someone/ChibiT")[0] == project / "checkpoints" / "ChibiT"      # a Hub id: its name
    shutil.copytree(lm_dirs / "gpt2", project / "lm_cotraining" / "checkpoints" / "ChibiT")
    assert find_model_dir("ChibiT")[0] == Path("checkpoints/ChibiT")


def test_a_hub_id_found_nowhere_is_downloaded_with_one_weight_format(lm_dirs, tmp_path, monkeypatch, capsys):
    """On a machine with network a Hub id that is on disk nowhere (the seeds' --pretrained_lm gpt2 on a fresh machine)
    is fetched into the Hugging Face cache: config, tokenizer and the safetensors weights, not the TensorFlow, Flax or
    ONNX copies. Offline (HF_HUB_OFFLINE, as in these tests) or with the Hub unreachable nothing is tried, and the
    not-found line says why; a path is never looked up on the Hub."""
    import huggingface_hub

    from decision_transformer.models import pretrained

    monkeypatch.chdir(tmp_path)
    repo = ["config.json", "model.safetensors", "tf_model.h5", "flax_model.msgpack", "onnx/decoder_model.onnx",
            "tokenizer.json", "vocab.json", "merges.txt", "README.md"]
    listed_for, fetched = [], []

    def list_repo_files(self, name, **kw):
        listed_for.append(name)
        return repo

    def snapshot_download(repo_id, cache_dir, allow_patterns=None, local_files_only=False, **kw):
        if local_files_only:                                            # the cache lookup: not there
            raise huggingface_hub.errors.LocalEntryNotFoundError("not in the cache")
        fetched.append((repo_id, cache_dir, allow_patterns))
        snap = Path(cache_dir) / "models--org--tiny" / "snapshots" / "abc"
        shutil.copytree(lm_dirs / "gpt2", snap)
        return str(snap)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(UserError, match=r"HF_HUB_OFFLINE is set: nothing is downloaded"):
        locate_lm("org/tiny")
    assert listed_for == []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(pretrained, "_hub_unreachable", lambda: "huggingface.co: Name or service not known")
    with pytest.raises(UserError, match=r"not reachable from here: huggingface.co: Name or service not known"):
        locate_lm("org/tiny")
    assert listed_for == []
    monkeypatch.setattr(pretrained, "_hub_unreachable", lambda: None)
    lm = locate_lm("org/tiny")
    assert lm.source == "hub" and lm.path.name == "abc" and lm.model_type == "gpt2"
    assert fetched == [("org/tiny", str(pretrained.hf_cache_dir()),
                        ["config.json", "tokenizer.json", "vocab.json", "merges.txt", "model.safetensors"])]
    assert "downloading its config and tokenizer files and model.safetensors from the Hugging Face Hub" in \
        capsys.readouterr().err
    shutil.rmtree(pretrained.hf_cache_dir() / "models--org--tiny")
    pretrained.find_model_dir("org/tiny", what="tokenizer", flag="--tokenizer_name")     # a tokenizer: no weights
    assert fetched[-1][2] == ["config.json", "tokenizer.json", "vocab.json", "merges.txt"]
    with pytest.raises(UserError, match="not found"):
        locate_lm("./no/such/folder")                                     # a path: never on the Hub
    assert listed_for == ["org/tiny", "org/tiny"]


def test_pretraining_seed_commands_with_cached_models(tmp_path, monkeypatch, hf_home, hopper_data):
    """TAKAGI's commands: --pretrained_lm gpt2 / openai/imagegpt-small from the HF cache, --remove_grad_clip,
    --K 1 with --pretrained_block (b = 0); run folders named as the analysis scripts expect."""
    monkeypatch.chdir(tmp_path)
    seed_cmd = ["--env", "hopper", "--dataset", "medium", "--model_type", "dt", "--seed", "666", "--outdir",
                "checkpoints", "--dropout", "0.2", "--share_input_output_proj", "--warmup_steps", "5000",
                "--data_path", str(hopper_data), "--batch_size", "4", "--num_eval_episodes", "1",
                "--max_iters", "1", "--num_steps_per_iter", "3"]
    experiment.main([*seed_cmd, "--embed_dim", "768", "--n_layer", "12", "--pretrained_lm", "gpt2"])
    experiment.main([*seed_cmd, "--pretrained_lm", "openai/imagegpt-small", "--remove_grad_clip"])
    experiment.main([*seed_cmd, "--pretrained_lm", "gpt2", "--embed_dim", "32", "--n_layer", "3", "--K", "1",
                     "--pretrained_block", "0"])
    # an iGPT block 0: its own folder, next to GPT-2's block-0 run (it used to move that one aside)
    experiment.main([*seed_cmd, "--pretrained_lm", "openai/imagegpt-small", "--embed_dim", "24", "--n_layer", "2",
                     "--K", "1", "--pretrained_block", "0"])
    ck = tmp_path / "checkpoints"
    assert [p.name for p in listed(ck)] == ["dt-igpt_medium_hopper_666_K1_block0", "dt_medium_hopper_666_K1_block0",
                                            "gpt2_medium_hopper_666", "igpt_medium_hopper_666_no_grad_clip"]
    lm_sd = locate_lm("gpt2").state_dict()
    for run, n_embd in (("gpt2_medium_hopper_666", 32), ("igpt_medium_hopper_666_no_grad_clip", 24),
                        ("dt_medium_hopper_666_K1_block0", 32)):
        m1 = load_checkpoint(ck / run / "model_1.pt")
        cfg = m1["config"]["model_config"]
        assert cfg["backbone"]["n_embd"] == n_embd                    # from the LM, not --embed_dim 768
        rebuilt = DecisionTransformer(DTConfig.from_dict(cfg))
        rebuilt.load_state_dict(m1["state_dict"])                     # strict, no LM files needed
        assert m1["config"]["pretrained_lm_path"].startswith(str(hf_home))
    gpt0 = load_checkpoint(ck / "gpt2_medium_hopper_666" / "model_0.pt")["state_dict"]
    assert torch.equal(gpt0["transformer.h.1.mlp.c_fc.weight"], lm_sd["h.1.mlp.c_fc.weight"])
    blk0 = load_checkpoint(ck / "dt_medium_hopper_666_K1_block0" / "model_0.pt")["state_dict"]
    assert torch.equal(blk0["transformer.h.0.attn.c_attn.weight"], lm_sd["h.0.attn.c_attn.weight"])
    assert not torch.equal(blk0["transformer.h.1.attn.c_attn.weight"], lm_sd["h.1.attn.c_attn.weight"])


def test_merging_seed_lm_command_against_a_fresh_chibit(tmp_path, monkeypatch, capsys, hopper_data):
    """(5) makes a ChibiT; the Merging-DT seed's LM command then runs as written from a sub-directory, creating
    the k-means cache it names; a second run reuses the cache."""
    from lm_cotraining import pretrain_chibit

    (tmp_path / "wiki.txt").write_text(corpus_text(n_lines=1500, seed=3))
    chibit = tmp_path / "checkpoints" / "ChibiT"
    res = pretrain_chibit.main(["--text", str(tmp_path / "wiki.txt"), "--out", str(chibit), "--vocab_size", "1200",
                                "--steps", "30", "--block_size", "32", "--batch_size", "8", "--n_positions", "512",
                                "--warmup_steps", "5", "--lr", "3e-3", "--device", "cpu"])
    assert res["last_loss"] < res["first_loss"] - 0.3                  # it learned something
    cfg = json.loads((chibit / "config.json").read_text())
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["model_type"]) == (3, 128, 1, "gpt2")
    assert cfg["vocab_size"] >= 1000 and (chibit / "tokenizer.json").is_file()

    work = tmp_path / "lm_cotraining"
    work.mkdir()
    seed = ["--env", "hopper", "--dataset", "medium", "--model_type", "dt", "-w", "--pretrained_lm",
            "../checkpoints/chibiT", "--extend_positions", "--gpt_kmeans", "1000", "--gpt_kmeans_const", "0.1",
            "--device=cuda", "--kmeans_cache=../kmeans_cache/chibi_1000.pt", "--save_model", "--save_mode=best",
            "--dropout", "0.1", "--init_reg", "1e-4"]
    small = ["--data_path", str(hopper_data), "--max_iters", "2", "--num_steps_per_iter", "3", "--K", "5",
             "--batch_size", "4", "--num_eval_episodes", "1"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "lm_cotraining" / "experiment.py"), *seed, *small], cwd=work,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cache = tmp_path / "kmeans_cache" / "chibi_1000.pt"
    centres = torch.load(cache, weights_only=True)["centres"]   # (beside the record of the LM's token table)
    assert centres.shape == (1000, 128)
    runs = list((work / "models" / "hopper").glob("dt_gym-experiment-hopper-medium-*"))
    best = [p for p in runs if p.name.endswith("_best.pt")]
    run_dirs = [p for p in runs if p.is_dir()]
    assert len(best) == 1 and len(run_dirs) == 1 and best[0].name == run_dirs[0].name + "_best.pt"
    assert sorted(p.name for p in run_dirs[0].glob("model_*.pt")) == ["model_0.pt", "model_1.pt", "model_2.pt"]
    rows = [json.loads(x) for x in (run_dirs[0] / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["training/init_reg_loss"] >= 0 and rows[0]["training/kmeans_loss"] != 0
    # the LM script's anneal horizon is 15000: weight 0.1 * anneal(s), logged at the iteration's last step (3)
    assert rows[0]["training/kmeans_weight"] == pytest.approx(0.1 * anneal(3, 15000), rel=1e-6)
    assert rows[1]["training/kmeans_weight"] == pytest.approx(0.1 * anneal(6, 15000), rel=1e-6)
    ck = load_checkpoint(best[0])
    assert ck["config"]["model_config"]["extend_positions"] is True and ck["config"]["max_iters"] == 2
    rebuilt = DecisionTransformer(DTConfig.from_dict(ck["config"]["model_config"]))
    rebuilt.load_state_dict(ck["state_dict"])
    assert rebuilt.embed_timestep is rebuilt.transformer.wpe
    # a second run (in-process this time) reads the cache instead of clustering again
    from decision_transformer.training import kmeans as km_mod
    from lm_cotraining import experiment as lm_experiment

    mtime = cache.stat().st_mtime_ns
    monkeypatch.chdir(work)
    monkeypatch.setattr(km_mod, "cosine_kmeans", lambda *a, **k: pytest.fail("recomputed despite the cache"))
    from decision_transformer.training.init_reg import InitReg

    regs = []  # the InitReg terms the run builds
    real_init = InitReg.__init__
    monkeypatch.setattr(InitReg, "__init__", lambda self, *a, **k: (regs.append(self), real_init(self, *a, **k))[1])
    no_best = [a for a in seed if a not in ("--save_model", "--save_mode=best")]  # (refused with 0 episodes)
    lm_experiment.main([*no_best, *small, "--max_iters", "1", "--num_eval_episodes", "0", "--joint",
                        "--nlp_dataset_name", str(tmp_path / "wiki.txt"), "--outdir", "joint"])
    assert [r.weight for r in regs] == [1e-4]                    # --init_reg 1e-4 is the term's weight
    err = capsys.readouterr().err
    assert "centres read from ../kmeans_cache/chibi_1000.pt" in err and "blocks of 512 tokens" in err
    assert cache.stat().st_mtime_ns == mtime
    (joint_run,) = listed(work / "joint")                        # --outdir replaces models/{env}
    row = json.loads((joint_run / "metrics.jsonl").read_text())
    assert 2.0 < row["training/lm_loss"] < 9.0 and row["training/lm_const"] == 1.0


def test_multi_task_dt_from_a_pretrained_lm(lm_dirs, tmp_path, monkeypatch):
    """experiment_multi.py --pretrained_lm --extend_positions: the LM's backbone, the shared timestep table is its
    (tiled) position table, and the saved model rebuilds with both."""
    from transformers import GPT2LMHeadModel

    import experiment_multi
    from decision_transformer.legacy_import import build_model, load_model_file
    from decision_transformer.models.multi_decision_transformer import MULTI_ENVS
    from decision_transformer.multi_run import multi_parser, new_model
    from decision_transformer.synthetic import make_dataset

    gpt_dir = str(lm_dirs / "gpt2")
    args = multi_parser().parse_args(["--pretrained_lm", gpt_dir, "--extend_positions", "--seed", "1", "--K", "5"])
    model = new_model(args)
    lm = GPT2LMHeadModel.from_pretrained(gpt_dir).transformer
    assert model.embed_timestep is model.transformer.wpe and model.transformer.wpe.weight.shape[0] == 1000
    assert torch.equal(model.transformer.h[1].attn.c_attn.weight, lm.h[1].attn.c_attn.weight)
    assert torch.equal(model.transformer.ln_f.bias, lm.ln_f.bias)
    assert torch.equal(model.transformer.wpe.weight[:40], lm.wpe.weight)
    assert torch.equal(model.transformer.wpe.weight[40:80], tile_positions(lm.wpe.weight, 80)[40:80])

    data = tmp_path / "data"
    for env in MULTI_ENVS:
        make_dataset(data, env, "medium", 300, seed=0, max_ep_len=50)
    monkeypatch.chdir(tmp_path)
    experiment_multi.main(["--data_path", str(data), "--pretrained_lm", gpt_dir, "--extend_positions", "--seed", "1",
                           "--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes", "1", "--K", "5",
                           "--batch_size", "4", "--save_model", "--save_mode", "last"])
    (path,) = (tmp_path / "models" / "multi").glob("dt_gym-experiment-multi-medium-*.pt")
    mf = load_model_file(path)
    assert mf.config["pretrained_lm"] == gpt_dir
    rebuilt = build_model(mf)
    assert rebuilt.embed_timestep is rebuilt.transformer.wpe
    assert rebuilt.config.backbone.n_embd == 32 and rebuilt.config.backbone.n_layer == 2
    # task vectors of such a model are taken against its rebuilt LM initialisation
    from decision_transformer.merge_setup import resolve_base

    base = resolve_base(Namespace(merge_base=None, pretrained_lm=None), [mf])
    fresh = new_model(multi_parser().parse_args(["--pretrained_lm", gpt_dir, "--extend_positions", "--seed", "1",
                                                 "--K", "5"])).state_dict()
    assert set(base) == set(fresh) and all(torch.equal(base[k], fresh[k]) for k in fresh)


def test_lm_script_resume_matches_uninterrupted_run(lm_dirs, tmp_path, monkeypatch, capsys, hopper_data):
    """lm_cotraining/experiment.py --resume: a run killed after logging iteration 2 but before saving it, resumed
    with the same command, ends bit-identical (weights, metrics) to one run straight through, with k-means, init_reg
    and LM co-training (the text stream's position is part of the training state) on."""
    from decision_transformer import run as run_mod
    from lm_cotraining import experiment as lm_experiment

    (tmp_path / "wiki.txt").write_text(corpus_text(n_lines=300, seed=5))
    cmd = ["--env", "hopper", "--dataset", "medium", "--data_path", str(hopper_data), "--pretrained_lm",
           str(lm_dirs / "gpt2"), *RUN, "--max_iters", "3", "--num_steps_per_iter", "3", "--gpt_kmeans", "20",
           "--gpt_kmeans_const", "0.1", "--init_reg", "1e-2", "--joint", "--nlp_dataset_name",
           str(tmp_path / "wiki.txt"), "--no_token_cache", "--dropout", "0.1"]
    monkeypatch.chdir(tmp_path)
    token_cache = hopper_data / "token_cache"       # where --joint caches its tokens without --no_token_cache

    def cached():
        return sorted(p.name for p in token_cache.iterdir()) if token_cache.is_dir() else []

    cached_before = cached()

    def run_dir(outdir):
        (d,) = [p for p in (tmp_path / outdir).iterdir() if p.name.startswith("dt_gym-experiment-hopper-medium-")]
        return d

    lm_experiment.main([*cmd, "--outdir", "a"])
    real_summary = run_mod.summary_line

    def killed_at_2(it, *a):
        if it == 2:
            raise KeyboardInterrupt
        return real_summary(it, *a)

    monkeypatch.setattr(run_mod, "summary_line", killed_at_2)
    with pytest.raises(SystemExit):
        lm_experiment.main([*cmd, "--outdir", "b"])
    monkeypatch.setattr(run_mod, "summary_line", real_summary)
    b = run_dir("b")
    assert len((b / "metrics.jsonl").read_text().splitlines()) == 2     # iteration 2 logged, its state not saved
    assert load_checkpoint(b / "train_state.pt")["iteration"] == 1
    capsys.readouterr()

    msg = expect_error(capsys, lm_experiment.main, [*cmd, "--outdir", "b", "--resume", "--gpt_lm_const", "0.5"])
    assert "nothing to resume" in msg and f"{b.name}, differs in --gpt_lm_const 0.5 (the run: 1.0)" in msg
    lm_experiment.main([*cmd, "--outdir", "b", "--resume"])
    assert f"resuming {Path('b') / b.name} after iteration 1" in capsys.readouterr().err
    assert [p.name for p in listed(tmp_path / "b")] == [b.name]   # continued in place, no new run folder
    a = run_dir("a")
    sa, sb = (load_checkpoint(d / "model_3.pt")["state_dict"] for d in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = lambda line: {k: v for k, v in json.loads(line).items() if not k.startswith("time/")}  # noqa: E731
    ra, rb = ([strip(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (a, b))
    assert len(rb) == 3 and ra == rb and rb[0]["training/lm_loss"] > 0
    lm_experiment.main([*cmd, "--outdir", "b", "--resume"])
    assert "nothing to do" in capsys.readouterr().err
    msg = expect_error(capsys, lm_experiment.main, [*cmd, "--outdir", "c", "--resume"])
    assert "nothing to resume: no run dt_gym-experiment-hopper-medium-<id> in c has finished an iteration" in msg
    assert cached() == cached_before                 # --no_token_cache: no token cache was written


# ---- lm_cotraining/experiment.py --resume: damaged and changed inputs ----------------------------------------------

def _lm_resume_cmd(lm_dirs, hopper_data, *extra):
    return ["--env", "hopper", "--dataset", "medium", "--data_path", str(hopper_data), "--pretrained_lm",
            str(lm_dirs / "gpt2"), *RUN, "--num_steps_per_iter", "2", "--device", "cpu", *extra]


def _lm_runs(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith("dt_gym-experiment-hopper-medium-"))


def test_lm_load_checkpoint_advises_the_lm_scripts_off_switch(lm_dirs, tmp_path, monkeypatch, capsys, hopper_data):
    """A checkpoint trained with --no_extend_positions, loaded by the LM script (where --extend_positions is on by
    default): the hint says pass --no_extend_positions, not drop a flag the command never gave."""
    from lm_cotraining import experiment as lm_experiment

    monkeypatch.chdir(tmp_path)
    cmd = _lm_resume_cmd(lm_dirs, hopper_data, "--max_iters", "1", "--num_eval_episodes", "0")
    lm_experiment.main([*cmd, "--no_extend_positions", "--outdir", "o"])
    (run,) = _lm_runs(tmp_path / "o")
    capsys.readouterr()
    msg = expect_error(capsys, lm_experiment.main, [*cmd, "--outdir", "p", "--load_checkpoint", str(run / "model_1.pt")])
    assert msg.endswith("extend_positions False; the model these flags build has extend_positions True: pass "
                        "--no_extend_positions as its run did)"), msg
    assert "drop --extend_positions" not in msg


def test_lm_resume_refuses_a_changed_corpus(lm_dirs, tmp_path, monkeypatch, capsys, hopper_data):
    """--joint: a corpus that changed since the run started (same number of blocks, other tokens) stops the resume
    with one line instead of continuing on other text; a damaged training state also stops it, keeping the files."""
    from lm_cotraining import experiment as lm_experiment

    monkeypatch.chdir(tmp_path)
    lines = corpus_text(n_lines=300, seed=5).splitlines(keepends=True)
    (tmp_path / "wiki.txt").write_text("".join(lines))
    cmd = _lm_resume_cmd(lm_dirs, hopper_data, "--joint", "--nlp_dataset_name", "wiki.txt", "--outdir", "o")
    lm_experiment.main([*cmd, "--max_iters", "1"])
    (run,) = _lm_runs(tmp_path / "o")
    state = run / "train_state.pt"
    assert load_checkpoint(state)["trainer_extra"]["text_batches"]["fingerprint"]
    (tmp_path / "wiki.txt").write_text("".join(reversed(lines)))          # the same tokens in another order
    capsys.readouterr()
    msg = expect_error(capsys, lm_experiment.main, [*cmd, "--max_iters", "2", "--resume"])
    assert "cannot restore the training state" in msg and "other tokens than this one" in msg
    (tmp_path / "wiki.txt").write_text("".join(lines))
    before = sorted(p.name for p in run.iterdir())
    state.write_bytes(state.read_bytes()[:2000])                          # a truncated training state
    msg = expect_error(capsys, lm_experiment.main, [*cmd, "--max_iters", "2", "--resume"])
    assert str(Path("o") / run.name / "train_state.pt") in msg and ": cut short: it begins as a zip archive" in msg
    assert sorted(p.name for p in run.iterdir()) == before and not (run / "model_2.pt").exists()


def test_text_batches_fingerprint_checks_the_tokens():
    from decision_transformer.training.lm_cotrain import TextBatches

    blocks = torch.arange(60).view(6, 10)
    a = TextBatches(blocks, seed=1)
    a.next()
    st = a.state_dict()
    b = TextBatches(blocks.clone(), seed=2)
    b.load_state_dict(st)
    assert torch.equal(a.next(), b.next())
    with pytest.raises(ValueError, match="other tokens"):
        TextBatches(blocks.flip(0), seed=1).load_state_dict(st)
    old = {k: v for k, v in st.items() if k != "fingerprint"}              # a state written before the fingerprint
    TextBatches(blocks.flip(0), seed=1).load_state_dict(old)


def test_lm_resume_with_a_missing_or_broken_config(lm_dirs, tmp_path, monkeypatch, capsys, hopper_data):
    """Two runs of the same flags: --resume continues the newest, also when its config.json is missing (its flags
    are read from its train_state.pt) instead of silently continuing the older one; a run whose config.json is not
    JSON is still found; --outdir '' says that no run folder is written."""
    import os
    import time

    from lm_cotraining import experiment as lm_experiment

    monkeypatch.chdir(tmp_path)
    cmd = _lm_resume_cmd(lm_dirs, hopper_data, "--outdir", "o")
    lm_experiment.main([*cmd, "--max_iters", "1"])
    (old,) = _lm_runs(tmp_path / "o")
    lm_experiment.main([*cmd, "--max_iters", "1"])
    (new,) = [p for p in _lm_runs(tmp_path / "o") if p != old]
    t = time.time()
    for f in old.iterdir():
        os.utime(f, (t - 100, t - 100))
    (new / "config.json").unlink()
    capsys.readouterr()
    lm_experiment.main([*cmd, "--max_iters", "2", "--resume"])
    err = capsys.readouterr().err
    assert f"resuming {Path('o') / new.name} after iteration 1" in err and "read from its train_state.pt" in err
    assert (new / "model_2.pt").is_file() and not (old / "model_2.pt").exists()
    assert json.loads((new / "config.json").read_text())["exp_id"] == int(new.name.rsplit("-", 1)[1])
    shutil.rmtree(new)
    (old / "config.json").write_text("{not json")
    lm_experiment.main([*cmd, "--max_iters", "2", "--resume"])
    assert f"resuming {Path('o') / old.name} after iteration 1" in capsys.readouterr().err
    (old / "config.json").write_text("[")
    (old / "train_state.pt").write_bytes(b"x")
    msg = expect_error(capsys, lm_experiment.main, [*cmd, "--max_iters", "3", "--resume"])
    assert old.name in msg and "neither a readable config.json nor a readable train_state.pt" in msg
    msg = expect_error(capsys, lm_experiment.main, [*cmd[:-2], "--outdir", "", "--resume"])
    assert "--outdir '' writes none" in msg


def test_lm_resume_keeps_the_first_parts_best_checkpoint(lm_dirs, tmp_path, monkeypatch, capsys, hopper_data):
    """--save_model --save_mode best: a resumed run compares with the best score of the part before the interruption,
    so a worse later iteration does not overwrite the earlier, better _best.pt; a better one does. A missing _best.pt
    (e.g. --save_model added on resume) is reported."""
    import numpy as np

    from decision_transformer import run as run_mod
    from decision_transformer.evaluation import EvalResult
    from lm_cotraining import experiment as lm_experiment

    returns = {1: 500.0, 2: 100.0, 3: 900.0}
    it = {"n": 0}

    class NoPool:
        def close(self):
            pass

    def fake_eval(model, env, target, n, *a, **k):
        return EvalResult(target, np.full(n, returns[it["n"]]), np.full(n, 10))

    monkeypatch.setattr(run_mod, "env_pool", lambda *a, **k: NoPool())
    monkeypatch.setattr(run_mod, "evaluate_episodes", fake_eval)
    monkeypatch.setattr(run_mod.Trainer, "train_iteration",
                        lambda self, n, i, bar=None: it.update(n=i) or {"training/train_loss_mean": 0.0})
    monkeypatch.chdir(tmp_path)
    cmd = [*_lm_resume_cmd(lm_dirs, hopper_data, "--outdir", "o"), "--num_eval_episodes", "1", "--save_model",
           "--save_mode", "best", "--env_targets", "3600"]
    lm_experiment.main([*cmd, "--max_iters", "1"])
    (run,) = _lm_runs(tmp_path / "o")
    best = tmp_path / "models" / "hopper" / f"dt_{run.name[3:]}_best.pt"
    assert load_checkpoint(best)["iteration"] == 1
    lm_experiment.main([*cmd, "--max_iters", "2", "--resume"])
    assert load_checkpoint(best)["iteration"] == 1                       # 100 < 500: the first part's best stays
    best.rename(tmp_path / "kept.pt")                                    # a best model that is missing is reported
    capsys.readouterr()
    lm_experiment.main([*cmd, "--max_iters", "2", "--resume"])
    assert f"warning: {best.relative_to(tmp_path)} is missing: the best model before the resume (score 500)" in \
        capsys.readouterr().err
    (tmp_path / "kept.pt").rename(best)
    lm_experiment.main([*cmd, "--max_iters", "3", "--resume"])
    assert load_checkpoint(best)["iteration"] == 3
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]


def test_resumed_metrics_survive_a_row_cut_before_its_newline(tmp_path):
    """metrics.jsonl of a killed run: a half-written last row is dropped, a last row complete but for its newline
    (or bytes that are not text) does not swallow the next row, which lands on a line of its own."""
    from decision_transformer.runlog import RunLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1, "a": 1}\n{"iteration": 2, "a": 2}')  # iteration 2 written but for "\n"
    RunLogger(tmp_path, {}, resume=True, resume_after=2).log({"a": 3}, 3)
    assert [json.loads(x)["iteration"] for x in path.read_text().splitlines()] == [1, 2, 3]
    path.write_bytes(b'{"iteration": 1, "a": 1}\n{"iteration": 2, "a": 2}\n{"itera\xff\xfe')
    RunLogger(tmp_path, {}, resume=True, resume_after=2).log({"a": 3}, 3)
    assert [json.loads(x)["iteration"] for x in path.read_text().splitlines()] == [1, 2, 3]


def test_run_config_is_replaced_whole(tmp_path, monkeypatch):
    """A resumed run rewrites config.json; a write that fails part-way (a full disk) leaves the previous file whole,
    so that the run can still be found by its flags."""
    import errno

    from decision_transformer.runlog import RunLogger

    RunLogger(tmp_path, {"seed": 1, "env": "hopper"})
    real = Path.write_text

    def disk_full(self, data, *a, **k):
        real(self, data[:5], *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    from decision_transformer.errors import UserError

    with pytest.raises(UserError, match=f"^cannot write {tmp_path / 'config.json'}: no space left on the device$"):
        RunLogger(tmp_path, {"seed": 1, "env": "hopper", "max_iters": 3}, resume=True, resume_after=1)
    monkeypatch.setattr(Path, "write_text", real)
    assert json.loads((tmp_path / "config.json").read_text()) == {"seed": 1, "env": "hopper"}
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))   # no partial file left


def test_restore_train_state_reports_any_damage_in_one_line(tmp_path):
    """A training state whose parts have the wrong shape or type (a damaged or crafted file) is one UserError naming
    the file, whatever the exception its loaders raise."""
    from decision_transformer.run import restore_train_state, save_train_state

    def objects():
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.AdamW(model.parameters())
        return model, Namespace(step=0), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), torch.Generator()

    model, trainer, opt, sched, gen = objects()
    path = tmp_path / "train_state.pt"
    save_train_state(path, model, {}, trainer, opt, sched, gen, iteration=1, best_score=0.0, exp_id=7)
    assert restore_train_state(path, *objects())["exp_id"] == 7
    good = torch.load(path, weights_only=True)
    for damage in ({"rng": {**good["rng"], "numpy": [1]}}, {"generator": [1, 2]}, {"rng": None}):
        torch.save({**good, **damage}, path)
        with pytest.raises(UserError, match="train_state.pt: cannot restore the training state"):
            restore_train_state(path, *objects())


def test_lm_resume_continues_in_the_folder_it_found(lm_dirs, tmp_path, monkeypatch, capsys, hopper_data):
    """A run folder copied under another run id is resumed in place: the copy is continued (the newest of the two)
    and the original, whose id the training state records, is left as it was."""
    import shutil

    from lm_cotraining import experiment as lm_experiment

    cmd = ["--env", "hopper", "--dataset", "medium", "--data_path", str(hopper_data), "--pretrained_lm",
           str(lm_dirs / "gpt2"), *RUN, "--num_steps_per_iter", "2", "--outdir", "runs"]
    monkeypatch.chdir(tmp_path)
    lm_experiment.main([*cmd, "--max_iters", "1"])
    (orig,) = listed(tmp_path / "runs")
    copy = orig.with_name("dt_gym-experiment-hopper-medium-999999999")
    shutil.copytree(orig, copy)
    before = sorted(p.name for p in orig.iterdir())
    lm_experiment.main([*cmd, "--max_iters", "2", "--resume"])
    assert (copy / "model_2.pt").is_file() and not (orig / "model_2.pt").exists()
    assert sorted(p.name for p in orig.iterdir()) == before


def test_a_tokenizer_folder_without_tokenizer_files_is_one_line(lm_dirs, tmp_path, monkeypatch):
    """--joint with an LM folder that holds only the model: the tokenizer resolved for it (here a model-only
    checkpoints/gpt2, as the README's download recipe makes) must have tokenizer files, instead of loading as an
    empty tokenizer that tokenises the corpus to 0 tokens."""
    import shutil

    from decision_transformer.errors import UserError
    from decision_transformer.training.lm_cotrain import load_tokenizer

    model_only = tmp_path / "checkpoints" / "gpt2"
    model_only.mkdir(parents=True)
    for f in (lm_dirs / "gpt2").iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, model_only / f.name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(UserError, match="holds no tokenizer files"):
        load_tokenizer(model_only, None)
    # tokenizer_config.json alone loads as an empty tokenizer (which then blamed the corpus): no tokenizer either
    shutil.copy(lm_dirs / "gpt2" / "tokenizer_config.json", model_only / "tokenizer_config.json")
    with pytest.raises(UserError, match="holds no tokenizer files"):
        load_tokenizer(model_only, None)
    from decision_transformer.training.lm_pretrain import load_tokenizer_dir

    with pytest.raises(UserError, match="the tokenizer there has no vocabulary"):
        load_tokenizer_dir(model_only)
    assert len(load_tokenizer(lm_dirs / "gpt2", None)) > 100       # a folder with its tokenizer still loads


def test_a_model_only_folder_gives_way_to_the_cached_tokenizer(lm_dirs, hf_home, tmp_path, monkeypatch, capsys):
    """--joint with a model-only checkpoints/gpt2 (the README's offline recipe) and gpt2's snapshot, tokenizer
    included, in the Hugging Face cache: the cache's tokenizer is used (the folder without one stopped the run)."""
    import shutil

    from decision_transformer.training.lm_cotrain import load_tokenizer

    model_only = tmp_path / "checkpoints" / "gpt2"
    model_only.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(lm_dirs / "gpt2" / f, model_only / f)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    tok = load_tokenizer(model_only, None)
    assert len(tok) == len(load_tokenizer(lm_dirs / "gpt2", None)) and len(tok) > 100
    assert "--tokenizer_name gpt2: checkpoints/gpt2 holds no tokenizer files; using " in capsys.readouterr().err


def test_size_flags_a_whole_lm_backbone_overrides_are_warned_about(lm_dirs, capsys):
    """--embed_dim 256 --n_layer 6 with --pretrained_lm: the LM's sizes win (the model has its 32 × 2 × 2); said, as
    experiment_multi.py says it, instead of silently training another size than asked. Sizes equal to the LM's, or
    left at their defaults, are not warned about."""
    capsys.readouterr()
    model = build_model_from_args(args_for("--pretrained_lm", str(lm_dirs / "gpt2"), "--embed_dim", "256",
                                           "--n_layer", "6", "--n_head", "2"), HOPPER)
    assert model.config.backbone.n_embd == 32 and model.config.backbone.n_layer == 2
    err = capsys.readouterr().err
    assert (f"warning: --embed_dim 256 (the LM has 32), --n_layer 6 (the LM has 2): no effect, the backbone is "
            f"{lm_dirs / 'gpt2'}'s") in err
    build_model_from_args(args_for("--pretrained_lm", str(lm_dirs / "gpt2"), "--embed_dim", "32"), HOPPER)
    assert "warning" not in capsys.readouterr().err


def test_a_cached_tokenizer_alone_is_no_model_and_planning_downloads_nothing(lm_dirs, tmp_path, monkeypatch):
    """A Hub snapshot holding only config and tokenizer files (left by --tokenizer_name gpt2) is not taken for the
    model: --pretrained_lm gpt2 then downloads the weights. A sweep's planning asks only whether the model could be
    had: where the Hub could give it, nothing is downloaded and the run is not blocked; where it could not, the
    run is blocked with the reason."""
    import huggingface_hub

    from decision_transformer import sweep
    from decision_transformer.models import pretrained

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    snap = pretrained.hf_cache_dir() / "models--org--tokonly" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(lm_dirs / "gpt2" / f, snap / f)
    fetched = []

    def snapshot_download(repo_id, cache_dir, allow_patterns=None, local_files_only=False, **kw):
        if not local_files_only:
            fetched.append(allow_patterns)
            for f in (lm_dirs / "gpt2").iterdir():
                shutil.copy(f, snap / f.name)
        return str(snap)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, name, **kw: ["config.json", "model.safetensors", "tokenizer.json", "tf_model.h5"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(pretrained, "_hub_unreachable", lambda: "huggingface.co: Name or service not known")
    assert "not reachable from here" in sweep._lm_problem("org/tokonly")
    assert pretrained.find_model_dir("org/tokonly", what="tokenizer") == (snap, "hf-cache")
    monkeypatch.setattr(pretrained, "_hub_unreachable", lambda: None)
    assert sweep._lm_problem("org/tokonly") is None and fetched == []       # could be had: planned, not fetched
    lm = locate_lm("org/tokonly")
    assert lm.source == "hub" and fetched == [["config.json", "tokenizer.json", "model.safetensors"]]
    assert set(lm.state_dict()) >= {"wte.weight", "h.0.attn.c_attn.weight"}
    assert locate_lm("org/tokonly").source == "hf-cache" and len(fetched) == 1   # now the weights are cached


def test_resume_refuses_lm_files_replaced_under_init_reg(lm_dirs, tmp_path, monkeypatch, capsys, hopper_data):
    """--init_reg measures the distance from the weights training started from, rebuilt from the LM folder on every
    start: a resume after those files changed would measure from other weights (a silently different loss). The
    training state records them, and the resume is one line; the run's files are left as they were."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lm_cotraining import experiment as lm_experiment

    monkeypatch.chdir(tmp_path)
    lm = tmp_path / "lm"
    shutil.copytree(lm_dirs / "gpt2", lm)
    cmd = [*_lm_resume_cmd(lm_dirs, hopper_data, "--init_reg", "1e-2", "--num_eval_episodes", "0", "--outdir", "o")]
    cmd[cmd.index("--pretrained_lm") + 1] = str(lm)
    lm_experiment.main([*cmd, "--max_iters", "1"])
    (run,) = _lm_runs(tmp_path / "o")
    weights = lm / "model.safetensors"
    sd = load_file(weights)
    save_file({k: v + 0.5 if ".h." in k else v for k, v in sd.items()}, weights, metadata={"format": "pt"})
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    msg = expect_error(capsys, lm_experiment.main, [*cmd, "--max_iters", "2", "--resume"])
    assert "the --init_reg reference weights" in msg and "are not those the run started with" in msg
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    save_file(sd, weights, metadata={"format": "pt"})                  # restored: the resume goes on
    lm_experiment.main([*cmd, "--max_iters", "2", "--resume"])
    assert (run / "model_2.pt").is_file()


@pytest.mark.parametrize("lm, extra, expect", [
    ("nan", [], "the weights hold NaN or inf values, in h.1.mlp.c_proj.weight"),
    ("gpt2", ["--embed_dim", "32", "--n_layer", "2", "--pretrained_block", "5"],
     "--pretrained_block 5 is out of range: the host has 2 blocks"),
    ("gpt2", ["--pretrained_block", "0"], "--pretrained_block needs the host's --embed_dim to equal the LM's"),
    ("gpt2", ["--gpt_kmeans", "100000", "--gpt_kmeans_const", "0.1"],
     "--gpt_kmeans 100000 must be between 1 and the LM's vocabulary size"),
])
def test_lm_problems_are_refused_before_a_missing_dataset_is_generated(lm_dirs, tmp_path, monkeypatch, capsys, lm,
                                                                       extra, expect):
    """Generating a missing dataset takes minutes: an LM whose weights hold NaN, and flags the LM rules out (a
    block beyond its depth, a host of another width, more k-means centres than tokens), are refused first."""
    from decision_transformer import generation

    monkeypatch.chdir(tmp_path)
    folder = _lm_with_weight(lm_dirs, tmp_path / "lm_nan", "h.1.mlp.c_proj.weight", (0, 0), float("nan")) \
        if lm == "nan" else lm_dirs / "gpt2"
    empty = tmp_path / "no_data"
    empty.mkdir()
    monkeypatch.setattr(generation, "generate_dataset", lambda *a, **k: pytest.fail("generated before the LM check"))
    msg = expect_error(capsys, experiment.main, ["--data_path", str(empty), *RUN, "--pretrained_lm", str(folder),
                                                 "--max_iters", "1", *extra])
    assert expect in msg
    assert not any(empty.iterdir())
