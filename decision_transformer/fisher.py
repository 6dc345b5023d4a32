"""Diagonal Fisher information of a Decision Transformer's blocks, for Fisher merging.

Three estimators (``--fisher_type``; ``reference/merging.md`` §4):

* ``batch`` — LAWSON's ``precompute_fisher.py``: model in train mode (dropout on), for each of N_b batches of B windows
  the squared gradient of the batch's masked action MSE, summed and divided by the number of unmasked timesteps:
  F = (1/n_tok)·Σ_b (∇L_b)². A batch-level estimate, not a per-example Fisher (E[(mean g)²] ≠ E[g²]);
* ``empirical`` — the per-example empirical Fisher F = (1/N_w)·Σ_n (∇ℓ_n)², ℓ_n = Σ_{unmasked t,k} (â − a)² of
  window n (a Gaussian log-likelihood up to constants), eval mode. Per-window gradients come from ``torch.func``
  (``vmap(grad)``) over chunks of windows;
* ``gaussian`` — the "true" Fisher of a fixed-variance Gaussian policy, F = (1/N_w)·Σ_n Σ_{unmasked t,k}
  (∂â_{n,t,k}/∂θ)² (σ² cancels under normalisation), eval mode: one batched forward per chunk of windows, then a
  ``vmap``-ed vector-Jacobian product per chunk of output elements (one-hot cotangents), so memory stays bounded.

Files: ``<model_dir>/info/<model_stem>-bs{B}-nb{N}`` (no extension; ``-{type}`` appended for the new types), a dict
{parameter name → F (CPU float32), ``_stats`` → {sum, mean}} (+ ``fisher_type``, ``n_examples``, ``train_mode`` for
the new types), written atomically, loadable with ``weights_only=True``.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from decision_transformer.checkpoint import atomic_save, check_not_inflated, weights_digest
from decision_transformer.cli import THREADS_HELP, HelpFormatter, check_context, check_seed
from decision_transformer.errors import UserError, first_line
from decision_transformer.files import check_zip_checksums, exclusive
from decision_transformer.paths import project_path
from decision_transformer.training.losses import masked_action_mse
from decision_transformer.training.trainer import check_data_timesteps, check_model_env, float32_device

FISHER_TYPES = ("batch", "empirical", "gaussian")
#: The original estimates the Fisher of every parameter whose name contains this.
FISHER_SCOPE = "transformer.h"
#: Upper bound on the floats held by one chunk of per-example gradients / Jacobian rows.
_CHUNK_FLOATS = 32_000_000


def fisher_info_path(model_path: str | os.PathLike, f_batch_size: int, f_num_batches: int,
                     fisher_type: str = "batch") -> Path:
    """``<model_dir>/info/<model_stem>-bs{B}-nb{N}`` (+ ``-{fisher_type}`` for non-``batch`` types)."""
    p = Path(model_path)
    stem = p.name[:-3] if p.name.endswith(".pt") else p.stem
    name = f"{stem}-bs{f_batch_size}-nb{f_num_batches}"
    if fisher_type != "batch":
        name += f"-{fisher_type}"
    return p.parent / "info" / name


def default_forward(model, states, actions, rtg, timesteps, mask, **kw):
    """The model's action predictions [B, K, da] for one batch of windows (``**kw`` passed to the model)."""
    return model(states, actions, rtg, timesteps, attention_mask=mask, **kw).action_preds


def _params(model, scope: str):
    return {n: p for n, p in model.named_parameters() if scope in n and p.requires_grad}


def _stats(fisher: dict[str, torch.Tensor]) -> dict[str, float]:
    total = sum(float(v.to(torch.float64).sum()) for v in fisher.values())
    numel = sum(v.numel() for v in fisher.values())
    return {"sum": total, "mean": total / max(numel, 1)}


class _quiet(warnings.catch_warnings):
    """functorch falls back to a loop for the fused CPU attention kernel and warns on every call: silence that."""

    def __enter__(self):
        out = super().__enter__()
        warnings.filterwarnings("ignore", message=".*There is a performance drop.*")
        return out


# ---- estimators ---------------------------------------------------------------------------------------------------

