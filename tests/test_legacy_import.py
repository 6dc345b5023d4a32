"""Importing the originals' whole-module checkpoints: pickles of look-alike classes written under the original class
paths (LAWSON's decision_transformer.models.*, transformers' Conv1D and GPT2Config) are read into our format by the
restricted unpickler without running any of their code."""
import os
import pickle
import sys
import types

import pytest
import torch
from torch import nn

from conftest import fails
from decision_transformer import legacy_import
from decision_transformer.errors import UserError
from decision_transformer.legacy_import import build_model, import_legacy, load_model_file

H, N_POS = 16, 32
CALLED = {"setstate": 0, "init": 0}


# ---- look-alikes of the original classes ------------------------------------------------------------------------------

class LConfig:                                      # transformers' GPT2Config
    def __init__(self, n_layer):
        self.n_embd, self.n_layer, self.n_head, self.n_inner = H, n_layer, 4, None
        self.activation_function, self.resid_pdrop, self.attn_pdrop, self.embd_pdrop = "gelu_new", 0.1, 0.1, 0.1
        self.layer_norm_epsilon, self.n_positions, self.vocab_size = 1e-5, N_POS, 50

    def __setstate__(self, state):                   # would run if the importer used the real class
        CALLED["setstate"] += 1
        self.__dict__.update(state)


class LConv1D(nn.Module):
    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))


class LNewGELU(nn.Module):
    pass


class LAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(N_POS, N_POS, dtype=torch.uint8)).view(1, 1, N_POS, N_POS))
        self.register_buffer("masked_bias", torch.tensor(-1e4))
        self.n_head = 4
        self.c_attn = LConv1D(3 * H, H)
        self.c_proj = LConv1D(H, H)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.1), nn.Dropout(0.1)


class LMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj, self.act, self.dropout = LConv1D(4 * H, H), LConv1D(H, 4 * H), LNewGELU(), nn.Dropout()


class LBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(H), LAttention(), nn.LayerNorm(H), LMLP()


