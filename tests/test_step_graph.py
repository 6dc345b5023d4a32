"""``--cuda_graph`` (``training.trainer.StepGraph``) on the CPU, with stand-ins for torch's graph API. A stand-in
graph's capture runs the step's body as it is (a CPU has no capture); its replay emulates a CUDA graph's: the
gradients the capture left are overwritten (zeroed, then the body's backward accumulates into them) and the loss
tensors the capture returned receive the new losses, all from the tensors the capture read. Training must equal
plain training step for step: warm-up steps, the captured step, every replay with its own batch, the optimiser and
schedule stepping once per step."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from decision_transformer.data import TrajectoryDataset
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig
from decision_transformer.models.mlp_bc import MLPBCConfig, MLPBCModel
from decision_transformer.training import GRAD_CLIP, Trainer, make_optimizer, warmup_schedule
from decision_transformer.training.trainer import ActTrainer
from decision_transformer.training import trainer as trainer_mod


class FakeStream:
    def __init__(self, *a):
        pass

    def wait_stream(self, other):
        pass


class FakeGraph:
    def __init__(self):
        self.owner = None

    def capture_begin(self, *a, **k):
        pass

    def capture_end(self):
        pass

    def replay(self):
        """Writes the captured gradient tensors and losses, and leaves the parameters' ``.grad`` as they were (a
        CUDA graph writes memory; it does not set Python attributes)."""
        sg = self.owner
        params = sg.trainer.params
        before = [p.grad for p in params]
        for p, g in zip(params, sg.grads):
            if g is not None:
                g.zero_()
            p.grad = g
        for out, new in zip(sg.outputs, sg.body()):
            out.copy_(new)
        for p, g in zip(params, before):
            p.grad = g


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    modes = []     # (the CPU build has no sync debug mode: the settings are recorded)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1] if modes else 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    capture = trainer_mod.StepGraph._capture

    def capture_and_own(self, batch):
        ok = capture(self, batch)
        if ok:
            self.graph.owner = self
        return ok

    monkeypatch.setattr(trainer_mod.StepGraph, "_capture", capture_and_own)
    return modes


def make_trainer(graphed: bool, grad_clip=GRAD_CLIP, bc=False):
    """A small DT trainer (dropout off, so that a stand-in capture, which runs its body, draws no random numbers), or
    with ``bc`` an MLP behaviour-cloning ``ActTrainer`` (no clipping, as the scripts)."""
    rng = np.random.default_rng(0)
    trajs = [{"observations": rng.normal(size=(40, 11)).astype(np.float32),
              "actions": rng.uniform(-1, 1, (40, 3)).astype(np.float32),
              "rewards": rng.normal(size=40).astype(np.float32),
              "terminals": np.zeros(40, bool)} for _ in range(4)]
    ds = TrajectoryDataset(trajs, "hopper")
    if bc:
        model = MLPBCModel(MLPBCConfig(11, 3, hidden_size=32, n_layer=2, max_length=5, dropout=0.0), seed=0)
        opt = make_optimizer(model, lr=1e-3, weight_decay=1e-4)
        t = ActTrainer(model, opt, warmup_schedule(opt, 4), ds, batch_size=8, K=5,
                       generator=torch.Generator().manual_seed(3), grad_clip=None)
        if graphed:
            t.graph = trainer_mod.StepGraph(t)
        return t
    bb = BackboneConfig(n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = DecisionTransformer(DTConfig(11, 3, max_length=5, backbone=bb), seed=0)
    opt = make_optimizer(model, lr=1e-3, weight_decay=1e-4)
    t = Trainer(model, opt, warmup_schedule(opt, 4), ds, batch_size=8, K=5, generator=torch.Generator().manual_seed(3),
                grad_clip=grad_clip)
    if graphed:
        t.graph = trainer_mod.StepGraph(t)    # (Trainer itself refuses --cuda_graph on the CPU)
    return t


@pytest.mark.parametrize("grad_clip", [GRAD_CLIP, None])
def test_graph_steps_train_as_plain_steps(fake_cuda, grad_clip):
    plain, graphed = make_trainer(False, grad_clip), make_trainer(True, grad_clip)
    a = [plain.train_step() for _ in range(10)]
    b = [graphed.train_step() for _ in range(10)]
    assert graphed.graph.graph is not None and graphed.graph.warm == trainer_mod.StepGraph.WARMUP
    assert torch.equal(torch.stack(a), torch.stack(b))
    assert torch.equal(plain.last_action_error, graphed.last_action_error)
    for (k, v), w in zip(plain.module.state_dict().items(), graphed.module.state_dict().values()):
        assert torch.equal(v, w), k
    assert graphed.step == 10 and graphed.scheduler.last_epoch == plain.scheduler.last_epoch == 10
    # the losses returned are the steps' own, not views of the graph's outputs that the next replay overwrites
    assert len({float(x) for x in b}) == 10
    # a gradient set aside between steps (as zero_grad(set_to_none=True) would) is put back by the next replay
    for p in graphed.params:
        p.grad = None
    plain.train_step(), graphed.train_step()
    for v, w in zip(plain.module.parameters(), graphed.module.parameters()):
        assert torch.equal(v, w)


def test_behaviour_cloning_graph_steps_train_as_plain_steps(fake_cuda):
    plain, graphed = make_trainer(False, bc=True), make_trainer(True, bc=True)
    a = [plain.train_step() for _ in range(8)]
    b = [graphed.train_step() for _ in range(8)]
    assert graphed.graph.graph is not None and torch.equal(torch.stack(a), torch.stack(b))
    for v, w in zip(plain.module.parameters(), graphed.module.parameters()):
        assert torch.equal(v, w)


def test_a_step_that_cannot_be_captured_is_a_warning_and_plain_steps(fake_cuda, monkeypatch):
    def refuse(*a, **k):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(FakeGraph, "capture_begin", refuse)
    falls_back_to_plain_steps("could not be captured")


def falls_back_to_plain_steps(warning: str, steps: int = 6):
    """A graphed trainer warns (``warning``) and trains as a plain one over ``steps`` steps; returns it."""
    plain, graphed = make_trainer(False), make_trainer(True)
    a = [plain.train_step() for _ in range(steps)]
    with pytest.warns(RuntimeWarning, match=warning):
        b = [graphed.train_step() for _ in range(steps)]
    assert graphed.graph.failed and torch.equal(torch.stack(a), torch.stack(b))
    for v, w in zip(plain.module.parameters(), graphed.module.parameters()):
        assert torch.equal(v, w)
    return graphed


def test_a_capture_error_names_the_body_s_own_error(fake_cuda, monkeypatch):
    """A body that fails inside the capture: capture_end then fails too (the capture is invalidated); the warning
    names the body's error, and training goes on with plain steps equal to plain training."""
    body = trainer_mod.StepGraph.body

    def failing_body(self, batches=None):
        if batches is None:    # (inside the capture)
            raise RuntimeError("the real cause: a host sync")
        return body(self, batches)

    def end_fails(self):
        raise RuntimeError("operation failed due to a previous error during capture")

    monkeypatch.setattr(trainer_mod.StepGraph, "body", failing_body)
    monkeypatch.setattr(FakeGraph, "capture_end", end_fails)
    falls_back_to_plain_steps("the real cause: a host sync")


