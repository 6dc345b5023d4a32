"""Optimiser groups, warm-up schedule, clipping, freezing and the masked loss."""
import numpy as np
import pytest
import torch

from decision_transformer.data import TrajectoryDataset
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig
from decision_transformer.training import GRAD_CLIP, Trainer, freeze, make_optimizer, masked_action_mse, warmup_schedule


def tiny_model(seed=0):
    return DecisionTransformer(DTConfig(11, 3, max_length=4, backbone=BackboneConfig(n_embd=16, n_layer=2, n_head=2)),
                               seed=seed)


def test_masked_mse_equals_boolean_indexing():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(5, 7, 3, generator=g), torch.randn(5, 7, 3, generator=g)
    mask = (torch.rand(5, 7, generator=g) > 0.4).float()
    sel = mask.reshape(-1) > 0
    expected = torch.mean((pred.reshape(-1, 3)[sel] - target.reshape(-1, 3)[sel]) ** 2)
    torch.testing.assert_close(masked_action_mse(pred, target, mask), expected, rtol=1e-6, atol=0)


def test_single_group_eps():
    m = tiny_model()
    opt = make_optimizer(m, lr=1e-4, weight_decay=1e-4)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["eps"] == 1e-8
    assert opt.param_groups[0]["weight_decay"] == 1e-4
    assert make_optimizer(m, lr=1e-4, weight_decay=1e-4, pretrained_lm=True).param_groups[0]["eps"] == 1e-6


def test_custom_transformer_decay_groups():
    m = tiny_model()
    opt = make_optimizer(m, lr=1e-4, weight_decay=1e-3, custom_transformer_decay=True, lm_lr=5e-5)
    g_t, g_rest = opt.param_groups
    t_ids = {id(p) for p in m.transformer.parameters()}
    assert {id(p) for p in g_t["params"]} == t_ids
    assert g_t["weight_decay"] == 0.0 and g_t["lr"] == 5e-5 and g_t["eps"] == 1e-6
    assert g_rest["weight_decay"] == 1e-3 and g_rest["lr"] == 1e-4
    assert {id(p) for p in g_rest["params"]} == {id(p) for p in m.parameters()} - t_ids
    # a tensor shared by both (the LM's wpe used as the timestep table) is listed once, in the transformer group
    m.embed_timestep = m.transformer.wpe
    opt = make_optimizer(m, lr=1e-4, weight_decay=1e-3, custom_transformer_decay=True)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and id(m.transformer.wpe.weight) in {id(p) for p in opt.param_groups[0]["params"]}


