"""Section 5.2 (Figure 2), Appendix E.3 (Figure 16) and H.2 (Figure 22): mutual information between data and
hidden representations, estimated with MINE (``decision_transformer.analysis.mine``).

Step 1, ``save_activation``: per model, one batch (same for every model) -> ``activation_{epoch}_{model}_{env}_{ds}_{seed}.npz``
(the block outputs ``{i}.mlp.dropout`` [B, 3K, D], or every hooked entry with ``--all_layers``, and the batch's
``batch_digest``) and
``data_{env}_{ds}_{seed}.npz`` (states, actions, rtg [B, K+1, 1], timesteps, attention_mask). ``.npz`` instead of
the originals' pickled ``.npy`` dicts: they load without pickle.

Step 2, ``run_mi_exp --exp_type``:

* ``normal``: layers 0, depth//2, depth-1 (``mlp.dropout``). For t = 0..K-1 and token type i ∈ {R̂, s, a} except a_K
  (3K - 1 positions, index 3t + i): Î(X;T) = MI(x_t of type i, activation at position -2, the s_K token) and
  Î(Y;T) = MI(a_K, activation at position 3t + i). -> ``mi_xy_{layer}_{epoch}_{model}_{env}_{ds}_{seed}.npz``
  (x, y, position, token, and the model's depth: Figure 2's rows put blocks of the same relative depth together).
* ``no_context``: every block output; for each t, MI(s_t, act[3t+1]) and MI(a_t, act[3t+1]) (the s_t token).
  -> ``mi_{epoch}_{model}_{env}_{ds}_{seed}.npz``.
* ``data``: for each t, MI(s_t, a_t) and MI(R̂_t, a_t) of the batch (no activations needed).
  -> ``mi_data_state_action_{env}_{ds}_{seed}.npy``, ``mi_data_rtg_action_{env}_{ds}_{seed}.npy``.

A non-default batch (save_activation.py's ``--batch_size``, ``--K``, ``--batch_seed``) tags the activation and data
files ``_bs{n}``, ``_ctx{k}``, ``_bseed{n}`` (after ``_K{K}``), and every result computed on it (after the estimator's
tags); run_mi_exp.py and the plots read them given ``--data_batch_size``, ``--K``, ``--batch_seed``.

Padded steps are included as in the original (``--exclude_padding`` drops, per estimate, the samples whose involved
timesteps are padding). Failed estimates are NaN and left out of the plots.
"""
from __future__ import annotations

import contextlib
import re
import sys
import warnings
from pathlib import Path

import numpy as np

from decision_transformer.analysis import common
from decision_transformer.analysis.activations import (
    BLOCK_ENTRIES,
    BLOCK_OUTPUT,
    block_of,
    check_finite_activations,
    get_activations,
)
from decision_transformer.analysis.mine import LOSSES, estimate_mi_many
from decision_transformer.analysis.runs import (
    RunKey,
    SharedDataset,
    analysis_batch,
    batch_digest,
    load_model,
    require_checkpoints,
)
from decision_transformer.errors import UserError

#: Relative: resolves against the working directory (the repository's folder when run from its root).
def mi_dir(kind: str = "results") -> str:
    """The MI section's default ``results`` (or ``figs``) folder."""
    return common.section_dir("mi", kind)
TOKENS = ("rtg", "state", "action")
EXP_TYPES = ("normal", "no_context", "data")


def activation_file(folder, epoch, model, env, ds, seed, ktag="") -> Path:
    """The path of save_activation.py's activation file of one model, epoch and run."""
    return Path(folder) / f"activation_{epoch}_{model}_{env}_{ds}_{seed}{ktag}.npz"


def data_file(folder, env, ds, seed, ktag="") -> Path:
    """The path of save_activation.py's batch file of one env, dataset and seed."""
    return Path(folder) / f"data_{env}_{ds}_{seed}{ktag}.npz"


#: The activation and MI result files' record of the batch they were computed on (``batch_digest``): run_mi_exp.py
#: compares an activation file's with the data file (one ``data_*.npz`` serves every model, and a later
#: save_activation.py on another batch rewrites it), the MI plots those of the models they draw.
BATCH_KEY = "batch_digest"
def _ktag(args) -> str:
    """``_K{K}`` in every file name of runs trained with K != 20 (``--run_K``), so they don't overwrite K=20's."""
    return common.run_k_tag(common.run_k(args))


def _add_run_k(p, reading: bool):
    if reading:
        p.add_argument("--run_K", type=int, default=None,
                       help="read the files of save_activation.py --run_K K (tagged _K{K}); default 20 (untagged)")
    else:
        common.add_run_k_flag(p)


#: run_mi_exp.py's estimator variants and settings and the tag each puts in its file names, so that their results
#: sit next to the default ones instead of replacing them (``_nopad``, ``_L2``, ``_fdiv``, ``_h64``, ``_it100``,
#: ``_mb32``, ``_lr0.001``; in this order).
MINE_DEFAULTS = {"mine_hidden_layers": 3, "mine_loss": "mine", "mine_hidden": 400, "iters": 1000, "batch_size": 50,
                 "lr": 1e-4}
_VARIANT_HELP = {
    "exclude_padding": "leave left-padded steps out of each estimate (results tagged _nopad)",
    "mine_hidden_layers": "hidden layers of the statistics network: the code's 3; the paper's text says 2 (other than 3: "
                          "results tagged _L{n})",
    "mine_loss": "mine: the moving-average-corrected bound; other losses tag the results _{loss}",
    "mine_hidden": "width of the statistics network's hidden layers (other than 400: results tagged _h{n})",
    "iters": "passes over the samples per estimate (other than 1000: results tagged _it{n})",
    "batch_size": "MINE's minibatch (other than 50: results tagged _mb{n})",
    "lr": "MINE's Adam learning rate (other than 0.0001: results tagged _lr{lr})",
}


