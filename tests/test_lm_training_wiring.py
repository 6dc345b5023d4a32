"""Wiring of the LM-side training code that the other tests leave loose: the fp16 trainer's schedule and unscaling,
the --joint corpus (file choice, token cache key, vocabulary check, kept tokens, batch order, seed), the ChibiT
maker's corpus check, schedule and clipping, and the importer's reading of env ids, action heads, dropout/eps,
ambiguous dims, max_length overrides and bare state dicts."""
import math

import pytest
import torch
from torch import nn

from conftest import tiny_trajectories
from test_legacy_import import H, LConfig, LDecisionTransformer, LMultiDecisionTransformer, save_original
from test_tools_pretrain import corpus

from decision_transformer.errors import UserError


# ---- helpers ---------------------------------------------------------------------------------------------------------

def tiny_dt(seed=0, **backbone):
    from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig

    cfg = DTConfig(11, 3, max_length=5, backbone=BackboneConfig(n_embd=16, n_layer=1, **backbone))
    return DecisionTransformer(cfg, seed=seed)


def trainers(make_opt, warmup=1, amp_scaler=None, grad_clip=0.25):
    """(plain Trainer, AmpTrainer) on the same tiny DT, data and generator seed."""
    from decision_transformer.data import TrajectoryDataset
    from decision_transformer.training import Trainer, warmup_schedule
    from decision_transformer.training.lm_cotrain import AmpTrainer

    out = []
    for cls in (Trainer, AmpTrainer):
        model = tiny_dt(resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.0)     # no dropout: no global RNG draws
        opt = make_opt(model)
        t = cls(model, opt, warmup_schedule(opt, warmup), TrajectoryDataset(tiny_trajectories(), "hopper"),
                batch_size=4, K=5, generator=torch.Generator().manual_seed(0), grad_clip=grad_clip)
        if cls is AmpTrainer and amp_scaler is not None:
            t.scaler = amp_scaler
        out.append(t)
    return out


def same_params(a, b, exact=True):
    sa, sb = a.state_dict(), b.state_dict()
    if exact:
        return all(torch.equal(sa[k], sb[k]) for k in sa)
    return all(torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-7) for k in sa)


class FakeTokenizer:
    """Tokenises each line to the ids given for it (a line's text is its key)."""

    def __init__(self, table):
        self.table = table

    def __call__(self, lines):
        return {"input_ids": [list(self.table[line.rstrip("\n")]) for line in lines]}


# ---- AmpTrainer (lm_cotraining --fp16) -------------------------------------------------------------------------------

def test_amp_trainer_advances_the_warmup_schedule():
    """L1: the fp16 trainer steps its LR schedule each step, as the plain trainer: after 3 steps of a 10-step warm-up
    the lr is 4/10 of the base and the weights equal the plain trainer's."""
    from decision_transformer.training import make_optimizer

    plain, amp = trainers(lambda m: make_optimizer(m, lr=1e-3, weight_decay=1e-4), warmup=10)
    for t in (plain, amp):
        t.train_iteration(3, 1)
    assert amp.scheduler.last_epoch == 3 and plain.scheduler.last_epoch == 3
    assert amp.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 4 / 10, rel=1e-12)
    assert same_params(plain.module, amp.module)


