"""Correctness checks of the CUDA-only paths, for one GPU lease (``gpu_suite.sh`` runs it last). Prints one row per
check (pass / FAIL / skip, and what was measured) and exits 1 when one fails; the checks of paths no GPU run has
passed yet come first (``CHECK_NAMES``' order), and ``--only CHECK ...`` runs those named:

* ``windows``: an analysis batch and the Fisher estimate's windows drawn for a dataset on the GPU are those of the
  same dataset on the CPU (the same ``batch_digest``), and the empirical Fisher estimate agrees to float tolerance;
* ``graph_reseed``: dropout under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) follows a reseeding of
  torch's generators between replays, as ``distributed.rank_dropout_stream`` needs: the same seed gives the same
  masks, another seed others;
* ``eval_graphs``: the batched evaluation's forwards replayed from CUDA graphs (``evaluation.GraphedActions``) give
  the plain forwards' actions (shapes in the order an evaluation meets them), and a hopper evaluation the same
  episode lengths and returns;
* ``resume_cpu_to_cuda``: a run trained one iteration with ``--device cpu`` and resumed with ``--device cuda`` takes
  its steps (fused AdamW with the CPU-saved optimiser state) and records iteration 2;
* ``torchrun_nccl``: ``torchrun --nproc_per_node 1`` on the GPU (the NCCL backend) trains one iteration;
* ``cuda_graph_dropout``: ``Trainer(cuda_graph=True)`` with dropout 0.1 trains as plain steps from the same seeds
  (the same losses and weights over 30 steps: the replays draw the eager steps' masks), and its graph was used;
* ``multi_cuda_graph``: the same for ``experiment_multi.py``'s trainer (two envs, ``--init_reg``);
* ``cuda_graph_run``: ``experiment.py --cuda_graph`` trains an iteration of 12 steps (warm-up, capture, replays) and
  resumes for a second without falling back to plain steps (its numerics: ``check_precision.py``'s ``cuda graph``
  rows).

    python benchmarks/cuda_checks.py            # on a CUDA machine with torch, gymnasium[mujoco] and this package
    python benchmarks/cuda_checks.py --only cuda_graph_run eval_graphs
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

import torch  # noqa: E402

from bench_args import bench_device  # noqa: E402
from bench_core import synthetic_trajectories  # noqa: E402
from decision_transformer.errors import UserError, cli_entry  # noqa: E402

TINY = ["--embed_dim", "16", "--n_layer", "1", "--n_head", "2", "--K", "5", "--batch_size", "4", "--warmup_steps",
        "10", "--num_steps_per_iter", "2", "--num_eval_episodes", "1"]


def check_windows(device):
    from decision_transformer.analysis.runs import analysis_batch, batch_digest
    from decision_transformer.data import TrajectoryDataset
    from decision_transformer.envs import get_env_spec
    from decision_transformer.fisher import compute_fisher
    from decision_transformer.models import DecisionTransformer, DTConfig

    trajs = synthetic_trajectories("hopper", 20_000, seed=0)
    cpu = TrajectoryDataset(trajs, env="hopper", device="cpu")
    gpu = TrajectoryDataset(trajs, env="hopper", device=device)
    same = batch_digest(analysis_batch(cpu, 64, 20, 3)) == batch_digest(analysis_batch(gpu, 64, 20, 3))
    spec = get_env_spec("hopper")
    model = DecisionTransformer(DTConfig(spec.state_dim, spec.act_dim), seed=0).eval()
    kw = dict(fisher_type="empirical", batch_size=8, num_batches=2, K=20, seed=5)
    f_cpu = compute_fisher(model, cpu, **kw)
    f_gpu = compute_fisher(model.to(device), gpu, **kw)
    worst = max(float((f_gpu[k].cpu() - v).abs().max() / v.abs().max().clamp_min(1e-30))
                for k, v in f_cpu.items() if isinstance(v, torch.Tensor) and v.numel())
    return same and worst < 1e-3, f"same batch digest: {same}; Fisher largest difference {worst:.1e} of its max"


def check_graph_reseed(device):
    from decision_transformer.models import DecisionTransformer, DTConfig

    model = DecisionTransformer(DTConfig(11, 3), seed=0).to(device).train()
    g = torch.Generator(device="cpu").manual_seed(0)
    args = [torch.randn(8, 20, 11, generator=g).to(device), torch.randn(8, 20, 3, generator=g).to(device),
            torch.randn(8, 20, 1, generator=g).to(device), torch.randint(0, 1000, (8, 20), generator=g).to(device)]
    step = torch.compile(lambda: model(*args).action_preds.clone(), mode="reduce-overhead")
    for _ in range(3):   # warm-up and capture
        step()
    outs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        outs.append(step())
    same = torch.equal(outs[0], outs[1])
    other = not torch.equal(outs[0], outs[2])
    return same and other, f"seed 11 twice equal: {same}; seed 12 different: {other}"


def check_eval_graphs(device):
    """GraphedActions against plain forwards on the same histories, shapes in the order an evaluation meets them
    (growing windows, then fewer rows, so that replays see stale rows), and a hopper evaluation both ways."""
    import numpy as np

    from decision_transformer.evaluation import EnvPool, GraphedActions, evaluate_episodes

    if device.type != "cuda":
        return True, "skipped: the CPU has no CUDA graphs"
    from decision_transformer.models import DecisionTransformer, DTConfig

    model = DecisionTransformer(DTConfig(11, 3), seed=0).to(device).eval()
    g = torch.Generator(device="cpu").manual_seed(1)
    graphed, worst = GraphedActions(model, device), 0.0
    with torch.no_grad():
        for m, t in [(50, t) for t in range(1, 21)] + [(m, 20) for m in (50, 37, 33, 16, 5, 1, 40)]:
            xs = (torch.randn(m, t, 11, generator=g), torch.randn(m, t, 3, generator=g),
                  torch.randn(m, t, 1, generator=g), torch.randint(0, 1000, (m, t), generator=g))
            xs = [x.to(device) for x in xs]
            worst = max(worst, float((graphed(*xs) - model.get_action(*xs)).abs().max()))
    mean, std = np.zeros(11, np.float32), np.ones(11, np.float32)
    pool = EnvPool("hopper")
    try:
        runs = [evaluate_episodes(model, "hopper", 3600, 16, mean, std, seed=3, pool=pool, cuda_graphs=on)
                for on in (True, False)]
    finally:
        pool.close()
    same_len = bool(np.array_equal(runs[0].lengths, runs[1].lengths))
    diff = float(np.abs(runs[0].returns - runs[1].returns).max())
    ok = not graphed.eager and worst < 1e-4 and same_len and diff < 1e-2 * max(1.0, float(runs[1].returns.max()))
    return ok, (f"{len(graphed.graphs)} graphs; largest action difference {worst:.1e}; hopper 16 episodes: same "
                f"lengths {same_len}, largest return difference {diff:.1e}")


def _experiment(cwd, *args, torchrun=False, timeout=120, full=False):
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] if torchrun
                             else []), os.path.join(ROOT, "experiment.py"), "--data_path", "d", *TINY, *args]
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
    return (p.returncode, tail[0], p.stdout + p.stderr) if full else (p.returncode, tail[0])


def check_resume(device, tmp):
    from decision_transformer.checkpoint import load_checkpoint

    rc, tail = _experiment(tmp, "--max_iters", "1", "--device", "cpu")
    if rc:
        return False, f"the CPU run failed: {tail}"
    rc, tail = _experiment(tmp, "--max_iters", "2", "--resume", "--device", str(device))
    if rc:
        return False, f"the resume on {device} failed: {tail}"
    st = load_checkpoint(os.path.join(tmp, "checkpoints", "dt_medium_hopper_666_K5", "train_state.pt"))
    fused = [g.get("fused") for g in st["optimizer"]["param_groups"]]
    ok = st["iteration"] == 2 and all(bool(f) == (device.type == "cuda") for f in fused)   # (fused on CUDA)
    return ok, f"iteration {st['iteration']}, fused AdamW groups {fused}"


def check_graph_dropout(device):
    """--cuda_graph with dropout on (0.1, the scripts' default), fp32, against plain steps from the same seeds: the
    replays must draw the masks eager steps draw (the same losses and weights), and the graph must really be used."""
    from decision_transformer.data import TrajectoryDataset
    from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig
    from decision_transformer.training import Trainer, make_optimizer, warmup_schedule

    if device.type != "cuda":
        return True, "skipped: --cuda_graph needs CUDA"
    trajs = synthetic_trajectories("hopper", 20_000, seed=0)
    runs = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = DecisionTransformer(DTConfig(11, 3, max_length=20, backbone=BackboneConfig(
            n_embd=128, n_layer=3, n_head=1, activation_function="relu")), seed=0).to(device)
        opt = make_optimizer(model, lr=1e-4, weight_decay=1e-4, fused=True)
        data = TrajectoryDataset(trajs, "hopper", device=device)
        t = Trainer(model, opt, warmup_schedule(opt, 10), data, batch_size=64, K=20,
                    generator=torch.Generator(device=device).manual_seed(0), cuda_graph=graphed)
        torch.manual_seed(1)
        losses = torch.stack([t.train_step() for _ in range(30)])
        runs.append(((losses,), model, t))
    return _same_training(runs, "30 steps, dropout 0.1")


def _same_training(runs, what: str):
    """(ok, text) for a plain run and a --cuda_graph run, each (loss tensors, model, trainer): the same losses and
    weights, bit for bit, and the graph captured and not given up."""
    (l0, m0, _), (l1, m1, t1) = runs
    used = t1.graph.graph is not None and not t1.graph.failed
    same = all(torch.equal(a, b) for a, b in zip(l0, l1))
    same_w = all(torch.equal(a, b) for a, b in zip(m0.parameters(), m1.parameters()))
    worst = float(((l1[0] - l0[0]).abs() / l0[0].abs()).max())
    return same and same_w and used, (f"graph used: {used}; {what}: same losses {same} (largest rel. difference "
                                      f"{worst:.1e}), same weights {same_w}")


def check_multi_graph(device, tmp):
    """experiment_multi.py's trainer with --cuda_graph (dropout 0.1, --init_reg) against plain steps from the same
    seeds: the same losses, per-env losses and weights over 20 steps, and the graph used."""
    from decision_transformer.models.multi_decision_transformer import MultiDecisionTransformer, MultiDTConfig
    from decision_transformer.multi_run import EnvData, MultiTrainer, multi_parser
    from decision_transformer.synthetic import make_dataset
    from decision_transformer.training import make_optimizer, warmup_schedule
    from decision_transformer.training.init_reg import InitReg

    if device.type != "cuda":
        return True, "skipped: --cuda_graph needs CUDA"
    make_dataset(os.path.join(tmp, "d"), "walker2d", "medium", 2000, seed=1, max_ep_len=100)
    args = multi_parser().parse_args(["--data_path", os.path.join(tmp, "d"), "--K", "20"])
    runs = []
    for graphed in (False, True):
        model = MultiDecisionTransformer(MultiDTConfig(max_length=20), seed=0).to(device)
        opt = make_optimizer(model, lr=1e-4, weight_decay=1e-4, fused=True)
        t = MultiTrainer(model, opt, warmup_schedule(opt, 10), EnvData(args, device, {}), ["hopper", "walker2d"],
                         batch_size=16, K=20, generator=torch.Generator(device=device).manual_seed(0),
                         init_reg=InitReg(model, 1e-2), cuda_graph=graphed)
        torch.manual_seed(1)
        steps = [t.train_step() for _ in range(20)]
        runs.append(((torch.stack([s[0] for s in steps]), torch.stack([s[1] for s in steps])), model, t))
    return _same_training(runs, "2 envs, 20 steps, dropout 0.1, init_reg")


def check_graph_run(device, tmp):
    """experiment.py --cuda_graph: an iteration of 12 steps (3 warm-up, the capture, replays), then a --resume."""
    from decision_transformer.checkpoint import load_checkpoint

    if device.type != "cuda":
        return True, "skipped: --cuda_graph needs CUDA"
    common = ["--device", str(device), "--cuda_graph", "--seed", "8", "--num_steps_per_iter", "12"]
    for args in (["--max_iters", "1"], ["--max_iters", "2", "--resume"]):
        rc, tail, out = _experiment(tmp, *args, *common, full=True)
        if rc or "could not be captured" in out:
            return False, f"{' '.join(args)}: " + (f"exit {rc}: {tail}" if rc else "fell back to plain steps")
    st = load_checkpoint(os.path.join(tmp, "checkpoints", "dt_medium_hopper_8_K5", "train_state.pt"))
    return st["iteration"] == 2 and st["step"] == 24, f"iteration {st['iteration']}, step {st['step']}: {tail}"


def check_torchrun(device, tmp):
    rc, tail = _experiment(tmp, "--max_iters", "1", "--device", str(device), "--seed", "7", torchrun=True)
    return rc == 0, f"exit {rc}: {tail}"


#: The checks, in the order they run (gpu_summary.py names those a log cut short never reached): those of the paths
#: that no GPU run has passed yet first, so that a time budget cuts the ones that have.
CHECK_NAMES = ("cuda_graph_dropout", "multi_cuda_graph", "cuda_graph_run", "windows", "graph_reseed", "eval_graphs",
               "resume_cpu_to_cuda", "torchrun_nccl")


@cli_entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only runs the checks' code (a smoke test)")
    p.add_argument("--only", nargs="+", choices=CHECK_NAMES, metavar="CHECK",
                   help=f"run only these checks (of: {', '.join(CHECK_NAMES)})")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("CUDA is not available: these checks are of the GPU paths")
    device = bench_device(args.device, cpu_fallback=False)
    from decision_transformer.synthetic import make_dataset

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}\n")
    print("| check | result | measured | s |\n|---|---|---|---:|")
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(os.path.join(tmp, "d"), "hopper", "medium", 2000, seed=0, max_ep_len=100)
        checks = {"cuda_graph_dropout": lambda: check_graph_dropout(device),
                  "multi_cuda_graph": lambda: check_multi_graph(device, tmp),
                  "cuda_graph_run": lambda: check_graph_run(device, tmp),
                  "windows": lambda: check_windows(device), "graph_reseed": lambda: check_graph_reseed(device),
                  "eval_graphs": lambda: check_eval_graphs(device),
                  "resume_cpu_to_cuda": lambda: check_resume(device, tmp),
                  "torchrun_nccl": lambda: check_torchrun(device, tmp)}
        assert tuple(checks) == CHECK_NAMES
        for name, fn in checks.items():
            if args.only and name not in args.only:
                continue
            start = time.perf_counter()
            try:
                ok, what = fn()
            except Exception as e:  # noqa: BLE001 - every check gets its row
                ok, what = False, f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
            failed += not ok
            result = "FAIL" if not ok else "skip" if what.startswith("skipped") else "pass"
            what = what.replace("\n", " ").replace("|", "\\|")   # (one markdown cell: gpu_summary.py reads it)
            print(f"| {name} | {result} | {what} | {time.perf_counter() - start:.1f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