def _add_variant_flags(p, reading: bool):
    """run_mi_exp.py's estimator variants and settings (``--exclude_padding``, ``--mine_hidden_layers``,
    ``--mine_loss``, ``--mine_hidden``, ``--iters``, ``--batch_size``, ``--lr``), or (``reading``) which run's results
    a plotting script reads."""
    read = "read the results of run_mi_exp.py run with this flag: " if reading else ""
    d = MINE_DEFAULTS
    p.add_argument("--exclude_padding", action="store_true", help=read + _VARIANT_HELP["exclude_padding"])
    p.add_argument("--mine_hidden_layers", type=int, default=d["mine_hidden_layers"],
                   help=read + _VARIANT_HELP["mine_hidden_layers"])
    p.add_argument("--mine_loss", choices=LOSSES, default=d["mine_loss"], help=read + _VARIANT_HELP["mine_loss"])
    p.add_argument("--mine_hidden", type=int, default=d["mine_hidden"], help=read + _VARIANT_HELP["mine_hidden"])
    p.add_argument("--iters", type=int, default=d["iters"], help=read + _VARIANT_HELP["iters"])
    p.add_argument("--batch_size", type=int, default=d["batch_size"], help=read + _VARIANT_HELP["batch_size"])
    p.add_argument("--lr", type=float, default=d["lr"], help=read + _VARIANT_HELP["lr"])


def _variant_tag(args) -> str:
    """The file-name tag of the estimator variant and settings ``args`` selects; empty for the default (the
    original's)."""
    d = MINE_DEFAULTS
    return ("_nopad" if args.exclude_padding else "") \
        + (f"_L{args.mine_hidden_layers}" if args.mine_hidden_layers != d["mine_hidden_layers"] else "") \
        + (f"_{args.mine_loss}" if args.mine_loss != d["mine_loss"] else "") \
        + (f"_h{args.mine_hidden}" if args.mine_hidden != d["mine_hidden"] else "") \
        + (f"_it{args.iters}" if args.iters != d["iters"] else "") \
        + (f"_mb{args.batch_size}" if args.batch_size != d["batch_size"] else "") \
        + (f"_lr{args.lr:g}" if args.lr != d["lr"] else "")


_SAME_FLAGS = ("; the results of a --run_K, --exclude_padding, --mine_hidden_layers, --mine_loss, --mine_hidden, "
               "--iters, --batch_size or --lr run are read with the same flags, and those of a save_activation.py "
               "batch of another --K, --batch_seed or --batch_size given --K, --batch_seed or --data_batch_size")


def _add_batch_flags(p):
    """Which save_activation.py batch run_mi_exp.py and the plots read: ``--K``, ``--batch_seed`` and
    ``--data_batch_size`` (save_activation.py's ``--batch_size``; here ``--batch_size`` is MINE's minibatch)."""
    common.add_batch_read_flags(p, "save_activation.py", size_flag="--data_batch_size")


def _batch_tag(K: int, batch_seed: int, samples: int) -> str:
    """The tag of a non-default save_activation.py batch: ``_bs{n}``, ``_ctx{k}``, ``_bseed{n}``
    (:func:`common.batch_tag`), in the names of its activation and data files and of every result computed on it."""
    return common.batch_tag(K, batch_seed, samples, common.DEFAULT_BATCH_SIZE)


def _data_tags(args) -> str:
    """What follows ``{seed}`` in the names of the save_activation.py files that run_mi_exp.py reads (``args`` of
    run_mi_exp.py): the runs' K tag, then the batch's."""
    return _ktag(args) + _batch_tag(args.K, args.batch_seed, args.data_batch_size)


def _batch_hint(args) -> str:
    """The save_activation.py flags of the batch ``args`` (of run_mi_exp.py) reads, for a hint."""
    d = common
    return (f" --batch_size {args.data_batch_size}" if args.data_batch_size != d.DEFAULT_BATCH_SIZE else "") \
        + (f" --K {args.K}" if args.K != d.DEFAULT_BATCH_K else "") \
        + (f" --batch_seed {args.batch_seed}" if args.batch_seed != d.DEFAULT_BATCH_SEED else "")


def _tags(args) -> str:
    """What follows ``{seed}`` in run_mi_exp.py's file names: the run's K tag, the estimator variant's, then the
    save_activation.py batch's (``_bs{n}``, ``_ctx{k}``, ``_bseed{n}``, where not the default)."""
    return _ktag(args) + _variant_tag(args) + _batch_tag(args.K, args.batch_seed, args.data_batch_size)


# ---- step 1 -----------------------------------------------------------------------------------------------------

def build_save_parser():
    """The command-line parser of save_activation.py (step 1)."""
    p = common.parser("Save block activations and the batch they were computed on, for run_mi_exp.py.")
    common.add_checkpoint_flags(p, aliases=("--path_to_load_model",))  # the original save_activation.py's spelling
    p.add_argument("--env_name_list", nargs="+", default=["hopper"])
    p.add_argument("--model_name", nargs="+", default=["gpt2"], help="one or more of gpt2, igpt, dt")
    p.add_argument("--epoch", type=int, default=40)
    p.add_argument("--seed", type=int, default=666)
    p.add_argument("--all_layers", action="store_true",
                   help="save every hooked entry (9 per block), not only the block outputs (large)")
    _add_run_k(p, reading=False)
    common.add_data_flags(p, device_default="cpu", data_aliases=("--path_to_load_data",),
                          batch_size_aliases=("--data_batch_size",),
                          batch_size_help=f"samples of the batch (other than {common.DEFAULT_BATCH_SIZE}: files "
                                          f"tagged _bs{{n}}, which run_mi_exp.py and the plots read given "
                                          f"--data_batch_size n; their --batch_size is MINE's minibatch)")
    p.add_argument("--results_dir", type=str, default=mi_dir(),
                   help="relative paths resolve against the working directory")
    # the original save_activation.py's two output folders (run_mi_exp.py's -pd / -pa read them)
    p.add_argument("--path_to_save_data", type=str, default=None,
                   help="folder of the data_*.npz batches (default --results_dir)")
    p.add_argument("--path_to_save_activation", type=str, default=None,
                   help="folder of the activation_*.npz files (default --results_dir)")
    return p


