"""Section 5.3: how far fine-tuning moves the parameters (Figures 3 and 4).

For every named ``transformer.h`` tensor of a model, θ₀ (epoch1, default the initial weights) and θ_T (epoch2):
l2 = ||θ_T - θ₀||₂ and cos = <θ₀, θ_T> / (||θ₀|| ||θ_T||), per tensor as TAKAGI's code and figures
(ln_1.w, ln_1.b, c_attn.w, c_attn.b, attn.c_proj.w, attn.c_proj.b, ln_2.w, ln_2.b, c_fc.w, c_fc.b, mlp.c_proj.w,
mlp.c_proj.b per block). ``--concat`` concatenates each block's tensors into one vector (the paper's wording).
TAKAGI added 1e-6 to the cosine's denominator, which pulls the cosine of a small tensor towards 0 (``--eps 1e-6``
reproduces it).
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from decision_transformer.analysis import common
from decision_transformer.analysis.runs import RunKey, checkpoint_path, load_state_dict, require_checkpoints
from decision_transformer.errors import UserError

H_PREFIX = "transformer.h."
#: the original's additive term in the cosine's denominator (``--eps`` reproduces it)
TAKAGI_COS_EPS = 1e-6
_BUFFERS = (".attn.bias", ".attn.masked_bias")


def block_tensors(state_dict: dict) -> dict[str, torch.Tensor]:
    """The floating-point ``transformer.h`` tensors, names without the prefix, in state-dict (block) order."""
    return {k[len(H_PREFIX):]: v for k, v in state_dict.items()
            if k.startswith(H_PREFIX) and not k.endswith(_BUFFERS) and torch.is_floating_point(v)}


def parameter_similarity(sd0: dict, sd1: dict, concat: bool = False, eps: float = 0.0,
                         sources: tuple = ("the first checkpoint", "the second checkpoint")
                         ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names, l2 distances, cosines), per tensor or (``concat``) per block. The cosine divides by the norms' product
    plus ``eps`` (0: the plain cosine, whatever the tensor's scale; a zero tensor's cosine is 0). ``sources``: the
    two state dicts' files, which an error names."""
    for sd, source in zip((sd0, sd1), sources):
        odd = next((k for k, v in sd.items() if k.startswith(H_PREFIX) and not k.endswith(_BUFFERS)
                    and isinstance(v, torch.Tensor) and not torch.is_floating_point(v)), None)
        if odd is not None:
            raise UserError(f"{source}: {odd} holds {str(sd[odd].dtype).replace('torch.', '')} numbers, not floating "
                            f"point ones (a damaged or converted checkpoint)")
    t0, t1 = block_tensors(sd0), block_tensors(sd1)
    if set(t0) != set(t1):   # (the same tensors in another order compare by name)
        k, i = next((k, i) for i, (a, b) in enumerate(((t0, t1), (t1, t0))) for k in a if k not in b)
        raise UserError(f"{sources[i]} has {H_PREFIX}{k}, which {sources[1 - i]} lacks: the two are not the same "
                        f"model at two epochs")
    names, dist, cos = [], [], []
    for g, ks in _groups(t0, concat).items():
        a = torch.cat([t0[k].reshape(-1).to(torch.float64) for k in ks])
        b = torch.cat([t1[k].reshape(-1).to(torch.float64) for k in ks])
        if a.shape != b.shape:
            raise UserError(f"transformer.h.{ks[0]} has different shapes in the two checkpoints")
        names.append(f"block {g}" if concat else g)
        dist.append(float(torch.linalg.norm(b - a)))
        prod = float(torch.linalg.norm(a) * torch.linalg.norm(b)) + eps
        cos.append(float(a @ b) / prod if prod > 0 else 0.0)
    return names, np.array(dist), np.array(cos)


def _groups(tensors: dict, concat: bool) -> dict[str, list[str]]:
    """The tensor names of each compared vector: one per tensor, or (``concat``) all of a block's."""
    groups: dict[str, list[str]] = {}
    for k in tensors:
        groups.setdefault(k.split(".", 1)[0] if concat else k, []).append(k)
    return groups


