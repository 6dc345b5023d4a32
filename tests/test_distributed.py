"""Data-parallel training on two CPU processes (gloo) equals one process at the same global batch."""
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from conftest import aux_losses, tiny_trajectories

from decision_transformer import distributed
from decision_transformer.data import TrajectoryDataset
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig
from decision_transformer.models.multi_decision_transformer import MULTI_ENVS, MultiDecisionTransformer, MultiDTConfig
from decision_transformer.multi_run import EnvData, MultiTrainer, multi_parser
from decision_transformer.synthetic import make_dataset
from decision_transformer.training import Trainer, make_optimizer, warmup_schedule
from decision_transformer.training.init_reg import InitReg

GLOBAL_BATCH, STEPS = 8, 3


def _train(rank: int, world: int, out_path: str, aux: bool = False):
    torch.set_num_threads(1)
    ctx = distributed.setup(torch.device("cpu"))[0] if world > 1 else distributed.DistContext()
    bb = BackboneConfig(n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.0,
                        vocab_size=50)
    model = DecisionTransformer(DTConfig(11, 3, max_length=5, backbone=bb), seed=0)
    if aux:
        # The attention key bias has an exactly zero gradient (softmax ignores a shift of a row's logits); AdamW turns
        # the float noise there into +-lr steps whose signs differ with summation order, and init_reg's per-tensor
        # norm would carry that into the rest of c_attn.bias. Frozen, so that the comparison is about DDP.
        for blk in model.transformer.h:
            blk.attn.c_attn.bias.requires_grad_(False)
    opt = make_optimizer(model, lr=1e-3, weight_decay=1e-4)
    ds = TrajectoryDataset(tiny_trajectories(), "hopper")
    trainer = Trainer(model, opt, warmup_schedule(opt, 2), ds, batch_size=GLOBAL_BATCH,
                      K=5, generator=torch.Generator().manual_seed(0), rank=ctx.rank, world_size=ctx.world_size,
                      extra_loss=aux_losses(model) if aux else None)
    logs = trainer.train_iteration(STEPS, 1)
    if ctx.is_main:
        torch.save({"state": model.state_dict(), "loss": logs["training/train_loss_mean"],
                    "logs": {k: v for k, v in logs.items() if not k.startswith("time/")}}, out_path)
    trainer.close()  # as the training scripts do: without it a rank could abort at exit, after training
    distributed.cleanup(ctx)
    if world > 1:  # no DDP wrapper is left for interpreter shutdown to free after the process group is gone
        import gc

        from torch.nn.parallel import DistributedDataParallel
        assert not [o for o in gc.get_objects() if isinstance(o, DistributedDataParallel)], f"rank {rank}: DDP alive"