def test_warmup_then_constant():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = warmup_schedule(opt, 4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_freeze_subset_and_frozen_get_no_update():
    m = tiny_model()
    names = freeze(m, ["ln_f", "embed_timestep"])
    assert set(names) == {"transformer.ln_f.weight", "transformer.ln_f.bias", "embed_timestep.weight"}
    assert all(not p.requires_grad for n, p in m.named_parameters() if n in names)
    opt = make_optimizer(m, lr=1e-4, weight_decay=1e-4)
    assert not {id(p) for n, p in m.named_parameters() if n in names} & {id(p) for p in opt.param_groups[0]["params"]}


def _trainer(grad_clip, lr=1e-3):
    import numpy as np

    rng = np.random.default_rng(0)
    trajs = [{"observations": rng.normal(size=(30, 11)).astype(np.float32) * 50,
              "actions": rng.uniform(-1, 1, (30, 3)).astype(np.float32),
              "rewards": rng.normal(size=30).astype(np.float32),
              "terminals": np.zeros(30, bool)} for _ in range(3)]
    ds = TrajectoryDataset(trajs, "hopper")
    m = tiny_model()
    opt = make_optimizer(m, lr=lr, weight_decay=0.0)
    return Trainer(m, opt, warmup_schedule(opt, 1), ds, batch_size=8, K=4,
                   generator=torch.Generator().manual_seed(0), grad_clip=grad_clip)


@pytest.mark.parametrize("clip", [GRAD_CLIP, None])
def test_grad_clip(clip, monkeypatch):
    tr = _trainer(clip)
    norms = []
    real_step = tr.optimizer.step

    def spy_step(*a, **k):
        grads = [p.grad for p in tr.params if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(*a, **k)

    monkeypatch.setattr(tr.optimizer, "step", spy_step)
    tr.train_iteration(5, 1)
    if clip is None:
        assert max(norms) > GRAD_CLIP  # the test's data give large gradients
    else:
        assert max(norms) <= GRAD_CLIP * (1 + 1e-5)


def test_train_iteration_logs_and_counts_steps():
    tr = _trainer(GRAD_CLIP)
    logs = tr.train_iteration(7, 1)
    assert tr.step == 7 and tr.scheduler.last_epoch == 7
    assert set(logs) == {"time/training", "training/train_loss_mean", "training/train_loss_std", "training/action_error"}
    assert logs["training/train_loss_mean"] > 0


def test_train_loss_includes_auxiliary_losses():
    """As in the originals, training/train_loss_* is the total loss (action MSE + auxiliary terms such as the k-means
    or LM loss); training/action_error stays the last step's action MSE."""
    tr = _trainer(GRAD_CLIP)
    tr.extra_loss = lambda module, out, batch, step: torch.tensor(5.0)
    tr.train_iteration(3, 1)
    logs = tr.train_iteration(1, 2)
    mse = logs["training/action_error"]
    assert 0 < mse < 5 and logs["training/train_loss_mean"] == pytest.approx(mse + 5.0, rel=1e-6)


def test_fused_adamw_and_bf16_autocast_stay_close_to_fp32():
    """The GPU fast path's numerics, run here on CPU (benchmarks/check_precision.py measures them on a GPU)."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_core import synthetic_trajectories
    from check_precision import TOLERANCES, compare, train_variant

    trajs = synthetic_trajectories("hopper", 5000)
    kw = dict(batch_size=8, K=5)
    ref = train_variant(trajs, torch.device("cpu"), "tiny", 15, **kw)
    for name, variant in (("fused", dict(fused=True)), ("bf16", dict(fused=True, amp=torch.bfloat16))):
        got = compare(ref, train_variant(trajs, torch.device("cpu"), "tiny", 15, **variant, **kw))
        assert all(g <= t for g, t in zip(got, TOLERANCES[name])), (name, got)
        assert got[1] > 0 or name == "fused"   # bf16 really changed the arithmetic
    # the measures tell runs apart: another initialisation is far outside every tolerance
    other = compare(ref, train_variant(trajs, torch.device("cpu"), "tiny", 15, seed=1, **kw))
    assert other[1] > 1.0 and other[2] > 0.05


def test_precision_drift_counts_each_runs_own_movement():
    """check_precision's floor row starts from perturbed weights: the drift compares how far each run moved from its
    own start, so an offset of the start alone is no drift, and a different movement is."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from check_precision import compare

    g = torch.Generator().manual_seed(0)
    init = {"w": torch.randn(50, generator=g)}
    moved = {"w": init["w"] + 0.1 * torch.randn(50, generator=g)}
    losses, preds = torch.ones(3), torch.zeros(4)
    offset = 1e-3 * torch.randn(50, generator=g)
    same_move = ({"w": moved["w"] + offset}, {"w": init["w"] + offset})
    assert compare((losses, moved, init, preds), (losses, *same_move, preds)) == (0.0, pytest.approx(0, abs=1e-6), 0.0)
    other = ({"w": moved["w"] + offset + 0.01}, {"w": init["w"] + offset})
    assert compare((losses, moved, init, preds), (losses, *other, preds))[1] > 0.05


@pytest.mark.parametrize("aux", [False, True], ids=["plain", "aux_losses"])
def test_training_steps_never_wait_for_the_device(aux, monkeypatch):
    """With fused AdamW (what CUDA runs use) a training step, the LM script's auxiliary losses included, makes no
    host-syncing tensor call: batches are drawn, the loss and update computed and the logs kept on the device. Only
    the end of an iteration (logging) reads values back."""
    from conftest import aux_losses, forbid_host_sync, tiny_trajectories

    bb = BackboneConfig(n_embd=16, n_layer=2, n_head=2, vocab_size=50)
    model = DecisionTransformer(DTConfig(11, 3, max_length=5, backbone=bb), seed=0)
    opt = make_optimizer(model, lr=1e-3, weight_decay=1e-4, fused=True)
    trainer = Trainer(model, opt, warmup_schedule(opt, 2), TrajectoryDataset(tiny_trajectories(), "hopper"),
                      batch_size=8, K=5, generator=torch.Generator().manual_seed(0),
                      extra_loss=aux_losses(model) if aux else None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with monkeypatch.context() as m:
        forbid_host_sync(m)
        with pytest.raises(AssertionError, match="host sync: Tensor.item"):   # the trap works
            torch.ones(1).item()
        for _ in range(3):
            trainer.train_step()
    assert not torch.equal(before["transformer.h.0.mlp.c_fc.weight"], model.state_dict()["transformer.h.0.mlp.c_fc.weight"])
    assert trainer.step == 3


def test_compile_flag_modes():
    """``--compile`` alone is torch's default mode; a mode may be named; the Trainer marks each step for CUDA graphs
    under ``reduce-overhead`` (a no-op without them)."""
    from decision_transformer.cli import experiment_parser
    from decision_transformer.training import compile_module, mark_step

    p = experiment_parser()
    assert p.parse_args([]).compile is None
    assert p.parse_args(["--compile"]).compile == "default"
    assert p.parse_args(["--compile", "reduce-overhead", "--K", "3"]).compile == "reduce-overhead"
    m = tiny_model()
    assert compile_module(m, None) is m and compile_module(m, False) is m
    assert compile_module(m, "default") is not m
    mark_step("reduce-overhead")
    mark_step(None)


def test_tf32_follows_precision_on_cuda_only():
    """TF32 is part of the CUDA fast path, but ``--precision fp32`` keeps full fp32 matmuls (the originals'
    arithmetic); a CPU run leaves the flags alone."""
    from decision_transformer.run import configure_matmul_precision

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for precision, expected in (("auto", True), ("bf16", True), ("fp32", False)):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not expected
            configure_matmul_precision(precision, torch.device("cuda"))
            assert torch.backends.cuda.matmul.allow_tf32 is expected and torch.backends.cudnn.allow_tf32 is expected
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        configure_matmul_precision("auto", torch.device("cpu"))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _padded_trainer(amp_dtype=None):
    """A trainer on trajectories of 7 to 40 steps (windows with left padding), its model in eval mode (no dropout)."""
    from conftest import tiny_trajectories

    ds = TrajectoryDataset(tiny_trajectories(), "hopper")
    m = DecisionTransformer(DTConfig(11, 3, max_length=10, backbone=BackboneConfig(n_embd=16, n_layer=2, n_head=2)),
                            seed=0).eval()
    opt = make_optimizer(m, lr=1e-3, weight_decay=0.0)
    return Trainer(m, opt, warmup_schedule(opt, 1), ds, batch_size=16, K=10,
                   generator=torch.Generator().manual_seed(0), amp_dtype=amp_dtype)


def test_training_loss_conditions_on_the_window_returns_to_go_and_its_mask():
    """The loss is the masked action MSE of the model fed rtg[:, :-1] (the return-to-go at each state, not the next
    one) with the padding mask: both other choices give a different loss on windows with left padding."""
    tr = _padded_trainer()
    with torch.no_grad():  # make the inputs matter at random init: returns-to-go are scaled to about 1e-3, and
        tr.module.embed_return.weight.mul_(1e3)  # attention logits are near 0 (uniform attention)
        for block in tr.module.transformer.h:
            block.attn.c_attn.weight.mul_(10)
    b = tr.dataset.sample_batch(16, 10, torch.Generator().manual_seed(0))
    assert (b.mask == 0).any()  # some windows are padded

    def loss(rtg, mask):
        out = tr.module(b.states, b.actions, rtg, b.timesteps, attention_mask=mask)
        return masked_action_mse(out.action_preds, b.actions, b.mask)

    with torch.no_grad():
        got = tr._loss(b)[0]
        assert torch.equal(got, loss(b.rtg[:, :-1], b.mask))
        assert abs(float(got - loss(b.rtg[:, 1:], b.mask))) > 1e-5  # about 200 float32 ulps of the loss
        assert abs(float(got - loss(b.rtg[:, :-1], None))) > 1e-5


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_training_forward_runs_under_autocast_only_with_a_precision(amp_dtype):
    tr = _padded_trainer(amp_dtype)
    seen = []
    tr.module.register_forward_pre_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    tr.train_step()
    assert seen == [amp_dtype is not None]


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_auxiliary_forwards_run_under_the_same_autocast(amp_dtype):
    """The auxiliary losses' forwards (--joint's LM pass over the backbone) run under the DT forward's autocast: with
    bf16 the LM pass ran in fp32, the largest part of a --joint step on a GPU."""
    tr = _padded_trainer(amp_dtype)
    seen = []

    def extra(model, out, batch, step):
        seen.append((torch.is_autocast_enabled("cpu"), (model.transformer.wte.weight[:4] @ torch.ones(16, 2)).dtype))
        return out.action_preds.new_zeros((), dtype=torch.float32)

    tr.extra_loss = extra
    tr.train_step()
    assert seen == [(amp_dtype is not None, amp_dtype or torch.float32)]


def test_logged_loss_mean_and_std_are_those_of_the_iteration_steps(monkeypatch):
    tr = _trainer(GRAD_CLIP)
    step, losses = tr.train_step, []

    def recording_step():
        loss = step()
        losses.append(float(loss))
        return loss

    monkeypatch.setattr(tr, "train_step", recording_step)
    logs = tr.train_iteration(6, 1)
    assert len(losses) == 6 and np.std(losses) > 0
    assert logs["training/train_loss_mean"] == pytest.approx(np.mean(losses), rel=1e-6)
    assert logs["training/train_loss_std"] == pytest.approx(np.std(losses), rel=1e-5)