class LGPT2Model(nn.Module):
    def __init__(self, n_layer):
        super().__init__()
        self.config = LConfig(n_layer)
        self.wte, self.wpe, self.drop = nn.Embedding(50, H), nn.Embedding(N_POS, H), nn.Dropout(0.1)
        self.h = nn.ModuleList([LBlock() for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(H)


class LDecisionTransformer(nn.Module):
    def __init__(self, state_dim=11, act_dim=3, n_layer=2):
        super().__init__()
        CALLED["init"] += 1
        self.state_dim, self.act_dim, self.max_length, self.hidden_size = state_dim, act_dim, 20, H
        self.transformer = LGPT2Model(n_layer)
        self.embed_timestep = nn.Embedding(1000, H)
        self.embed_return, self.embed_state = nn.Linear(1, H), nn.Linear(state_dim, H)
        self.embed_action, self.embed_ln = nn.Linear(act_dim, H), nn.LayerNorm(H)
        self.predict_state = nn.Linear(H, state_dim)
        self.predict_action = nn.Sequential(nn.Linear(H, act_dim), nn.Tanh())
        self.predict_return = nn.Linear(H, 1)
        for p in self.parameters():
            nn.init.normal_(p)

    def __setstate__(self, state):
        CALLED["setstate"] += 1
        super().__setstate__(state)


class LMultiDecisionTransformer(LDecisionTransformer):
    """LAWSON's bug: per-env modules in plain lists; the toggled env's (walker2d's) registered as the parent's."""

    def __init__(self):
        super().__init__(11, 3, n_layer=1)
        dims = [(11, 3), (17, 6), (17, 6)]
        self.env_ids = ["Hopper-v3", "HalfCheetah-v3", "Walker2d-v3"]
        self.specializations = ["Walker2d-v3"]
        self.embed_returns = [nn.Linear(1, H) for _ in dims]
        self.embed_states = [nn.Linear(s, H) for s, _ in dims]
        self.embed_actions = [nn.Linear(a, H) for _, a in dims]
        self.embed_lns = [nn.LayerNorm(H) for _ in dims]
        self.predict_actions = [nn.Sequential(nn.Linear(H, a), nn.Tanh()) for _, a in dims]
        for lst in (self.embed_returns, self.embed_states, self.embed_actions, self.embed_lns, self.predict_actions):
            for m in lst:
                for p in m.parameters():
                    nn.init.normal_(p)
        self.embed_return, self.embed_state, self.embed_action = (self.embed_returns[2], self.embed_states[2],
                                                                  self.embed_actions[2])
        self.embed_ln, self.predict_action = self.embed_lns[2], self.predict_actions[2]


ORIGINAL_PATHS = {
    LConfig: ("transformers.models.gpt2.configuration_gpt2", "GPT2Config"),
    LConv1D: ("transformers.pytorch_utils", "Conv1D"),
    LNewGELU: ("transformers.activations", "NewGELUActivation"),
    LAttention: ("decision_transformer.models.trajectory_gpt2", "Attention"),
    LMLP: ("decision_transformer.models.trajectory_gpt2", "MLP"),
    LBlock: ("decision_transformer.models.trajectory_gpt2", "Block"),
    LGPT2Model: ("decision_transformer.models.trajectory_gpt2", "GPT2Model"),
    LDecisionTransformer: ("decision_transformer.models.decision_transformer", "DecisionTransformer"),
    LMultiDecisionTransformer: ("decision_transformer.models.multi_decision_transformer", "MultiDecisionTransformer"),
}


class _RenamingPickler(pickle._Pickler):
    """Writes the look-alike classes under the original classes' module paths (as the original files name them)."""

    def save_global(self, obj, name=None):
        if obj in ORIGINAL_PATHS:
            module, qual = ORIGINAL_PATHS[obj]
            self.write(pickle.GLOBAL + f"{module}\n{qual}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


renaming_pickle = types.SimpleNamespace(Pickler=_RenamingPickler, __name__="renaming_pickle")


def save_original(obj, path):
    torch.save(obj, path, pickle_module=renaming_pickle, pickle_protocol=2)


def registered_state(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}


# ---- tests -------------------------------------------------------------------------------------------------------------

def test_single_task_import_runs_nothing_and_keeps_every_tensor(tmp_path):
    orig = LDecisionTransformer()
    d = tmp_path / "models" / "hopper"
    d.mkdir(parents=True)
    path = d / "dt_gym-experiment-hopper-medium-expert-706057_best.pt"
    save_original(orig, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)                      # not loadable the safe standard way
    CALLED.update(setstate=0, init=0)
    ckpt = import_legacy(path)
    assert CALLED == {"setstate": 0, "init": 0}                   # no method of the original classes ran
    assert "decision_transformer.models.trajectory_gpt2" not in sys.modules
    sd = ckpt["state_dict"]
    expect = registered_state(orig)
    assert set(sd) == set(expect)
    assert all(torch.equal(sd[k], expect[k]) for k in expect)
    cfg = ckpt["config"]
    assert cfg["env"] == "hopper" and cfg["dataset"] == "medium-expert"
    bb = cfg["model_config"]["backbone"]
    assert (bb["n_embd"], bb["n_layer"], bb["n_head"], bb["n_inner"], bb["activation_function"]) == \
        (16, 2, 4, 64, "gelu_new")
    # our model rebuilt from the imported config holds exactly these weights and runs
    mf = load_model_file(path)                                    # the general loader falls back to the importer
    assert mf.legacy and mf.env == "hopper"
    model = build_model(mf)
    out = model(torch.zeros(1, 3, 11), torch.zeros(1, 3, 3), torch.zeros(1, 3, 1), torch.zeros(1, 3, dtype=torch.long))
    assert out.action_preds.shape == (1, 3, 3)
    # CLI: converted file loads with weights_only=True
    legacy_import.main([str(path), "--out", str(tmp_path / "conv.pt")])
    conv = torch.load(tmp_path / "conv.pt", weights_only=True)
    assert all(torch.equal(conv["state_dict"][k], expect[k]) for k in expect)


def test_a_folder_that_also_holds_converted_models(tmp_path, capsys):
    """`legacy_import models/hopper/*.pt --out_dir ...` where --save_model also wrote this toolkit's checkpoints: those
    are skipped with a note and the original pickles are converted; only checkpoints of ours is an error."""
    d = tmp_path / "models" / "hopper"
    d.mkdir(parents=True)
    legacy = d / "dt_gym-experiment-hopper-medium-111_best.pt"
    save_original(LDecisionTransformer(), legacy)
    ours = d / "dt_gym-experiment-hopper-medium-222_best.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "config": {}}, ours)
    legacy_import.main([str(ours), str(legacy), "--out_dir", str(tmp_path / "imported")])
    assert sorted(p.name for p in (tmp_path / "imported").iterdir()) == [legacy.name]
    assert f"{ours}: already a checkpoint of this toolkit; skipped" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        legacy_import.main([str(ours), "--out_dir", str(tmp_path / "imported2")])
    assert e.value.code == 2 and "nothing to convert" in capsys.readouterr().err
    assert not (tmp_path / "imported2").exists()


def test_a_shared_timestep_table_imports_as_extend_positions(tmp_path):
    orig = LDecisionTransformer()
    orig.transformer.wpe = nn.Embedding(1000, H)
    orig.embed_timestep = orig.transformer.wpe                     # --extend_positions: one module, two names
    path = tmp_path / "dt_gym-experiment-hopper-medium-1_best.pt"
    save_original(orig, path)
    ckpt = import_legacy(path)
    assert ckpt["config"]["model_config"]["extend_positions"] is True
    model = build_model(load_model_file(path))
    assert model.embed_timestep is model.transformer.wpe
    assert torch.equal(model.embed_timestep.weight, orig.transformer.wpe.weight)
    # without the sharing, the flag stays off
    assert import_legacy(_saved(LDecisionTransformer(), tmp_path / "plain.pt"))["config"]["model_config"][
        "extend_positions"] is False


def test_our_checkpoint_with_a_longer_shared_position_table_loads(tmp_path):
    """--extend_positions with an LM of 1024 positions (a ChibiT): the timestep table is the 1024-row wpe, more rows
    than max_ep_len 1000; the checkpoint's config describes it and every reader builds it."""
    from decision_transformer.checkpoint import atomic_save, load_model, make_checkpoint
    from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig

    cfg = DTConfig(11, 3, max_length=5, extend_positions=True,
                   backbone=BackboneConfig(n_embd=16, n_layer=1, n_head=1, n_positions=1024))
    model = DecisionTransformer(cfg, seed=0)
    assert model.embed_timestep.weight.shape[0] == 1024
    path = tmp_path / "dt_gym-experiment-hopper-medium-1_best.pt"
    atomic_save(make_checkpoint(model.state_dict(), {"model_config": cfg.to_dict(), "env": "hopper",
                                                     "dataset": "medium"}), path)
    loaded, _ = load_model(path)
    assert loaded.embed_timestep is loaded.transformer.wpe
    assert torch.equal(loaded.embed_timestep.weight, model.embed_timestep.weight)


def _saved(obj, path):
    save_original(obj, path)
    return path


def test_multi_task_import_keeps_every_env(tmp_path):
    orig = LMultiDecisionTransformer()
    path = tmp_path / "dt_gym-experiment-multi-medium-730023_best.pt"
    save_original(orig, path)
    ckpt = import_legacy(path)
    sd = ckpt["state_dict"]
    assert ckpt["config"]["model_class"] == "multi_dt" and ckpt["specializations"] == ["walker2d"]
    assert ckpt["config"]["dataset"] == "medium"
    for i in range(3):   # hopper's and halfcheetah's layers too, not only the registered (walker2d) ones
        assert torch.equal(sd[f"embed_states.{i}.weight"], orig.embed_states[i].weight)
        assert torch.equal(sd[f"predict_actions.{i}.0.bias"], orig.predict_actions[i][0].bias)
        assert torch.equal(sd[f"embed_lns.{i}.weight"], orig.embed_lns[i].weight)
    assert not any(k.startswith(("embed_state.", "predict_action.", "embed_ln.")) for k in sd)  # aliases dropped
    model = build_model(load_model_file(path))
    assert model.config.envs == ["hopper", "halfcheetah", "walker2d"] and model.config.state_dims == [11, 17, 17]
    out = model(torch.zeros(1, 2, 17), torch.zeros(1, 2, 6), torch.zeros(1, 2, 1), torch.zeros(1, 2, dtype=torch.long),
                env="halfcheetah")
    assert out.action_preds.shape == (1, 2, 6)


def test_released_style_models_can_be_merged(tmp_path):
    from decision_transformer import merge_cli, merging

    paths = []
    for i, (env, dims) in enumerate((("hopper", (11, 3)), ("walker2d", (17, 6)))):
        d = tmp_path / "models" / env
        d.mkdir(parents=True)
        paths.append(d / f"dt_gym-experiment-{env}-medium-{100000 + i}_best.pt")
        save_original(LDecisionTransformer(*dims), paths[-1])
    merge_cli.main(["--models", *map(str, paths), "--include", "attn", "mlp", "--out", str(tmp_path / "m.pt")])
    out = torch.load(tmp_path / "m.pt", weights_only=True)["state_dict"]
    a, b = (import_legacy(p)["state_dict"] for p in paths)
    k = "transformer.h.1.mlp.c_fc.weight"
    assert torch.allclose(out[k], (a[k] + b[k]) / 2) and torch.equal(out["embed_state.weight"], a["embed_state.weight"])
    assert merging.select_keys(list(out), ["attn.bias"]) == [f"transformer.h.{i}.attn.c_attn.bias" for i in range(2)]


class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + str(Evil.sentinel),))


def test_anything_else_is_refused(tmp_path):
    Evil.sentinel = tmp_path / "pwned"
    orig = LDecisionTransformer()
    orig.note = Evil()                                   # an attribute whose unpickling would run a shell command
    path = tmp_path / "evil.pt"
    save_original(orig, path)
    with pytest.raises(UserError, match=r"evil\.pt: refused to import \(forbidden global (posix|os)\.system\)"):
        load_model_file(path)
    assert not Evil.sentinel.exists()
    # a plain pickle of builtins.eval
    bad = tmp_path / "eval.pt"
    torch.save({"x": eval}, bad)
    with pytest.raises(UserError, match="forbidden global builtins.eval"):
        import_legacy(bad)
    # not a model at all
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt"):
        load_model_file(junk)


def test_malformed_module_trees_are_one_line_naming_the_file(tmp_path):
    """A pickled model whose module tree contains itself, a child that is not a module, or a max_length that is not a
    number: one line naming the file, no RecursionError or TypeError traceback."""
    cyclic = LDecisionTransformer()
    cyclic.transformer._modules["loop"] = cyclic.transformer        # the module contains itself
    path = tmp_path / "models" / "hopper" / "dt_gym-experiment-hopper-medium-1.pt"
    path.parent.mkdir(parents=True)
    save_original(cyclic, path)
    with pytest.raises(UserError, match=rf"^{path}: module transformer.loop contains itself$"):
        load_model_file(path)
    odd = LDecisionTransformer()
    odd.transformer._modules["extra"] = torch.Size([])               # a child that is not a module
    save_original(odd, path)
    with pytest.raises(UserError, match=rf"^{path}: unexpected object Size in module transformer.extra$"):
        load_model_file(path)
    weird = LDecisionTransformer()
    weird.max_length = LConfig(2)                                   # not a number: the default context (20)
    save_original(weird, path)
    assert load_model_file(path).config["model_config"]["max_length"] == 20


# ---- the LM co-training layout, module attributes, activation callables --------------------------------------------

class LGPT2LMHeadModel(nn.Module):                  # transformers' GPT2LMHeadModel: the LM script's backbone
    def __init__(self, n_layer):
        super().__init__()
        self.transformer = LGPT2Model(n_layer)
        self.transformer.wpe = nn.Embedding(1000, H)              # --extend_positions: the table covers max_ep_len
        self.lm_head = nn.Linear(H, 50, bias=False)
        self.lm_head.weight = self.transformer.wte.weight         # tied, as GPT-2's


ORIGINAL_PATHS[LGPT2LMHeadModel] = ("transformers.models.gpt2.modeling_gpt2", "GPT2LMHeadModel")


def lm_script_model():
    """The LM co-training DT (the released ChibiT models): the backbone kept as ``transformer_model``, the timestep
    table its ``wpe`` (--extend_positions), the heads tied to the input embeddings (None in the pickle)."""
    m = LDecisionTransformer()
    del m.transformer, m.embed_timestep, m.predict_state, m.predict_action, m.predict_return
    m.transformer_model = LGPT2LMHeadModel(2)
    for p in m.transformer_model.parameters():
        nn.init.normal_(p)
    m.embed_timestep = m.transformer_model.transformer.wpe
    m.predict_state = m.predict_action = m.predict_return = None
    m.cluster_centers = torch.randn(10, H)                        # a plain attribute, not a buffer
    return m


def test_the_lm_scripts_models_import_with_their_inner_backbone(tmp_path):
    orig = lm_script_model()
    path = tmp_path / "models" / "hopper" / "dt_gym-experiment-hopper-medium-expert-151557_best.pt"
    path.parent.mkdir(parents=True)
    save_original(orig, path)
    ckpt = import_legacy(path)
    sd = ckpt["state_dict"]
    assert not any(k.startswith(("transformer_model.", "lm_head")) for k in sd)
    inner = {f"transformer.{k}": v for k, v in registered_state(orig.transformer_model.transformer).items()}
    assert all(torch.equal(sd[k], v) for k, v in inner.items())
    mc = ckpt["config"]["model_config"]
    assert mc["extend_positions"] is True and mc["share_input_output_proj"] is True and mc["action_tanh"] is True
    model = build_model(load_model_file(path))
    assert model.embed_timestep is model.transformer.wpe
    x = (torch.randn(1, 3, 11), torch.randn(1, 3, 3), torch.randn(1, 3, 1), torch.tensor([[0, 500, 999]]))
    assert torch.isfinite(model(*x).action_preds).all()


def test_disable_attention_set_on_the_backbone_is_kept(tmp_path):
    """LAWSON's experiment.py sets ``model.transformer.disable_attention``, an attribute, not a config field."""
    orig = LDecisionTransformer()
    orig.transformer.disable_attention = True
    path = tmp_path / "dt_gym-experiment-hopper-medium-1.pt"
    save_original(orig, path)
    assert import_legacy(path)["config"]["model_config"]["backbone"]["disable_attention"] is True
    model = build_model(load_model_file(path))
    assert all(b.disable_attention for b in model.transformer.h)


@pytest.mark.parametrize("act", ["gelu", "mish", "gelu_python", "relu"])
def test_activation_modules_that_hold_a_function_import(tmp_path, act):
    """transformers' GELU and Mish activation modules keep a function (torch's gelu or mish, or a bound method) as an
    attribute; the restricted unpickler reads it as an inert stand-in and takes the activation from the config."""
    from transformers.activations import ACT2FN

    orig = LDecisionTransformer()
    orig.transformer.config.activation_function = act
    for block in orig.transformer.h:
        block.mlp.act = ACT2FN[act]
    path = tmp_path / "dt_gym-experiment-hopper-medium-1.pt"
    torch.save(orig, path, pickle_module=renaming_pickle, pickle_protocol=2)
    ckpt = import_legacy(path)
    assert ckpt["config"]["model_config"]["backbone"]["activation_function"] == act


def test_the_inert_function_never_runs_anything():
    assert legacy_import._inert_function(torch.ones(2)) is None
    up = legacy_import.RestrictedUnpickler
    for module, name in (("builtins", "eval"), ("os", "system"), ("torch", "load")):
        with pytest.raises(pickle.UnpicklingError):
            up.find_class(up.__new__(up), module, name)


def test_a_bare_state_dict_is_rebuilt_with_a_warning(tmp_path, capsys):
    """Heads and activation cannot be read from weights: the rebuilt model says what it assumed."""
    from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig

    cfg = DTConfig(state_dim=11, act_dim=3, backbone=BackboneConfig(n_embd=16, n_layer=1, n_head=4))
    path = tmp_path / "model_1.pt"
    torch.save(DecisionTransformer(cfg).state_dict(), path)
    build_model(load_model_file(path))
    assert "a bare state dict records no head count or activation; rebuilt with 1 head and relu" in \
        capsys.readouterr().err


def test_a_geglu_label_on_a_plain_mlp_takes_the_activation_modules(tmp_path, capsys):
    """The released random-init models are labelled "geglu", which transformers did not have: where the MLP is not
    gated, the pickled activation module (here transformers' NewGELUActivation) says what ran; without a known
    module the file is still refused."""
    orig = LDecisionTransformer()
    orig.transformer.config.activation_function = "geglu"
    path = tmp_path / "dt_gym-experiment-hopper-medium-278649.pt"
    save_original(orig, path)
    assert import_legacy(path)["config"]["model_config"]["backbone"]["activation_function"] == "gelu_new"
    assert "the config says geglu, but the MLP is not gated; its activation module is gelu_new's" in \
        capsys.readouterr().err
    for block in orig.transformer.h:
        block.mlp.act = nn.Identity()
    save_original(orig, path)
    with pytest.raises(UserError, match="activation cannot be determined"):
        import_legacy(path)
    del orig.transformer.config.activation_function                # no label: the module's
    for block in orig.transformer.h:
        block.mlp.act = nn.ReLU()
    save_original(orig, path)
    assert import_legacy(path)["config"]["model_config"]["backbone"]["activation_function"] == "relu"


def _bare(tmp_path, name, **backbone):
    from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig

    torch.manual_seed(0)
    cfg = DTConfig(state_dim=11, act_dim=3, max_length=5, backbone=BackboneConfig(n_embd=16, n_layer=2, **backbone))
    model = DecisionTransformer(cfg).eval()
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, path


def test_a_bare_state_dict_converts_with_its_architecture_given(tmp_path, capsys):
    """TAKAGI's model_{i}.pt: --n_head / --activation_function / -K record what the weights cannot say, and the
    converted checkpoint computes exactly what the model that was saved computed."""
    model, path = _bare(tmp_path, "hopper/model_0.pt", n_head=4, activation_function="gelu_new")
    out = tmp_path / "conv.pt"
    legacy_import.main([str(path), "--out", str(out), "--n_head", "4", "--activation_function", "gelu_new", "-K", "5"])
    conv = torch.load(out, weights_only=True)
    mc = conv["config"]["model_config"]
    assert (mc["backbone"]["n_head"], mc["backbone"]["activation_function"], mc["max_length"]) == (4, "gelu_new", 5)
    assert conv["config"]["env"] == "hopper" and conv["specializations"] == ["hopper"]
    rebuilt = build_model(load_model_file(out)).eval()
    assert "bare state dict" not in capsys.readouterr().err       # a converted file needs no assumption
    s, a, r, t = torch.randn(2, 5, 11), torch.randn(2, 5, 3), torch.randn(2, 5, 1), torch.arange(5).repeat(2, 1)
    with torch.no_grad():
        assert torch.equal(rebuilt(s, a, r, t).action_preds, model(s, a, r, t).action_preds)


def test_a_bare_state_dict_needs_its_architecture(tmp_path, capsys):
    _, path = _bare(tmp_path, "model_1.pt", n_head=4)
    argv = [str(path), "--out", str(tmp_path / "conv.pt")]
    assert "give --n_head and --activation_function" in fails(legacy_import.main, argv, capsys)
    assert "not divisible by n_head 3" in fails(legacy_import.main, argv + ["--n_head", "3", "--activation_function",
                                                                             "relu"], capsys)
    assert "unknown activation function 'nope'" in fails(legacy_import.main, argv + ["--n_head", "4",
                                                                                     "--activation_function", "nope"],
                                                         capsys)
    assert not (tmp_path / "conv.pt").exists()


def test_a_bare_imagegpt_state_dict_keeps_its_norm(tmp_path):
    """ImageGPT's norm has no bias tensors: such a state dict is rebuilt with that norm and loads strictly."""
    model, path = _bare(tmp_path, "model_2.pt", n_head=8, activation_function="quick_gelu", norm_type="imagegpt")
    out = tmp_path / "conv.pt"
    legacy_import.main([str(path), "--out", str(out), "--n_head", "8", "--activation_function", "quick_gelu"])
    assert torch.load(out, weights_only=True)["config"]["model_config"]["backbone"]["norm_type"] == "imagegpt"
    build_model(load_model_file(out))


def test_a_bare_state_dict_in_a_run_folder_converts_for_the_analyses(tmp_path, capsys):
    """A TAKAGI run folder names the env, dataset and K; converted into a run folder of ours, the analyses' loader
    rebuilds the same model."""
    from decision_transformer.analysis.runs import load_model, parse_run_dir

    run = "gpt2_medium_walker2d_666_K1"
    model, path = _bare(tmp_path, f"takagi/{run}/model_40.pt", n_head=4, activation_function="gelu_new")
    # the weights take hopper's 11-dim states, the folder says walker2d
    msg = fails(legacy_import.main, [path, "--out_dir", tmp_path / "checkpoints" / run, "--n_head", "4",
                                     "--activation_function", "gelu_new"], capsys)
    assert f"{path}: state/action dims 11/3, the path's env walker2d needs 17/6" in msg
    assert not (tmp_path / "checkpoints" / run).exists()
    model, path = _bare(tmp_path, f"takagi/{run.replace('walker2d', 'hopper')}/model_40.pt", n_head=4,
                        activation_function="gelu_new")
    run = path.parent.name
    legacy_import.main([str(path), "--out_dir", str(tmp_path / "checkpoints" / run), "--n_head", "4",
                        "--activation_function", "gelu_new"])
    loaded = load_model(tmp_path / "checkpoints", parse_run_dir(run), 40)
    c = loaded.checkpoint["config"]
    assert (c["env"], c["dataset"], c["model_config"]["max_length"]) == ("hopper", "medium", 1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.model.state_dict().items())


def _no_timestep(m):
    del m.embed_timestep


def _n_head(value):
    def change(m):
        m.transformer.config.n_head = value
    return change


def _activation(value):
    def change(m):
        m.transformer.config.activation_function = value
    return change


def _eps_nan(m):
    m.transformer.config.layer_norm_epsilon = float("nan")


def _huge_context(m):
    m.max_length = 10 ** 12


@pytest.mark.parametrize("damage, message", [
    (_no_timestep, "not shaped like an original model: no tensor or attribute 'embed_timestep.weight'"),
    (_n_head("four"), "n_head 'four': a head count is a whole number"),
    (_n_head(2.5), "n_head 2.5: a head count is a whole number"),       # (it was cut to 2)
    (_n_head(True), "n_head True: a head count is a whole number"),     # (it was read as 1)
    (_n_head(0), "n_head must be a positive integer, got 0"),
    (_n_head(5), "hidden size 16 is not divisible by n_head 5"),
    (_activation("bogus"), "unknown activation function 'bogus'"),
    (_eps_nan, "layer_norm_epsilon must be a finite positive number, got nan"),
    (_huge_context, "max_length 1000000000000 exceeds its 1000 timesteps"),
], ids=["no_timestep", "n_head_str", "n_head_frac", "n_head_bool", "n_head_0", "n_head_5", "activation", "eps_nan",
        "huge_context"])
def test_a_damaged_original_is_one_line_and_nothing_is_written(tmp_path, capsys, damage, message):
    """Pickles that are not shaped like the originals' models, or whose config no model can be built from, are refused
    by the converter before it writes anything (and by every loader)."""
    orig = LDecisionTransformer()
    damage(orig)
    path = tmp_path / "models" / "hopper" / "dt_gym-experiment-hopper-medium-1.pt"
    path.parent.mkdir(parents=True)
    save_original(orig, path)
    assert message in fails(legacy_import.main, [path, "--out_dir", tmp_path / "out"], capsys)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    with pytest.raises(UserError, match=str(path)):
        build_model(load_model_file(path))


def test_a_multi_task_original_with_lists_of_unequal_length(tmp_path, capsys):
    orig = LMultiDecisionTransformer()
    orig.embed_states.pop()
    path = tmp_path / "multi.pt"
    save_original(orig, path)
    assert "not shaped like an original model" in fails(legacy_import.main, [path, "--out", tmp_path / "o.pt"], capsys)


def test_a_checkpoint_whose_state_dict_holds_a_non_tensor_is_refused(tmp_path):
    from decision_transformer.checkpoint import load_checkpoint
    from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig

    model = DecisionTransformer(DTConfig(state_dim=11, act_dim=3, backbone=BackboneConfig(n_embd=16, n_layer=1)))
    state = model.state_dict()
    state["transformer.h.0.attn.c_attn.weight"] = 3
    path = tmp_path / "damaged.pt"
    torch.save({"state_dict": state, "config": {"model_config": model.config.to_dict()}}, path)
    for load in (load_checkpoint, load_model_file):
        with pytest.raises(UserError, match=rf"^{path}: damaged checkpoint: state_dict entry "
                                            r"'transformer.h.0.attn.c_attn.weight' is an int, not a tensor$"):
            load(path)


def test_damaged_files_say_what_torch_found_without_its_advice(tmp_path):
    """A file torch cannot unpickle is not passed to the importer (whose refusal would read as a security matter),
    and the message carries torch's finding, not its advice to load untrusted files."""
    from decision_transformer.checkpoint import load_checkpoint

    path = tmp_path / "model_1.pt"
    path.write_bytes(b"garbage")
    for load in (load_checkpoint, load_model_file):
        with pytest.raises(UserError) as e:
            load(path)
        assert "Unsupported operand 103" in str(e.value) and "weights_only" not in str(e.value)
        assert "\x1b" not in str(e.value) and "refused to import" not in str(e.value)


def test_our_checkpoints_in_torchs_older_format_are_skipped_too(tmp_path, capsys):
    d = tmp_path / "models" / "hopper"
    d.mkdir(parents=True)
    legacy = d / "dt_gym-experiment-hopper-medium-111_best.pt"
    save_original(LDecisionTransformer(), legacy)
    ours = d / "dt_gym-experiment-hopper-medium-222_best.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "config": {}}, ours, _use_new_zipfile_serialization=False)
    legacy_import.main([str(ours), str(legacy), "--out_dir", str(tmp_path / "imported")])
    assert [p.name for p in (tmp_path / "imported").iterdir()] == [legacy.name]
    assert f"{ours}: already a checkpoint of this toolkit; skipped" in capsys.readouterr().err


def test_a_geglu_label_takes_the_activation_each_module_class_names(tmp_path):
    """Every activation class the importer knows is read as a name whose activation computes what the module did."""
    from transformers.activations import ACT2CLS

    from decision_transformer.models.gpt2 import make_activation

    def cls_of(entry):
        return entry[0] if isinstance(entry, tuple) else entry

    checked = 0
    for entry in ACT2CLS.values():
        cls = cls_of(entry)
        # (recent transformers' GELUTanh keeps a functools.partial, which the restricted unpickler refuses; the
        # originals' transformers had no such class)
        if cls.__name__ not in legacy_import._ACTIVATION_CLASSES or cls.__name__ == "GELUTanh":
            continue
        orig = LDecisionTransformer()
        orig.transformer.config.activation_function = "geglu"   # the released models' label; the MLP is not gated
        for block in orig.transformer.h:
            block.mlp.act = entry[0](**entry[1]) if isinstance(entry, tuple) else entry()
        path = tmp_path / f"dt_gym-experiment-hopper-medium-{checked}.pt"
        torch.save(orig, path, pickle_module=renaming_pickle, pickle_protocol=2)
        got = import_legacy(path)["config"]["model_config"]["backbone"]["activation_function"]
        x = torch.linspace(-4, 4, 101)
        assert torch.allclose(make_activation(got)(x), orig.transformer.h[0].mlp.act(x), atol=1e-6), \
            (cls.__name__, got)
        checked += 1
    assert checked >= 8


def test_a_bare_state_dicts_context_length_and_range_checks(tmp_path, capsys):
    """K is 20 unless -K or a TAKAGI run folder says otherwise; -K and --n_head below 1 are one line."""
    _, path = _bare(tmp_path, "hopper/model_0.pt", n_head=4, activation_function="gelu_new")
    out = tmp_path / "conv.pt"
    flags = ["--n_head", "4", "--activation_function", "gelu_new"]
    legacy_import.main([str(path), "--out", str(out), *flags])
    assert torch.load(out, weights_only=True)["config"]["model_config"]["max_length"] == 20
    argv = [path, "--out", tmp_path / "other.pt"]
    assert fails(legacy_import.main, [*argv, *flags, "-K", "0"], capsys) == \
        "error: --max_length must be at least 1, got 0"
    assert fails(legacy_import.main, [*argv, "--n_head", "0", "--activation_function", "relu"], capsys) == \
        "error: --n_head must be at least 1, got 0"
    assert "-K 2000 exceeds the model's 1000 timesteps" in fails(legacy_import.main, [*argv, *flags, "-K", "2000"],
                                                                 capsys)
    text = tmp_path / "notes.pt"
    text.write_text("not a model at all")
    msg = fails(legacy_import.main, [text, "--out", tmp_path / "other.pt"], capsys)
    assert msg.startswith(f"error: {text}: not a loadable checkpoint (") and "refused to import" not in msg
    assert not (tmp_path / "other.pt").exists()


def test_a_bare_state_dict_of_dims_two_envs_share_records_no_env(tmp_path):
    """halfcheetah and walker2d both take 17-dim states and 6-dim actions: without --env or a folder that names one,
    the converted checkpoint records none rather than a guess."""
    from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig

    path = tmp_path / "x" / "model_0.pt"
    path.parent.mkdir()
    torch.save(DecisionTransformer(DTConfig(state_dim=17, act_dim=6, backbone=BackboneConfig(n_embd=16, n_layer=1)))
               .state_dict(), path)
    legacy_import.main([str(path), "--out", str(tmp_path / "o.pt"), "--n_head", "1", "--activation_function", "relu"])
    ckpt = torch.load(tmp_path / "o.pt", weights_only=True)
    assert ckpt["config"]["env"] is None and ckpt["specializations"] == []


def test_a_bare_state_dicts_causal_mask_buffers_are_left_out(tmp_path):
    """State dicts of the originals' GPT-2 carry each block's causal-mask buffers (attn.bias, attn.masked_bias),
    which this implementation computes on the fly: they are not copied into the converted checkpoint."""
    model, path = _bare(tmp_path, "hopper/model_0.pt", n_head=4)
    state = model.state_dict()
    for b in range(2):
        state[f"transformer.h.{b}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64, dtype=torch.uint8))
        state[f"transformer.h.{b}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, path)
    legacy_import.main([str(path), "--out", str(tmp_path / "o.pt"), "--n_head", "4", "--activation_function", "relu"])
    converted = torch.load(tmp_path / "o.pt", weights_only=True)["state_dict"]
    assert sorted(converted) == sorted(model.state_dict())


def test_a_recorded_model_config_no_model_can_use_is_one_line_when_loaded(tmp_path):
    """Every tool loads model files through load_model_file: a config that BackboneConfig refuses is named there,
    before a merge writes a file that nothing could rebuild."""
    from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig

    model = DecisionTransformer(DTConfig(state_dim=11, act_dim=3, backbone=BackboneConfig(n_embd=16, n_layer=1)))
    mc = model.config.to_dict()
    mc["backbone"]["resid_pdrop"] = 1.5
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": model.state_dict(), "config": {"model_config": mc}}, path)
    with pytest.raises(UserError, match=rf"^{path}: invalid model_config \(resid_pdrop must be a probability in "
                                        r"\[0, 1\), got 1.5\)$"):
        load_model_file(path)


def test_a_bare_state_dict_needs_both_its_head_count_and_its_activation(tmp_path, capsys):
    """Either of --n_head / --activation_function alone is refused: a gelu_new model given only --n_head would
    otherwise convert silently with another activation."""
    _, path = _bare(tmp_path, "hopper/model_0.pt", n_head=4, activation_function="gelu_new")
    out = tmp_path / "conv.pt"
    for given in (["--n_head", "4"], ["--activation_function", "relu"]):
        assert "give --n_head and --activation_function" in fails(legacy_import.main,
                                                                    [str(path), "--out", str(out), *given], capsys)
    assert not out.exists()


def test_a_context_length_equal_to_the_timestep_count_converts(tmp_path, capsys):
    """K may equal the model's timestep count (only a longer context is refused), for a bare state dict's -K and
    for an original's recorded max_length."""
    _, path = _bare(tmp_path, "hopper/model_0.pt", n_head=4, activation_function="gelu_new")
    flags = ["--n_head", "4", "--activation_function", "gelu_new"]
    legacy_import.main([str(path), "--out", str(tmp_path / "k1000.pt"), *flags, "-K", "1000"])
    assert torch.load(tmp_path / "k1000.pt", weights_only=True)["config"]["model_config"]["max_length"] == 1000
    assert "-K 1001 exceeds the model's 1000 timesteps" in fails(
        legacy_import.main, [str(path), "--out", str(tmp_path / "k1001.pt"), *flags, "-K", "1001"], capsys)
    orig = LDecisionTransformer()
    orig.max_length = 1000                                          # its embed_timestep has 1000 rows
    src = tmp_path / "models" / "hopper" / "dt_gym-experiment-hopper-medium-1.pt"
    src.parent.mkdir(parents=True)
    save_original(orig, src)
    assert import_legacy(src)["config"]["model_config"]["max_length"] == 1000
    orig.max_length = 1001
    save_original(orig, src)
    with pytest.raises(UserError, match="its context length max_length 1001 exceeds its 1000 timesteps"):
        import_legacy(src)


def test_env_overrides_a_run_folder_that_names_another_env(tmp_path):
    """--env wins over the env a TAKAGI run folder names (the weights must fit the env given)."""
    from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig

    path = tmp_path / "gpt2_medium_hopper_0" / "model_1.pt"
    path.parent.mkdir()
    torch.save(DecisionTransformer(DTConfig(state_dim=17, act_dim=6, backbone=BackboneConfig(n_embd=16, n_layer=1)))
               .state_dict(), path)
    out = tmp_path / "o.pt"
    legacy_import.main([str(path), "--out", str(out), "--env", "walker2d", "--n_head", "1",
                        "--activation_function", "relu"])
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["config"]["env"] == "walker2d" and ckpt["specializations"] == ["walker2d"]