def fisher_batch(model, batches, *, scope: str = FISHER_SCOPE, forward: Callable = default_forward,
                 model_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
    """LAWSON's estimate: train mode, F = Σ_b (∇_θ L_b)² / n_tok over ``batches`` (iterable of ``data.Batch``)."""
    model_kwargs = model_kwargs or {}
    params = _params(model, scope)
    if not params:
        raise UserError(f"the model has no trainable parameters named *{scope}*")
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    n_tok = 0.0
    was_training = model.training
    model.train()
    try:
        for b in batches:
            model.zero_grad(set_to_none=True)
            preds = forward(model, b.states, b.actions, b.rtg[:, :-1], b.timesteps, b.mask, **model_kwargs)
            loss = masked_action_mse(preds, b.actions, b.mask)
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    acc[n] += p.grad.detach().to(torch.float32) ** 2
            n_tok += float(b.mask.sum())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {n: (v / max(n_tok, 1.0)).cpu() for n, v in acc.items()}


def _vmap_setup(model, scope: str, model_kwargs: dict | None):
    """The detached parameters in ``scope``, their total size, and the forward kwargs for vmapped gradients."""
    params = {n: p.detach() for n, p in _params(model, scope).items()}
    if not params:
        raise UserError(f"the model has no trainable parameters named *{scope}*")
    # output_attentions selects the eager attention path, which vmap batches (it runs SDPA in a Python loop)
    return params, sum(p.numel() for p in params.values()), {"output_attentions": True, **(model_kwargs or {})}


def _window_chunk(n_params: int, per_window: int = 1) -> int:
    return max(1, _CHUNK_FLOATS // max(n_params * per_window, 1))


def fisher_empirical(model, batches, *, scope: str = FISHER_SCOPE, forward: Callable = default_forward,
                     model_kwargs: dict | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Per-example empirical Fisher, eval mode: F = (1/N_w)·Σ_n (∇_θ ℓ_n)², ℓ_n = Σ_{unmasked t,k} (â − a)².
    Returns (F on CPU, N_w)."""
    from torch.func import grad, vmap

    params, n_params, model_kwargs = _vmap_setup(model, scope, model_kwargs)
    chunk = _window_chunk(n_params)

    wrapper = _Forward(model, forward, model_kwargs)

    def window_loss(p, s, a, r, t, m):
        """ℓ_n of one window (s [K, ds], a [K, da], ...): Σ over unmasked t and k of (â − a)², with ``p`` in the
        model."""
        # one window, batch dimension added back for the model: s [K, ds] -> [1, K, ds]
        preds = _call(wrapper, p, (s[None], a[None], r[None], t[None], m[None]))
        return (((preds[0] - a) ** 2) * m[:, None]).sum()

    per_example = vmap(grad(window_loss), in_dims=(None, 0, 0, 0, 0, 0))
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    n_w = 0
    was_training = model.training
    model.eval()
    with _quiet():
        try:
            for b in batches:
                rtg = b.rtg[:, :-1]
                for i in range(0, b.states.shape[0], chunk):
                    sl = slice(i, i + chunk)
                    g = per_example(params, b.states[sl], b.actions[sl], rtg[sl], b.timesteps[sl], b.mask[sl])
                    for n in acc:
                        acc[n] += (g[n].detach().to(torch.float32) ** 2).sum(0)
                n_w += b.states.shape[0]
        finally:
            model.train(was_training)
    return {n: (v / max(n_w, 1)).cpu() for n, v in acc.items()}, n_w


class _Forward(torch.nn.Module):
    """``forward(model, *args, **model_kwargs)`` as a module, so that ``functional_call`` can substitute parameters."""

    def __init__(self, model, forward, model_kwargs):
        super().__init__()
        self.m = model
        self.fwd = forward
        self.kw = model_kwargs

    def forward(self, *args):
        """``forward(model, *args, **model_kwargs)``."""
        return self.fwd(self.m, *args, **self.kw)


def _call(wrapper: _Forward, params: dict, args: tuple):
    """The wrapped forward with ``params`` (names of the inner model) substituted (``torch.func.functional_call``)."""
    from torch.func import functional_call

    return functional_call(wrapper, {f"m.{k}": v for k, v in params.items()}, args, strict=False)


def fisher_gaussian(model, batches, *, scope: str = FISHER_SCOPE, forward: Callable = default_forward,
                    model_kwargs: dict | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Fisher of a fixed-variance Gaussian policy, eval mode: F = (1/N_w)·Σ_n Σ_{unmasked t,k} (∂â_{n,t,k}/∂θ)².
    Returns (F on CPU, N_w)."""
    from torch.func import vjp, vmap

    params, n_params, model_kwargs = _vmap_setup(model, scope, model_kwargs)
    rows_per_chunk = _window_chunk(n_params)
    wrapper = _Forward(model, forward, model_kwargs)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    n_w = 0
    was_training = model.training
    model.eval()
    with _quiet():
        try:
            for b in batches:
                args = (b.states, b.actions, b.rtg[:, :-1], b.timesteps, b.mask)
                preds, vjp_fn = vjp(lambda p, a=args: _call(wrapper, p, a), params)                     # [B, K, da]
                # one cotangent per unmasked output element: windows are independent, so the VJP of a one-hot
                # cotangent is that element's own Jacobian row, ∂â_{n,t,k}/∂θ
                rows = torch.nonzero(b.mask > 0)                                                         # [R, 2] (n, t)
                da = preds.shape[-1]
                idx = torch.cat([rows.repeat_interleave(da, 0),
                                 torch.arange(da, device=rows.device).repeat(rows.shape[0])[:, None]], 1)  # [R*da, 3]
                for i in range(0, idx.shape[0], rows_per_chunk):
                    sel = idx[i:i + rows_per_chunk]
                    cot = torch.zeros((sel.shape[0],) + tuple(preds.shape), dtype=preds.dtype, device=preds.device)
                    cot[torch.arange(sel.shape[0]), sel[:, 0], sel[:, 1], sel[:, 2]] = 1.0
                    (jac,) = vmap(vjp_fn)(cot)
                    for n in acc:
                        acc[n] += (jac[n].detach().to(torch.float32) ** 2).sum(0)
                n_w += b.states.shape[0]
        finally:
            model.train(was_training)
    return {n: (v / max(n_w, 1)).cpu() for n, v in acc.items()}, n_w


def sample_batches(dataset, batch_size: int, num_batches: int, K: int, generator: torch.Generator):
    """The training sampler's windows, ``num_batches`` batches of ``batch_size``."""
    for _ in range(num_batches):
        yield dataset.sample_batch(batch_size, K, generator)


@contextlib.contextmanager
def full_fp32_matmuls():
    """TF32 off on CUDA for the block, then as it was: a Fisher estimate is the same whichever tool makes it
    (``experiment.py`` turns TF32 on for training, ``precompute_fisher.py`` does not), and cached files are shared."""
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def compute_fisher(model, dataset, *, fisher_type: str = "batch", batch_size: int = 64, num_batches: int = 100,
                   K: int = 20, seed: int = 666, scope: str = FISHER_SCOPE, forward: Callable = default_forward,
                   model_kwargs: dict | None = None) -> dict:
    """The Fisher of ``model`` on ``dataset`` (seeded sampler and dropout) as the dict saved in info files. The
    dropout seed goes through ``torch.manual_seed(seed)``: torch's global generator is reseeded, as in the scripts."""
    if fisher_type not in FISHER_TYPES:
        raise UserError(f"unknown --fisher_type {fisher_type!r}; choose one of {', '.join(FISHER_TYPES)}")
    if batch_size < 1 or num_batches < 1:
        raise UserError(f"--f_batch_size and --f_num_batches must be >= 1 (got {batch_size}, {num_batches})")
    if K < 1:
        raise UserError(f"--K must be >= 1 (got {K})")
    if isinstance(seed, bool) or not isinstance(seed, int):  # torch's seeding takes only ints
        raise UserError(f"the Fisher seed must be an integer, got {seed!r}")
    float32_device(model, "compute_fisher")   # (a float32 model, on one device)
    if isinstance(getattr(dataset, "env", None), str):
        check_model_env(model, dataset.env, "compute_fisher", (model_kwargs or {}).get("env"))
    check_data_timesteps(model, dataset, "compute_fisher")
    gen = torch.Generator().manual_seed(seed)   # (on the CPU: the same windows whatever the device)
    torch.manual_seed(seed)  # dropout masks of the batch estimate
    batches = sample_batches(dataset, batch_size, num_batches, K, gen)
    kw = dict(scope=scope, forward=forward, model_kwargs=model_kwargs)
    with full_fp32_matmuls():
        if fisher_type == "batch":
            F = fisher_batch(model, batches, **kw)
            n = batch_size * num_batches
        elif fisher_type == "empirical":
            F, n = fisher_empirical(model, batches, **kw)
        else:
            F, n = fisher_gaussian(model, batches, **kw)
    out: dict = dict(F)
    out["_stats"] = _stats(F)
    if fisher_type != "batch":
        out.update(fisher_type=fisher_type, n_examples=int(n), train_mode=False)
    return out


def training_context(mf) -> int | None:
    """The context length K a model file was trained with (its run config, else its model config), or None."""
    for k in (mf.config.get("K"), (mf.config.get("model_config") or {}).get("max_length")):
        if isinstance(k, int) and not isinstance(k, bool) and k >= 1:
            return k
    return None


def warn_context(sources, K: int, log):
    """Warn for each model file trained with another context length than the ``--K`` it is used with here."""
    for mf in sources:
        k = training_context(mf)
        if k is not None and k != K:
            log(f"warning: {mf.path} was trained with K={k}; this run uses K={K} (--K)")


def fisher_tensors(info: dict) -> dict[str, torch.Tensor]:
    """The per-parameter tensors of a Fisher info dict (metadata dropped)."""
    return {k: v.detach() for k, v in info.items() if isinstance(v, torch.Tensor) and not k.startswith("_")}


def check_fisher(info: dict, where: str):
    """A usable Fisher: finite, >= 0 (a diagonal Fisher is a mean of squares), and not zero everywhere (such a file
    would poison the cache that later runs load)."""
    F = fisher_tensors(info)
    bad = next((k for k, v in F.items() if not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UserError(f"{where}: Fisher tensor {bad} contains NaN or inf")
    neg = next((k for k, v in F.items() if bool((v < 0).any())), None)
    if neg is not None:
        raise UserError(f"{where}: Fisher tensor {neg} has negative entries (down to {float(F[neg].min()):.3g}); a "
                        f"diagonal Fisher is >= 0")
    if not any(bool(v.any()) for v in F.values()):
        raise UserError(f"{where}: the Fisher is zero everywhere (no gradient reached the blocks)")


#: The originals' causal-mask buffers: never parameters, so never in a Fisher.
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def check_fisher_fits(info: dict, state_dict: dict, path, model_name):
    """A Fisher file must hold exactly the model's block parameters (names containing ``FISHER_SCOPE``) with their
    shapes; otherwise it was estimated for another model. One line naming the file and the first mismatch."""
    F = fisher_tensors(info)
    want = {k: v.shape for k, v in state_dict.items()
            if FISHER_SCOPE in k and torch.is_floating_point(v) and not k.endswith(_BUFFER_SUFFIXES)}
    hint = "; it was estimated for another model: delete it (or recompute it with precompute_fisher.py --force)"
    missing = [k for k in want if k not in F]
    if missing:
        raise UserError(f"{path}: no Fisher for {len(missing)} of the {len(want)} block tensors of {model_name} "
                        f"(first {missing[0]}){hint}")
    extra = [k for k in F if k not in want]
    if extra:
        raise UserError(f"{path}: Fisher tensor {extra[0]} is not a block tensor of {model_name}{hint}")
    for k, shape in want.items():
        if F[k].shape != shape:
            raise UserError(f"{path}: Fisher tensor {k} has shape {list(F[k].shape)}, {list(shape)} in "
                            f"{model_name}{hint}")


def save_fisher(info: dict, path: str | os.PathLike) -> Path:
    """Write an info file; a Fisher that is non-finite or zero everywhere is refused and nothing is written."""
    check_fisher(info, f"{path} not written")
    return atomic_save(info, path)


def load_fisher(path: str | os.PathLike) -> dict:
    """A Fisher info file, loaded without running pickled code and checked (tensors, no broadcast views,
    finite, >= 0, not all zero); any problem is one line naming the file."""
    path = Path(path)
    if path.is_file():
        check_zip_checksums(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: Fisher file not found") from None
    except Exception as e:
        raise UserError(f"{path}: not a readable Fisher file ({first_line(e)})") from None
    if not isinstance(obj, dict) or not fisher_tensors(obj):
        raise UserError(f"{path}: not a Fisher file (expected a dict of parameter name -> tensor)")
    for k, v in obj.items():   # the estimates and any tensor among the metadata (``_stats`` of the originals' files)
        for name, t in ({k: v} if not isinstance(v, dict) else {f"{k}.{n}": x for n, x in v.items()}).items():
            if isinstance(t, torch.Tensor):
                check_not_inflated(t, name, path, "Fisher file", "a Fisher estimate")
    try:
        check_fisher(obj, str(path))
    except UserError as e:
        raise UserError(f"{e}; delete it (or recompute it with precompute_fisher.py --force)") from None
    return obj


#: The seed of a cached Fisher file's windows and dropout: ``precompute_fisher.py``'s default, and the one a merge run
#: uses when it computes a missing file, so that the cache is the same whichever tool (or run seed) made it.
FISHER_SEED = 666


def source_record(env: str, dataset: str, K: int, seed, state_dict: dict | None = None) -> dict:
    """What a saved Fisher was estimated on (kept in the file as ``_source``; its name records neither): the data,
    windows and seed, and the model's weights (``weights_digest``), so that a model file rewritten since (a resumed
    run's ``_best.pt``, a merge saved to the same path) is not merged with its old Fisher."""
    rec = {"env": env, "dataset": dataset, "K": int(K), "seed": None if seed is None else int(seed)}
    if state_dict is not None:
        rec["weights"] = weights_digest(state_dict)
    return rec


def stale_weights(info: dict, state_dict: dict) -> bool:
    """Whether a Fisher file records weights other than ``state_dict`` (files without the record are not)."""
    rec = info.get("_source") if isinstance(info.get("_source"), dict) else {}
    return isinstance(rec.get("weights"), str) and rec["weights"] != weights_digest(state_dict)


def describe(info: dict) -> str:
    """A Fisher info dict in words: ``{n} tensors, trace {t}`` (the trace from its ``_stats``)."""
    st = info.get("_stats", {})
    s = st.get("sum", float("nan"))
    s = float(s) if not isinstance(s, torch.Tensor) else float(s.sum())
    n = len(fisher_tensors(info))
    return f"{n} tensors, trace {s:.4g}"


def log(msg: str):
    """Print ``msg`` to stderr."""
    print(msg, file=sys.stderr)


# ---- precompute_fisher.py ----------------------------------------------------------------------------------------------

def precompute_parser():
    """The command-line parser of ``precompute_fisher.py``."""
    import argparse

    p = argparse.ArgumentParser(description="Diagonal Fisher of a single-task checkpoint's transformer blocks on its "
                                            "own dataset, saved to <model_dir>/info/<stem>-bs{B}-nb{N}[-type] for "
                                            "experiment.py --use_fisher.",
                                formatter_class=HelpFormatter)
    p.add_argument("--data_path", default=project_path("data"),
                   help="default: the project's data/ when started inside the project, ./data when started outside it")
    p.add_argument("--model", required=True, help="model file (our checkpoint, a state dict or an original pickle)")
    p.add_argument("--f_batch_size", type=int, default=64, help="windows per batch")
    p.add_argument("--f_num_batches", type=int, default=100, help="batches")
    p.add_argument("--K", type=int, default=None, help="window length (default: the K the model was trained with, "
                                                      "else 20)")
    p.add_argument("--device", default="auto", help="auto = cuda:0 when CUDA is there, else cpu (the original: cuda:0); "
                                                  "an explicit cuda device falls back to cpu with a warning when CUDA is absent")
    p.add_argument("--threads", default="auto", help=THREADS_HELP)
    p.add_argument("--fisher_type", default="batch", choices=FISHER_TYPES)
    p.add_argument("--seed", type=int, default=FISHER_SEED,
                   help="sampler and dropout seed (merge runs compute a missing file with this default)")
    p.add_argument("--dataset", default=None, help="data to estimate on (default: the model's own dataset)")
    p.add_argument("--force", action="store_true", help="recompute even if the info file exists")
    return p


def check_precompute_args(args):
    """Reject bad sizes and names before anything is loaded or written."""
    from decision_transformer.envs import check_dataset_name

    for name in ("f_batch_size", "f_num_batches", "K"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1 (got {getattr(args, name)})")
    check_context(args.K)
    check_seed(args.seed)
    if args.dataset is not None:
        check_dataset_name(args.dataset)


def run_precompute(args) -> Path:
    """``precompute_fisher.py``: estimate and save the Fisher of ``--model`` on its dataset, unless a file
    for the same weights, data, K and seed exists (``--force`` recomputes it); returns the path."""
    from decision_transformer.data import TrajectoryDataset, load_dataset
    from decision_transformer.legacy_import import build_model, load_model_file
    from decision_transformer.run import resolve_device

    check_precompute_args(args)
    device = resolve_device(args.device, args.threads)
    mf = load_model_file(args.model)
    if mf.is_multi:
        raise UserError(f"{args.model}: a multi-task model; experiment_multi.py --use_fisher computes its Fisher per env")
    env, dataset = mf.env, args.dataset or mf.dataset
    if env is None or dataset is None:
        raise UserError(f"{args.model}: cannot tell the model's env and dataset (no stored config, and the path is "
                        f"neither models/{{env}}/dt_gym-experiment-{{env}}-{{dataset}}-{{id}}.pt nor in a run folder "
                        f"{{model}}_{{dataset}}_{{env}}_{{seed}}); convert it with `python -m "
                        f"decision_transformer.legacy_import MODEL --env ENV --dataset DATASET ...` first")
    out = fisher_info_path(args.model, args.f_batch_size, args.f_num_batches, args.fisher_type)
    K = args.K or training_context(mf) or 20  # the info file's name does not record K: the model's own by default
    if args.K:   # (another K than the model's own: said, as the training scripts do)
        warn_context([mf], args.K, log)
    from decision_transformer.files import refuse_files_above, refuse_folders

    refuse_folders([out])     # (before the lock, which makes its folder, and the estimate)
    refuse_files_above(out.parent, "precompute_fisher.py", writable=args.force or not out.is_file())
    with exclusive(out, "a Fisher file"):   # two processes computing it at once: the second finds it made
        stale = False
        if out.is_file() and not args.force:
            old = load_fisher(out)
            stale = stale_weights(old, mf.state_dict)
            if not stale:
                check_fisher_fits(old, mf.state_dict, out, args.model)
        if stale:
            log(f"{out} was estimated on other weights than {args.model} holds now (the file changed since); "
                f"recomputing it")
        elif out.is_file() and not args.force:
            rec = old.get("_source") if isinstance(old.get("_source"), dict) else {}
            if rec and (rec.get("dataset"), rec.get("K")) != (dataset, K):
                raise UserError(f"{out} exists, computed on {env}-{rec.get('dataset')} with K={rec.get('K')}, not on "
                                f"{env}-{dataset} with K={K} (the file name records neither); --force recomputes it")
            if rec.get("seed") is not None and rec.get("seed") != args.seed:
                raise UserError(f"{out} exists, computed with --seed {rec.get('seed')}, not {args.seed} (the file name "
                                f"does not record it); --force recomputes it")
            log(f"{out} exists ({describe(old)}); --force recomputes it")
            return out
        data_file, trajs = load_dataset(args.data_path, env, dataset)
        ds = TrajectoryDataset(trajs, env, device=device)     # no pct_traj filter, the dataset's own statistics
        model = build_model(mf, device, max_length=K)
        info = compute_fisher(model, ds, fisher_type=args.fisher_type, batch_size=args.f_batch_size,
                              num_batches=args.f_num_batches, K=K, seed=args.seed)
        info["_source"] = source_record(env, dataset, K, args.seed, mf.state_dict)
        save_fisher(info, out)
        log(f"{out}: {args.fisher_type} Fisher of {args.model} on {data_file} ({args.f_num_batches} x {args.f_batch_size} "
            f"windows of K={K}): {describe(info)}")
    return out
