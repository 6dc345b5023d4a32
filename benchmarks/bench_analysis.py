"""Fisher estimation, per-sample gradients and CKA: the vectorised paths against the loops they replace.

    python benchmarks/bench_analysis.py [--device cuda] [--windows 128]

* Fisher (per-example empirical, ``--fisher_type empirical``): ``torch.func`` vmap(grad) over windows vs one
  forward/backward per window;
* per-sample gradients of the gradient-confusion analysis: vmap(grad) vs a per-sample backward loop;
* CKA between every pair of hooked layers of two models (27 x 27 for 3 blocks): one centred Gram per layer and one
  matrix product vs recomputing both Grams for every pair (the original notebook's loop); on the CPU whatever
  ``--device``, as the CKA analysis computes it (from activations moved to the host);
* MINE: ``--mine_estimates`` estimates of ``run_mi_exp.py``'s shapes (100 pairs of x in R^1, R^11 or R^3 and a
  128-wide activation; the 3x400 statistics network; ``--mine_iters`` passes of 2 minibatches of 50) trained as one
  batched ensemble (``estimate_mi_many``) vs one by one (``estimate_mi``); the largest difference between the two
  paths' estimates is printed below the table.
Model: the paper's DT (128 hidden, 3 layers, 1 head), K=20, hopper dims. Each row is printed as soon as it is measured.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

import torch  # noqa: E402

from bench_args import bench_device, positive_int  # noqa: E402
from bench_core import synthetic_trajectories  # noqa: E402
from decision_transformer.analysis.cka import cka_matrix, linear_cka  # noqa: E402
from decision_transformer.analysis.grads import per_sample_grads  # noqa: E402
from decision_transformer.analysis.mine import estimate_mi, estimate_mi_many  # noqa: E402
from decision_transformer.data import TrajectoryDataset  # noqa: E402
from decision_transformer.errors import UserError, cli_entry  # noqa: E402
from decision_transformer.fisher import fisher_empirical  # noqa: E402
from decision_transformer.models import DecisionTransformer, DTConfig  # noqa: E402
from decision_transformer.training import masked_action_mse  # noqa: E402


def timed(fn, sync):
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--windows", type=positive_int, default=64)
    p.add_argument("--cka_examples", type=positive_int, default=500)
    p.add_argument("--mine_estimates", type=positive_int, default=16,
                   help="MINE estimates (118 = one block of run_mi_exp.py --exp_type normal at K=20)")
    p.add_argument("--mine_iters", type=positive_int, default=3, help="MINE passes over the 100 pairs per estimate")
    args = p.parse_args(argv)
    if args.cka_examples < 4:
        raise UserError(f"invalid --cka_examples {args.cka_examples}: debiased CKA needs at least 4 examples")
    device = bench_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device: {device}; torch {torch.__version__}; {args.windows} windows, K=20, DT 128x3\n")
    ds = TrajectoryDataset(synthetic_trajectories("hopper", 100_000), "hopper", device=device)
    batch = ds.sample_batch(args.windows, 20, torch.Generator(device=device).manual_seed(0))
    model = DecisionTransformer(DTConfig(11, 3), seed=0).to(device).eval()
    h_params = [(n, p) for n, p in model.named_parameters() if "transformer.h" in n]

    def fisher_loop():
        acc = {n: torch.zeros_like(p) for n, p in h_params}
        for i in range(args.windows):
            model.zero_grad(set_to_none=True)
            sl = slice(i, i + 1)
            out = model(batch.states[sl], batch.actions[sl], batch.rtg[sl, :-1], batch.timesteps[sl],
                        attention_mask=batch.mask[sl])
            (((out.action_preds - batch.actions[sl]) ** 2) * batch.mask[sl, :, None]).sum().backward()
            for n, p in h_params:
                acc[n] += p.grad ** 2
        return acc

    def grads_loop():
        model.train()
        out_g = []
        for i in range(args.windows):
            model.zero_grad(set_to_none=True)
            sl = slice(i, i + 1)
            out = model(batch.states[sl], batch.actions[sl], batch.rtg[sl, :-1], batch.timesteps[sl],
                        attention_mask=batch.mask[sl])
            masked_action_mse(out.action_preds, batch.actions[sl], batch.mask[sl]).backward()
            out_g.append(torch.cat([p.grad.flatten() for _, p in h_params]))
        return torch.stack(out_g)

    names = [n for n, _ in h_params]
    print("| analysis | loop (s) | vectorised (s) | speed-up |")
    print("|---|---:|---:|---:|")

    def row(name, a, b):
        print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.1f}x |", flush=True)

    t_loop, _ = timed(fisher_loop, sync)
    t_fast, _ = timed(lambda: fisher_empirical(model, [batch]), sync)
    row("empirical Fisher", t_loop, t_fast)
    t_loop, _ = timed(grads_loop, sync)
    t_fast, _ = timed(lambda: per_sample_grads(model, batch, names), sync)
    row("per-sample gradients", t_loop, t_fast)

    # CKA runs on the CPU whatever --device: the analysis computes it from activations it has moved to the host
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(args.cka_examples, 128, generator=g) for _ in range(27)]
    t_loop, _ = timed(lambda: [[linear_cka(a, b, debiased=True) for b in feats] for a in feats], lambda: None)
    t_fast, _ = timed(lambda: cka_matrix(feats, feats), lambda: None)
    row(f"CKA 27x27 layers, {args.cka_examples} examples (CPU)", t_loop, t_fast)

    n_est = args.mine_estimates
    pairs = [(torch.randn(100, (1, 11, 3)[i % 3], generator=g), torch.randn(100, 128, generator=g))
             for i in range(n_est)]
    mine_kw = {"iters": args.mine_iters, "device": device}
    t_loop, one_by_one = timed(lambda: [estimate_mi(x, y, seed=i, **mine_kw) for i, (x, y) in enumerate(pairs)], sync)
    t_fast, together = timed(lambda: estimate_mi_many(pairs, list(range(n_est)), **mine_kw), sync)
    row(f"MINE, {n_est} estimates x {args.mine_iters} passes", t_loop, t_fast)
    gap = max(abs(a - b) for a, b in zip(one_by_one, together))
    print(f"\nMINE: largest difference between the ensemble's and the one-by-one estimates {gap:.2e} nats")

if __name__ == "__main__":
    main()