def _worker(rank, world, port, out_path, aux=False):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    _train(rank, world, out_path, aux)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("aux", [False, True], ids=["plain", "aux_losses"])
def test_ddp_two_processes_match_one(tmp_path, aux):
    """Also with the auxiliary losses of the LM script: the LM term trains wte under DDP too, and every rank reads
    the same text batches as one process does."""
    single, ddp = tmp_path / "single.pt", tmp_path / "ddp.pt"
    _train(0, 1, str(single), aux)
    mp.spawn(_worker, args=(2, _free_port(), str(ddp), aux), nprocs=2, join=True)
    a, b = torch.load(single, weights_only=True), torch.load(ddp, weights_only=True)
    init = DecisionTransformer(DTConfig(11, 3, max_length=5, backbone=BackboneConfig(n_embd=16, n_layer=2, n_head=2,
                                                                                     vocab_size=50)),
                               seed=0).state_dict()
    changed = 0
    for k, v in a["state"].items():
        torch.testing.assert_close(b["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        changed += not torch.equal(v, init[k])
    assert changed > 10  # training moved the weights, identically
    assert aux == (not torch.equal(a["state"]["transformer.wte.weight"], init["transformer.wte.weight"]))
    assert abs(a["loss"] - b["loss"]) < 1e-5
    # every logged training value, the auxiliary terms' too (k-means loss, LM loss ...), is the global batch's
    assert a["logs"].keys() == b["logs"].keys() and (len(a["logs"]) > 3) == aux
    for k in a["logs"]:
        assert b["logs"][k] == pytest.approx(a["logs"][k], rel=1e-5, abs=1e-6), k


def _torchrun(cwd, script: str, *args: str, ok=True):
    """``torchrun --nproc_per_node 2 {script} {args}`` on CPU, one thread per process."""
    import subprocess
    import sys

    from conftest import ROOT

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / script), *args, "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc


def test_torchrun_experiment(tmp_path, hopper_data):
    """``torchrun --nproc_per_node 2 experiment.py`` on CPU: rank 0 alone writes the run folder and metrics."""
    import json

    proc = _torchrun(tmp_path, "experiment.py", "--data_path", str(hopper_data), "--embed_dim", "16", "--n_layer", "1",
                     "--K", "5", "--batch_size", "8", "--max_iters", "1", "--num_steps_per_iter", "3",
                     "--num_eval_episodes", "1", "--include", "attn")
    assert proc.stderr.count("iter 1/1 |") == 1 and proc.stderr.count("data: ") == 1   # rank 1 stays quiet
    # a flag warning given before the process group is joined: rank 1's carries its prefix (it came out twice, alike)
    lines = proc.stderr.splitlines()
    assert sum(line.startswith("warning: --include") for line in lines) == 1, proc.stderr[-3000:]
    assert sum(line.startswith("[rank 1] warning: --include") for line in lines) == 1, proc.stderr[-3000:]
    rd = tmp_path / "checkpoints" / "dt_medium_hopper_666_K5"
    assert (rd / "model_1.pt").is_file() and not list(rd.glob("*.tmp"))
    rows = (rd / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["evaluation/target_3600_return_mean"] is not None


def test_torchrun_experiment_multi(tmp_path):
    """``torchrun --nproc_per_node 2 experiment_multi.py`` on CPU, the seed drawn (rank 0's, for all): one run folder,
    one model, one summary line; every env evaluated once (by rank 0)."""
    import json

    for i, env in enumerate(MULTI_ENVS):
        make_dataset(tmp_path / "data", env, "medium", 200, seed=i, max_ep_len=40)
    proc = _torchrun(tmp_path, "experiment_multi.py", "--dataset", "medium", "--data_path", str(tmp_path / "data"),
                     "--embed_dim", "16", "--n_layer", "1", "--n_head", "2", "--K", "5", "--batch_size", "6",
                     "--max_iters", "1", "--num_steps_per_iter", "3", "--num_eval_episodes", "1", "--save_model")
    assert proc.stderr.count("iter 1/1 |") == 1 and proc.stderr.count("seed: ") == 1, proc.stderr[-3000:]
    (run,) = (tmp_path / "checkpoints" / "multi").glob("gym-*")
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["evaluation/average_norm_return_mean"] is not None
    assert [p.name for p in (tmp_path / "models" / "multi").iterdir()] == [f"dt_{run.name}.pt"]  # --save_mode last
    assert (run / "train_state.pt").is_file()


def test_quiet_rank_passes_errors_warnings_and_tracebacks_only():
    import io

    out = io.StringIO()
    q = distributed.QuietRank(out, 3)
    q.write("data: 10 trajectories\niter 1/2 | loss 0.1\nwarning: something odd\n")
    q.write("err")
    assert out.getvalue() == "[rank 3] warning: something odd\n"
    q.write("or: the file is corrupt\nTraceback (most recent call last):\n  File x\nValueError: y\n")
    assert out.getvalue().splitlines()[1:] == ["[rank 3] error: the file is corrupt",
                                               "[rank 3] Traceback (most recent call last):", "[rank 3]   File x",
                                               "[rank 3] ValueError: y"]
    assert not q.isatty()


def test_a_rank_keeps_its_prefix_after_leaving_the_process_group(monkeypatch):
    """The line a script ends with is printed after ``cleanup`` (``error: interrupted`` on Ctrl-C in training): rank
    1's still carries ``[rank 1]``, so it is not a second copy of rank 0's line."""
    import io

    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", distributed.QuietRank(out, 1))
    distributed.cleanup(distributed.DistContext(1, 2))    # (no process group to leave here)
    print("error: interrupted", file=sys.stderr)
    assert out.getvalue() == "[rank 1] error: interrupted\n"


def _tiny_multi(seed: int = 0, **dropout):
    bb = BackboneConfig(n_embd=16, n_layer=2, n_head=2, **dropout)
    return MultiDecisionTransformer(MultiDTConfig(max_length=5, backbone=bb), seed=seed)


def _train_multi(rank: int, world: int, out_path: str, data_dir: str):
    """Two of the three envs (the third env's layers get no gradient: frozen under DDP) with init_reg."""
    torch.set_num_threads(1)
    ctx = distributed.setup(torch.device("cpu"))[0] if world > 1 else distributed.DistContext()
    assert distributed.from_main(ctx, {"seed": 7 + rank}) == {"seed": 7}  # (experiment_multi's drawn seed)
    # each rank's own start (as a merge estimated on each rank's own batches could be); broadcast_module makes it
    # rank 0's before init_reg takes its reference, as run_multi does
    model = _tiny_multi(seed=ctx.rank, resid_pdrop=0.0, attn_pdrop=0.0, embd_pdrop=0.0)
    distributed.broadcast_module(ctx, model)
    for blk in model.transformer.h:  # the key biases' zero gradient, as in _train
        blk.attn.c_attn.bias.requires_grad_(False)
    args = multi_parser().parse_args(["--data_path", data_dir, "--K", "5"])
    opt = make_optimizer(model, lr=1e-3, weight_decay=1e-4)
    trainer = MultiTrainer(model, opt, warmup_schedule(opt, 2), EnvData(args, "cpu", {}), ["hopper", "walker2d"],
                           batch_size=GLOBAL_BATCH, K=5, generator=torch.Generator().manual_seed(0),
                           init_reg=InitReg(model, 1e-2), rank=ctx.rank, world_size=ctx.world_size)
    logs = trainer.train_iteration(STEPS, 1)
    if ctx.is_main:
        torch.save({"state": model.state_dict(), "logs": logs}, out_path)
    trainer.close()
    distributed.cleanup(ctx)


def _worker_multi(rank, world, port, out_path, data_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    _train_multi(rank, world, out_path, data_dir)


def test_ddp_multi_task_two_processes_match_one(tmp_path):
    """The multi-task trainer (one batch per env, one backward) under DDP: weights and every logged loss as in one
    process at the same global batch, though the ranks start from different weights (broadcast_module gives every rank
    rank 0's, init_reg's reference included); the left-out env's layers stay at their initial values. A global batch that
    does not split evenly is refused."""
    for i, env in enumerate(MULTI_ENVS):
        make_dataset(tmp_path, env, "medium", 200, seed=i, max_ep_len=40)
    single, ddp = tmp_path / "single.pt", tmp_path / "ddp.pt"
    _train_multi(0, 1, str(single), str(tmp_path))
    mp.spawn(_worker_multi, args=(2, _free_port(), str(ddp), str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(single, weights_only=False), torch.load(ddp, weights_only=False)
    for k, v in a["state"].items():
        torch.testing.assert_close(b["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert set(a["logs"]) == set(b["logs"]) and "training/init_reg_loss" in a["logs"]
    for k, v in a["logs"].items():
        if not k.startswith("time/"):
            assert abs(v - b["logs"][k]) < 1e-5 * max(1.0, abs(v)), k
    cheetah = MULTI_ENVS.index("halfcheetah")
    init = _tiny_multi().state_dict()
    assert torch.equal(b["state"][f"embed_states.{cheetah}.weight"], init[f"embed_states.{cheetah}.weight"])
    assert not torch.equal(b["state"]["embed_states.0.weight"], init["embed_states.0.weight"])

    model = _tiny_multi()
    opt = make_optimizer(model, lr=1e-3, weight_decay=1e-4)
    data = EnvData(multi_parser().parse_args(["--data_path", str(tmp_path), "--K", "5"]), "cpu", {})
    with pytest.raises(ValueError, match="batch size 7 is not divisible by 2 processes"):
        MultiTrainer(model, opt, warmup_schedule(opt, 2), data, ["hopper"], batch_size=7, K=5,
                     generator=torch.Generator(), rank=0, world_size=2)


@pytest.mark.parametrize("script", ["experiment", "experiment_multi"])
def test_a_batch_that_does_not_split_over_the_processes_stops_before_the_data(tmp_path, monkeypatch, capsys, script):
    """Under torchrun (WORLD_SIZE) a --batch_size the processes cannot share is one line with the other flag checks,
    before a dataset is loaded or generated (minutes)."""
    import importlib

    from conftest import fails
    from decision_transformer import data, run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for module in (data, run):
        monkeypatch.setattr(module, "load_dataset", lambda *a, **k: pytest.fail("data loaded"))
    main = importlib.import_module(script).main
    argv = ["--data_path", str(tmp_path / "none"), "--batch_size", "7", "--max_iters", "1", "--outdir", "o"]
    msg = fails(main, argv, capsys)
    assert msg == ("error: batch size 7 is not divisible by 2 processes (torchrun's WORLD_SIZE): give a --batch_size "
                   "that is")
    assert not (tmp_path / "none").exists() and not (tmp_path / "o").exists()


def test_a_refusal_only_rank_0_makes_stops_every_rank_with_its_line(tmp_path, hopper_data, monkeypatch):
    """A check only rank 0 makes (here: --load_checkpoint of a file in the run's own folder, which a fresh run would
    move away) stops rank 1 too, with the same line, instead of rank 1 training on into a broken gradient exchange
    (a gloo traceback)."""
    import experiment

    flags = ["--data_path", str(hopper_data), "--embed_dim", "16", "--n_layer", "1", "--K", "5", "--batch_size", "8",
             "--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes", "0"]
    monkeypatch.chdir(tmp_path)
    experiment.main([*flags, "--device", "cpu"])
    own = tmp_path / "checkpoints" / "dt_medium_hopper_666_K5" / "model_1.pt"
    proc = _torchrun(tmp_path, "experiment.py", *flags, "--load_checkpoint", str(own), ok=False)
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    # (rank 1's line may be cut off: torchrun stops the other ranks once one has failed)
    assert 1 <= len(errors) <= 2 and len({e.split("error: ", 1)[1] for e in errors}) == 1, proc.stderr[-3000:]
    assert "[rank1]" not in proc.stderr and "gloo" not in proc.stderr, proc.stderr[-3000:]   # (torchrun's own report
    #                                                                                   of the failed ranks follows)


def test_a_rank_other_than_0_draws_its_own_dropout_stream_from_the_sampler_state():
    """Every rank is seeded alike: without a stream of its own each rank's slice of the global batch got rank 0's
    dropout masks. Ranks other than 0 reseed from the sampler's state (the same on every rank, restored by a resume)
    and their rank; rank 0, and a plain run, keep theirs."""
    def draws(rank, world=2, sampler_seed=0):
        torch.manual_seed(5)
        distributed.rank_dropout_stream(torch.Generator().manual_seed(sampler_seed), rank, world)
        return torch.rand(8)

    torch.manual_seed(5)
    plain = torch.rand(8)
    assert torch.equal(draws(0), plain) and torch.equal(draws(1, world=1), plain)
    assert torch.equal(draws(1), draws(1))                              # a resume at this state draws the same
    assert len({tuple(draws(r).tolist()) for r in (0, 1, 2, 3)}) == 4
    assert not torch.equal(draws(1), draws(1, sampler_seed=1))          # a new stream each iteration


def _masks(rank: int, world: int, port: int, out_path: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = distributed.setup(torch.device("cpu"))[0]
    torch.manual_seed(0)                                                # (seeded alike, as the scripts do)
    bb = BackboneConfig(n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.5, attn_pdrop=0.0, embd_pdrop=0.0, vocab_size=50)
    model = DecisionTransformer(DTConfig(11, 3, max_length=5, backbone=bb), seed=0)
    masks = []
    model.transformer.h[0].mlp.dropout.register_forward_hook(lambda m, i, o: masks.append((o == 0).flatten()))
    opt = make_optimizer(model, lr=1e-3, weight_decay=1e-4)
    trainer = Trainer(model, opt, warmup_schedule(opt, 2), TrajectoryDataset(tiny_trajectories(), "hopper"),
                      batch_size=GLOBAL_BATCH, K=5, generator=torch.Generator().manual_seed(0), rank=ctx.rank,
                      world_size=ctx.world_size)
    trainer.train_iteration(1, 1)
    torch.save(masks[-1], f"{out_path}.{rank}")          # (the training step's; the first is a probe in eval mode)
    trainer.close()
    distributed.cleanup(ctx)


def test_ddp_ranks_draw_different_dropout_masks(tmp_path):
    mp.spawn(_masks, args=(2, _free_port(), str(tmp_path / "m")), nprocs=2, join=True)
    m0, m1 = (torch.load(tmp_path / f"m.{r}", weights_only=True) for r in (0, 1))
    assert m0.shape == m1.shape and 0.3 < m0.float().mean() < 0.7 and not torch.equal(m0, m1)


def test_more_ranks_than_gpus_is_one_line_before_joining(monkeypatch):
    """torchrun --nproc_per_node 2 with --device cuda on a one-GPU machine died in torch.cuda.set_device with
    'invalid device ordinal'; it is a UserError before the process group is joined."""
    from decision_transformer.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device reached"))
    monkeypatch.setattr(sys, "stderr", sys.stderr)                  # (quiet_other_ranks is not reached either)
    with pytest.raises(UserError, match=r"^torchrun's local rank 1 needs GPU 1, but this machine has 1: give "
                                        r"--nproc_per_node at most 1$"):
        distributed.setup(torch.device("cuda"))


def test_a_trainer_refuses_a_model_and_dataset_on_different_devices():
    """The README's library example with model.to("cuda") and a CPU dataset failed deep in the forward."""
    model = DecisionTransformer(DTConfig(11, 3, max_length=5, backbone=BackboneConfig(n_embd=16, n_layer=1)), seed=0)
    opt = make_optimizer(model, lr=1e-3, weight_decay=1e-4)
    model.to("meta")                                                # (a device other than the dataset's CPU)
    with pytest.raises(ValueError, match="^the model is on meta, the dataset on cpu: build the dataset with"):
        Trainer(model, opt, warmup_schedule(opt, 2), TrajectoryDataset(tiny_trajectories(), "hopper"), batch_size=4,
                K=5, generator=torch.Generator())


def test_quiet_rank_passes_the_tracebacks_torch_tags():
    """Once the process group is joined, torch.distributed's excepthook tags each traceback line ``[rankN]: ``: the
    traceback still passes, with the rank's own prefix instead."""
    import io

    out = io.StringIO()
    q = distributed.QuietRank(out, 1)
    q.write("[rank1]: Traceback (most recent call last):\n[rank1]:   File x\n[rank1]: RuntimeError: injected\n")
    assert out.getvalue().splitlines() == ["[rank 1] Traceback (most recent call last):", "[rank 1]   File x",
                                           "[rank 1] RuntimeError: injected"]


def test_a_rank_that_fails_after_joining_shows_its_traceback_and_leaves_the_group(tmp_path):
    """Rank 1 raising once the process group is joined (before any cleanup): its traceback is printed, prefixed
    ``[rank 1]``, and each rank leaves the group at exit (a rank exiting inside it could abort)."""
    from conftest import ROOT

    script = tmp_path / "crash.py"
    script.write_text(
        f"import atexit, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport torch\nimport torch.distributed as dist\n"
        "from decision_transformer import distributed\n"
        "atexit.register(lambda: print(f'warning: in the group at exit: {dist.is_initialized()}', file=sys.stderr))\n"
        "distributed.quiet_other_ranks()\nctx, _ = distributed.setup(torch.device('cpu'))\n"
        "if ctx.rank == 1:\n    raise RuntimeError('injected')\n")
    proc = _torchrun(tmp_path, str(script), ok=False)
    lines = proc.stderr.splitlines()
    assert "[rank 1] RuntimeError: injected" in lines and "[rank 1] Traceback (most recent call last):" in lines, \
        proc.stderr[-3000:]
    assert "warning: in the group at exit: False" in lines, proc.stderr[-3000:]
    assert "[rank 1] warning: in the group at exit: False" in lines, proc.stderr[-3000:]


def test_a_missing_dataset_of_an_evaluated_env_stops_every_rank_with_its_line(tmp_path):
    """experiment_multi.py trains on hopper alone but evaluates every env: a missing dataset of another env (rank 0
    checks it before the run folder is written) stops rank 1 with the same line, not with a broken broadcast."""
    make_dataset(tmp_path / "data", "hopper", "medium", 200, seed=0, max_ep_len=40)
    proc = _torchrun(tmp_path, "experiment_multi.py", "--dataset", "medium", "--data_path", str(tmp_path / "data"),
                     "--embed_dim", "16", "--n_layer", "1", "--n_head", "2", "--K", "5", "--batch_size", "6",
                     "--max_iters", "1", "--num_steps_per_iter", "2", "--num_eval_episodes", "1", "--seed", "1",
                     "--selected_training", "hopper", "--no_generate", ok=False)
    errors = [line for line in proc.stderr.splitlines() if "error: dataset not found" in line]
    assert any(e.startswith("error: ") for e in errors), proc.stderr[-3000:]
    assert any(e.startswith("[rank 1] error: ") for e in errors), proc.stderr[-3000:]


def test_only_rank_0_evaluates_a_merged_model_before_finetuning(tmp_path):
    """A merge run under torchrun: the merged model's evaluation before finetuning (iteration 0) is rank 0's alone."""
    from conftest import ROOT, write_source_models

    root, data, paths = write_source_models(tmp_path / "src", ("hopper", "walker2d"), n=250, max_ep_len=50,
                                            id_base=400000)
    script = tmp_path / "spy.py"
    script.write_text(
        f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport experiment\n"
        "from decision_transformer import merge_setup\nreal = merge_setup._evaluate_before_finetuning\n"
        "def spy(*a):\n    print(f'warning: rank {os.environ[\"RANK\"]} evaluates the merged model', file=sys.stderr)\n"
        "    return real(*a)\nmerge_setup._evaluate_before_finetuning = spy\nexperiment.main(sys.argv[1:])\n")
    proc = _torchrun(tmp_path, str(script), "--env", "hopper", "--data_path", str(data), "--pretrained_models",
                     str(paths["hopper"]), str(paths["walker2d"]), "--include", "attn", "--copy_model",
                     "--embed_dim", "16", "--n_layer", "1", "--K", "5", "--batch_size", "8", "--max_iters", "1",
                     "--num_steps_per_iter", "2", "--num_eval_episodes", "1", "--warmup_steps", "2")
    assert proc.stderr.count("evaluates the merged model") == 1, proc.stderr[-3000:]
    assert "warning: rank 0 evaluates the merged model" in proc.stderr


def test_rank_0_writes_whole_lines_under_torchrun(monkeypatch):
    """Rank 0's stderr is line-buffered under torchrun: ``print`` gives one write per line, so another rank's line
    cannot land between a line's text and its newline."""
    import io

    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, write_through=True)
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.quiet_other_ranks()
    assert sys.stderr is stream and stream.line_buffering and not stream.write_through
    print("warning: half", end="", file=sys.stderr)
    assert raw.getvalue() == b""      # held until its newline
    print(file=sys.stderr)
    assert raw.getvalue() == b"warning: half\n"


def test_a_resumed_torchrun_run_trains_as_an_uninterrupted_one(tmp_path, hopper_data):
    """Dropout on, two ranks: one iteration, then --resume to two, gives the weights of two iterations in one go (the
    ranks' dropout streams follow the sampler state the training state restores)."""
    flags = ["--data_path", str(hopper_data), "--embed_dim", "16", "--n_layer", "1", "--K", "5", "--batch_size", "8",
             "--num_steps_per_iter", "3", "--num_eval_episodes", "0"]
    for name, runs in (("whole", [["--max_iters", "2"]]),
                       ("resumed", [["--max_iters", "1"], ["--max_iters", "2", "--resume"]])):
        for extra in runs:
            _torchrun(tmp_path, "experiment.py", *flags, "--outdir", str(tmp_path / name), *extra)
    (whole,) = (tmp_path / "whole").glob("*/model_2.pt")
    (resumed,) = (tmp_path / "resumed").glob("*/model_2.pt")
    a = torch.load(whole, weights_only=True)["state_dict"]
    b = torch.load(resumed, weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = torch.load(next((tmp_path / "whole").glob("*/model_1.pt")), weights_only=True)["state_dict"]
    assert not all(torch.equal(a[k], first[k]) for k in a)    # the second iteration trained