def test_a_warm_up_step_that_waits_for_the_gpu_is_refused_before_any_capture(fake_cuda, monkeypatch):
    """The warm-up runs the graph's body where a host sync raises (torch's sync debug mode "error"): such a step
    gives up before a capture begins, which on torch < 2.13 would leave the CUDA generator marked as capturing."""
    began = []
    monkeypatch.setattr(FakeGraph, "capture_begin", lambda self, *a, **k: began.append(1))

    @contextlib.contextmanager
    def syncs():
        yield
        raise RuntimeError("called a synchronizing CUDA operation")

    monkeypatch.setattr(trainer_mod, "no_host_sync", syncs)
    falls_back_to_plain_steps("called a synchronizing CUDA operation", steps=5)
    assert not began


def test_the_warm_up_refuses_host_syncs(fake_cuda):
    """Each warm-up step runs the graph's body under sync debug mode "error", then puts the mode back."""
    graphed = make_trainer(True)
    graphed.train_step()
    assert fake_cuda == ["error", 0]
    for _ in range(trainer_mod.StepGraph.WARMUP):    # the other warm-up steps, the capture, a replay
        graphed.train_step()
    assert fake_cuda == ["error", 0] * trainer_mod.StepGraph.WARMUP and graphed.graph.graph is not None


def test_cuda_graph_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        t = make_trainer(False)
        Trainer(t.module, t.optimizer, t.scheduler, t.dataset, batch_size=8, K=5, generator=t.generator,
                cuda_graph=True)
    t = make_trainer(False)
    t.compile_mode = "default"
    with pytest.raises(ValueError, match="cannot be used with --compile"):
        trainer_mod.StepGraph(t)
    t = make_trainer(False)
    t.extra_loss = lambda *a: 0.0
    with pytest.raises(ValueError, match="cannot be used with an auxiliary loss"):
        trainer_mod.StepGraph(t)


