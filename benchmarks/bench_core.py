"""Sampler and evaluation throughput: the fast paths against the slow paths they replace.

    python benchmarks/bench_core.py [--device cpu] [--quick]

Prints a table: sampler batches/s (vectorised on-device sampler vs the originals' per-sample Python loop) and
evaluation episodes/s (lockstep batched rollouts vs one episode at a time with batch-1 forwards). Evaluation uses
HalfCheetah-v4 (episodes never terminate early, so every episode is 1000 steps) and a randomly initialised DT of the
default size (128 hidden, 3 layers, 1 head, K=20). The one-by-one rate is measured on a few episodes (its cost is
linear in the number of episodes), after a warm-up forward, so that it pays no first-use costs of the device.
Evaluation rows are printed as they are measured, in the order of ``--episodes``. A third table times one evaluation
forward for M histories: the full forward (every token's output) against ``last_action_only`` (the last block on the
final tokens only), which evaluation uses.

Runs tune glibc's allocator as the scripts do (``decision_transformer/cpu.py``); ``--no_tune_allocator`` measures
without it.
"""
import argparse
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_args import bench_device, positive_int  # noqa: E402
from decision_transformer.cli import eval_workers_type, nonnegative_int  # noqa: E402
from decision_transformer.cpu import tune_allocator  # noqa: E402
from decision_transformer.data import TrajectoryDataset, state_stats  # noqa: E402
from decision_transformer.envs import get_env_spec  # noqa: E402
from decision_transformer.errors import UserError, cli_entry  # noqa: E402
from decision_transformer.evaluation import (EnvPool, default_env_workers, evaluate_episodes,  # noqa: E402
                                            evaluate_episodes_sequential)
from decision_transformer.models import DecisionTransformer, DTConfig  # noqa: E402
from decision_transformer.slow_paths import reference_get_batch  # noqa: E402  (the originals' per-sample loop)


def synthetic_trajectories(env, num_timesteps, seed=0):
    """Random arrays with hopper-medium-like episode lengths (sampling cost does not depend on the values)."""
    spec = get_env_spec(env)
    rng = np.random.default_rng(seed)
    trajs, total = [], 0
    while total < num_timesteps:
        n = int(rng.integers(100, 1000))
        trajs.append({"observations": rng.normal(size=(n, spec.state_dim)).astype(np.float32),
                      "actions": rng.uniform(-1, 1, (n, spec.act_dim)).astype(np.float32),
                      "rewards": rng.uniform(0, 3, n).astype(np.float32),
                      "terminals": np.zeros(n, dtype=bool)})
        total += n
    return trajs


def rate(fn, min_time=2.0, min_reps=3):
    fn()  # warm-up
    reps, start = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < min_time:
        fn()
        reps += 1
    return reps / (time.perf_counter() - start)


