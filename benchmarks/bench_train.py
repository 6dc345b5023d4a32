"""Training throughput: steps/s, tokens/s, peak memory and (on CUDA) MFU, fast path vs the slow path it replaces.

    python benchmarks/bench_train.py [--device cuda] [--configs paper gpt2] [--steps 50]

Fast path: batches sampled on the training device by index arithmetic, the loss reduced without host syncs, one
sync per measurement. Slow path (the originals): each batch built by a per-sample Python/numpy loop and copied
host -> device every step. Both train the same model (``paper``: 128 hidden x 3 layers x 1 head; ``gpt2``: 768 x 12 x
12, the size of the pre-training paper's runs) at batch 64, K=20, on a hopper-sized synthetic dataset. On CUDA,
``--amp bf16`` adds bf16 autocast and the optimiser is fused. ``--compile MODE ...`` adds rows for the on-device path
under ``torch.compile`` (``reduce-overhead`` replays each step as CUDA graphs on a GPU).
"""
import argparse
import os
import random
import resource
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_args import bench_device, positive_int  # noqa: E402
from bench_core import synthetic_trajectories  # noqa: E402
from decision_transformer.cli import COMPILE_MODES  # noqa: E402
from decision_transformer.data import Batch, TrajectoryDataset, state_stats  # noqa: E402
from decision_transformer.errors import UserError, cli_entry  # noqa: E402
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig  # noqa: E402
from decision_transformer.training import Trainer, make_optimizer, warmup_schedule  # noqa: E402
from test_data import reference_get_batch  # noqa: E402

CONFIGS = {"paper": dict(n_embd=128, n_layer=3, n_head=1, activation_function="relu"),
           "gpt2": dict(n_embd=768, n_layer=12, n_head=12, activation_function="gelu_new")}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def flops_per_step(model, batch_size, K):
    """6 * (non-embedding parameters) * tokens + attention scores/values (fwd + bwd)."""
    cfg = model.config.backbone
    n = sum(p.numel() for name, p in model.named_parameters() if name.startswith("transformer.h."))
    n += sum(p.numel() for name, p in model.named_parameters() if name.startswith(("embed_", "predict_")))
    tokens = batch_size * 3 * K
    attn = 6 * 2 * cfg.n_layer * batch_size * (3 * K) ** 2 * cfg.n_embd
    return 6 * n * tokens + attn


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


def measure(name, trajs, device, steps, batch_size, K, slow, amp, compile=None):
    cfg = DTConfig(11, 3, max_length=K, backbone=BackboneConfig(**CONFIGS[name]))
    model = DecisionTransformer(cfg, seed=0).to(device)
    fused = device.type == "cuda"
    opt = make_optimizer(model, lr=1e-4, weight_decay=1e-4, fused=fused)
    ds = SlowSampler(trajs, device) if slow else TrajectoryDataset(trajs, "hopper", device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    trainer = Trainer(model, opt, warmup_schedule(opt, 100), ds, batch_size=batch_size, K=K, generator=gen,
                      amp_dtype=amp, compile=compile)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3 if compile is None else 10):  # compiling (and recording CUDA graphs) is not timed
        trainer.train_step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync()
    dt = time.perf_counter() - start
    sps = steps / dt
    mem = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return sps, sps * batch_size * 3 * K, mem, flops_per_step(model, batch_size, K) * sps


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
    p.add_argument("--compile", nargs="*", choices=COMPILE_MODES, default=[],
                   help="also time the on-device path under torch.compile in these modes (--compile of the scripts)")
    args = p.parse_args(argv)
    if args.K > 1000:  # the synthetic episodes are at most 1000 steps
        raise UserError(f"invalid --K {args.K}: at most 1000 (the episode length)")
    device = bench_device(args.device)
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    amp_dtype = torch.bfloat16 if amp == "bf16" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        gpu = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in gpu), None)
        print(f"device: {gpu}, autocast {amp}, fused AdamW, TF32")
    else:
        peak = None
        print(f"device: cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), autocast {amp}")
    print(f"torch {torch.__version__}; batch {args.batch_size}, K {args.K}, {args.steps} timed steps\n")
    trajs = synthetic_trajectories("hopper", 1_000_000)
    print("| config | batches | steps/s | tokens/s | peak memory (MiB) | TFLOP/s | MFU | speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.configs:
        steps = args.steps if name == "paper" or device.type == "cuda" else max(3, args.steps // 10)
        variants = [("per-sample loop", True, None), ("on-device", False, None)]
        variants += [(f"on-device, compile {mode}", False, mode) for mode in args.compile]
        rows = {label: measure(name, trajs, device, steps, args.batch_size, args.K, slow, amp_dtype, mode)
                for label, slow, mode in variants}
        base = rows["per-sample loop"][0]
        for label, (sps, tps, mem, flops) in rows.items():
            mfu = f"{100 * flops / (peak * 1e12):.1f}%" if peak else "-"
            print(f"| {name} | {label} | {sps:.2f} | {tps:,.0f} | {mem:,.0f} | {flops / 1e12:.3f} | {mfu} | "
                  f"{sps / base:.2f}x |")


if __name__ == "__main__":
    main()
