"""Centred kernel alignment (Kornblith et al. 2019) and Section 5.1's activation-similarity analysis.

CKA(K, L) = <K~, L~>_F / (||K~||_F ||L~||_F + eps) for Gram matrices K = k(X, X), L = k(Y, Y) of n examples, where
~ is the centring H G H (biased HSIC) or the unbiased centring of Song et al. (2012) (debiased HSIC: the default of
the analysis script and of ``cka_matrix``, as TAKAGI; ``--biased`` switches the script to biased HSIC, and the
library functions ``cka()`` and ``linear_cka()`` default to ``debiased=False``). Everything is accumulated in
float64. TAKAGI adds eps = 1e-6 to the denominator; that breaks the scale invariance for layers with small
activations (the norms of their centred Grams can be far below 1e-6), so the default is eps = 0 (a constant
representation gets CKA 0) and ``--eps 1e-6`` reproduces TAKAGI.

The analysis compares every pair of hooked layers of two checkpoints at the tokens of the **last timestep** of a
K-step context: sequence positions -3 (R̂_K, "reward"), -2 (s_K, "state"), -1 (a_K, "action"), one example per
batch element (X in R^{n x D}). TAKAGI's code indexed the feature axis instead (X = activation[:, :, -1|-2|-3], one
hidden unit across the token positions); ``--legacy_feature_index`` reproduces that.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from decision_transformer.analysis import common
from decision_transformer.analysis.activations import (
    BLOCK_ENTRIES,
    BLOCK_OUTPUT,
    block_of,
    check_finite_activations,
    depth as model_depth,
    entry_of,
    get_activations,
    hooked_modules,
)
from decision_transformer.analysis.runs import (
    RunKey,
    analysis_batch,
    analysis_dataset,
    batch_digest,
    envs_with_runs,
    load_model,
)
from decision_transformer.errors import UserError

TOKEN_POSITIONS = {"reward": -3, "state": -2, "action": -1}
DEFAULT_EPS = 0.0
TAKAGI_EPS = 1e-6


# ---- the estimator ----------------------------------------------------------------------------------------------

def _as64(x) -> torch.Tensor:
    """x as float64 [n, features]; refused if it holds NaN or inf (its Grams would be NaN, and a NaN denominator used
    to read as CKA 0)."""
    t = torch.as_tensor(x)
    if t.is_complex():
        raise UserError("CKA takes real features, got a complex tensor")
    if t.dim() < 1 or t.shape[0] == 0:
        raise UserError(f"CKA features must be [n examples, ...] with n >= 1, got shape {list(t.shape)}")
    t = t.to(torch.float64).reshape(t.shape[0], -1)
    if not bool(torch.isfinite(t).all()):
        raise UserError("CKA features contain NaN or inf")
    return t


def gram_linear(x) -> torch.Tensor:
    """[n, d] -> [n, n] X Xᵀ."""
    x = _as64(x)
    return x @ x.T


def gram_rbf(x, threshold: float = 1.0) -> torch.Tensor:
    """RBF Gram exp(-||x_i - x_j||² / (2 threshold² median_ij ||x_i - x_j||²)) (bandwidth = a fraction of the median
    squared distance, as in Kornblith et al.'s code). All examples equal (median 0): the constant 1."""
    x = _as64(x)
    g = x @ x.T
    d = torch.diagonal(g)
    sq = (d[:, None] + d[None, :] - 2 * g).clamp(min=0)
    med = _median(sq.flatten())
    if med == 0:
        return torch.ones_like(sq)
    return torch.exp(-sq / (2 * threshold ** 2 * med))


def _median(v: torch.Tensor) -> float:
    """The median of a 1-d tensor, averaging the middle pair as ``np.median`` does (``torch.quantile`` is limited to
    2^24 elements: RBF Grams of more than 4096 examples)."""
    n = v.numel()
    lo = v.kthvalue((n + 1) // 2).values
    hi = v.kthvalue(n // 2 + 1).values
    return float((lo + hi) / 2)


def _without_offsets(x) -> torch.Tensor:
    """x [n, d] minus its column means, with columns that hold one value exactly 0. CKA is invariant to this for both
    kernels and both centrings; without it, a constant representation's centred Gram is rounding noise instead of
    exactly 0, and CKA the cosine of two noise patterns."""
    x = _as64(x)
    constant = (x == x[:1]).all(0)
    x = x - x.mean(0, keepdim=True)
    x[:, constant] = 0
    return x


def center_gram(g, unbiased: bool = False) -> torch.Tensor:
    """Centre a symmetric Gram matrix. Biased: H G H with H = I - 11ᵀ/n. Unbiased (needs n > 3): zero the diagonal,
    m_j = Σ_i G_ij / (n - 2), m_j -= Σ_k m_k / (2 (n - 1)), G_ij -= m_i + m_j, zero the diagonal again; then
    <G~, L~> / (n (n - 3)) is the unbiased HSIC estimator."""
    g = torch.as_tensor(g).to(torch.float64).clone()
    if g.dim() != 2 or g.shape[0] != g.shape[1]:
        raise UserError(f"a Gram matrix must be square [n, n], got shape {list(g.shape)}")
    if not bool(torch.isfinite(g).all()):
        raise UserError("a Gram matrix contains NaN or inf")
    n = g.shape[0]
    if unbiased:
        if n < 4:
            raise UserError(f"debiased CKA needs at least 4 examples, got {n}")
        g.fill_diagonal_(0)
        m = g.sum(0) / (n - 2)
        m = m - m.sum() / (2 * (n - 1))
        g = g - m[:, None] - m[None, :]
        g.fill_diagonal_(0)
    else:
        if n < 3:  # one example centres to zeros (CKA 0), two to rank one (CKA 1 whatever the layers)
            raise UserError(f"CKA needs at least 3 examples, got {n}")
        g = g - g.mean(0, keepdim=True)
        g = g - g.mean(1, keepdim=True)
    return g


def cka(gram_x, gram_y, debiased: bool = False, eps: float = 0.0) -> float:
    """CKA of two Gram matrices [n, n] of the same n examples (biased HSIC unless ``debiased``); 0 when the
    denominator is 0."""
    a = center_gram(gram_x, debiased)
    b = center_gram(gram_y, debiased)
    if a.shape != b.shape:
        raise UserError(f"CKA compares the same examples: Grams of {a.shape[0]} and {b.shape[0]} examples")
    denom = torch.linalg.norm(a) * torch.linalg.norm(b) + eps
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def linear_cka(x, y, debiased: bool = False, eps: float = 0.0) -> float:
    """Linear-kernel CKA of x [n, d_x] and y [n, d_y], the same n examples (biased HSIC unless ``debiased``)."""
    return cka(_gram(x, "linear", 1.0), _gram(y, "linear", 1.0), debiased, eps)


def _gram(x, kernel: str, threshold: float) -> torch.Tensor:
    """The Gram matrix CKA uses: of x without its column offsets (same CKA, exact 0 for a constant representation:
    its Gram is then all zeros, whose centring is exact)."""
    if kernel not in ("linear", "rbf"):
        raise UserError(f"unknown CKA kernel {kernel!r}; choose linear or rbf")
    x = _without_offsets(x)
    if not x.any():
        return torch.zeros(x.shape[0], x.shape[0], dtype=x.dtype, device=x.device)
    return gram_linear(x) if kernel == "linear" else gram_rbf(x, threshold)


def check_gram_memory(n_layers: int, n: int, limit: int | None = None):
    """Refuse a CKA whose centred Grams (``n_layers`` of n × n float64, held at once) would need more than ``limit``
    bytes (default: half this machine's memory)."""
    if limit is None:
        limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    need = n_layers * n * n * 8
    if need > limit:
        raise UserError(f"CKA of {n_layers} layers on {n:,} examples needs {need / 2**30:.1f} GiB for its Gram matrices "
                        f"(n² float64 each), more than {limit / 2**30:.1f} GiB; use a smaller --batch_size")


def cka_matrix(feats1: list, feats2: list, kernel: str = "linear", debiased: bool = True, threshold: float = 1.0,
               eps: float = DEFAULT_EPS) -> np.ndarray:
    """CKA of every pair (feats1[i], feats2[j]), each [n, d_i] with the same n examples: [len(feats1), len(feats2)].

    One centred Gram per layer, then all inner products at once (a matrix product of the flattened Grams)."""
    def centred(feats):
        """The flattened centred Grams [L, n²] of ``feats`` and their norms [L]."""
        c = torch.stack([center_gram(_gram(f, kernel, threshold), debiased).flatten() for f in feats])  # [L, n²]
        return c, torch.linalg.norm(c, dim=1)

    if not len(feats1) or not len(feats2):
        raise UserError(f"CKA needs at least one layer's features on each side, got {len(feats1)} and {len(feats2)}")
    sizes = {int(torch.as_tensor(f).shape[0]) if torch.as_tensor(f).dim() else 0 for f in [*feats1, *feats2]}
    if len(sizes) > 1:
        raise UserError(f"CKA compares the same examples: the features hold {sorted(sizes)} examples")
    c1, n1 = centred(feats1)
    c2, n2 = centred(feats2)
    denom = n1[:, None] * n2[None, :] + eps
    return torch.where(denom > 0, (c1 @ c2.T) / torch.where(denom > 0, denom, 1.0), 0.0).cpu().numpy()


# ---- token selection --------------------------------------------------------------------------------------------

def select_tokens(act: torch.Tensor, legacy_feature_index: bool = False) -> torch.Tensor:
    """[B, 3K, D] -> [B, 3, D]: the last timestep's (R̂, s, a) tokens; legacy: [B, 3K, 3], the last three *features*
    (-3, -2, -1) at every position, TAKAGI's indexing."""
    idx = [TOKEN_POSITIONS[t] for t in TOKEN_POSITIONS]
    return act[:, :, idx] if legacy_feature_index else act[:, idx, :]


def token_features(selected: torch.Tensor, token: str, legacy_feature_index: bool = False) -> torch.Tensor:
    """From ``select_tokens`` output to the [n, d] matrix of one token type (a key of ``TOKEN_POSITIONS``)."""
    if token not in TOKEN_POSITIONS:
        raise UserError(f"unknown token type {token!r}; choose one of {', '.join(TOKEN_POSITIONS)}")
    j = list(TOKEN_POSITIONS).index(token)
    return selected[:, :, j] if legacy_feature_index else selected[:, j, :]


# ---- the analysis -----------------------------------------------------------------------------------------------

def build_parser():
    """The command-line parser of compute_cka.py (Section 5.1)."""
    p = common.parser("Section 5.1: CKA between every pair of hooked layers of two checkpoints (Figure 1, "
                      "appendix heatmaps).")
    # Each flag also takes the original compute_cka.py's spelling (-plm, --model1, ...).
    common.add_checkpoint_flags(p, aliases=("--path_to_load_model", "-plm"))
    p.add_argument("--env_name_list", nargs="+", default=list(common.ENV_NAMES))
    p.add_argument("--seed", type=int, default=666)
    p.add_argument("--model_name1", "--model1", dest="model_name1", type=str, default="gpt2")
    p.add_argument("--model_name2", "--model2", dest="model_name2", type=str, default="gpt2")
    p.add_argument("--epoch1", type=int, default=0)
    p.add_argument("--epoch2", type=int, default=40)
    p.add_argument("--block", action="store_true", help="only the block outputs (mlp.dropout)")
    p.add_argument("--no_context", action="store_true",
                   help="load the K=1 runs ({run}_K1) and still feed --K-step contexts (= --run_K 1)")
    common.add_run_k_flag(p, "20, or 1 with --no_context")
    p.add_argument("--legacy_feature_index", action="store_true",
                   help="TAKAGI's indexing: the last three hidden units across positions instead of the last three "
                        "token positions")
    add_estimator_flags(p, reading=False)
    p.add_argument("--heatmap_token_list", nargs="*", default=list(TOKEN_POSITIONS), choices=list(TOKEN_POSITIONS),
                   help="token types to draw heatmaps of")
    p.add_argument("--no_heatmap", action="store_true")
    common.add_data_flags(p, device_default="cpu", data_aliases=("--path_to_load_data", "-pld"))
    common.add_output_flags(p, "cka", results_aliases=("--path_to_save_cka", "-psc"),
                            figs_aliases=("--path_to_save_figure", "-psf"))
    return p


def add_estimator_flags(p, reading: bool):
    """``--kernel``, ``--rbf_threshold``, ``--biased`` and ``--eps``: the CKA estimator of compute_cka.py, or
    (``reading``) the estimator whose results plot_cka.py reads. A non-default one tags the file names."""
    read = "read the results of compute_cka.py run with this flag; " if reading else ""
    p.add_argument("--kernel", choices=["linear", "rbf"], default="linear",
                   help=read + "rbf: results tagged _rbf{threshold}")
    p.add_argument("--rbf_threshold", type=float, default=1.0,
                   help=read + "RBF bandwidth as a fraction of the median distance")
    p.add_argument("--biased", action="store_true",
                   help=read + "biased HSIC (plain centring) instead of the debiased one (results tagged _biased)")
    p.add_argument("--eps", type=float, default=DEFAULT_EPS,
                   help=read + f"added to the denominator (TAKAGI: {TAKAGI_EPS}; it distorts layers with small "
                               f"activations; other than {DEFAULT_EPS:g}: results tagged _eps{{eps}})")


def estimator_tag(args) -> str:
    """The file-name tag of a non-default CKA estimator: ``_rbf{threshold}``, ``_biased``, ``_eps{eps}`` (in this
    order; empty for the default linear debiased CKA without eps), so its results never replace or mix with the
    default ones."""
    return (f"_rbf{args.rbf_threshold:g}" if args.kernel == "rbf" else "") + ("_biased" if args.biased else "") \
        + (f"_eps{args.eps:g}" if args.eps != DEFAULT_EPS else "")


def batch_tag(args) -> str:
    """The file-name tag of a non-default analysis batch (``--batch_size``, ``--K``, ``--batch_seed``;
    :func:`common.batch_tag`): compute_cka.py's, or (plot_cka.py) the one whose results are read."""
    return common.batch_tag(args.K, args.batch_seed, args.batch_size, common.DEFAULT_BATCH_SIZE)


def result_stem(e1, e2, m1, m2, env, ds, seed, no_context=False, block=False, legacy=False, run_K=None,
                estimator="", batch="") -> str:
    """The results' file stem; ``_K{run_K}`` for runs of K != 20 (``run_K`` None: 1 with ``no_context``, else 20),
    then the variants' tags, ``estimator`` (:func:`estimator_tag`) and ``batch`` (:func:`batch_tag`)."""
    run_K = run_K if run_K is not None else (1 if no_context else common.DEFAULT_RUN_K)
    tags = common.run_k_tag(run_K) + ("_block" if block else "") + ("_legacyidx" if legacy else "") + estimator \
        + batch
    return f"cka_{e1}_{e2}_{m1}{m2}_{env}_{ds}_{seed}{tags}"


def run(args) -> common.Outputs:
    """CKA between every pair of hooked layers of two checkpoints, per env and token type: saves the matrices, the
    layer lists and the heatmaps."""
    common.check_data_flags(args)
    common.check_seeds(args, "seed")
    common.check_min(args, 0, "epoch1", "epoch2")
    common.check_numbers(args, eps=common.NON_NEGATIVE, rbf_threshold=common.POSITIVE)
    if args.batch_size < (3 if args.biased else 4):   # before any model is loaded
        raise UserError(f"--batch_size {args.batch_size}: " + ("CKA needs at least 3 examples" if args.biased else
                                                               "debiased CKA needs at least 4 examples (3 with --biased)"))
    device = common.resolve_device(args.device, getattr(args, "threads", "auto"))
    entries = (BLOCK_OUTPUT,) if args.block else BLOCK_ENTRIES
    K_ckpt = common.run_k(args)
    outs = common.Outputs()
    envs = envs_with_runs(args.checkpoint_dir, args.env_name_list, outs.notes)
    common.check_env_datasets(args, envs)
    res_dir, figs_dir = common.out_dir(args.results_dir), args.figs_dir
    for env in envs:
        torch.manual_seed(args.seed)
        k1 = RunKey(args.model_name1, args.dataset_name, env, args.seed, K_ckpt)
        k2 = RunKey(args.model_name2, args.dataset_name, env, args.seed, K_ckpt)
        m1 = load_model(args.checkpoint_dir, k1, args.epoch1, device)
        m2 = load_model(args.checkpoint_dir, k2, args.epoch2, device)
        check_same_run_depth(m1, m2)
        data = analysis_dataset(env, args.dataset_name, args.data_path, m1.checkpoint, device)
        batch = analysis_batch(data, args.batch_size, args.K, args.batch_seed)

        def sel(t):
            """The last timestep's tokens of an activation (:func:`select_tokens`)."""
            return select_tokens(t, args.legacy_feature_index)

        check_gram_memory(len(hooked_modules(m1.model, entries)) + len(hooked_modules(m2.model, entries)),
                          args.batch_size)
        a1 = get_activations(m1.model, batch, entries, sel)
        a2 = get_activations(m2.model, batch, entries, sel)
        check_finite_activations(a1, m1.path)
        check_finite_activations(a2, m2.path)
        del m1, m2
        stem = result_stem(args.epoch1, args.epoch2, args.model_name1, args.model_name2, env, args.dataset_name,
                           args.seed, args.no_context, args.block, args.legacy_feature_index, K_ckpt,
                           estimator_tag(args), batch_tag(args))
        # the layer lists, and the batch the matrices were computed on (plot_cka.py compares the models')
        outs.files.append(common.save_csv(res_dir / f"{stem}_layers.csv", ["axis", "index", "layer"],
                                          [["rows", i, k] for i, k in enumerate(a1)]
                                          + [["cols", i, k] for i, k in enumerate(a2)]
                                          + [["batch", 0, batch_digest(batch)]]))
        for token in TOKEN_POSITIONS:
            f1 = [token_features(v, token, args.legacy_feature_index) for v in a1.values()]
            f2 = [token_features(v, token, args.legacy_feature_index) for v in a2.values()]
            mat = cka_matrix(f1, f2, args.kernel, not args.biased, args.rbf_threshold, args.eps)
            outs.files.append(common.save_npy(res_dir / f"{stem}_{token}.npy", mat))
            if not args.no_heatmap and token in args.heatmap_token_list:
                outs.figures.append(plot_heatmap(mat, list(a1), list(a2), args, env, token, figs_dir, stem))
        print(f"{env}: CKA {args.model_name1}@{args.epoch1} vs {args.model_name2}@{args.epoch2}, "
              f"{len(a1)}x{len(a2)} layers, {args.batch_size} samples", file=sys.stderr)
    return outs


def check_same_run_depth(m1, m2):
    """Two epochs of one run (``--model_name1`` = ``--model_name2``) are one model: a checkpoint of another depth
    (copied in from another run) would give a non-square matrix that plot_cka.py cannot read as epoch vs epoch.
    Models of different names may differ in depth (GPT2's 12 blocks against iGPT's 24)."""
    n1, n2 = model_depth(m1.model), model_depth(m2.model)
    if m1.key == m2.key and n1 != n2:
        raise UserError(f"{m1.path} has {n1} blocks but {m2.path} has {n2}: two checkpoints of one run are one "
                        f"model (one was copied in from another run?)")


def plot_heatmap(mat, rows, cols, args, env, token, figs_dir, stem):
    """Draw one CKA matrix as a heatmap ticked at the block boundaries and save it; returns the PNG path."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    im = ax.imshow(mat, origin="lower", cmap="magma", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(im, ax=ax, label="CKA")
    # tick the block boundaries
    def ticks(names):
        """Positions and labels of the first layer of each block in ``names``."""
        pos = [i for i, k in enumerate(names) if i == 0 or block_of(names[i - 1]) != block_of(k)]
        return pos, [str(block_of(names[i])) for i in pos]

    ax.set_yticks(*ticks(rows))
    ax.set_xticks(*ticks(cols))
    ax.set_ylabel(f"{common.model_label(args.model_name1)} epoch {args.epoch1} (block)")
    ax.set_xlabel(f"{common.model_label(args.model_name2)} epoch {args.epoch2} (block)")
    ax.set_title(f"CKA, {env}, {token} token")
    return common.save_figure(fig, figs_dir, f"{stem}_{token}")


# ---- Figure 1: the diagonal -------------------------------------------------------------------------------------

def normalise_depth(values: np.ndarray, names: list[str], target_blocks: int,
                    legacy_pairing: bool = False) -> tuple[np.ndarray, list[str]]:
    """Average a deeper model's per-layer values onto ``target_blocks`` blocks, Figure 1's "normalized layer" (iGPT's
    24 blocks onto 12): the same entry of consecutive blocks 2b and 2b+1 is averaged. ``legacy_pairing``: as TAKAGI's
    plot_cka.py, consecutive values of the flattened per-layer sequence are averaged instead (entry 2i with entry
    2i+1: ln_1 with attn.c_attn of the same block, and, with 9 entries a block, pairs that straddle two blocks); the
    points are named ``{i // entries per block}.{the averaged layers joined by '+'}``."""
    nb = block_of(names[-1]) + 1
    if nb == target_blocks or nb % target_blocks:
        return values, names
    f = nb // target_blocks
    if legacy_pairing:
        per_block = len(names) // nb
        n = len(values) // f
        out = np.asarray(values, dtype=float)[:n * f].reshape(n, f).mean(axis=1)
        return out, [f"{i // per_block}.{'+'.join(names[i * f:(i + 1) * f])}" for i in range(n)]
    groups: dict[tuple[int, str], list[float]] = {}
    for v, k in zip(values, names):
        groups.setdefault((block_of(k) // f, entry_of(k)), []).append(float(v))
    keys = list(groups)
    return np.array([np.mean(groups[k]) for k in keys]), [f"{b}.{e}" for b, e in keys]


def build_plot_parser():
    """The command-line parser of plot_cka.py (Figure 1)."""
    p = common.parser("Figure 1: per-layer CKA of each model with itself between two epochs, with a threshold line.")
    # Each flag also takes the original plot_cka.py's spelling (--cka_threshold_rand_init, --epoch = --epoch2 against
    # epoch 0, --env_name and -rsa with one value, -plc, -psf).
    p.add_argument("-thr", "--threshold", "--cka_threshold_rand_init", dest="thr", type=float, default=0.23,
                   help="threshold line (TAKAGI's code 0.23; the paper's appendix says 0.38)")
    p.add_argument("--epoch1", type=int, default=0)
    p.add_argument("--epoch2", "--epoch", dest="epoch2", type=int, default=40)
    p.add_argument("--model_name_list", nargs="+", default=list(common.MODEL_NAMES))
    p.add_argument("--env_name_list", "--env_name", dest="env_name_list", nargs="+", default=list(common.ENV_NAMES))
    p.add_argument("--dataset_name", type=str, default="medium")
    p.add_argument("--seed", type=int, default=666)
    p.add_argument("--token_list", "--rtg_state_action", "-rsa", dest="token_list", nargs="+",
                   default=list(TOKEN_POSITIONS), choices=list(TOKEN_POSITIONS))
    p.add_argument("--no_context", action="store_true", help="the results of compute_cka.py --no_context")
    common.add_run_k_flag(p, "20, or 1 with --no_context (as given to compute_cka.py)")
    p.add_argument("--block", action="store_true")
    p.add_argument("--legacy_feature_index", action="store_true")
    add_estimator_flags(p, reading=True)
    common.add_batch_read_flags(p, "compute_cka.py")
    p.add_argument("--legacy_pairing", action="store_true",
                   help="iGPT's normalized layers as TAKAGI's plot_cka.py: consecutive entries of the flattened "
                        "diagonal averaged (ln_1 with attn.c_attn, ...), not the same entry of blocks 2b and 2b+1")
    common.add_output_flags(p, "cka", results_aliases=("--path_to_load_cka", "-plc"),
                            figs_aliases=("--path_to_save_figure", "-psf"))
    common.add_ignored_device_flag(p)
    return p


def _read_layers(path) -> tuple[list[str], list[str], str | None]:
    """The row and column layer names of compute_cka.py's ``{stem}_layers.csv``, and the batch digest it records
    (None in files written before it did)."""
    import csv

    if not Path(path).is_file():
        raise UserError(f"{path}: file not found (compute_cka.py writes it next to the CKA matrices)")
    rows, cols, batch = [], [], None
    try:
        with open(path, newline="") as f:
            for i, r in enumerate(csv.DictReader(f), 2):
                layer = r.get("layer") or ""
                if r.get("axis") == "batch" and layer:
                    batch = layer
                    continue
                if r.get("axis") not in ("rows", "cols") or not layer.split(".", 1)[0].isdigit():
                    raise UserError(f"{path}: line {i} is not an axis,index,layer row of a CKA layer list")
                (rows if r["axis"] == "rows" else cols).append(layer)
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a readable CSV file ({e})") from None
    return rows, cols, batch


def plot(args) -> common.Outputs:
    """Figure 1: each model's CKA with itself between two epochs, layer by layer (the matrices' diagonals), with the
    threshold line; one figure and CSV per env and token."""
    common.check_numbers(args, thr=common.FINITE)
    common.check_seeds(args, "seed")
    common.check_min(args, 0, "epoch1", "epoch2")
    plt = common.pyplot()
    res = Path(args.results_dir)
    outs = common.Outputs()
    run_K = common.run_k(args)

    def result(env, m, token):
        """The results' stem and the ``.npy`` path of model ``m``'s CKA matrix for ``env`` and ``token``."""
        stem = result_stem(args.epoch1, args.epoch2, m, m, env, args.dataset_name, args.seed, args.no_context,
                           args.block, args.legacy_feature_index, run_K, estimator_tag(args), batch_tag(args))
        return stem, res / f"{stem}_{token}.npy"

    # an env with no results at all is left out with a note (an error only when no env has any), as in the curves
    envs = [e for e in args.env_name_list if any(result(e, m, t)[1].is_file()
                                                 for m in args.model_name_list for t in args.token_list)]
    outs.notes += [f"skipped {e}: no CKA results of it in {res}" for e in args.env_name_list if envs and e not in envs]
    for env in envs or args.env_name_list:
        for token in args.token_list:
            curves, missing, batches = {}, [], {}
            for m in args.model_name_list:
                stem, f = result(env, m, token)
                if not f.is_file():
                    missing.append(str(f))
                    continue
                mat = common.load_npy(f)
                common.check_arrays(f, {"CKA matrix": mat}, ["CKA matrix"])    # compute_cka.py writes finite values
                if np.iscomplexobj(mat):                         # numeric and finite, but no CKA value is complex
                    raise UserError(f"{f}: array 'CKA matrix' is not real ({mat.dtype})")
                layers = res / f"{stem}_layers.csv"
                names, cols, batch = _read_layers(layers)
                if batch is not None:
                    batches.setdefault(batch, layers)
                if not names or names != cols:
                    raise UserError(f"{layers}: not the layer list of a model against itself (rows and columns "
                                    f"{'differ' if names or cols else 'are empty'})")
                if mat.shape != (len(names), len(names)):
                    raise UserError(f"{f}: a CKA matrix of shape {mat.shape}, but {layers} lists {len(names)} layers; "
                                    f"the two files are from different compute_cka.py runs (rerun it)")
                curves[m] = (np.diagonal(mat).copy(), names)
            if not curves:
                raise UserError(f"no CKA results for {env}/{token}: looked for {', '.join(missing)} (run compute_cka.py "
                                f"--model_name1 M --model_name2 M --epoch1 {args.epoch1} --epoch2 {args.epoch2}"
                                f"{f' --run_K {run_K}' if run_K != common.DEFAULT_RUN_K else ''}; the results of "
                                f"--block, --legacy_feature_index, --kernel, --biased, --eps, --batch_size, --K or "
                                f"--batch_seed runs are read with the same flags; run_all.py keeps its results under "
                                f"its --out_dir: --results_dir OUT/{common.SECTIONS['cka']}/results)")
            for f in missing:
                common.warn(f"{f} not found; that model is left out of the figure")
            if len(batches) > 1:
                a, b = list(batches.values())[:2]
                common.warn(f"{a} and {b} record different batches, so the figure compares models that did not see "
                            f"the same batch: rerun compute_cka.py for every model with the same --batch_seed, "
                            f"--batch_size, --K and data")
            depths = {m: block_of(n[-1]) + 1 for m, (_, n) in curves.items()}
            target = min(depths.values())
            fig, ax = plt.subplots(figsize=(7, 3.6))
            rows, shown = [], {}
            for m, (vals, names) in curves.items():
                vals, names = normalise_depth(vals, names, target, args.legacy_pairing)
                shown[m] = names
                ax.plot(np.arange(len(vals)), vals, marker=".", color=common.model_colors(list(curves))[m],
                        label=common.model_label(m))
                above = [n for n, v in zip(names, vals) if v > args.thr]
                rows += [[m, i, n, float(v)] for i, (n, v) in enumerate(zip(names, vals))]
                print(f"{env}/{token} {m}: {len(above)} layers above {args.thr}: {', '.join(above)}")
            # the block ticks of the longest curve drawn (not of the last model's): with depths that are no multiple
            # of the shallowest (2, 3, 5 blocks) nothing is paired and the deepest model's blocks run furthest
            names = max(shown.values(), key=len)
            starts = [i for i, n in enumerate(names) if i == 0 or block_of(names[i - 1]) != block_of(n)]
            ax.axhline(args.thr, ls="--", color="k", lw=1, label=f"threshold {args.thr:g}")
            for i in starts[1:]:
                ax.axvline(i - 0.5, color="0.85", lw=0.8, zorder=0)
            ax.set_xticks(starts, [str(block_of(names[i])) for i in starts])
            lo = min(float(np.nanmin(v[0])) for v in curves.values())
            ax.set_ylim(min(-0.05, lo - 0.05), 1.05)
            # "normalized" only with a model that normalise_depth paired, named as in the attention and MI figures
            paired = [m for m in curves if depths[m] != target and depths[m] % target == 0]
            per = len(names) // max(len(starts), 1)
            notes = ([] if per == 1 else [f"ticks: first entry of each block, {per} entries per block"]) \
                + [f"{common.model_label(m)}: consecutive entries averaged" if args.legacy_pairing
                   else common.pairing_text(m, depths[m], target) for m in paired]
            ax.set_xlabel(f"{'normalized ' if paired else ''}{'block' if per == 1 else 'layer'}"
                          + (f" ({'; '.join(notes)})" if notes else ""))
            ax.set_ylabel(f"CKA (epoch {args.epoch1} vs {args.epoch2})")
            ax.set_title(f"{env}, {token} token")
            common.legend(ax)
            stem = (f"cka_plot_{args.epoch1}_{args.epoch2}_{'_'.join(curves)}_{env}_{args.dataset_name}_{args.seed}"
                    + common.run_k_tag(run_K) + ("_block" if args.block else "")
                    + ("_legacyidx" if args.legacy_feature_index else "") + estimator_tag(args) + batch_tag(args)
                    + f"_{token}" + ("_legacy_pairing" if args.legacy_pairing else ""))
            outs.figures.append(common.save_figure(fig, args.figs_dir, stem))
            outs.files.append(common.save_csv(res / f"{stem}.csv", ["model", "index", "layer", "cka"], rows))
    return outs