def starts_at_zero(sd0: dict, concat: bool = False) -> np.ndarray:
    """Per entry of :func:`parameter_similarity`, whether θ₀ is all zeros (a zero-initialised bias): its cosine is 0 by
    definition, not a measured change of direction."""
    t0 = block_tensors(sd0)
    return np.array([all(not bool(t0[k].any()) for k in ks) for ks in _groups(t0, concat).values()], dtype=bool)


def _cosine_summary(names: list[str], cos: np.ndarray, measured: np.ndarray) -> tuple[str, str]:
    """(mean cosine, min cosine with its tensor) over the ``measured`` entries: "n/a" where none is."""
    if not measured.any():
        return "n/a", "n/a"
    idx = np.flatnonzero(measured)
    low = idx[int(cos[idx].argmin())]
    return f"{cos[idx].mean():.4f}", f"{cos[low]:.4f} ({names[low]})"


def build_parser():
    """The command-line parser of the parameter-similarity script (Figures 3 and 4)."""
    p = common.parser("Figures 3 and 4: per-tensor L2 distance and cosine similarity between two epochs.")
    # The original parameter_similarity_analysis.py's spellings: -plm/--path_to_load_model, -psr, -psf.
    common.add_checkpoint_flags(p, plm_alias=True, aliases=("--path_to_load_model",))
    p.add_argument("--model_name_list", nargs="+", default=list(common.MODEL_NAMES))
    p.add_argument("--env_name", type=str, default="hopper")
    p.add_argument("--seed", type=int, default=666)
    p.add_argument("--epoch1", type=int, default=0)
    p.add_argument("--epoch2", type=int, default=40)
    p.add_argument("--concat", action="store_true", help="one value per block (all its tensors concatenated)")
    p.add_argument("--eps", type=float, default=0.0,
                   help=f"added to the cosine's denominator (TAKAGI: {TAKAGI_COS_EPS}; it pulls the cosines of small "
                        f"tensors towards 0; other than 0: results tagged _eps{{eps}})")
    p.add_argument("--distance_ylim", choices=["paper", "auto"], default="paper",
                   help="L2-distance axis: paper = 0 to at least 80, as the originals (paper-size models); auto = "
                        "0 to the largest distance (small models, whose bars are flat on 0-80)")
    common.add_run_k_flag(p)
    common.add_output_flags(p, "params", results_aliases=("--path_to_save_result", "-psr"),
                            figs_aliases=("--path_to_save_figure", "-psf"))
    return p


