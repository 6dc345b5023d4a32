"""SAC update throughput: the textbook update against the project's fast update (eager, bf16, compiled).

    python benchmarks/bench_sac.py [--threads 1 2] [--env halfcheetah] [--seconds 10] [--no_compile]

Prints updates/s per variant and thread count (256-256 MLPs, two critics, batch 256, dims of the env), and the
ratio to the textbook update. Batches are drawn from random tensors: the cost of an update does not depend on the
values. Measure on an idle machine; other processes on the same cores make every number smaller.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

import torch  # noqa: E402

from bench_args import positive_float, positive_int  # noqa: E402
from decision_transformer.envs import get_env_spec  # noqa: E402
from decision_transformer.errors import cli_entry  # noqa: E402
from decision_transformer.sac import SAC, ReferenceSAC  # noqa: E402


def batches(ds, da, n=64, b=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, ds, generator=g), torch.rand(b, da, generator=g) * 2 - 1, torch.randn(b, generator=g),
             torch.randn(b, ds, generator=g), (torch.rand(b, generator=g) < 0.05).float()) for _ in range(n)]


def rate(step, data, seconds, warmup=20):
    """(updates per wall second, updates per CPU second of this process)."""
    for i in range(warmup):
        step(*data[i % len(data)])
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        step(*data[n % len(data)])
        n += 1
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="halfcheetah")
    p.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    p.add_argument("--seconds", type=positive_float, default=5.0, help="per measurement")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--no_compile", action="store_true")
    args = p.parse_args(argv)
    spec = get_env_spec(args.env)
    data = batches(spec.state_dim, spec.act_dim)
    print(f"SAC update, {args.env} dims ({spec.state_dim}/{spec.act_dim}), 256-256, 2 critics, batch 256, "
          f"torch {torch.__version__}")
    print("updates/s = per wall-clock second; per CPU-s = per second of CPU time this process got (with 1 thread,\n"
          "the rate an idle core would give; use it when other jobs share the cores). Medians of interleaved rounds.")
    print(f"{'variant':<34}{'threads':>8}{'updates/s':>12}{'per CPU-s':>12}{'x textbook':>12}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        variants = [("textbook (3 optimisers, 2 MLPs)", lambda: ReferenceSAC(spec.state_dim, spec.act_dim).update),
                    ("fast eager (ensemble, 1 backward)", lambda: SAC(spec.state_dim, spec.act_dim).update),
                    ("fast eager, bf16 hidden matmuls", lambda: SAC(spec.state_dim, spec.act_dim,
                                                                     precision="bf16").update)]
        if not args.no_compile:
            variants.append(("fast + torch.compile",
                             lambda: SAC(spec.state_dim, spec.act_dim, compile=True).update))
        steps, setup = [], []
        for name, make in variants:
            t0 = time.perf_counter()
            step = make()
            step(*data[0])  # compilation happens here
            setup.append(time.perf_counter() - t0)
            steps.append(step)
        # Interleave the variants and take medians: on a shared machine the load changes from minute to minute.
        rates = [[] for _ in variants]
        for _ in range(args.rounds):
            for i, step in enumerate(steps):
                rates[i].append(rate(step, data, args.seconds))
        base = None
        for (name, _), r, s in zip(variants, rates, setup):
            wall = statistics.median(x[0] for x in r)
            cpu = statistics.median(x[1] for x in r)
            ref = cpu if threads == 1 else wall
            base = base or ref
            extra = f"   (first call {s:.0f} s)" if s > 2 else ""
            print(f"{name:<34}{threads:>8}{wall:>12.1f}{cpu:>12.1f}{ref / base:>12.2f}{extra}", flush=True)


if __name__ == "__main__":
    main()
