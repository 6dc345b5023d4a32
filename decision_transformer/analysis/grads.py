"""Section 5.4: per-sample gradients, gradient confusion (Figure 5), gradient norms (Figures 6 and 7).

As TAKAGI's ``get_gradients``: the model in **train mode** (dropout on, ``--train_mode false`` turns it off), each
sample forwarded alone, the masked action MSE, the gradient, ``clip_grad_norm_(all parameters, 0.25)``, then the
gradients of the ``transformer.h`` parameters flattened into one vector per sample.

Per-sample gradients come from ``torch.func`` (``vmap(grad(loss))``, ``randomness="different"``: every sample draws
its own dropout masks), not a Python loop. The n×n Gram matrix of the flattened gradients is accumulated over groups
of parameter tensors, each group re-running the same seeded forward, so memory stays within ``max_bytes`` even for
12×768 models (50 samples × 85M parameters would need 17 GB at once); the dropout masks are identical in every pass.
Parameters that do not influence the loss (the unused ``wte``/``wpe`` tables) have zero gradients and are skipped.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from decision_transformer.analysis import common
from decision_transformer.analysis.runs import (
    RunKey,
    SharedDataset,
    analysis_batch,
    batch_for,
    batch_generator,
    envs_with_runs,
    load_model,
    model_inputs,
    require_checkpoints,
)
from decision_transformer.errors import UserError
from decision_transformer.training import GRAD_CLIP, masked_action_mse, module_mode

H_PREFIX = "transformer.h."
CLIP_EPS = 1e-6           # torch.nn.utils.clip_grad_norm_: coef = max_norm / (total_norm + 1e-6)
#: the original's additive term in the cosine's denominator (``--eps`` reproduces it)
TAKAGI_COS_EPS = 1e-6


def used_parameters(model, batch) -> list[str]:
    """Names of the trainable parameters that receive a gradient from the action loss (one backward on 1 sample)."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    s, a, r, t, m = (x[:1] for x in model_inputs(batch))
    out = model(s, a, r, t, attention_mask=m)
    masked_action_mse(out.action_preds, a, m).backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return names


def per_sample_grads(model, batch, names: list[str], *, train_mode: bool = True, seed: int = 0,
                     chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """``{name: [n, *param.shape]}``: the gradient of each sample's own loss w.r.t. the parameters ``names`` (the
    others held fixed). Seeded: the same seed (and chunk size) gives the same dropout masks whatever ``names`` is.
    Dropout is on with ``train_mode``; the model is left in the mode it was in, and torch's random streams as they
    were."""
    with module_mode(model, train_mode):
        return _per_sample_grads(model, batch, names, train_mode, seed, chunk_size)


def _per_sample_grads(model, batch, names, train_mode, seed, chunk_size) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    diff = {k: params[k].detach() for k in names}
    fixed = {k: v.detach() for k, v in params.items() if k not in diff}
    fixed.update(dict(model.named_buffers()))

    def loss_one(d, s, a, r, t, m):
        """The masked action MSE of one sample (no batch axis) with the parameters ``d`` swapped in."""
        # output_attentions selects the eager attention path, which vmap batches (SDPA falls back to a loop)
        out = functional_call(model, {**fixed, **d}, (s[None], a[None], r[None], t[None]),
                              {"attention_mask": m[None], "output_attentions": True})
        return masked_action_mse(out.action_preds, a[None], m[None])

    f = vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0, 0), randomness="different" if train_mode else "error",
             chunk_size=chunk_size)
    dev = next(model.parameters()).device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        return f(diff, *model_inputs(batch))