def bench_sampler(device, batch_size=64, K=20, num_timesteps=1_000_000):
    trajs = synthetic_trajectories("hopper", num_timesteps)
    ds = TrajectoryDataset(trajs, "hopper", device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    mean, std = state_stats(trajs)
    lens = np.array([len(t["rewards"]) for t in trajs])
    p = lens / lens.sum()

    def fast():
        b = ds.sample_batch(batch_size, K, gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return b

    def slow():  # the originals: numpy trajectory choice, Python start index, per-sample slicing, host->device copy
        idx = np.random.choice(len(trajs), size=batch_size, replace=True, p=p)
        pairs = [(i, random.randint(0, lens[i] - 1)) for i in idx]
        b = reference_get_batch(trajs, pairs, K, mean, std)
        return {k: v.to(device) for k, v in b.items()}

    return rate(fast), rate(slow)


def warm_up(model, device):
    """One batch-1 ``get_action`` on zero inputs: the device's first-use costs (CUDA context, kernels, allocator) are
    not timed."""
    cfg = model.config
    with torch.no_grad():
        model.get_action(torch.zeros(1, 1, cfg.state_dim, device=device), torch.zeros(1, 1, cfg.act_dim, device=device),
                         torch.zeros(1, 1, 1, device=device), torch.zeros(1, 1, dtype=torch.long, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_eval(device, episodes_list, seq_episodes, workers_list=(0,), groups_list=(None,), graphs_list=(None,)):
    """Yields (episodes, env workers, overlap groups, CUDA graphs, batched ep/s, one-by-one ep/s) rows as they are
    measured: every worker, group and graph setting of the first size in ``episodes_list``, then of the next."""
    spec = get_env_spec("halfcheetah")
    model = DecisionTransformer(DTConfig(spec.state_dim, spec.act_dim), seed=0).to(device).eval()
    mean, std = np.zeros(spec.state_dim, np.float32), np.ones(spec.state_dim, np.float32)
    pool = EnvPool("halfcheetah")
    pool.get(1)
    warm_up(model, device)
    start = time.perf_counter()
    evaluate_episodes_sequential(model, "halfcheetah", 6000, seq_episodes, mean, std, device=device, pool=pool)
    seq_rate = seq_episodes / (time.perf_counter() - start)
    pool.close()
    most = max(episodes_list)
    pools = []
    try:
        for workers in workers_list:
            w = default_env_workers(device, most) if workers == "auto" else int(workers)
            pools.append((w, EnvPool("halfcheetah", workers=w)))
            pools[-1][1].stepper(most).reset(most, 0, "normal")   # start workers, make envs
        for n in episodes_list:
            for w, pool in pools:
                for groups in groups_list:
                    for graphs in graphs_list:
                        start = time.perf_counter()
                        evaluate_episodes(model, "halfcheetah", 6000, n, mean, std, device=device, pool=pool,
                                          overlap_groups=groups, cuda_graphs=graphs)
                        yield (n, w, groups or 1, "on" if (device.type == "cuda" if graphs is None else graphs)
                               else "off", n / (time.perf_counter() - start), seq_rate)
    finally:
        for _, pool in pools:
            pool.close()


def bench_env_stepping(n_envs, workers_list, steps=200):
    """Yields (worker processes, HalfCheetah-v4 env steps/s) with random actions, in this process (0) against worker
    processes (no model), each as soon as it is measured."""
    spec = get_env_spec("halfcheetah")
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (steps, n_envs, spec.act_dim))
    idx = np.arange(n_envs)
    for w in workers_list:
        pool = EnvPool("halfcheetah", workers=w)
        try:
            stepper = pool.stepper(n_envs)
            stepper.reset(n_envs, 0, "normal")
            start = time.perf_counter()
            for t in range(steps):
                stepper.step_async(idx, actions[t])
                stepper.step_wait()
            steps_s = n_envs * steps / (time.perf_counter() - start)
        finally:
            pool.close()
        yield w, steps_s


def bench_forward(device, batch_sizes, K=20):
    spec = get_env_spec("halfcheetah")
    model = DecisionTransformer(DTConfig(spec.state_dim, spec.act_dim, max_length=K), seed=0).to(device).eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    for M in batch_sizes:
        s = torch.randn(M, K, spec.state_dim, generator=g).to(device)
        a = (torch.rand(M, K, spec.act_dim, generator=g) * 2 - 1).to(device)
        r, t = torch.randn(M, K, 1, generator=g).to(device), torch.arange(K, device=device).repeat(M, 1)
        mask = torch.ones(M, K, device=device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        with torch.no_grad():
            def full():
                model(s, a, r, t, attention_mask=mask).action_preds[:, -1]
                sync()

            def last():
                model(s, a, r, t, attention_mask=mask, last_action_only=True).action_preds[:, -1]
                sync()
            rows.append((M, 1e3 / rate(full), 1e3 / rate(last)))
    return rows


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer episodes (10 only, unless --episodes is given) and a "
                                                        "2-episode one-by-one baseline")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--episodes", type=positive_int, nargs="+", default=None,
                   help="batched evaluation sizes (default 10 50 100; 10 with --quick)")
    p.add_argument("--no_tune_allocator", action="store_true", help="keep glibc's default malloc thresholds")
    p.add_argument("--env_workers", type=eval_workers_type, nargs="+", default=None,
                   help="evaluation env worker processes to compare (default: 0 and auto on CUDA, 0 on CPU)")
    p.add_argument("--overlap_groups", type=positive_int, nargs="+", default=None,
                   help="overlapped forward groups to compare (default: 1)")
    p.add_argument("--cuda_graphs", choices=["on", "off"], nargs="+", default=None,
                   help="batched evaluation with its forwards replayed from CUDA graphs, and/or plain (default: on "
                        "and off on CUDA; the CPU has none)")
    p.add_argument("--stepping_workers", type=nonnegative_int, nargs="+", default=[0, 1, 2],
                   help="worker counts of the env-stepping table (50 envs, no model)")
    args = p.parse_args(argv)
    device = bench_device(args.device)
    cuda = device.type == "cuda"
    if not cuda and "on" in (args.cuda_graphs or []):   # (before minutes of sampler and stepping rows)
        raise UserError("--cuda_graphs on needs a CUDA device (the CPU has no graphs)")
    tuned = False if args.no_tune_allocator else tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads")
    print(f"device: {device} ({where})")
    print(f"torch {torch.__version__}, glibc allocator tuned: {tuned}\n")

    fast, slow = bench_sampler(device)
    print("| sampler (batch 64, K 20, 1M timesteps) | batches/s | ratio |")
    print("|---|---:|---:|")
    print(f"| per-sample loop (originals) | {slow:,.0f} | 1.0x |")
    print(f"| vectorised on-device | {fast:,.0f} | {fast / slow:.1f}x |\n")

    print("| env stepping (50 HalfCheetah-v4 envs, random actions, no model) | worker processes | env steps/s |")
    print("|---|---:|---:|")
    for w, steps_s in bench_env_stepping(50, args.stepping_workers, 50 if args.quick else 200):
        print(f"| | {w or 'none (this process)'} | {steps_s:,.0f} |")
    print()

    episodes = args.episodes or ([10] if args.quick else [10, 50, 100])
    rows = bench_eval(device, episodes, 2 if args.quick else 5, args.env_workers or ([0, "auto"] if cuda else [0]),
                      args.overlap_groups or [1],
                      [g == "on" for g in args.cuda_graphs or (["on", "off"] if cuda else ["off"])])
    print("| evaluation (HalfCheetah-v4, 1000-step episodes, DT 128x3) | episodes | env workers | overlap groups "
          "| CUDA graphs | one-by-one ep/s | batched ep/s | ratio |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for n, w, groups, graphs, batched, seq in rows:  # each row printed as soon as it is measured
        print(f"| | {n} | {w} | {groups} | {graphs} | {seq:.2f} | {batched:.2f} | {batched / seq:.1f}x |")

    print("\n| evaluation forward (DT 128x3, K 20) | histories | full forward ms | last_action_only ms | ratio |")
    print("|---|---:|---:|---:|---:|")
    for M, full, last in bench_forward(device, [1, 10] if args.quick else [1, 10, 50, 100]):
        print(f"| | {M} | {full:.2f} | {last:.2f} | {full / last:.2f}x |")


if __name__ == "__main__":
    main()