def test_amp_trainer_clips_the_unscaled_gradients():
    """L2: with a real loss scale (CPU GradScaler, 1024) the gradients are unscaled before the 0.25 norm clip, so one
    SGD step equals the plain fp32 step with the same clip (which does clip here: without it the step differs)."""
    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=0.1)

    plain, amp = trainers(sgd, amp_scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    unclipped, _ = trainers(sgd, grad_clip=None)
    for t in (plain, amp, unclipped):
        t.train_step()
    assert amp.scaler.get_scale() == 1024.0                       # a finite step: the scale is kept
    assert not same_params(plain.module, unclipped.module, exact=False)      # the clip is active
    assert same_params(plain.module, amp.module, exact=False)


# ---- the --joint corpus ----------------------------------------------------------------------------------------------

def test_find_text_corpus_prefers_train_files(tmp_path):
    """L4: a folder holding an extracted WikiText (train/valid/test) gives only its train file; a folder without a
    train file gives every text file, sorted."""
    from decision_transformer.training.lm_cotrain import find_text_corpus

    wiki = tmp_path / "wikitext-103-raw"
    wiki.mkdir()
    for split in ("test", "train", "valid"):
        (wiki / f"wiki.{split}.raw").write_text(f"{split} text\n")
    (wiki / "README.md").write_text("not text\n")
    assert find_text_corpus(str(wiki), None) == [wiki / "wiki.train.raw"]
    other = tmp_path / "other"
    other.mkdir()
    for name in ("b.txt", "a.raw"):
        (other / name).write_text("x\n")
    assert find_text_corpus(str(other), None) == [other / "a.raw", other / "b.txt"]


def test_tokenize_corpus_keeps_the_head_and_checks_the_vocabulary(tmp_path):
    """L7: the tokens of the files, concatenated, cut into blocks from the start (the tail remainder is dropped);
    L5: an id equal to the vocabulary size is refused with one line, the largest valid id passes."""
    from decision_transformer.training.lm_cotrain import tokenize_corpus

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("one\ntwo\nthree\n")
    b.write_text("four\n")
    tok = FakeTokenizer({"one": [5, 6], "two": [7], "three": [8, 9, 10], "four": [11, 12, 13, 14]})
    blocks = tokenize_corpus([a, b], tok, 3, 400, chunk_lines=2)
    assert torch.equal(blocks, torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]]))
    assert blocks.dtype == torch.long

    c = tmp_path / "c.txt"
    c.write_text("x\n")
    ok = tokenize_corpus([c], FakeTokenizer({"x": [0, 399]}), 2, 400)
    assert ok.tolist() == [[0, 399]]
    with pytest.raises(UserError) as e:
        tokenize_corpus([c], FakeTokenizer({"x": [0, 400]}), 2, 400)
    assert str(e.value) == ("--joint: the tokenizer produces id 400 but the LM has only 400 embeddings; use the LM's "
                            "own tokenizer (--tokenizer_name)")