@dataclass
class GradStats:
    """Per-sample gradient statistics (unclipped): Gram of the ``transformer.h`` gradients [n, n] (or None), squared
    norms of the ``transformer.h`` part and of all parameters [n] (float64)."""

    gram_h: torch.Tensor | None
    sqnorm_h: torch.Tensor
    sqnorm_all: torch.Tensor

    def check(self, source):
        """Refuse non-finite gradients (a loss that overflows), naming ``source``; warn of samples whose
        ``transformer.h`` gradient is zero (their cosines are 0, which reads as no confusion)."""
        parts = [self.sqnorm_all, self.sqnorm_h] + ([self.gram_h] if self.gram_h is not None else [])
        if not all(bool(torch.isfinite(t).all()) for t in parts):
            raise UserError(f"{source}: the per-sample gradients are not finite (the model's loss overflows)")
        zero = int((self.sqnorm_h == 0).sum())
        if zero:
            common.warn(f"{source}: {zero} of {len(self.sqnorm_h)} samples have a zero transformer.h gradient (their "
                        f"cosines are 0)")

    def clip_coef(self, max_norm: float = GRAD_CLIP) -> torch.Tensor:
        """The per-sample factor of ``clip_grad_norm_(all parameters, max_norm)``."""
        return torch.clamp(max_norm / (self.sqnorm_all.sqrt() + CLIP_EPS), max=1.0)

    def h_norms(self, clip: float | None = GRAD_CLIP) -> torch.Tensor:
        """[n] norms of the per-sample ``transformer.h`` gradients, times the clip factor unless ``clip`` is None."""
        n = self.sqnorm_h.sqrt()
        return n if clip is None else n * self.clip_coef(clip)

    def cosine(self, clip: float | None = GRAD_CLIP, eps: float = 0.0) -> torch.Tensor:
        """[n, n] cosine similarity of the (clipped) ``transformer.h`` gradients: gᵢ·gⱼ / (‖gᵢ‖‖gⱼ‖ + eps). The
        original added eps = 1e-6, which pulls the cosines of small (clipped) gradients towards 0; with eps 0 the
        cosine is that of the directions whatever the norms, and a zero gradient's cosines are 0 (not NaN)."""
        c = self.clip_coef(clip) if clip is not None else torch.ones_like(self.sqnorm_h)
        g = self.gram_h * c[:, None] * c[None, :]
        nrm = torch.sqrt(torch.diagonal(g).clamp(min=0))
        prod = nrm[:, None] * nrm[None, :]
        if eps > 0:
            return g / (prod + eps)
        return torch.where(prod > 0, g / torch.where(prod > 0, prod, 1.0), 0.0)


def _groups(model, names: list[str], n: int, max_bytes: int) -> list[list[str]]:
    sizes = {k: p.numel() for k, p in model.named_parameters()}
    groups, cur, cur_bytes = [], [], 0
    for k in names:
        b = n * sizes[k] * 4
        if cur and cur_bytes + b > max_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(k)
        cur_bytes += b
    if cur:
        groups.append(cur)
    return groups


def per_sample_grad_stats(model, batch, *, train_mode: bool = True, seed: int = 0, gram: bool = True,
                          max_bytes: int = 1 << 30, chunk_size: int | None = None) -> GradStats:
    """Per-sample gradient statistics of ``batch`` (``GradStats``), computed ``max_bytes`` of gradients at a time.
    The model's ``.grad`` are cleared; it is left in the mode it was in."""
    batch = batch_for(model, batch, "per_sample_grad_stats")
    names = used_parameters(model, batch)
    n = batch.states.shape[0]
    dev = next(model.parameters()).device
    gram_h = torch.zeros(n, n, dtype=torch.float64, device=dev) if gram else None
    sq_h = torch.zeros(n, dtype=torch.float64, device=dev)
    sq_all = torch.zeros(n, dtype=torch.float64, device=dev)
    for group in _groups(model, names, n, max_bytes):
        g = per_sample_grads(model, batch, group, train_mode=train_mode, seed=seed, chunk_size=chunk_size)
        for k in group:
            flat = g[k].reshape(n, -1).to(torch.float64)
            sq = (flat * flat).sum(1)
            sq_all += sq
            if k.startswith(H_PREFIX):
                sq_h += sq
                if gram:
                    gram_h += flat @ flat.T
        del g
    model.zero_grad(set_to_none=True)
    return GradStats(gram_h.cpu() if gram else None, sq_h.cpu(), sq_all.cpu())