def run(args) -> common.Outputs:
    """Figures 3 and 4: per model, the L2 distance and cosine between ``--epoch1`` and ``--epoch2`` of every
    ``transformer.h`` tensor (or block with ``--concat``), saved as arrays, CSVs, bar charts and a table."""
    common.check_seeds(args, "seed")
    common.check_min(args, 0, "epoch1", "epoch2")
    common.check_numbers(args, eps=common.NON_NEGATIVE)
    run_K = common.run_k(args)
    res = common.out_dir(args.results_dir)
    outs = common.Outputs()
    tag = common.run_k_tag(run_K) + ("_concat" if args.concat else "") + (f"_eps{args.eps:g}" if args.eps else "")
    env, ds = args.env_name, args.dataset_name
    results = {}
    require_checkpoints(args.checkpoint_dir, [(RunKey(m, ds, env, args.seed, run_K), e)
                                              for m in args.model_name_list for e in (args.epoch1, args.epoch2)])
    for m in args.model_name_list:
        key = RunKey(m, ds, env, args.seed, run_K)
        sd0, _ = load_state_dict(args.checkpoint_dir, key, args.epoch1)
        sd1, _ = load_state_dict(args.checkpoint_dir, key, args.epoch2)
        names, dist, cos = parameter_similarity(sd0, sd1, args.concat, args.eps,
                                                sources=tuple(checkpoint_path(args.checkpoint_dir, key, e)
                                                              for e in (args.epoch1, args.epoch2)))
        measured = ~starts_at_zero(sd0, args.concat)
        results[m] = (names, dist, cos, measured)
        base = f"{args.epoch1}_{args.epoch2}_{m}_{env}_{ds}_{args.seed}{tag}"
        outs.files.append(common.save_npy(res / f"paramdist_{base}.npy", dist))
        outs.files.append(common.save_npy(res / f"paramcos_{base}.npy", cos))
        outs.files.append(common.save_csv(res / f"paramsim_{base}.csv", ["tensor", "l2", "cosine"],
                                          [[n, d, c] for n, d, c in zip(names, dist, cos)]))
        unit = "blocks" if args.concat else "tensors"
        print(f"{m}: mean l2 {dist.mean():.4f} over {len(names)} {unit}, mean cosine "
              f"{_cosine_summary(names, cos, measured)[0]} over the {int(measured.sum())} that do not start at zero",
              file=sys.stderr)
        if not measured.all():
            outs.notes.append(f"{m}: {int((~measured).sum())} of {len(names)} {unit} start at zero (zero-initialised "
                              f"biases; e.g. {names[int(np.argmin(measured))]}): their cosine is 0 by definition and is "
                              f"left out of the mean and min cosine")
    plt = common.pyplot()
    top = 1.05 * max(float(np.max(x[1])) for x in results.values())
    if getattr(args, "distance_ylim", "paper") == "paper" and not args.concat and top < 0.8:
        outs.notes.append(f"{env}: the largest distance, {top / 1.05:.3g}, is under 1% of the 0-80 axis, where its bars "
                          f"look flat; --distance_ylim auto fits the axis to the data")
    for what, idx, ylabel in (("paramdist", 1, "L2 distance"), ("paramcos", 2, "cosine similarity")):
        fig, axes = plt.subplots(len(results), 1, figsize=(10, 1.9 * len(results)), squeeze=False)
        colors = common.model_colors(list(results))
        for ax, (m, r) in zip(axes[:, 0], results.items()):
            names, vals = r[0], r[idx]
            ax.bar(np.arange(len(vals)), vals, width=0.9 if args.concat else 1.0, color=colors[m])
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(common.model_label(m), fontsize=9)
            if idx == 2:   # the originals' 0-1, lowered to show a negative cosine
                ax.set_ylim(min(0.0, min(float(np.min(x[2])) for x in results.values()) - 0.05), 1.02)
            else:  # one scale for every row; per tensor at least the originals' 0-80 unless auto
                floor = 80.0 if getattr(args, "distance_ylim", "paper") == "paper" and not args.concat else 0.0
                ax.set_ylim(0, max(floor, top) or 1.0)
            if args.concat:
                ax.set_xticks(np.arange(len(names)), [n.split()[-1] for n in names])
            else:
                starts = [i for i, n in enumerate(names) if n.endswith("ln_1.weight")]
                ax.set_xticks(starts, [names[i].split(".")[0] for i in starts], fontsize=7)
        axes[-1, 0].set_xlabel("block" + ("" if args.concat else " (bars: its tensors in order)"))
        fig.tight_layout()
        auto = "_auto" if what == "paramdist" and getattr(args, "distance_ylim", "paper") == "auto" else ""
        stem = f"{what}_{args.epoch1}_{args.epoch2}_{'_'.join(results)}_{env}_{ds}_{args.seed}{tag}{auto}"
        outs.figures.append(common.save_figure(fig, args.figs_dir, stem))
    rows = [[common.model_label(m), f"{r[1].mean():.4f}", f"{r[1].max():.4f} ({r[0][int(r[1].argmax())]})",
             *_cosine_summary(*r[0:1], r[2], r[3])] for m, r in results.items()]
    outs.tables.append((f"Parameter change {env}, epoch {args.epoch1} vs {args.epoch2}",
                        common.markdown_table(["model", "mean L2", "max L2", "mean cosine", "min cosine"], rows)))
    return outs
