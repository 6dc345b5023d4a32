"""Section 5.6.2: how far back the attention looks, and how much fine-tuning changes that (Figure 10).

Project default (the paper's method, Appendix I.2): the **K = 1** checkpoints fed K = 20 contexts; the model's own
attention probabilities per block and head (causal and padding masks applied before the softmax, scale 1/√d_head).
For head h of block l and sample n:

    d = (1/|Q|) Σ_{q ∈ Q} Σ_{k ≤ q} A_qk |q - k|,   Q = the sample's unpadded query tokens,

in tokens (``--distance_unit timestep``: |⌊q/3⌋ - ⌊k/3⌋|). The gap is |d(epoch2) - d(epoch1)| per (n, l, h).

``--legacy`` reproduces TAKAGI's computation: the hooked ``attn.c_attn`` output split into Q and K over the whole
hidden size (one head, 1/√D), softmax over all T keys *before* the causal cut (rows no longer sum to 1), no padding
mask, d = (1/T²) Σ_ij W_ij |i - j|; with the K = 20 checkpoints it loaded.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import torch

from decision_transformer.analysis import common
from decision_transformer.analysis.activations import get_activations
from decision_transformer.analysis.runs import (
    RunKey,
    SharedDataset,
    analysis_batch,
    batch_for,
    checkpoint_path,
    envs_with_runs,
    load_model,
    model_inputs,
    require_checkpoints,
)
from decision_transformer.errors import UserError
from decision_transformer.training.trainer import module_mode

UNITS = ("token", "timestep")


def distance_matrix(T: int, unit: str = "token", device=None) -> torch.Tensor:
    """[T, T] |q - k| in tokens, or in timesteps (three tokens per timestep)."""
    if unit not in UNITS:
        raise UserError(f"unknown --distance_unit {unit!r}; choose token or timestep")
    i = torch.arange(T, device=device)
    if unit == "timestep":
        i = torch.div(i, 3, rounding_mode="floor")
    return (i[:, None] - i[None, :]).abs().to(torch.float64)


def attention_distance(probs: torch.Tensor, token_mask: torch.Tensor | None = None, unit: str = "token") -> torch.Tensor:
    """probs [B, H, T, T] (rows = queries) -> [B, H] mean attention distance over the unpadded queries.

    Only keys k ≤ q count (the model's causal mask already gives the others ~0 weight)."""
    B, _, T, _ = probs.shape
    dist = distance_matrix(T, unit, probs.device).tril()                     # [T, T], zero above the diagonal
    per_query = (probs.to(torch.float64) * dist).sum(-1)                    # [B, H, T]
    if token_mask is None:
        token_mask = torch.ones(B, T, device=probs.device)
    w = token_mask.to(torch.float64)[:, None, :]                            # [B, 1, T]
    return (per_query * w).sum(-1) / w.sum(-1).clamp(min=1)


def legacy_attention_distance(c_attn_out: torch.Tensor, unit: str = "token") -> torch.Tensor:
    """TAKAGI: c_attn output [B, T, 3D] -> [B]: W = tril(softmax(Q Kᵀ / √D)), d = Σ W_ij |i - j| / T², with |i - j|
    in tokens (the original) or in timesteps."""
    _, T, D3 = c_attn_out.shape
    D = D3 // 3
    q, k = c_attn_out[..., :D].to(torch.float64), c_attn_out[..., D:2 * D].to(torch.float64)
    w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D), dim=-1).tril()
    return (w * distance_matrix(T, unit, c_attn_out.device)).sum((1, 2)) / T ** 2


@torch.no_grad()
def model_attention_distances(model, batch, unit: str = "token", legacy: bool = False) -> np.ndarray:
    """[B, blocks, heads] (legacy: heads = 1) attention distances of one batch, in eval mode (the model is left in
    the mode it was in)."""
    batch = batch_for(model, batch, "model_attention_distances")
    if legacy:
        acts = get_activations(model, batch, entries=("attn.c_attn",))
        return torch.stack([legacy_attention_distance(v, unit) for v in acts.values()],
                           dim=1)[:, :, None].cpu().numpy()
    s, a, r, t, m = model_inputs(batch)
    with module_mode(model, False):
        out = model(s, a, r, t, attention_mask=m, output_attentions=True)
    if not out.attentions or any(x is None for x in out.attentions):
        raise UserError("the model returned no attention probabilities (blocks without attention?)")
    token_mask = m.repeat_interleave(3, dim=1)                              # [B, 3K]
    return torch.stack([attention_distance(p, token_mask, unit) for p in out.attentions], dim=1).cpu().numpy()