def test_token_cache_key_depends_on_the_tokenizer(tmp_path, monkeypatch):
    """L3: the same corpus and block size with another tokenizer is another cache entry: it is tokenised again and
    gives that tokenizer's tokens, not the first tokenizer's cached blocks."""
    from decision_transformer.training import lm_cotrain
    from decision_transformer.training.lm_pretrain import train_bpe_tokenizer

    text = corpus(tmp_path / "c.txt", n_lines=120)
    tok_a, tok_b = train_bpe_tokenizer([text], 300), train_bpe_tokenizer([text], 280)
    real = lm_cotrain.tokenize_corpus
    want_a, want_b = real([text], tok_a, 16, 300), real([text], tok_b, 16, 300)
    assert not torch.equal(want_a[:3], want_b[:3])
    calls = []
    monkeypatch.setattr(lm_cotrain, "tokenize_corpus", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    cache = tmp_path / "cache"
    assert torch.equal(lm_cotrain.cached_tokenize_corpus([text], tok_a, 16, 300, cache), want_a)
    assert torch.equal(lm_cotrain.cached_tokenize_corpus([text], tok_b, 16, 300, cache), want_b)
    assert calls == [tok_a, tok_b] and len(list(cache.glob("joint_*.pt"))) == 2
    assert torch.equal(lm_cotrain.cached_tokenize_corpus([text], tok_a, 16, 300, cache), want_a)   # cached
    assert len(calls) == 2


def test_text_batches_read_every_block_of_a_pass():
    """L6: a pass over 6 blocks in batches of 2 is three batches of one permutation (the last one included); the
    fourth batch starts the next permutation."""
    from decision_transformer.training.lm_cotrain import TextBatches

    blocks = torch.arange(60).view(6, 10)
    tb = TextBatches(blocks, batch_size=2, seed=0)
    g = torch.Generator().manual_seed(0)
    first, second = torch.randperm(6, generator=g), torch.randperm(6, generator=g)
    got = [tb.next() for _ in range(4)]
    for i in range(3):
        assert torch.equal(got[i], blocks[first[2 * i:2 * i + 2]]), i
    assert torch.equal(got[3], blocks[second[:2]])
    assert sorted(torch.cat(got[:3])[:, 0].tolist()) == [0, 10, 20, 30, 40, 50]


@pytest.fixture(scope="module")
def tiny_gpt_dir(tmp_path_factory):
    """A 1-layer, 16-wide GPT-2 (n_positions 16) saved with its own BPE tokenizer, and a text file."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from decision_transformer.training.lm_pretrain import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("tinylm")
    text = corpus(root / "wiki.txt", n_lines=60)
    tok = train_bpe_tokenizer([text], 300)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16, vocab_size=len(tok),
                               bos_token_id=0, eos_token_id=0)).save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    return root


def test_joint_text_stream_is_seeded_by_the_run_seed(tiny_gpt_dir, tmp_path):
    """L8: the --joint text batches are shuffled with --seed: the first batch is the blocks of
    randperm(n, seed)[:2], so runs with different seeds read different text and equal seeds the same."""
    from decision_transformer.cli_lm import lm_cotraining_parser
    from decision_transformer.envs import get_env_spec
    from decision_transformer.model_factory import build_model_from_args
    from decision_transformer.models.pretrained import locate_lm
    from decision_transformer.training.lm_cotrain import build_lm_cotraining, load_tokenizer, tokenize_corpus

    lm_dir, text = tiny_gpt_dir / "gpt2", tiny_gpt_dir / "wiki.txt"
    blocks = tokenize_corpus([text], load_tokenizer(lm_dir, None), 16, 10**6)

    def first_batch(seed):
        args = lm_cotraining_parser().parse_args(["--pretrained_lm", str(lm_dir), "--joint", "--nlp_dataset_name",
                                                  str(text), "--no_token_cache", "--seed", str(seed),
                                                  "--data_path", str(tmp_path)])
        model = build_model_from_args(args, get_env_spec("hopper"))
        term = build_lm_cotraining(args, model, locate_lm(str(lm_dir)), "cpu")
        assert torch.equal(term.batches.blocks, blocks)
        return term.batches.next()

    for seed in (1, 2):
        perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(first_batch(seed), blocks[perm[:2]]), seed
    assert not torch.equal(first_batch(1), first_batch(2))
    assert not (tmp_path / "token_cache").exists()   # --no_token_cache: no {data_path}/token_cache/ written


# ---- the ChibiT maker ------------------------------------------------------------------------------------------------

def _tokenizer_dir(tmp_path):
    from decision_transformer.training.lm_pretrain import train_bpe_tokenizer

    text = corpus(tmp_path / "lex.txt", n_lines=200)
    tok = train_bpe_tokenizer([text], 300)
    tok.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok", tok


def test_pretrain_windows_reach_the_last_token_and_need_one_block(tmp_path, monkeypatch):
    """T1: a window is block_size tokens (the loss shifts the labels inside it), so a corpus of exactly block_size
    tokens trains on its one window, the last token included (window starts were one short of the end, so the last
    token was never seen and that corpus was refused); one token fewer is one line, and nothing is written."""
    from decision_transformer.training import lm_pretrain
    from decision_transformer.training.lm_pretrain import encode_files, pretrain_chibit

    tok_dir, tok = _tokenizer_dir(tmp_path)
    text = tmp_path / "short.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n")
    ids = encode_files([text], tok)
    n = len(ids)
    assert 4 < n <= 64
    seen = []
    real = lm_pretrain.next_token_loss
    monkeypatch.setattr(lm_pretrain, "next_token_loss", lambda logits, x: seen.append(x.clone()) or real(logits, x))
    pretrain_chibit(text, tmp_path / "out", tokenizer_dir=tok_dir, n_layer=1, n_embd=16, n_head=2, n_positions=64,
                    block_size=n, batch_size=2, steps=1, warmup_steps=1, log_every=1)
    assert all(torch.equal(row, ids) for row in seen[0])                   # the whole corpus, its last token too
    with pytest.raises(UserError) as e:
        pretrain_chibit(text, tmp_path / "out2", tokenizer_dir=tok_dir, n_layer=1, n_embd=16, n_head=2,
                        n_positions=64, block_size=n + 1, batch_size=2, steps=1, warmup_steps=1, log_every=1)
    assert str(e.value) == f"{text}: {n} tokens, fewer than one block of {n + 1}"
    assert not (tmp_path / "out2").exists()


def test_pretrain_schedule_and_gradient_clip(tmp_path, monkeypatch):
    """T2: lr at step s (from 1) is lr * min(s / warmup, 1) * (0.1 + 0.45 * (1 + cos(pi * (s - 1) / steps))): the first
    step is already lr / warmup, the cosine ends above the 0.1 floor; every step's gradient norm is clipped to 1."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from decision_transformer.training.lm_pretrain import pretrain_chibit

    tok_dir, _ = _tokenizer_dir(tmp_path)
    lrs, norms, raw = [], [], []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **k):
        assert max_norm == 1.0
        raw.append(float(clip(params, max_norm, *a, **k)))   # the norm before clipping
        return raw[-1]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)

    def record(opt, args, kwargs):
        lrs.append(opt.param_groups[0]["lr"])
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))))

    handle = register_optimizer_step_pre_hook(record)
    try:
        pretrain_chibit(tmp_path / "lex.txt", tmp_path / "out", tokenizer_dir=tok_dir, n_layer=1, n_embd=16, n_head=2,
                        n_positions=32, block_size=16, batch_size=2, steps=6, lr=1e-2, warmup_steps=3, log_every=100)
    finally:
        handle.remove()
    lr, steps, warmup = 1e-2, 6, 3
    expect = [lr * min(s / warmup, 1.0) * (0.1 + 0.45 * (1 + math.cos(math.pi * (s - 1) / steps)))
              for s in range(1, steps + 1)]
    assert lrs == pytest.approx(expect, rel=1e-9)
    assert lrs[0] == pytest.approx(lr / 3)
    assert lrs[-1] == pytest.approx(lr * (0.1 + 0.45 * (1 + math.cos(math.pi * 5 / 6))))
    assert len(norms) == len(raw) == steps
    assert norms == pytest.approx([min(r, 1.0) for r in raw], rel=1e-4)   # each step clipped to norm 1