def run_save(args) -> common.Outputs:
    """Step 1: per env and model, save the block outputs (every hooked entry with ``--all_layers``) of one
    batch with its digest, and the batch itself (states, actions, rtg, timesteps, attention_mask)."""
    common.check_min(args, 2, "batch_size")                          # MI of one sample is undefined (all NaN)
    common.check_data_flags(args)
    common.check_seeds(args, "seed")
    common.check_min(args, 0, "epoch")
    device = common.resolve_device(args.device, getattr(args, "threads", "auto"))
    # the folders are made once the first model's activations passed their check (nothing written before)
    act_dir = args.path_to_save_activation or args.results_dir
    data_dir = args.path_to_save_data or args.results_dir
    outs = common.Outputs()
    entries = BLOCK_ENTRIES if args.all_layers else (BLOCK_OUTPUT,)
    # the runs' K, then a non-default batch (run_mi_exp.py reads these files given the same --run_K, --K,
    # --batch_seed and --data_batch_size)
    run_K, ktag = common.run_k(args), _ktag(args) + _batch_tag(args.K, args.batch_seed, args.batch_size)
    common.check_env_datasets(args, args.env_name_list)
    require_checkpoints(args.checkpoint_dir, [(RunKey(m, args.dataset_name, env, args.seed, run_K), args.epoch)
                                              for env in args.env_name_list for m in args.model_name])
    datasets = SharedDataset(args.dataset_name, args.data_path, device, outs.notes)   # every model: the same batch
    for env in args.env_name_list:
        for m in args.model_name:
            key = RunKey(m, args.dataset_name, env, args.seed, run_K)
            lm = load_model(args.checkpoint_dir, key, args.epoch, device)
            data = datasets.get(env, lm)
            batch = analysis_batch(data, args.batch_size, args.K, args.batch_seed)
            acts = get_activations(lm.model, batch, entries)
            check_finite_activations(acts, lm.path)
            common.out_dir(args.results_dir)
            act_dir, data_dir = common.out_dir(act_dir), common.out_dir(data_dir)
            arrays = dict(states=batch.states.cpu().numpy(), actions=batch.actions.cpu().numpy(),
                          rtg=batch.rtg.cpu().numpy(), timesteps=batch.timesteps.cpu().numpy(),
                          attention_mask=batch.mask.cpu().numpy())
            digest = batch_digest(arrays)
            act_file = activation_file(act_dir, args.epoch, m, env, args.dataset_name, args.seed, ktag)
            df = data_file(data_dir, env, args.dataset_name, args.seed, ktag)
            _warn_replaced_batch(df, digest)
            outs.files.append(common.save_npz(act_file, **{k: v.numpy() for k, v in acts.items()},
                                              **{BATCH_KEY: np.array(digest)}))
            outs.files.append(common.save_npz(df, **arrays))
            print(f"{env} {m}: saved {len(acts)} activations of {args.batch_size} samples", file=sys.stderr)
    return outs


def _warn_replaced_batch(df: Path, digest: str):
    """Rewriting a data file with another batch (other --batch_seed, --batch_size, --data_path or recorded data file)
    strands the activations saved with the old one: said here, and run_mi_exp.py refuses those pairs."""
    if not df.is_file():
        return
    try:
        old = batch_digest(common.load_npz(df))
    except (UserError, KeyError, ValueError):   # an unreadable or foreign file: replaced without comment
        return
    if old != digest:
        common.warn(f"{df} held a different batch; activation files saved with it for other models no longer match "
                    f"it (run_mi_exp.py refuses them): save every model's activations with the same --batch_seed, "
                    f"--batch_size and data")


# ---- step 2 -----------------------------------------------------------------------------------------------------

def build_mi_parser():
    """The command-line parser of run_mi_exp.py (step 2)."""
    import torch

    p = common.parser("Mutual information between data and hidden representations with MINE (TAKAGI's "
                      "mine-pytorch/run_mi_exp.py).")
    p.add_argument("--path_to_save_mi", "-psm", type=str, default=mi_dir(),
                   help="relative paths (also of -pd, -pa) resolve against the working directory")
    p.add_argument("--path_to_data", "-pd", type=str, default=mi_dir())
    p.add_argument("--path_to_activation", "-pa", type=str, default=mi_dir())
    _add_run_k(p, reading=True)
    p.add_argument("--exp_type", choices=EXP_TYPES, default="normal")
    p.add_argument("--env_name", type=str, default="hopper")
    p.add_argument("--dataset_name", type=str, default="medium")
    p.add_argument("--seed", type=int, default=666, help="selects the files; also seeds MINE")
    p.add_argument("--epoch", type=int, default=40)
    p.add_argument("--model_name", type=str, default="gpt2")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_threads_flag(p)
    _add_variant_flags(p, reading=False)
    _add_batch_flags(p)
    p.add_argument("--layers", nargs="+", type=int, default=None,
                   help="blocks for --exp_type normal (default: 0, depth//2, depth-1)")
    p.add_argument("--mine_ensemble", type=int, default=128,
                   help="MINE estimators trained at once as one batched network (the same estimates up to float "
                        "rounding; 1 trains them one by one)")
    return p


