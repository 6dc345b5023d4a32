"""The fast path's numerics against the fp32 path: fused AdamW, TF32, bf16 autocast and torch.compile.

    python benchmarks/check_precision.py [--device cuda] [--config paper|gpt2] [--steps 200]

Every variant trains the same model from the same initial weights on the same batches (dropout off, so that the
variants consume no random numbers of their own) and is compared with plain fp32 training (unfused AdamW, no TF32, no
autocast, eager):

* ``loss``: the largest relative difference of a step's loss over the run;
* ``drift``: ||(w_variant - w_init) - (w_fp32 - w_init)|| / ||w_fp32 - w_init||, how far the weights moved apart
  relative to how far training moved them (each run from its own initial weights);
* ``action``: the largest absolute difference of the trained models' action predictions on a held-out batch.

A first row, not judged, gives the floor: the reference run again from initial weights perturbed by one float32
rounding (a relative 2^-24), which shows how far rounding alone takes two fp32 runs apart in these steps (at GPT-2
size more than the tolerances, which were set at the paper config); after the bf16 row, the same for bf16: two bf16
runs from weights 2^-24 apart, so that a bf16 difference from fp32 can be set against bf16's own spread. On CUDA
``cuda graph fp32`` (``--cuda_graph`` alone) is compared with the eager run of the same arithmetic (fused AdamW,
fp32), and ``cuda graph`` with the rest of the fast path (bf16, TF32) with the reference.

Prints a table with the tolerance of each variant and exits 1 when one is exceeded. TF32 applies on CUDA only;
``compile`` needs a working C++ compiler (inductor) and is skipped with ``--no_compile``; on CUDA
``compile reduce-overhead`` (CUDA graphs, the training scripts' ``--compile reduce-overhead``) is checked too, with
the tolerances of ``compile``.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

import torch  # noqa: E402

from bench_args import bench_device, positive_int  # noqa: E402
from decision_transformer.data import TrajectoryDataset  # noqa: E402
from decision_transformer.errors import UserError, cli_entry  # noqa: E402
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig  # noqa: E402
from decision_transformer.run import native_bf16  # noqa: E402
from decision_transformer.training import Trainer, make_optimizer, warmup_schedule  # noqa: E402

CONFIGS = {"tiny": dict(n_embd=32, n_layer=1, n_head=1, activation_function="relu"),
           "paper": dict(n_embd=128, n_layer=3, n_head=1, activation_function="relu"),
           "gpt2": dict(n_embd=768, n_layer=12, n_head=12, activation_function="gelu_new")}

#: (loss, drift, action) tolerances. fp32 reorderings (fused AdamW) stay near rounding; TF32 keeps 10 mantissa
#: bits and bf16 7, so their runs drift apart by more while training the same way.
TOLERANCES = {"fused": (1e-4, 1e-3, 1e-4), "tf32": (1e-2, 5e-2, 1e-2), "bf16": (5e-2, 0.25, 5e-2),
              "compile": (5e-2, 0.25, 5e-2), "compile reduce-overhead": (5e-2, 0.25, 5e-2),
              "cuda graph fp32": (1e-4, 1e-3, 1e-4), "cuda graph": (5e-2, 0.25, 5e-2)}


def train_variant(trajs, device, config: str, steps: int, *, fused=False, tf32=False, amp=None, compile=False,
                  cuda_graph=False, batch_size=64, K=20, seed=0, perturb=0.0):
    """(per-step losses [steps], final state dict, initial state dict, action predictions on a held-out batch)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    cfg = DTConfig(11, 3, max_length=K, backbone=BackboneConfig(**CONFIGS[config], resid_pdrop=0.0, embd_pdrop=0.0,
                                                                 attn_pdrop=0.0))
    model = DecisionTransformer(cfg, seed=seed).to(device)
    if perturb:   # the floor row: every initial weight times (1 + perturb * N(0, 1))
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + perturb * torch.randn(p.shape, generator=g).to(device))
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, lr=1e-4, weight_decay=1e-4, fused=fused)
    data = TrajectoryDataset(trajs, "hopper", device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    trainer = Trainer(model, opt, warmup_schedule(opt, 10), data, batch_size=batch_size, K=K, generator=gen,
                      amp_dtype=amp, compile=compile, cuda_graph=cuda_graph)
    losses = torch.stack([trainer.train_step() for _ in range(steps)]).float().cpu()
    if cuda_graph and (trainer.graph.graph is None or trainer.graph.failed):   # (its rows would be eager training)
        why = "fell back to plain steps" if trainer.graph.failed else "never captured its graph (too few --steps)"
        raise UserError(f"the --cuda_graph variant {why}: nothing of the graph would be checked")
    held_out = data.sample_batch(batch_size, K, torch.Generator(device=device).manual_seed(seed + 1))
    model.eval()
    with torch.no_grad():
        preds = model(held_out.states, held_out.actions, held_out.rtg[:, :-1], held_out.timesteps,
                      attention_mask=held_out.mask).action_preds.float().cpu()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return losses, {k: v.detach().float().cpu() for k, v in model.state_dict().items()}, \
        {k: v.float().cpu() for k, v in init.items()}, preds


def compare(ref, other) -> tuple[float, float, float]:
    """(loss, drift, action) differences of ``other`` from ``ref`` (outputs of ``train_variant``)."""
    l0, w0, init, p0 = ref
    l1, w1, init1, p1 = other
    loss = float(((l1 - l0).abs() / l0.abs().clamp_min(1e-12)).max())
    # (how each run moved from its own initial weights: the floor row starts from perturbed ones)
    num = sum(float(((w1[k] - init1[k] - (w0[k] - init[k])) ** 2).sum()) for k in w0)
    den = sum(float(((w0[k] - init[k]) ** 2).sum()) for k in w0)
    drift = (num / max(den, 1e-30)) ** 0.5
    return loss, drift, float((p1 - p0).abs().max())


def variants(device: torch.device, no_compile: bool) -> dict[str, dict]:
    cuda = device.type == "cuda"
    bf16 = torch.bfloat16 if (not cuda or native_bf16(device)) else None
    out = {"fused": dict(fused=True)}
    if cuda:
        out["tf32"] = dict(tf32=True)
    if bf16 is not None:
        out["bf16"] = dict(amp=bf16, fused=True, tf32=cuda)
    if not no_compile:
        out["compile"] = dict(compile=True, fused=True, tf32=cuda, amp=bf16 if cuda else None)
        if cuda:  # the training scripts' --compile reduce-overhead: each step replayed as CUDA graphs
            out["compile reduce-overhead"] = dict(compile="reduce-overhead", fused=True, tf32=True, amp=bf16)
    if cuda:  # --cuda_graph: alone (fp32 arithmetic, so the fused tolerances), and with the rest of the fast path
        out["cuda graph fp32"] = dict(cuda_graph=True, fused=True)
        if bf16 is not None:
            out["cuda graph"] = dict(cuda_graph=True, fused=True, tf32=True, amp=bf16)
    return out


@cli_entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="paper", choices=list(CONFIGS))
    p.add_argument("--steps", type=positive_int, default=200)
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--no_compile", action="store_true",
                   help="leave out the torch.compile variants (default mode; reduce-overhead, on CUDA)")
    args = p.parse_args(argv)
    device = bench_device(args.device, cpu_fallback=False)  # a GPU check that ran on the CPU would mislead
    from bench_core import synthetic_trajectories

    trajs = synthetic_trajectories("hopper", 200_000)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; config {args.config}, batch {args.batch_size}, K 20, "
          f"{args.steps} steps; reference: fp32, unfused AdamW, eager\n")
    ref = train_variant(trajs, device, args.config, args.steps, batch_size=args.batch_size)
    print(f"reference final loss {float(ref[0][-1]):.5f}\n")
    print("| variant | loss (max rel.) | weight drift | action (max abs.) | tolerances | result |")
    print("|---|---:|---:|---:|---|---|")
    # how far rounding alone takes two fp32 runs apart in these steps: the reference from weights perturbed by one
    # float32 rounding (2^-24); shown, not judged
    floor = compare(ref, train_variant(trajs, device, args.config, args.steps, batch_size=args.batch_size,
                                       perturb=2.0 ** -24))
    print(f"| fp32 floor (weights perturbed by 2^-24) | {floor[0]:.2e} | {floor[1]:.2e} | {floor[2]:.2e} | - | - |")
    failed, runs = False, {}
    for name, kw in variants(device, args.no_compile).items():
        runs[name] = train_variant(trajs, device, args.config, args.steps, batch_size=args.batch_size, **kw)
        # --cuda_graph alone against the eager run of the same arithmetic (fused AdamW, fp32): it replays that step
        got = compare(runs["fused"] if name == "cuda graph fp32" else ref, runs[name])
        tol = TOLERANCES[name]
        ok = all(g <= t for g, t in zip(got, tol))
        failed |= not ok
        label = name + (" (" + ", ".join(k for k, v in kw.items() if v and k != "compile") + ")"
                        if name.startswith(("bf16", "compile", "cuda graph (")) or name == "cuda graph" else "")
        label += " (against fused)" if name == "cuda graph fp32" else ""
        print(f"| {label} | {got[0]:.2e} | {got[1]:.2e} | {got[2]:.2e} | {tol[0]:g} / {tol[1]:g} / {tol[2]:g} | "
              f"{'ok' if ok else 'EXCEEDED'} |")
        if name == "bf16":   # bf16's own floor: two bf16 runs from weights 2^-24 apart; shown, not judged
            bf = compare(runs[name], train_variant(trajs, device, args.config, args.steps, batch_size=args.batch_size,
                                                   perturb=2.0 ** -24, **kw))
            print(f"| bf16 floor (against bf16, weights perturbed by 2^-24) | {bf[0]:.2e} | {bf[1]:.2e} | "
                  f"{bf[2]:.2e} | - | - |")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
