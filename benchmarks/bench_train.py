"""Training throughput: steps/s, tokens/s, peak memory and (on CUDA) MFU, fast path vs the slow path it replaces.

    python benchmarks/bench_train.py [--device cuda] [--configs paper gpt2] [--steps 50]

Fast path: batches sampled on the training device by index arithmetic, the loss reduced without host syncs, one
sync per measurement. Slow path (the originals): each batch built by a per-sample Python/numpy loop and copied
host -> device every step. Both train the same model (``paper``: 128 hidden x 3 layers x 1 head; ``gpt2``: 768 x 12 x
12, the size of the pre-training paper's runs) at batch 64, K=20, on a hopper-sized synthetic dataset. On CUDA,
``--amp bf16`` adds bf16 autocast and the optimiser is fused. ``--compile MODE ...`` adds rows for the on-device path
under ``torch.compile`` (``reduce-overhead`` replays each step as CUDA graphs on a GPU). Each row is printed as soon
as it is measured, with the loss of its last step (a compiled path that trains wrongly shows there) and the number of
steps it timed (``--steps``; gpt2 on the CPU times max(3, --steps // 10)). MFU counts the matmul FLOPs
(``flops_per_step``) against the GPU's dense bf16 peak (``PEAK_TFLOPS``, printed in the header). ``--no_loop``
leaves out the per-sample loop rows (the speed-up is then against the eager on-device row), for batch sizes the
originals' loop would take long to build (``--batch_size 512 --no_loop``: MFU at GPT-2 size when the GPU is filled).
``--profile N`` profiles N more steps of every row after its timed ones and prints on stderr, just before the row,
the operators (with the CUDA kernels they ran) that took the most time: ``torch.profiler``'s table sorted by self
device time on CUDA, by self CPU time on the CPU. A profile that fails is one line, and the row is still printed.

Peak memory is each row's own: on CUDA the most memory torch allocated during its timed steps
(``max_memory_allocated`` after a reset); on the CPU every row runs in a fresh child process and the figure is that
process's peak resident set (VmHWM: the Python interpreter, torch, the dataset, the model, the optimiser and the
steps), so that no row carries the memory of the rows before it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import re
import resource
import subprocess
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
from bench_core import synthetic_trajectories  # noqa: E402
from decision_transformer.cli import COMPILE_MODES  # noqa: E402
from decision_transformer.data import Batch, TrajectoryDataset, state_stats  # noqa: E402
from decision_transformer.errors import UserError, cli_entry, first_line  # noqa: E402
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig  # noqa: E402
from decision_transformer.slow_paths import reference_get_batch  # noqa: E402
from decision_transformer.training import Trainer, make_optimizer, warmup_schedule  # noqa: E402

CONFIGS = {"paper": dict(n_embd=128, n_layer=3, n_head=1, activation_function="relu"),
           "gpt2": dict(n_embd=768, n_layer=12, n_head=12, activation_function="gelu_new")}
#: Dense bf16 tensor-core peaks (TFLOP/s) by CUDA device name, the first match counting: the PCIe and NVL cards run
#: at lower clocks and power than the SXM ones ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA GH200 480GB").
PEAK_TFLOPS = ((re.compile(r"\bG?H[12]00\b.*\bPCIe\b", re.I), 756.0),
               (re.compile(r"\bG?H[12]00\b.*\bNVL\b", re.I), 835.0),
               (re.compile(r"\bG?H[12]00\b", re.I), 989.0),
               (re.compile(r"\bA100\b", re.I), 312.0))


def peak_tflops(gpu_name: str) -> float | None:
    """The dense bf16 peak of a GPU named ``gpu_name`` (``torch.cuda.get_device_name``); None for one not listed."""
    return next((peak for pattern, peak in PEAK_TFLOPS if pattern.search(gpu_name)), None)


def flops_per_step(model, batch_size, K):
    """FLOPs of a training step: 6 per matmul parameter per token it multiplies (forward 2, backward 4), plus the
    attention scores and weighted values. The blocks' linear layers see all 3K tokens, the state, action and return
    embeddings and the three heads K tokens each; lookups (timestep, position) and layer norms do no matmuls."""
    cfg = model.config.backbone
    params = [(name, p.numel()) for name, p in model.named_parameters()]
    blocks = sum(n for name, n in params if name.startswith("transformer.h.") and ".ln_" not in name)
    io = sum(n for name, n in params if name.startswith(("embed_state.", "embed_action.", "embed_return.",
                                                         "predict_")))
    attn = 6 * 2 * cfg.n_layer * batch_size * (3 * K) ** 2 * cfg.n_embd
    return 6 * batch_size * (3 * K * blocks + K * io) + attn


class SlowSampler:
    """The originals' get_batch: numpy trajectory choice, Python start index, per-sample loop, host -> device."""

    def __init__(self, trajs, device):
        self.trajs, self.device = trajs, device
        self.mean, self.std = state_stats(trajs)
        lens = np.array([len(t["rewards"]) for t in trajs])
        self.lens, self.p = lens, lens / lens.sum()

    def sample_batch(self, batch_size, K, generator=None):
        idx = np.random.choice(len(self.trajs), size=batch_size, replace=True, p=self.p)
        pairs = [(i, random.randint(0, self.lens[i] - 1)) for i in idx]
        b = reference_get_batch(self.trajs, pairs, K, self.mean, self.std)
        return Batch(**{k: v.to(self.device) for k, v in b.items()})


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB. On Linux ``VmHWM`` of /proc/self/status: the peak of this
    process's own memory since it started (or exec'd). Not ``ru_maxrss`` there: at exec the kernel folds the peak of
    the memory the process had before (after a vfork or fork, its parent's) into it, so a fresh child's ru_maxrss can
    be its parent's peak. Elsewhere ``ru_maxrss`` (KiB, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


#: ``measure``'s ``compile`` value for a run with ``--cuda_graph`` (each step replayed from a CUDA graph), and its row
CUDA_GRAPH = "cuda-graph"
GRAPH_LABEL = "on-device, CUDA graph step"


def measure(name, trajs, device, steps, batch_size, K, slow, amp, compile=None, profile=0):
    """(steps/s, tokens/s, peak memory MiB, FLOP/s, the last step's loss) of ``steps`` timed training steps: on CUDA
    in this process (peak: the most torch allocated during the timed steps), on the CPU in a fresh child process
    (peak: that process's peak RSS, the row's own and no earlier row's). ``profile``: that many more steps are
    profiled after the timed ones and the table printed (stderr)."""
    if device.type == "cuda":
        return measure_here(name, trajs, device, steps, batch_size, K, slow, amp, compile, profile)
    return measure_in_child(name, trajs, device, steps, batch_size, K, slow, amp, compile, profile)


#: The child process of a CPU row: this file imported as a module (its main does not run), the row read from stdin.
_CHILD = ("import os, signal, sys; signal.signal(signal.SIGINT, lambda *a: os._exit(130)); "
          "sys.path.insert(0, sys.argv[1]); import bench_train; bench_train.child_main()")
_RESULT = "bench_train row result: "


def measure_in_child(name, trajs, device, steps, batch_size, K, slow, amp, compile=None, profile=0):
    """``measure_here`` in a fresh Python process, which gets the row and ``trajs`` pickled on stdin and prints its
    result on stdout; its stderr is this process's. Ctrl-C stops both (exit 130)."""
    amp_name = {None: None, torch.bfloat16: "bf16"}[amp]
    job = dict(name=name, device=str(device), steps=steps, batch_size=batch_size, K=K, slow=slow, amp=amp_name,
               compile=compile, profile=profile, threads=torch.get_num_threads())   # (--threads: the child's too)
    payload = pickle.dumps((job, trajs), protocol=pickle.HIGHEST_PROTOCOL)
    with subprocess.Popen([sys.executable, "-c", _CHILD, os.path.dirname(os.path.abspath(__file__))],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        try:
            stdout, _ = proc.communicate(payload)
        except BaseException:   # Ctrl-C or SIGTERM here: the child is stopped and reaped, not left behind
            proc.kill()
            proc.wait()
            raise
    del payload
    out = stdout.decode(errors="replace").splitlines()
    results = [line[len(_RESULT):] for line in out if line.startswith(_RESULT)]
    for line in out:   # anything else the child printed goes to stderr, not into the table
        if not line.startswith(_RESULT):
            print(line, file=sys.stderr)
    if proc.returncode in (130, -2):
        raise KeyboardInterrupt
    if proc.returncode != 0 or not results:
        how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with {proc.returncode}"
        what = "per-sample loop" if slow else "on-device" + (f", compile {compile}" if compile else "")
        raise SystemExit(f"error: the process measuring {name} ({what}) {how}"
                         + ("" if proc.returncode else " without a result") + "; its error output is above")
    sps, tps, mem, flops, loss = json.loads(results[-1])
    return sps, tps, mem, flops, loss


def child_main():
    """The child process of ``measure_in_child``: (job, trajs) from stdin, one result line on stdout."""
    job, trajs = pickle.load(sys.stdin.buffer)
    torch.set_num_threads(job["threads"])
    amp = {None: None, "bf16": torch.bfloat16}[job["amp"]]
    result = measure_here(job["name"], trajs, torch.device(job["device"]), job["steps"], job["batch_size"], job["K"],
                          job["slow"], amp, job["compile"], job["profile"])
    print(_RESULT + json.dumps(list(result)), flush=True)


def measure_here(name, trajs, device, steps, batch_size, K, slow, amp, compile=None, profile=0):
    """``measure`` in this process. The CPU peak is ``peak_rss_mib``: this process's whole life, so a fresh process
    per row (``measure_in_child``) makes it the row's own. On CUDA the peak is that of the timed steps, and for a
    ``--cuda_graph`` row that of its first step on (the warm-up steps and the capture): its activations are allocated
    while the graph is captured (in the graph's own memory pool, which the replays reuse) and never again."""
    import gc

    gc.collect()   # an earlier row's trainer (a graphed one is freed by the cycle collector): not in this row's peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cfg = DTConfig(11, 3, max_length=K, backbone=BackboneConfig(**CONFIGS[name]))
    model = DecisionTransformer(cfg, seed=0).to(device)
    random.seed(0)      # the per-sample loop draws from the global streams, as the originals did: the same batches
    np.random.seed(0)   # (and last loss) on every run
    fused = device.type == "cuda"
    opt = make_optimizer(model, lr=1e-4, weight_decay=1e-4, fused=fused)
    ds = SlowSampler(trajs, device) if slow else TrajectoryDataset(trajs, "hopper", device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    graph = compile == CUDA_GRAPH
    trainer = Trainer(model, opt, warmup_schedule(opt, 100), ds, batch_size=batch_size, K=K, generator=gen,
                      amp_dtype=amp, compile=None if graph else compile, cuda_graph=graph)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda" and graph:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3 if compile is None else 10):  # compiling (and recording CUDA graphs) is not timed
        trainer.train_step()
    sync()
    if device.type == "cuda" and not graph:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = trainer.train_step()
    sync()
    dt = time.perf_counter() - start
    sps = steps / dt
    mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib()
    if profile:
        try:
            table = profile_table(trainer, profile, device)
        except Exception as e:   # (the profiler is an aid: its failure costs the row nothing)
            table = f"profile of {profile} steps failed: {type(e).__name__}: {first_line(e)}"
        print(table, file=sys.stderr, flush=True)
    return sps, sps * batch_size * 3 * K, mem, flops_per_step(model, batch_size, K) * sps, float(loss)


#: rows of ``profile_table``: the operators that took the most time
PROFILE_ROWS = 20


def profile_table(trainer, steps, device) -> str:
    """``torch.profiler``'s table of ``steps`` training steps of ``trainer``: the ``PROFILE_ROWS`` operators and CUDA
    kernels with the most self time (device time on CUDA, CPU time on the CPU), headed by one line."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            trainer.train_step()
        if cuda:
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return (f"profile of {steps} steps (sorted by {key}):\n"
            + prof.key_averages().table(sort_by=key, row_limit=PROFILE_ROWS))


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--configs", nargs="+", default=["paper", "gpt2"], choices=list(CONFIGS))
    p.add_argument("--steps", type=positive_int, default=30)
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--K", type=positive_int, default=20)
    p.add_argument("--amp", choices=["none", "bf16"], default=None,
                   help="autocast dtype, on CUDA or CPU (default: bf16 on CUDA, none on CPU)")
    p.add_argument("--compile", nargs="*", choices=COMPILE_MODES, default=None,
                   help="also time the on-device path under torch.compile in these modes (--compile of the scripts; "
                        "alone: torch's default mode)")
    p.add_argument("--cuda_graph", action="store_true",
                   help="also time the on-device path with each step replayed from a CUDA graph (--cuda_graph of "
                        "experiment.py; CUDA only)")
    p.add_argument("--no_loop", action="store_true",
                   help="leave out the per-sample loop rows (the speed-up is then against the on-device row)")
    p.add_argument("--profile", type=positive_int, default=None, metavar="N",
                   help="profile N more steps of each row and print the operators that took the most time")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads of every row (default: torch's choice; 1 on a shared machine gives "
                        "steadier CPU figures)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.compile = ["default"] if args.compile == [] else (args.compile or [])
    if args.K > 1000:  # the synthetic episodes are at most 1000 steps
        raise UserError(f"invalid --K {args.K}: at most 1000 (the episode length)")
    device = bench_device(args.device)
    if args.cuda_graph and device.type != "cuda":
        raise UserError("--cuda_graph needs a CUDA device")
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    amp_dtype = torch.bfloat16 if amp == "bf16" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        gpu = torch.cuda.get_device_name(device)
        peak = peak_tflops(gpu)
        print(f"device: {gpu}, autocast {amp}, fused AdamW, TF32; MFU against "
              + (f"{peak:g} TFLOP/s (dense bf16 peak)" if peak else "no peak (GPU not listed in PEAK_TFLOPS)"))
    else:
        peak = None
        print(f"device: cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), autocast {amp}")
    # gpt2 on the CPU takes seconds a step: it times a tenth of --steps (at least 3)
    timed = {name: args.steps if name == "paper" or device.type == "cuda" else max(3, args.steps // 10)
             for name in args.configs}
    print(f"torch {torch.__version__}; batch {args.batch_size}, K {args.K}; timed steps: "
          + ", ".join(f"{name} {n}" for name, n in timed.items())
          + ("" if all(n == args.steps for n in timed.values()) else " (gpt2 on the CPU: max(3, --steps // 10))"))
    if device.type == "cuda":
        mem_head = "peak CUDA memory allocated (MiB)"
        print("peak memory: the most torch allocated on the GPU during the row's timed steps\n")
    else:
        mem_head = "peak RSS of the row's own process (MiB)"
        print("peak memory: each row runs in a fresh process; its peak resident set (torch, data, model, optimiser, "
              "steps)\n")
    trajs = synthetic_trajectories("hopper", 1_000_000)
    mfu_head = f"MFU (of {peak:g} TFLOP/s)" if peak else "MFU"
    print(f"| config | batches | timed steps | steps/s | tokens/s | {mem_head} | TFLOP/s | {mfu_head} | speed-up "
          "| last loss |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.configs:
        steps = timed[name]
        variants = [] if args.no_loop else [("per-sample loop", True, None)]
        variants += [("on-device", False, None)]
        variants += [(f"on-device, compile {mode}", False, mode) for mode in args.compile]
        variants += [(GRAPH_LABEL, False, CUDA_GRAPH)] if args.cuda_graph else []
        base = None
        for label, slow, mode in variants:  # each row printed as soon as it is measured
            sps, tps, mem, flops, loss = measure(name, trajs, device, steps, args.batch_size, args.K, slow, amp_dtype,
                                                 mode, **({"profile": args.profile} if args.profile else {}))
            base = base or sps
            mfu = f"{100 * flops / (peak * 1e12):.1f}%" if peak else "-"
            print(f"| {name} | {label} | {steps} | {sps:.2f} | {tps:,.0f} | {mem:,.0f} | {flops / 1e12:.3f} | {mfu} | "
                  f"{sps / base:.2f}x | {loss:.4f}{'' if math.isfinite(loss) else ' (not finite)'} |")


if __name__ == "__main__":
    main()