# ---- legacy_import ---------------------------------------------------------------------------------------------------

def test_multi_task_env_ids_give_the_env_order(tmp_path):
    """G1: a multi-task pickle's env_ids decide which env each per-env slot is (here walker2d before halfcheetah,
    not the default order)."""
    from decision_transformer.legacy_import import build_model, import_legacy, load_model_file

    orig = LMultiDecisionTransformer()
    orig.env_ids = ["Hopper-v3", "Walker2d-v3", "HalfCheetah-v3"]
    path = tmp_path / "dt_gym-experiment-multi-medium-1_best.pt"
    save_original(orig, path)
    mc = import_legacy(path)["config"]["model_config"]
    assert mc["envs"] == ["hopper", "walker2d", "halfcheetah"] and mc["action_tanh"] is True
    assert build_model(load_model_file(path)).config.envs == ["hopper", "walker2d", "halfcheetah"]


def test_an_action_head_without_tanh_imports_without_tanh(tmp_path):
    """G2: an original whose action head is a bare Linear imports with action_tanh False (single- and multi-task), and
    the imported model's actions are that Linear applied to the state tokens' outputs (no tanh)."""
    from decision_transformer.legacy_import import build_model, import_legacy, load_model_file

    orig = LDecisionTransformer()
    orig.predict_action = nn.Sequential(nn.Linear(H, 3))
    nn.init.normal_(orig.predict_action[0].weight, std=3.0)
    path = tmp_path / "models" / "hopper" / "dt_gym-experiment-hopper-medium-1_best.pt"
    path.parent.mkdir(parents=True)
    save_original(orig, path)
    assert import_legacy(path)["config"]["model_config"]["action_tanh"] is False
    model = build_model(load_model_file(path)).eval()
    assert not any(isinstance(m, nn.Tanh) for m in model.modules())
    seen = []
    model.predict_action.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 11, generator=g), torch.randn(1, 3, 3, generator=g),
                    torch.randn(1, 3, 1, generator=g), torch.arange(3).view(1, 3))
        expect = orig.predict_action(seen[0])
    torch.testing.assert_close(out.action_preds, expect, rtol=1e-6, atol=1e-6)
    assert out.action_preds.abs().max() > 1.5                     # not squashed into (-1, 1)

    multi = LMultiDecisionTransformer()
    multi.predict_actions = [nn.Sequential(nn.Linear(H, a)) for a in (3, 6, 6)]
    multi.predict_action = multi.predict_actions[2]
    save_original(multi, tmp_path / "multi.pt")
    assert import_legacy(tmp_path / "multi.pt")["config"]["model_config"]["action_tanh"] is False