@contextlib.contextmanager
def _quiet_nan():
    """numpy's RuntimeWarnings of nanmean / nanstd / nanmedian over all-NaN slices (their result is NaN, which the
    callers handle), not printed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


class _Estimator:
    """Queues the estimates of a result file and trains them together (``estimate_mi_many``); estimate i of the run
    is seeded ``--seed`` + i, in the order they are queued."""

    def __init__(self, args):
        self.args = args
        self.device = common.resolve_device(args.device, getattr(args, "threads", "auto"))
        self.count = 0
        self.pending: list[tuple[np.ndarray, np.ndarray, int]] = []

    def __call__(self, x, y, keep=None) -> int:
        """Queues MI(x, y) (over the samples ``keep`` selects, with ``--exclude_padding``); returns its place in
        ``results``, -1 for fewer than 2 samples (NaN)."""
        x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float32)
        if keep is not None and self.args.exclude_padding:
            x, y = x[keep], y[keep]
        if len(x) < 2:
            return -1
        self.count += 1
        self.pending.append((x.reshape(len(x), -1), y.reshape(len(y), -1), self.args.seed + self.count))
        return len(self.pending) - 1

    def results(self, handles, desc: str) -> np.ndarray:
        """Trains the queued estimates (a progress bar titled ``desc``) and returns the values of ``handles``."""
        a, queued, self.pending = self.args, self.pending, []
        values = estimate_mi_many([q[:2] for q in queued], [q[2] for q in queued], iters=a.iters,
                                  batch_size=a.batch_size, loss=a.mine_loss, hidden=a.mine_hidden,
                                  hidden_layers=a.mine_hidden_layers, lr=a.lr, device=self.device,
                                  ensemble=a.mine_ensemble, desc=desc) if queued else []
        return np.array([values[h] if h >= 0 else np.nan for h in handles], dtype=float)


def _check_data(path, data: dict):
    """A ``data_file``'s arrays: present, numeric, finite, in save_activation.py's shapes."""
    common.check_arrays(path, data, ("states", "actions", "rtg", "attention_mask"))
    m, s, a, r = (data[k] for k in ("attention_mask", "states", "actions", "rtg"))
    if not (m.ndim == 2 and s.ndim == a.ndim == r.ndim == 3 and s.shape[:2] == a.shape[:2] == m.shape
            and r.shape[:2] == (m.shape[0], m.shape[1] + 1)):
        raise UserError(f"{path}: arrays of shapes attention_mask {m.shape}, states {s.shape}, actions {a.shape}, rtg "
                        f"{r.shape}; save_activation.py writes [B, K], [B, K, ds], [B, K, da] and [B, K+1, 1]")


def _inputs(data: dict):
    """x_t per token type as [B, K, d] arrays, a_K [B, da], and the [B, K] mask."""
    rtg = data["rtg"][:, :-1]
    return {"rtg": rtg, "state": data["states"], "action": data["actions"]}, data["actions"][:, -1], \
        data["attention_mask"] > 0


def _check_same_batch(act_file: Path, recorded, df: Path, data: dict, args):
    """The batch recorded in the activation file is the data file's (files without the record, such as the
    originals', are taken as they are)."""
    if recorded is not None and str(recorded) != batch_digest(data):
        raise UserError(f"{act_file}: computed on a different batch than {df} holds (save_activation.py rewrote it "
                        f"since, for another model or other flags); rerun save_activation.py --model_name "
                        f"{args.model_name} --epoch {args.epoch} with the batch flags the other models used")


def _absent(path: Path) -> bool:
    """Neither ``path`` nor the original scripts' pickled ``.npy`` of the same name (which ``load_npz`` reads)."""
    return not path.exists() and not path.with_suffix(".npy").is_file()