def _pairs(cos: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries (i ≠ j) of a cosine matrix (of at least two samples: one has no pair)."""
    if cos.ndim != 2 or cos.shape[0] != cos.shape[1] or cos.shape[0] < 2:
        raise ValueError(f"gradient pairs need a square cosine matrix of at least 2 samples, got shape "
                         f"{tuple(cos.shape)}")
    return cos[~torch.eye(cos.shape[0], dtype=torch.bool, device=cos.device)]


def grad_confusion(cos: torch.Tensor) -> float:
    """min_{i≠j} cos(g_i, g_j) (Sankararaman et al. 2020: confusion η = max(0, -min))."""
    return float(_pairs(cos).min())


def mean_pairwise_cosine(cos: torch.Tensor) -> float:
    """The mean of cos(g_i, g_j) over the pairs i ≠ j (the diagonal's ones left out)."""
    return float(_pairs(cos).mean())


def full_batch_param_norms(model, batch, *, clip: float | None = GRAD_CLIP, train_mode: bool = True,
                           seed: int = 0) -> dict[str, float]:
    """L2 norm of the full-batch (clipped) gradient of every ``transformer.h`` tensor (Figure 7). The model's
    ``.grad`` are cleared; it is left in the mode it was in."""
    batch = batch_for(model, batch, "full_batch_param_norms")
    model.zero_grad(set_to_none=True)
    dev = next(model.parameters()).device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), module_mode(model, train_mode):
        torch.manual_seed(seed)
        s, a, r, t, m = model_inputs(batch)
        out = model(s, a, r, t, attention_mask=m)
        masked_action_mse(out.action_preds, a, m).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip)
    norms = {k[len(H_PREFIX):]: float(p.grad.norm()) for k, p in model.named_parameters()
             if k.startswith(H_PREFIX) and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return norms


# ---- the scripts ------------------------------------------------------------------------------------------------

#: The scripts' default --batch_size: gradient confusion (Figure 5), gradient norms (Figures 6 and 7).
CONFUSION_BATCH_SIZE, NORM_BATCH_SIZE = 50, 100


def _common_parser(desc, batch_size, results_alias):
    """The flags of both scripts; each path flag and --env_name_list also take the original scripts' spelling
    (``results_alias``: that of --results_dir). A flag that changes the numbers tags the file names when it is not
    its default (:func:`setting_tag`)."""
    p = common.parser(desc)
    common.add_checkpoint_flags(p, aliases=("--path_to_load_model",))
    p.add_argument("--env_name_list", "--env_name", dest="env_name_list", nargs="+", default=list(common.ENV_NAMES))
    p.add_argument("--model_name_list", nargs="+", default=list(common.MODEL_NAMES))
    p.add_argument("--seed", type=int, default=666)
    p.add_argument("--epoch", type=int, default=1, help="checkpoint model_{epoch}.pt (1 = after 2500 steps)")
    p.add_argument("--train_mode", type=common.str2bool, nargs="?", const=True, default=True,
                   help="dropout on while taking gradients, as the original (--train_mode false: eval mode; results "
                        "tagged _evalmode)")
    p.add_argument("--independent_batches", action="store_true",
                   help="each model draws its own batch from one shared sampler (TAKAGI's behaviour; results tagged "
                        "_indep)")
    p.add_argument("--grad_seed", type=int, default=0,
                   help="seed of the dropout masks (other than 0: results tagged _gseed{n})")
    p.add_argument("--max_grad_memory_gb", type=float, default=1.0,
                   help="per-sample gradients held at once; larger models take several seeded passes (same results)")
    common.add_run_k_flag(p)
    common.add_data_flags(p, device_default="cpu", batch_size=batch_size, data_aliases=("--path_to_load_data",),
                          batch_size_help=f"samples per model (other than {batch_size}: results tagged _bs{{n}})")
    common.add_output_flags(p, "grads", results_aliases=(results_alias,), figs_aliases=("--path_to_save_figure",))
    return p


def build_confusion_parser():
    """The command-line parser of the gradient-confusion script (Figure 5)."""
    p = _common_parser("Figure 5: gradient confusion (minimum pairwise cosine of per-sample gradients).",
                       CONFUSION_BATCH_SIZE, "--path_to_save_gradcossim")
    p.add_argument("--eps", type=float, default=0.0,
                   help=f"added to the cosine's denominator (TAKAGI: {TAKAGI_COS_EPS}; it pulls the cosines of small "
                        "clipped gradients towards 0; other than 0: results tagged _eps{eps})")
    return p


def build_norm_parser():
    """The command-line parser of the gradient-norm script (Figures 6 and 7)."""
    p = _common_parser("Figures 6 and 7: per-sample gradient norms and full-batch per-parameter norms.",
                       NORM_BATCH_SIZE, "--path_to_save_gradnorm")
    p.add_argument("--unclipped", action="store_true", help="report the norms before the 0.25 clip (results tagged "
                                                            "_unclipped)")
    p.add_argument("--top_k", type=int, default=2, help="tensors named in the per-parameter ratio figure")
    return p


def setting_tag(args, default_batch_size: int) -> str:
    """The file-name tag of the gradient settings that change the numbers, where not their default: ``_evalmode``
    (``--train_mode false``), ``_indep`` (``--independent_batches``), ``_bs{n}`` (``--batch_size`` other than
    ``default_batch_size``, the script's), ``_gseed{n}`` (``--grad_seed`` other than 0), ``_eps{eps}`` (confusion's
    ``--eps`` other than 0), then the analysis batch's ``_ctx{k}`` (``--K`` other than 20) and ``_bseed{n}``
    (``--batch_seed`` other than 0), in this order; empty for the defaults, so the default names stay the originals'
    and another setting's results never replace them."""
    return ("" if args.train_mode else "_evalmode") + ("_indep" if args.independent_batches else "") \
        + (f"_bs{args.batch_size}" if args.batch_size != default_batch_size else "") \
        + (f"_gseed{args.grad_seed}" if args.grad_seed != 0 else "") \
        + (f"_eps{args.eps:g}" if getattr(args, "eps", 0.0) != 0 else "") \
        + common.batch_tag(args.K, args.batch_seed)


def _require_models(args, envs):
    """Every model's checkpoint in every env, checked before any gradient is computed (one missing model used to
    stop the script after the earlier models' results were written)."""
    run_K = common.run_k(args)
    require_checkpoints(args.checkpoint_dir, [(RunKey(m, args.dataset_name, env, args.seed, run_K), args.epoch)
                                              for env in envs for m in args.model_name_list])


def _batches(args, env, device, notes: list):
    """Per model: (loaded model, batch), all drawn from one dataset (``SharedDataset``). Same batch for all models
    unless --independent_batches."""
    shared = None
    run_K = common.run_k(args)
    datasets = SharedDataset(args.dataset_name, args.data_path, device, notes)
    for m in args.model_name_list:
        lm = load_model(args.checkpoint_dir, RunKey(m, args.dataset_name, env, args.seed, run_K), args.epoch, device)
        data = datasets.get(env, lm)
        if args.independent_batches:
            if shared is None:
                shared = batch_generator(args.batch_seed)
            batch = analysis_batch(data, args.batch_size, args.K, args.batch_seed, shared)
        else:
            batch = analysis_batch(data, args.batch_size, args.K, args.batch_seed)
        yield m, lm, batch


def _check_flags(args):
    common.check_data_flags(args)
    common.check_positive(args, "top_k")
    common.check_min(args, 0, "epoch")
    common.check_seeds(args, "seed", "grad_seed")
    common.check_numbers(args, max_grad_memory_gb=common.POSITIVE, eps=common.NON_NEGATIVE)


def run_confusion(args) -> common.Outputs:
    """Figure 5: per env and model, the [n, n] cosines of the clipped per-sample ``transformer.h``
    gradients, saved with a CSV, a table and a bar chart of the minimum pairwise cosine."""
    _check_flags(args)
    if args.batch_size < 2:
        raise UserError("gradient confusion needs --batch_size >= 2")
    device = common.resolve_device(args.device, getattr(args, "threads", "auto"))
    outs = common.Outputs()
    envs = envs_with_runs(args.checkpoint_dir, args.env_name_list, outs.notes)
    common.check_env_datasets(args, envs)
    _require_models(args, envs)
    res = common.out_dir(args.results_dir)
    max_bytes = int(args.max_grad_memory_gb * 2**30)
    ktag = common.run_k_tag(common.run_k(args)) + setting_tag(args, CONFUSION_BATCH_SIZE)
    for env in envs:
        summary = []
        for m, lm, batch in _batches(args, env, device, outs.notes):
            st = per_sample_grad_stats(lm.model, batch, train_mode=args.train_mode, seed=args.grad_seed,
                                       max_bytes=max_bytes)
            st.check(lm.path)
            cos = st.cosine(GRAD_CLIP, eps=args.eps)
            name = f"gradcossim_{args.epoch}_{m}_{env}_{args.dataset_name}_{args.seed}{ktag}.npy"
            outs.files.append(common.save_npy(res / name, cos.numpy()))
            summary.append([m, grad_confusion(cos), mean_pairwise_cosine(cos)])
            print(f"{env} {m}: min pairwise cosine {summary[-1][1]:.4f}", file=sys.stderr)
        models = "_".join(args.model_name_list)
        stem = f"grad_confusion_{args.epoch}_{models}_{env}_{args.dataset_name}_{args.seed}{ktag}"
        outs.files.append(common.save_csv(res / f"{stem}.csv", ["model", "min_cosine", "mean_cosine"], summary))
        outs.tables.append(((f"Gradient confusion, {env}, epoch {args.epoch} (min pairwise cosine over "
                             f"{args.batch_size} samples; confusion = max(0, -min))"),
                            common.markdown_table(["model", "min cosine", "mean cosine"],
                                                  [[common.model_label(r[0]), f"{r[1]:.4f}", f"{r[2]:.4f}"]
                                                   for r in summary])))
        plt = common.pyplot()
        fig, ax = plt.subplots(figsize=(3.6, 3.2))
        colors = common.model_colors([r[0] for r in summary])
        ax.bar([common.model_label(r[0]) for r in summary], [r[1] for r in summary],
               color=[colors[r[0]] for r in summary])
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel("min pairwise cosine (i ≠ j)")            # confusion = max(0, -bar), as the table says
        ax.set_title(f"{env}, epoch {args.epoch}")
        outs.figures.append(common.save_figure(fig, args.figs_dir, stem))
    return outs


def run_norms(args) -> common.Outputs:
    """Figures 6 and 7: per env, the per-sample ``transformer.h`` gradient norms [models, n] (after the clip
    unless ``--unclipped``) and each model's full-batch per-tensor norms, saved with their figures."""
    _check_flags(args)
    device = common.resolve_device(args.device, getattr(args, "threads", "auto"))
    outs = common.Outputs()
    envs = envs_with_runs(args.checkpoint_dir, args.env_name_list, outs.notes)
    common.check_env_datasets(args, envs)
    _require_models(args, envs)
    res = common.out_dir(args.results_dir)
    clip = None if args.unclipped else GRAD_CLIP
    tag = common.run_k_tag(common.run_k(args)) + ("_unclipped" if args.unclipped else "") \
        + setting_tag(args, NORM_BATCH_SIZE)
    max_bytes = int(args.max_grad_memory_gb * 2**30)
    plt = common.pyplot()
    for env in envs:
        norms, perparam = {}, {}
        for m, lm, batch in _batches(args, env, device, outs.notes):
            st = per_sample_grad_stats(lm.model, batch, train_mode=args.train_mode, seed=args.grad_seed, gram=False,
                                       max_bytes=max_bytes)
            st.check(lm.path)
            norms[m] = st.h_norms(clip).numpy()
            perparam[m] = full_batch_param_norms(lm.model, batch, clip=clip, train_mode=args.train_mode,
                                                 seed=args.grad_seed)
            pp = perparam[m]
            outs.files.append(common.save_npy(
                res / f"gradnorm_perparam_{args.epoch}_{m}_{env}_{args.dataset_name}_{args.seed}{tag}.npy",
                np.array(list(pp.values()))))
            outs.files.append(common.save_csv(
                res / f"gradnorm_perparam_{args.epoch}_{m}_{env}_{args.dataset_name}_{args.seed}{tag}.csv",
                ["parameter", "norm"], [[k, v] for k, v in pp.items()]))
        models = list(norms)
        stem = f"gradnorms_{args.epoch}_{'_'.join(models)}_{env}_{args.dataset_name}_{args.seed}{tag}"
        outs.files.append(common.save_npy(res / f"{stem}.npy", np.stack([norms[m] for m in models])))
        outs.tables.append((f"Per-sample gradient norms of transformer.h, {env}, epoch {args.epoch}"
                            + (" (unclipped)" if args.unclipped else " (after the 0.25 clip)"),
                            common.markdown_table(["model", "median", "mean", "max", "share at the clip"],
                                                  [[common.model_label(m), f"{np.median(v):.4f}", f"{v.mean():.4f}",
                                                    f"{v.max():.4f}",
                                                    f"{np.mean(v > 0.99 * GRAD_CLIP):.2f}" if clip else "-"]
                                                   for m, v in norms.items()])))
        fig, ax = plt.subplots(figsize=(3.8, 3.2))
        ax.boxplot([norms[m] for m in models])
        ax.set_xticks(range(1, len(models) + 1), [common.model_label(m) for m in models])
        if clip is not None:
            ax.set_ylim(0, GRAD_CLIP * 1.04)
        ax.set_ylabel("per-sample gradient norm" + (" (unclipped)" if clip is None else f" (after the {clip} clip)"))
        ax.set_title(f"{env}, epoch {args.epoch}")
        outs.figures.append(common.save_figure(fig, args.figs_dir, stem))
        for m, pp in perparam.items():
            outs.figures.append(_perparam_figure(pp, m, env, args, tag))
    return outs


def _perparam_figure(pp: dict, m, env, args, tag) -> Path:
    """Figure 7: the per-tensor norms, and each tensor's share of their sum (top-k named, the rest "others")."""
    plt = common.pyplot()
    names, vals = list(pp), np.array(list(pp.values()))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [3, 1]},
                                 layout="constrained")
    a1.bar(np.arange(len(vals)), vals, width=1.0, color=common.model_color(m))
    step = max(1, len(names) // 12)
    a1.set_xticks(np.arange(0, len(names), step), [names[i] for i in range(0, len(names), step)], rotation=70,
                  fontsize=6)
    a1.set_ylabel("gradient norm" + (" (unclipped)" if getattr(args, "unclipped", False) else ""))
    a1.set_title(f"{common.model_label(m)}, {env}, epoch {args.epoch}")
    total = vals.sum() if vals.sum() > 0 else 1.0
    order = np.argsort(vals)[::-1][:args.top_k]
    shares = [vals[i] / total for i in order]
    labels = [names[i] for i in order] + ["others"]
    greys = [str(0.25 + 0.5 * i / max(len(labels) - 1, 1)) for i in range(len(labels))]   # not the models' colours
    a2.bar(range(len(labels)), shares + [1 - sum(shares)], color=greys)
    a2.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
    a2.set_ylabel("ratio to the sum of norms")
    a2.set_ylim(0, 1)
    return common.save_figure(fig, args.figs_dir,
                              f"gradnorm_perparam_{args.epoch}_{m}_{env}_{args.dataset_name}_{args.seed}{tag}")