def test_pickled_dropout_and_eps_are_imported(tmp_path):
    """G3: the pickled GPT2Config's dropout rates, layer-norm eps and init range go into the imported backbone."""
    from decision_transformer.legacy_import import build_model, import_legacy, load_model_file

    orig = LDecisionTransformer()
    cfg = LConfig(2)
    cfg.resid_pdrop, cfg.attn_pdrop, cfg.embd_pdrop = 0.2, 0.3, 0.15
    cfg.layer_norm_epsilon, cfg.initializer_range = 1e-6, 0.05
    orig.transformer.config = cfg
    path = tmp_path / "dt_gym-experiment-hopper-medium-1_best.pt"
    save_original(orig, path)
    bb = import_legacy(path)["config"]["model_config"]["backbone"]
    assert {k: bb[k] for k in ("resid_pdrop", "attn_pdrop", "embd_pdrop", "layer_norm_epsilon",
                               "initializer_range")} == {"resid_pdrop": 0.2, "attn_pdrop": 0.3, "embd_pdrop": 0.15,
                                                         "layer_norm_epsilon": 1e-6, "initializer_range": 0.05}
    model = build_model(load_model_file(path))
    assert (model.config.backbone.resid_pdrop, model.config.backbone.layer_norm_epsilon) == (0.2, 1e-6)


def test_build_model_max_length_override_for_single_task():
    """G4: build_model(..., max_length=7) rebuilds a single-task model with context 7 (its stored one is 5)."""
    from decision_transformer.checkpoint import make_checkpoint
    from decision_transformer.legacy_import import ModelFile, build_model

    m = tiny_dt()
    ck = make_checkpoint(m.state_dict(), {"env": "hopper", "model_config": m.config.to_dict()})
    mf = ModelFile("x.pt", ck["state_dict"], ck["config"])
    assert build_model(mf).config.max_length == 5
    assert build_model(mf, max_length=7).config.max_length == 7


def test_ambiguous_dims_name_no_env(tmp_path):
    """G5: 17/6 dims fit both halfcheetah and walker2d: a file whose path names no env gets env None (recorded and
    as ModelFile.env), while 11/3 (hopper only) is still recognised."""
    from decision_transformer.legacy_import import ModelFile, import_legacy, load_model_file
    from decision_transformer.models import DTConfig

    amb = tmp_path / "x.pt"
    save_original(LDecisionTransformer(17, 6), amb)
    ck = import_legacy(amb)
    assert ck["config"]["env"] is None and ck["specializations"] == []
    assert load_model_file(amb).env is None
    hop = tmp_path / "y.pt"
    save_original(LDecisionTransformer(11, 3), hop)
    assert import_legacy(hop)["config"]["env"] == "hopper" and load_model_file(hop).env == "hopper"
    # our own checkpoint without a recorded env: ModelFile.env reads the dims the same way
    m = tiny_dt()
    cfg = DTConfig.from_dict({**m.config.to_dict(), "state_dim": 17, "act_dim": 6})
    assert ModelFile(str(tmp_path / "z.pt"), {}, {"model_config": cfg.to_dict()}).env is None
    assert ModelFile(str(tmp_path / "z.pt"), {}, {"model_config": m.config.to_dict()}).env == "hopper"


@pytest.mark.parametrize("kind", ["relu", "geglu", "tied"])
def test_a_bare_state_dict_rebuilds_the_same_model(tmp_path, kind):
    """G6: a bare state dict (no config) of a relu (the default), a geglu or a tied-head DT is rebuilt from its shapes
    alone: the weights load strictly and the model computes what the original does."""
    from decision_transformer.legacy_import import ModelFile, build_model, infer_dt_config
    from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig

    bb = BackboneConfig(n_embd=16, n_layer=2, **({"activation_function": "geglu", "n_inner": 24}
                                                   if kind == "geglu" else {}))
    orig = DecisionTransformer(DTConfig(11, 3, max_length=5, max_ep_len=50, share_input_output_proj=kind == "tied",
                                        backbone=bb), seed=3).eval()
    with torch.no_grad():
        for p in orig.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    sd = orig.state_dict()
    cfg = infer_dt_config(sd)
    assert (cfg.backbone.activation_function, cfg.share_input_output_proj, cfg.max_ep_len, cfg.backbone.n_inner) == \
        ({"relu": "relu", "geglu": "geglu", "tied": "relu"}[kind], kind == "tied", 50, 24 if kind == "geglu" else 64)
    model = build_model(ModelFile(str(tmp_path / "sd.pt"), sd, {})).eval()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 4, 11, generator=g), torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 1, generator=g),
         torch.randint(0, 50, (2, 4), generator=g))
    with torch.no_grad():
        a, b = orig(*x), model(*x)
    torch.testing.assert_close(b.action_preds, a.action_preds, rtol=0, atol=0)
    torch.testing.assert_close(b.state_preds, a.state_preds, rtol=0, atol=0)