def run_mi(args) -> common.Outputs:
    """Step 2: MINE estimates of the ``--exp_type`` (normal, no_context or data) from the saved batch and
    activations, written as the ``.npz`` / ``.npy`` files the module docstring lists."""
    common.check_positive(args, "iters", "batch_size", "mine_hidden", "mine_hidden_layers", "mine_ensemble")
    common.check_numbers(args, lr=common.POSITIVE)
    common.check_seeds(args, "seed", bits=62)
    common.check_min(args, 0, "epoch")
    ds, env, ktag = args.dataset_name, args.env_name, _data_tags(args)
    df = data_file(args.path_to_data, env, ds, args.seed, ktag)
    run_k = (f" --run_K {common.run_k(args)}" if _ktag(args) else "") + _batch_hint(args)
    if _absent(df):
        raise UserError(f"{df}: file not found; save_activation.py writes it (save_activation.py --env_name_list "
                        f"{env} --dataset_name {ds} --seed {args.seed}{run_k} --model_name M --epoch E)")
    data = common.load_npz(df)
    _check_data(df, data)
    xs, a_last, mask = _inputs(data)
    B, K = mask.shape
    if B < 2:
        raise UserError(f"{df}: {B} sample(s); MI needs at least 2 (save_activation.py --batch_size 2 or more)")
    if args.exp_type != "data":
        act_file = activation_file(args.path_to_activation, args.epoch, args.model_name, env, ds, args.seed, ktag)
        if _absent(act_file):
            raise UserError(f"{act_file}: file not found; run save_activation.py --model_name {args.model_name} "
                            f"--epoch {args.epoch} --env_name_list {env} --dataset_name {ds} --seed {args.seed}{run_k} "
                            f"first (-pa reads the folder its --results_dir names)")
        loaded = common.load_npz(act_file)
        outputs = {k: v for k, v in loaded.items()
                   if k.endswith("." + BLOCK_OUTPUT) and k.split(".", 1)[0].isdigit()}
        if not outputs:
            raise UserError(f"{act_file}: no block outputs (*.{BLOCK_OUTPUT})")
        _check_same_batch(act_file, loaded.get(BATCH_KEY), df, data, args)
        common.check_arrays(act_file, outputs, outputs)
        for k, v in outputs.items():
            if v.ndim != 3 or v.shape[:2] != (B, 3 * K):
                raise UserError(f"{act_file}: activation {k} has shape {v.shape}, the data file's batch needs [{B}, "
                                f"{3 * K}, D] ({B} samples, 3 tokens x {K} steps)")
        depth = max(block_of(k) for k in outputs) + 1
        layers = args.layers if args.layers is not None else sorted({0, depth // 2, depth - 1})
        bad = [b for b in layers if f"{b}.{BLOCK_OUTPUT}" not in outputs]
        if bad and args.exp_type == "normal":
            raise UserError(f"no activation {bad[0]}.{BLOCK_OUTPUT} in {act_file} (depth {depth})")
    out = common.out_dir(args.path_to_save_mi)
    outs = common.Outputs()
    est = _Estimator(args)
    if args.exp_type == "data":
        handles = [est(xs["state"][:, t], xs["action"][:, t], mask[:, t]) for t in range(K)] \
            + [est(xs["rtg"][:, t], xs["action"][:, t], mask[:, t]) for t in range(K)]
        sa, ra = np.split(est.results(handles, f"MINE {env} {ds} data"), 2)
        tags = _tags(args)
        outs.files.append(common.save_npy(out / f"mi_data_state_action_{env}_{ds}_{args.seed}{tags}.npy", sa))
        outs.files.append(common.save_npy(out / f"mi_data_rtg_action_{env}_{ds}_{args.seed}{tags}.npy", ra))
        with _quiet_nan():
            print(f"{env}: I(s;a) median {np.nanmedian(sa):.3f}, I(R;a) median {np.nanmedian(ra):.3f} nats",
                  file=sys.stderr)
        return outs
    stem_tail = f"{args.epoch}_{args.model_name}_{env}_{ds}_{args.seed}{_tags(args)}"
    if args.exp_type == "normal":
        for layer in layers:
            key = f"{layer}.{BLOCK_OUTPUT}"
            act = outputs[key]                                                   # [B, 3K, D]
            pos, tok, ix, iy = [], [], [], []
            target = act[:, -2]                                                  # the s_K token
            for t in range(K):
                for i, name in enumerate(TOKENS):
                    p = 3 * t + i
                    if p == 3 * K - 1:                                           # a_K is the prediction target
                        continue
                    keep = mask[:, t]
                    ix.append(est(xs[name][:, t], target, keep))
                    iy.append(est(a_last, act[:, p], keep))
                    pos.append(p)
                    tok.append(i)
            ix, iy = np.split(est.results(ix + iy, f"MINE {args.model_name} block {layer}"), 2)
            f = out / f"mi_xy_{layer}_{stem_tail}.npz"
            outs.files.append(common.save_npz(f, x=ix, y=iy, position=np.array(pos),
                                              token=np.array(tok), depth=np.array(depth),
                                              blocks=np.array(sorted(set(layers))), **{BATCH_KEY: np.array(batch_digest(data))}))
            with _quiet_nan():
                print(f"{env} {args.model_name} block {layer}: I(X;T) mean {np.nanmean(ix):.3f}, "
                      f"I(Y;T) mean {np.nanmean(iy):.3f} nats", file=sys.stderr)
        return outs
    # no_context
    handles = {}
    for key in sorted(outputs, key=block_of):
        act = outputs[key]
        handles[key] = [est(xs["state"][:, t], act[:, 3 * t + 1], mask[:, t]) for t in range(K)] \
            + [est(xs["action"][:, t], act[:, 3 * t + 1], mask[:, t]) for t in range(K)]
    values = est.results([h for hs in handles.values() for h in hs], f"MINE {args.model_name} no context")
    res = {key: values[i * 2 * K:(i + 1) * 2 * K].reshape(2, K) for i, key in enumerate(handles)}  # [2, K] each
    outs.files.append(common.save_npz(out / f"mi_{stem_tail}.npz", **res, **{BATCH_KEY: np.array(batch_digest(data))}))
    return outs


# ---- plots ------------------------------------------------------------------------------------------------------

def _add_plot_dirs(p):
    """--results_dir / --figs_dir, also spelt as in the original plotting scripts (-plm, -psf)."""
    p.add_argument("--results_dir", "--path_to_load_mi", "-plm", dest="results_dir", type=str, default=mi_dir(),
                   help="relative paths resolve against the working directory")
    p.add_argument("--figs_dir", "--path_to_save_figure", "-psf", dest="figs_dir", type=str, default=mi_dir("figs"))


def build_plot_parser():
    """The command-line parser of the MI plotting script (Figures 2 and 16)."""
    p = common.parser("Figures 2 and 16 from run_mi_exp.py's results.")
    p.add_argument("--exp_type", choices=("normal", "no_context"), default="normal")
    # the original plot_mutual_information.py's switch for Figure 16
    p.add_argument("--no_context", dest="exp_type", action="store_const", const="no_context",
                   help="= --exp_type no_context")
    p.add_argument("--env_name", type=str, default="hopper")
    p.add_argument("--dataset_name", type=str, default="medium")
    p.add_argument("--seed", type=int, default=666)
    p.add_argument("--epoch", type=int, default=40)
    p.add_argument("--model_name_list", nargs="+", default=list(common.MODEL_NAMES))
    _add_run_k(p, reading=True)
    _add_variant_flags(p, reading=True)
    _add_batch_flags(p)
    _add_plot_dirs(p)
    return p


def _pair_average(values: np.ndarray, target: int) -> np.ndarray:
    n = len(values)
    if n == target or n % target:
        return values
    return np.nanmean(values.reshape(target, n // target), axis=1)


def _check_estimates(f, k, a):
    """MI estimates ``a`` (array ``k`` of the file ``f``): real numbers or NaN (a failed estimate; MINE never gives
    inf)."""
    if np.iscomplexobj(a):
        raise UserError(f"{f}: array {k!r} is not real ({a.dtype})")
    if np.isinf(a).any():
        raise UserError(f"{f}: array {k!r} has infinite values (failed estimates are NaN)")


def _load_mi_xy(f, block: int | None = None) -> dict:
    """A ``normal`` result as run_mi_exp.py writes it: 1-D ``x``, ``y`` (NaN: failed estimates), ``position`` and
    ``token`` (0, 1, 2: R̂, s, a) of one length, and optionally the model's ``depth`` (a whole number above
    ``block``); anything else is refused naming the file."""
    d = common.load_npz(f)
    names = ("x", "y", "position", "token")
    common.check_arrays(f, d, names, finite=False)                          # failed estimates are NaN
    shapes = [d[k].shape for k in names]
    if any(len(sh) != 1 for sh in shapes) or len(set(shapes)) > 1 or shapes[0][0] == 0:
        raise UserError(f"{f}: arrays x, y, position, token of shapes {', '.join(str(list(sh)) for sh in shapes)}; "
                        f"run_mi_exp.py writes four 1-D arrays of one length")
    for k in ("x", "y"):
        _check_estimates(f, k, d[k])
    if np.iscomplexobj(d["position"]) or not np.isfinite(d["position"]).all():
        raise UserError(f"{f}: array 'position' has values that are not finite real numbers")
    if np.iscomplexobj(d["token"]) or not np.isin(d["token"], (0, 1, 2)).all():
        raise UserError(f"{f}: array 'token' has values other than 0, 1, 2 (R̂, s, a)")
    if "depth" in d:
        v = d["depth"]
        ok = (v.size == 1 and (np.issubdtype(v.dtype, np.integer) or np.issubdtype(v.dtype, np.floating))
              and np.isfinite(v).all() and float(v.item()) == int(v.item()) and int(v.item()) >= 1)
        if not ok or (block is not None and int(v.item()) <= block):
            raise UserError(f"{f}: 'depth' {v.tolist()!r} is not the depth of a model with block {block}")
    if "blocks" in d:   # the blocks the run_mi_exp.py call that wrote this file computed
        v = d["blocks"]
        if v.ndim != 1 or not np.issubdtype(v.dtype, np.integer) or (v < 0).any() or (
                block is not None and block not in v.tolist()):
            raise UserError(f"{f}: 'blocks' {v.tolist()!r} is not a list of block numbers holding block {block}")
    return d


def _load_mi_blocks(f) -> dict:
    """A ``no_context`` result: one ``[2, K]`` array (state, action MI per timestep) per ``{block}.{module}`` key, the
    same K for every block; anything else is refused naming the file."""
    d = common.load_npz(f)
    d.pop(BATCH_KEY, None)                                                  # the batch record: see _warn_batches
    if not d:
        raise UserError(f"{f}: no MI arrays")
    common.check_arrays(f, d, list(d), finite=False)                        # failed estimates are NaN
    for k, a in d.items():
        if not re.fullmatch(r"\d+\.\S+", k):
            raise UserError(f"{f}: array {k!r} is not named {{block}}.{{module}} (e.g. 0.mlp.dropout)")
        if a.ndim != 2 or a.shape[0] != 2 or a.shape[1] < 1:
            raise UserError(f"{f}: array {k!r} has shape {list(a.shape)}, expected [2, K]")
        _check_estimates(f, k, a)
    widths = {a.shape[1] for a in d.values()}
    if len(widths) > 1:
        raise UserError(f"{f}: the blocks' arrays have different K ({sorted(widths)})")
    return d


DEPTH_NAMES = ("shallow", "middle", "deep")


def _warn_batches(files) -> None:
    """A warning when the result files drawn in one figure record different batches (``BATCH_KEY``; files without
    the record are left out): their models did not see the same batch, as the figure's comparison assumes."""
    seen = {}
    for f in files:
        try:
            rec = common.load_npz(f).get(BATCH_KEY)
        except UserError:
            continue
        if rec is not None:
            seen.setdefault(str(rec), f)
    if len(seen) > 1:
        a, b = list(seen.values())[:2]
        common.warn(f"{a} and {b} were computed on different batches, so the figure compares models that did not see "
                    f"the same batch: save every model's activations in one save_activation.py call (or with the "
                    f"same batch flags) and rerun run_mi_exp.py")


def _check_one_depth(loaded: list, pattern: Path):
    """The ``normal`` results of one model (``loaded``: [(file, block, result)], every file of ``pattern``) are of
    one model depth. A results folder that held an earlier run of a model of the same name but another number of
    blocks keeps that run's files (run_mi_exp.py writes only the blocks it computes), and Figure 2 would draw both
    models' blocks as one model's."""
    recorded = [(f, int(d["depth"].item())) for f, _, d in loaded if "depth" in d]
    if not recorded:
        return
    f1, n1 = recorded[0]
    other = next(((f, n) for f, n in recorded if n != n1), None)
    # a file without a recorded depth (older results) conflicts only where its block lies beyond the recorded depth
    beyond = next(((f, b) for f, b, d in loaded if "depth" not in d and b >= n1), None)
    if other is None and beyond is None:
        return
    what = f"{other[0]} depth {other[1]}" if other else f"{beyond[0]} is block {beyond[1]}"
    raise UserError(f"{f1} records depth {n1} but {what}: results of two models of different depth in one folder "
                    f"(one left over from an earlier run); remove the stale files, or every {pattern.name}, and "
                    f"rerun run_mi_exp.py")


def _default_blocks(depth: int) -> list[int]:
    """The blocks run_mi_exp.py's ``normal`` writes without ``--layers``: first, middle, last."""
    return sorted({0, depth // 2, depth - 1})


def _missing_blocks(loaded: list) -> tuple[int, list[int], list[int]] | None:
    """(depth, missing blocks, blocks asked for) of one model's ``normal`` results (``loaded``: [(file, block, result)], one depth, see
    ``_check_one_depth``) that hold some but not all of the blocks the run_mi_exp.py calls that wrote them computed
    (a run killed between two blocks leaves the later ones out). The blocks asked for are recorded in each file
    (``blocks``); files without that record (older results) are measured against the default blocks, unless a
    block outside those shows that ``--layers`` chose them. None when complete or without a recorded depth (older
    results: the gap cannot be told)."""
    depth = next((int(d["depth"].item()) for _, _, d in loaded if "depth" in d), None)
    if depth is None:
        return None
    have = {b for _, b, _ in loaded}
    asked = {int(b) for _, _, d in loaded if "blocks" in d for b in d["blocks"].tolist()}
    if asked:
        gap = sorted(asked - have)
        return (depth, gap, sorted(asked)) if gap else None
    default = _default_blocks(depth)
    if not have <= set(default):
        return None
    gap = [b for b in default if b not in have]
    return (depth, gap, default) if gap else None


def _depth_rows(found: dict) -> list[dict]:
    """Figure 2's rows: each model's blocks placed by relative depth (block / (depth - 1)), so a row holds blocks at
    the same depth of every model (GPT2's block 11 next to iGPT's block 23, a 2-block model's block 1 in the deep
    row), not the i-th file of each model. ``found``: model -> [(block, result)] sorted by block; a result's
    ``depth`` (files without it: the model's deepest block + 1; one per model, see ``_check_one_depth``). Returns
    per row {"models": {model: (block, result)}, "title": e.g. "deep: GPT2/Random Init block 11, iGPT block 23"}
    (named "shallow" / "middle" / "deep" only where every block of the row is nearest to its model's first / middle
    / last block)."""
    rel = {}
    for m, layers in found.items():
        deepest = max(b for b, _ in layers)
        for b, d in layers:
            n = int(d["depth"]) if "depth" in d and np.size(d["depth"]) == 1 else deepest + 1
            rel[(m, b)] = b / max(n - 1, 1)
    nrows = max(len(v) for v in found.values())
    slots = [r / max(nrows - 1, 1) for r in range(nrows)]                  # each row's nominal relative depth
    rows = [{"models": {}} for _ in range(nrows)]
    for m, layers in found.items():
        prev = -1
        for i, (b, d) in enumerate(layers):
            # the nearest row after the previous block's, leaving a row for each deeper block of this model
            free = range(prev + 1, nrows - (len(layers) - 1 - i))
            prev = min(free, key=lambda r: (abs(slots[r] - rel[(m, b)]), r))
            rows[prev]["models"][m] = (b, d)
    rows = [row for row in rows if row["models"]]
    for row in rows:
        names = {min(range(3), key=lambda k: abs(rel[(m, b)] - k / 2)) for m, (b, _) in row["models"].items()}
        by_block: dict[int, list[str]] = {}
        for m, (b, _) in row["models"].items():
            by_block.setdefault(b, []).append(common.model_label(m))
        blocks = ", ".join(f"{'/'.join(ms)} block {b}" for b, ms in by_block.items())
        row["title"] = f"{DEPTH_NAMES[names.pop()]}: {blocks}" if len(names) == 1 else blocks
    return rows


def plot_mi(args) -> common.Outputs:
    """Figure 2 (``normal``: Î(X;T) and Î(Y;T) per context position, one row per relative depth) or Figure 16
    (``no_context``: per-block mean and std over timesteps of Î(s_t; T) and Î(a_t; T))."""
    common.check_seeds(args, "seed")
    common.check_min(args, 0, "epoch")
    plt = common.pyplot()
    res = Path(args.results_dir)
    outs = common.Outputs()
    ktag = _tags(args)
    tail = lambda m: f"{args.epoch}_{m}_{args.env_name}_{args.dataset_name}_{args.seed}{ktag}"
    if args.exp_type == "normal":
        found, missing, empty, drawn, gaps = {}, [], [], [], []
        for m in args.model_name_list:
            files = sorted((f for f in res.glob(f"mi_xy_*_{tail(m)}.npz") if f.name.split("_")[2].isdigit()),
                           key=lambda f: int(f.name.split("_")[2]))
            if not files:
                missing.append(res / f"mi_xy_*_{tail(m)}.npz")
            elif m not in found:
                loaded = []
                for f in files:
                    b = int(f.name.split("_")[2])
                    d = _load_mi_xy(f, b)
                    loaded.append((f, b, d))
                    nan = [w for w in ("x", "y") if np.isnan(d[w]).all()]
                    if nan:
                        empty.append(f"{f}: every {' and '.join(nan)} estimate is NaN; nothing of it is drawn")
                _check_one_depth(loaded, res / f"mi_xy_*_{tail(m)}.npz")
                gap = _missing_blocks(loaded)
                if gap:
                    depth, blocks, asked = gap
                    names = ", ".join(str(res / f"mi_xy_{b}_{tail(m)}.npz") for b in blocks)
                    which = f"block{'s' * (len(blocks) > 1)} {', '.join(map(str, blocks))}"
                    gaps.append(f"{names} not found: {m} (depth {depth}) lacks {which} of the blocks run_mi_exp.py "
                                f"computes ({', '.join(map(str, asked))}; a run killed before its last "
                                f"block leaves the later ones out), so the figure draws {m} without "
                                f"{'them' if len(blocks) > 1 else 'it'}; rerun run_mi_exp.py --model_name {m} "
                                f"--env_name {args.env_name} --epoch {args.epoch} with the flags of its other files")
                found[m] = [(b, d) for _, b, d in loaded]
                drawn += files
        if not found:
            raise UserError(f"no MI results mi_xy_*_{tail('{model}')}.npz in {res} (run mine/run_mi_exp.py first"
                            f"{_SAME_FLAGS})")
        for f in missing:
            common.warn(f"{f} not found; that model is left out of the figure")
        for line in gaps + empty:
            common.warn(line)
        _warn_batches(drawn)
        rows = _depth_rows(found)
        nrows = len(rows)
        fig, axes = plt.subplots(nrows, 2, figsize=(10, 2.6 * nrows), squeeze=False)
        markers = ("^", "o", "x")
        colors = common.model_colors(list(found))
        top = np.full((nrows, 2), 5.5)                   # each panel's upper limit: over every model drawn in it
        for r, row in enumerate(rows):
            for c, what in enumerate(("x", "y")):
                ax = axes[r, c]
                for m, (layer, d) in row["models"].items():
                    for i, mk in enumerate(markers):
                        sel = (d["token"] == i) & ~np.isnan(d[what])
                        ax.scatter(d["position"][sel] / 3, d[what][sel], marker=mk, s=14, color=colors[m])
                    if np.isfinite(d[what]).any():
                        top[r, c] = max(top[r, c], np.nanmax(d[what][np.isfinite(d[what])]) + 0.2)
                ax.set_title(f"{'Î(X;T)' if what == 'x' else 'Î(Y;T)'}, {row['title']}", fontsize=9)
                ax.set_ylim(-0.1, top[r, c])
                ax.set_xlabel("Context (timestep; R̂, s, a at t, t+1/3, t+2/3)")
                ax.set_ylabel("MI (nats)")
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], ls="", marker=mk, color=colors[m], label=f"{common.model_label(m)} {tok}")
                   for m in found for mk, tok in zip(markers, ("R̂", "s", "a"))]
        axes[0, 1].legend(handles=handles, fontsize=6, ncol=len(found))
        stem = f"mi_xy_{args.epoch}_{'_'.join(found)}_{args.env_name}_{args.dataset_name}_{args.seed}{ktag}"
        fig.tight_layout()
        outs.figures.append(common.save_figure(fig, args.figs_dir, stem))
        return outs
    found, missing = {}, []
    for m in args.model_name_list:
        f = res / f"mi_{tail(m)}.npz"
        if f.is_file():
            found[m] = _load_mi_blocks(f)
        else:
            missing.append(f)
    if not found:
        raise UserError(f"no MI results {res / ('mi_' + tail('{model}') + '.npz')} (run run_mi_exp.py --exp_type "
                        f"no_context first{_SAME_FLAGS})")
    for f in missing:
        common.warn(f"{f} not found; that model is left out of the figure")
    _warn_batches([res / f"mi_{tail(m)}.npz" for m in found])
    for m, d in found.items():
        nan = [w for c, w in enumerate(("state", "action")) if all(np.isnan(a[c]).all() for a in d.values())]
        if nan:
            common.warn(f"{res / f'mi_{tail(m)}.npz'}: every {' and '.join(nan)} estimate is NaN; nothing of it is "
                        f"drawn")
    target = min(len(d) for d in found.values())
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), layout="constrained")
    colors = common.model_colors(list(found))
    top = [4.5, 4.5]   # the originals' 4.5 nats, raised to show a higher estimate (it was cut off)
    for m, d in found.items():
        keys = sorted(d, key=block_of)
        arr = np.stack([d[k] for k in keys])                                     # [blocks, 2, K]
        for c, (ax, name) in enumerate(zip(axes, ("Î(s_t; T)", "Î(a_t; T)"))):
            with _quiet_nan():                                                   # an all-NaN block: a NaN point
                mean = _pair_average(np.nanmean(arr[:, c], axis=1), target)
                std = _pair_average(np.nanstd(arr[:, c], axis=1), target)
            ax.errorbar(np.arange(len(mean)), mean, yerr=std, marker="o", ms=3, capsize=2, color=colors[m],
                        label=common.model_label(m))
            ax.set_title(name)
            ax.set_ylabel("MI (nats)")
            high = mean + std
            if np.isfinite(high).any():
                top[c] = max(top[c], float(np.nanmax(high[np.isfinite(high)])) + 0.2)
            ax.set_ylim(-0.5, top[c])
    # every model decides the axis label (not the last one drawn)
    pairing = "; ".join(common.pairing_text(m, len(d), target) for m, d in found.items()
                        if len(d) != target and len(d) % target == 0)
    for ax in axes:
        ax.set_xlabel(f"normalized block ({pairing})" if pairing else "block")
        common.integer_ticks(ax)
    common.legend(axes[0], fontsize=7)
    stem = f"mi_no_context_{args.epoch}_{'_'.join(found)}_{args.env_name}_{args.dataset_name}_{args.seed}{ktag}"
    outs.figures.append(common.save_figure(fig, args.figs_dir, stem))
    return outs


def build_plot_data_parser():
    """The command-line parser of the data-MI plotting script (Figure 22)."""
    p = common.parser("Figure 22: MI between states and actions and between returns-to-go and actions, per env.")
    p.add_argument("--exp_type", choices=("data", "normal", "no_context"), default="data",
                   help="unused: this script plots the data experiment (accepted for the originals' command lines, "
                        "which passed --exp_type normal, their default)")
    p.add_argument("--env_name_list", nargs="+", default=list(common.ENV_NAMES))
    p.add_argument("--env_name", type=str, default=None, help="a single env (overrides --env_name_list)")
    p.add_argument("--dataset_name", type=str, default="medium")
    p.add_argument("--seed", type=int, default=666)
    p.add_argument("--epoch", type=int, default=40, help="unused (accepted for the originals' command lines)")
    _add_run_k(p, reading=True)
    _add_variant_flags(p, reading=True)
    _add_batch_flags(p)
    _add_plot_dirs(p)
    return p


def _load_mi_data(f) -> np.ndarray:
    """A ``data`` result as run_mi_exp.py writes it: a non-empty 1-D array of MI per timestep (NaN: failed
    estimates); anything else is refused naming the file."""
    a = common.load_npy(f)
    common.check_arrays(f, {"MI": a}, ("MI",), finite=False)
    if a.ndim != 1 or a.size == 0:
        raise UserError(f"{f}: an array of shape {list(a.shape)}; run_mi_exp.py writes a 1-D array (one MI per "
                        f"timestep)")
    _check_estimates(f, "MI", a)
    return a


def plot_mi_data(args) -> common.Outputs:
    """Figure 22: per env, box plots over timesteps of Î(s; a) and Î(R̂; a) of the batch."""
    common.check_seeds(args, "seed")
    plt = common.pyplot()
    res = Path(args.results_dir)
    envs = [args.env_name] if args.env_name else args.env_name_list
    ktag = _tags(args)
    found, missing, empty = {}, [], []
    for env in envs:
        fs = [res / f"mi_data_{w}_action_{env}_{args.dataset_name}_{args.seed}{ktag}.npy" for w in ("state", "rtg")]
        if not all(f.is_file() for f in fs):
            missing.append(" and ".join(str(f) for f in fs if not f.is_file()))
        elif env not in found:
            found[env] = [_load_mi_data(f) for f in fs]
            if found[env][0].size != found[env][1].size:
                raise UserError(f"{fs[0]} has {found[env][0].size} timesteps but {fs[1]} has {found[env][1].size}; "
                                f"run_mi_exp.py writes both from one data file, so one is from another run: "
                                f"run it again for {env}")
            empty += [f for f, a in zip(fs, found[env]) if np.isnan(a).all()]
    if not found:
        raise UserError(f"no data-MI results mi_data_state_action_{{env}}_{args.dataset_name}_{args.seed}{ktag}.npy in "
                        f"{res} (run run_mi_exp.py --exp_type data first{_SAME_FLAGS})")
    for f in missing:
        common.warn(f"{f} not found; that env is left out of the figure")
    for f in empty:
        common.warn(f"{f}: every estimate is NaN; its box is empty")
    fig, axes = plt.subplots(1, len(found), figsize=(3.2 * len(found), 3.2), squeeze=False, layout="constrained")
    for ax, (env, (sa, ra)) in zip(axes[0], found.items()):
        ax.boxplot([sa[~np.isnan(sa)], ra[~np.isnan(ra)]])
        ax.set_xticks([1, 2], ["Î(s; a)", "Î(R̂; a)"])
        ax.set_title(env)
        ax.set_ylabel("MI (nats) over timesteps")
    outs = common.Outputs()
    stem = f"mi_data_{'_'.join(found)}_{args.dataset_name}_{args.seed}{ktag}"
    outs.figures.append(common.save_figure(fig, args.figs_dir, stem))
    return outs