# ---- the script -------------------------------------------------------------------------------------------------

def build_parser():
    """The command-line parser of the attention-distance script (Figure 10)."""
    p = common.parser("Figure 10: change of the attention distance per block between two epochs.")
    # Path flags and --env_name_list also take the original compute_attention_distance.py's spellings.
    common.add_checkpoint_flags(p, aliases=("--path_to_load_model",))
    p.add_argument("--env_name_list", "--env_name", dest="env_name_list", nargs="+", default=list(common.ENV_NAMES))
    p.add_argument("--model_name_list", nargs="+", default=["gpt2", "dt"])
    p.add_argument("--seed", type=int, default=666)
    p.add_argument("--epoch1", type=int, default=0)
    p.add_argument("--epoch2", type=int, default=4)
    p.add_argument("--run_K", "--K_ckpt", dest="K_ckpt", type=int, default=None,
                   help="load the runs trained with this K (folders ..._K{K}; default 1, the paper; 20 with --legacy, "
                        "the code); --K is the analysis batch's context")
    p.add_argument("--distance_unit", choices=UNITS, default="token")
    p.add_argument("--legacy", action="store_true", help="TAKAGI's computation (see the module docstring)")
    common.add_data_flags(p, device_default="cpu", data_aliases=("--path_to_load_data",))
    common.add_output_flags(p, "attention", results_aliases=("--path_to_save_att_dist_diff",),
                            figs_aliases=("--path_to_save_figure",))
    return p