def test_experiment_refuses_cuda_graph_without_a_gpu(tmp_path, monkeypatch, capsys, hopper_data):
    import experiment

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        experiment.main(["--data_path", str(hopper_data), "--embed_dim", "16", "--n_layer", "1", "--n_head", "2",
                         "--K", "5", "--batch_size", "4", "--num_steps_per_iter", "2", "--max_iters", "1",
                         "--num_eval_episodes", "1", "--cuda_graph"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: --cuda_graph needs a CUDA device (it replays each training step as a CUDA graph)"
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").glob("*/model_*.pt"))


def graphed_logs_equal(plain, graphed, steps=6) -> bool:
    """One ``train_iteration`` of ``steps`` steps of each: the logs (but the time) equal."""
    a, b = plain.train_iteration(steps, 1), graphed.train_iteration(steps, 1)
    return {k: v for k, v in a.items() if not k.startswith("time/")} == \
        {k: v for k, v in b.items() if not k.startswith("time/")}


@pytest.mark.parametrize("init_reg", [None, 1e-2])
def test_multi_task_graph_steps_train_as_plain_steps(fake_cuda, tmp_path, init_reg, monkeypatch):
    """experiment_multi.py --cuda_graph: each env's batch drawn first (in a plain step's order), then one graph for
    every env's forward and loss, --init_reg, the backward and clipping; per-env and init_reg logs as plain steps."""
    from decision_transformer.models.multi_decision_transformer import MultiDecisionTransformer, MultiDTConfig
    from decision_transformer.multi_run import EnvData, MultiTrainer, multi_parser
    from decision_transformer.synthetic import make_dataset
    from decision_transformer.training.init_reg import InitReg

    for i, env in enumerate(("hopper", "walker2d")):
        make_dataset(tmp_path, env, "medium", 200, seed=i, max_ep_len=40)
    args = multi_parser().parse_args(["--data_path", str(tmp_path), "--K", "5"])

    def trainer(graphed):
        bb = BackboneConfig(n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.0)
        model = MultiDecisionTransformer(MultiDTConfig(max_length=5, backbone=bb), seed=0)
        opt = make_optimizer(model, lr=1e-3, weight_decay=1e-4)
        t = MultiTrainer(model, opt, warmup_schedule(opt, 2), EnvData(args, "cpu", {}), ["hopper", "walker2d"],
                         batch_size=6, K=5, generator=torch.Generator().manual_seed(0),
                         init_reg=InitReg(model, init_reg) if init_reg else None)
        if graphed:
            t.graph = trainer_mod.StepGraph(t, t._graph_losses)   # (MultiTrainer refuses --cuda_graph on the CPU)
        return t

    plain, graphed = trainer(False), trainer(True)
    assert graphed_logs_equal(plain, graphed)       # train_iteration's logs, per env and init_reg's too
    for _ in range(8):
        a, b = plain.train_step(), graphed.train_step()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert (a[2] is None and b[2] is None) if init_reg is None else torch.equal(a[2], b[2])
    assert graphed.graph.graph is not None and graphed.step == 14
    for v, w in zip(plain.model.parameters(), graphed.model.parameters()):
        assert torch.equal(v, w)
    # a capture that fails: a warning, then plain steps on the same batches, as plain training
    failing = trainer(True)
    monkeypatch.setattr(FakeGraph, "capture_begin", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no graph")))
    again = trainer(False)
    with pytest.warns(RuntimeWarning, match="no graph"):
        assert graphed_logs_equal(again, failing, steps=6)
    assert failing.graph.failed and failing.step == again.step == 6
    with pytest.raises(ValueError, match="needs a CUDA device"):
        m = plain.model
        MultiTrainer(m, plain.optimizer, plain.scheduler, EnvData(args, "cpu", {}), ["hopper"], batch_size=6, K=5,
                     generator=torch.Generator(), cuda_graph=True)


def test_cuda_graph_refusals_come_with_the_flag_checks(tmp_path, monkeypatch, capsys):
    """--cuda_graph with what it cannot graph (--compile, torchrun, an auxiliary loss, the LM script's --fp16) is
    refused with the flag checks, before any data is read (the sweep planner lists such points as invalid), also where
    a GPU is seen; without a GPU, --cuda_graph itself is, as the run starts (before its data), but a sweep of it still
    plans on a machine without one (--dry_run)."""
    import experiment
    import experiment_multi
    from lm_cotraining import experiment as lm_experiment

    from decision_transformer import sweep
    from decision_transformer.errors import UserError

    monkeypatch.chdir(tmp_path)
    missing = ["--data_path", str(tmp_path / "no_data"), "--no_generate"]

    def refused(main, *flags) -> str:
        with pytest.raises(SystemExit) as stop:
            main([*missing, "--cuda_graph", *flags])
        assert stop.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    for main in (experiment.main, experiment_multi.main):
        assert refused(main) == "error: --cuda_graph needs a CUDA device (it replays each training step as a CUDA graph)"
    assert sweep.inspect_run(str(sweep.ROOT / "experiment.py"), [*missing, "--cuda_graph", "--outdir", "ck"]).state \
        == "new"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert refused(experiment.main, "--compile") == "error: --cuda_graph cannot be used with --compile"
    assert refused(experiment_multi.main, "--compile") == "error: --cuda_graph cannot be used with --compile"
    lm = ["--pretrained_lm", str(tmp_path / "lm")]
    assert refused(lm_experiment.main, *lm, "--gpt_kmeans", "8", "--gpt_kmeans_const", "0.1") == \
        "error: --cuda_graph cannot be used with an auxiliary loss (--gpt_kmeans)"
    assert refused(lm_experiment.main, *lm, "--fp16") == ("error: --cuda_graph cannot be used with --fp16 (its "
                                                          "GradScaler step); --precision bf16 is the graphed mixed "
                                                          "precision")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="^experiment.py: --cuda_graph cannot be used with torchrun$"):
        sweep.inspect_run(str(sweep.ROOT / "experiment.py"), [*missing, "--cuda_graph", "--outdir", "ck"])