def run(args) -> common.Outputs:
    """Save each model's per-block attention distances at ``--epoch1`` and ``--epoch2`` and their gap
    [B, blocks, heads] per env, with a box plot and a table of the head-averaged gap per block."""
    common.check_data_flags(args)
    common.check_seeds(args, "seed")
    common.check_min(args, 0, "epoch1", "epoch2")
    device = common.resolve_device(args.device, getattr(args, "threads", "auto"))
    K_ckpt = args.K_ckpt if args.K_ckpt is not None else (20 if args.legacy else 1)
    if K_ckpt < 1:
        raise UserError(f"invalid --run_K {K_ckpt}: the runs' context length is a positive integer")
    outs = common.Outputs()
    envs = envs_with_runs(args.checkpoint_dir, args.env_name_list, outs.notes)
    common.check_env_datasets(args, envs)
    res = common.out_dir(args.results_dir)
    # the runs' K, the variants, then a non-default analysis batch (_bs{n}, _ctx{k}, _bseed{n})
    tag = f"_K{K_ckpt}" + ("_legacy" if args.legacy else "") \
        + ("_timestep" if args.distance_unit == "timestep" else "") \
        + common.batch_tag(args.K, args.batch_seed, args.batch_size, common.DEFAULT_BATCH_SIZE)
    plt = common.pyplot()
    require_checkpoints(args.checkpoint_dir, [(RunKey(m, args.dataset_name, env, args.seed, K_ckpt), e)
                                              for env in envs for m in args.model_name_list
                                              for e in (args.epoch1, args.epoch2)])   # (before any file is written)
    datasets = SharedDataset(args.dataset_name, args.data_path, device, outs.notes)   # every model: the same batch
    for env in envs:
        gaps = {}
        for m in args.model_name_list:
            key = RunKey(m, args.dataset_name, env, args.seed, K_ckpt)
            dists = []
            for e in (args.epoch1, args.epoch2):
                lm = load_model(args.checkpoint_dir, key, e, device)
                data = datasets.get(env, lm)
                batch = analysis_batch(data, args.batch_size, args.K, args.batch_seed)
                d = model_attention_distances(lm.model, batch, args.distance_unit, args.legacy)
                if not np.isfinite(d).all():
                    raise UserError(f"{lm.path}: the attention distances are not finite (the model's forward pass "
                                    f"overflows)")
                dists.append(d)
            # both epochs before anything is written: a checkpoint copied in from a run of another size has other
            # blocks or heads, and no per-block gap (numpy would fail to broadcast, after the first file was saved)
            if dists[0].shape[1:] != dists[1].shape[1:]:
                p1, p2 = (checkpoint_path(args.checkpoint_dir, key, e) for e in (args.epoch1, args.epoch2))
                size = [f"{d.shape[1]} blocks" + ("" if args.legacy else f" x {d.shape[2]} heads") for d in dists]
                raise UserError(f"{p1} has {size[0]} but {p2} has {size[1]}: two checkpoints of one run are one model "
                                f"(one was copied in from another run?)")
            for e, d in zip((args.epoch1, args.epoch2), dists):
                outs.files.append(common.save_npy(
                    res / f"att_dist_{e}_{m}_{env}_{args.dataset_name}_{args.seed}{tag}.npy", d))
            gap = np.abs(dists[1] - dists[0])                                  # [B, blocks, heads]
            gaps[m] = gap
            outs.files.append(common.save_npy(
                res / f"att_dist_diff_{args.epoch1}_{args.epoch2}_{m}_{env}_{args.dataset_name}_{args.seed}{tag}.npy",
                gap))
            print(f"{env} {m}: mean gap per block " + " ".join(f"{v:.3f}" for v in gap.mean((0, 2))), file=sys.stderr)
        models = list(gaps)
        per_block = {m: g.mean(2) for m, g in gaps.items()}                    # head-averaged [B, blocks]
        depths = {m: g.shape[1] for m, g in per_block.items()}
        target = min(depths.values())
        # a deeper model's blocks averaged onto the shallowest's positions (iGPT's 24 blocks onto 12: blocks 2b and
        # 2b+1), as CKA's normalised layers; a depth that is not a multiple is shown block by block
        shown = {m: common.pair_average(g, target, axis=1) for m, g in per_block.items()}
        paired = [m for m in models if shown[m].shape[1] != depths[m]]
        nb = max(g.shape[1] for g in shown.values())
        colors = common.model_colors(models)
        fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * nb * len(models)), 3.4))
        width = 0.8 / len(models)
        for j, m in enumerate(models):
            g = shown[m]
            pos = np.arange(g.shape[1]) + (j - (len(models) - 1) / 2) * width
            bp = ax.boxplot([g[:, b] for b in range(g.shape[1])], positions=pos, widths=width * 0.9,
                            patch_artist=True, showfliers=False, medianprops={"color": "k"})  # visible on C1
            for box in bp["boxes"]:
                box.set_facecolor(colors[m])
            ax.plot([], [], color=colors[m], lw=6, label=common.model_label(m))
        ax.set_xticks(np.arange(nb), [str(b) for b in range(nb)])
        pairing = "; ".join(common.pairing_text(m, depths[m], target) for m in paired)
        ax.set_xlabel(f"normalized block ({pairing})" if paired else "block")
        ax.set_ylabel(f"|Δ attention distance| ({args.distance_unit}s)")
        ax.set_title(f"{env}, epoch {args.epoch1} vs {args.epoch2}, K={K_ckpt} runs, {args.K}-step context")
        common.legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))     # outside: every corner holds whiskers
        stem = f"att_dist_diff_{args.epoch1}_{args.epoch2}_{'_'.join(models)}_{env}_{args.dataset_name}_{args.seed}{tag}"
        outs.figures.append(common.save_figure(fig, args.figs_dir, stem))
        table_rows = []
        for m in models:
            cells = [f"{v:.3f}" for v in np.median(shown[m], 0)]
            table_rows.append([common.model_label(m)] + cells + ["–"] * (nb - len(cells)))
        outs.tables.append(((f"Attention-distance change per block, {env} (median over samples of the "
                             f"head-averaged gap, {args.distance_unit}s"
                             + (f"; normalized blocks, {pairing}" if paired else "") + ")"),
                            common.markdown_table(["model"] + [str(b) for b in range(nb)], table_rows)))
    return outs
