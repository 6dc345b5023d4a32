"""Merging Decision Transformers: which tensors, and how they are combined.

Every function here works on state dicts (name -> tensor) and is pure: the inputs are never modified, the result is a
new state dict. Notation (``reference/merging.md``): θᵢ is model i's state dict, i = 1 (index 0 here) is the *target*
whose tensors fill everything outside the merged set S; θ₀ is a shared initialisation (the "base") for task-vector
methods, τᵢ = θᵢ − θ₀.

Rules shared by every method:

* only floating-point tensors in S are combined (in float32, or float64 where a solve needs it); integer and bool
  tensors (the originals' uint8 causal-mask buffers) are copied from model 1;
* everything outside S comes from model 1;
* tensors are combined in their stored layout (fused q|k|v ``c_attn``, Conv1D [in, out]); no permutation alignment.

Every ``merge_*`` function and :func:`greedy_soup` checks its inputs itself (library callers get a one-line
``UserError``, not a wrong merge): the models are compatible over S (:func:`check_compatible`; ``names`` label them in
messages, "model 1", "model 2", ... by default) and S holds at least one floating-point tensor.

Methods: :func:`merge_mean` (uniform soup / 2-model lerp), :func:`merge_fisher` (diagonal Fisher weights),
:func:`merge_task_arithmetic`, :func:`merge_ties`, :func:`merge_regmean` (with :func:`collect_grams`) and
:func:`greedy_soup`.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence

import torch

from decision_transformer.errors import UserError

MERGE_METHODS = ("mean", "fisher", "task_arithmetic", "ties", "regmean", "greedy_soup")
FISHER_NORMS = ("trace", "l2", "none")
#: Defaults of the task-vector scale λ when ``--merge_lambda`` is not given.
DEFAULT_LAMBDA = {"task_arithmetic": 0.8, "ties": 1.0}

StateDict = dict[str, torch.Tensor]


# ---- which tensors ----------------------------------------------------------------------------------------------

def select_keys(keys: Sequence[str], include: Sequence[str] | None = (), exclude: Sequence[str] | None = ()) -> list[str]:
    """S: keys containing any ``include`` substring (all keys when ``include`` is empty), minus those containing any
    ``exclude`` substring. Order follows ``keys``."""
    include, exclude = list(include or []), list(exclude or [])
    out = [k for k in keys if not include or any(s in k for s in include)]
    return [k for k in out if not any(s in k for s in exclude)]


def mergeable(t: torch.Tensor) -> bool:
    """Whether a tensor takes part in merging: floating point (other tensors keep model 1's values)."""
    return torch.is_floating_point(t)


#: modules whose shapes follow the env's state and action sizes (the rest of a DT is shaped by its width and depth)
_ENV_SIZED = ("embed_state", "embed_action", "predict_state", "predict_action")


def check_compatible(states: Sequence[StateDict], names: Sequence[str], keys: Sequence[str]):
    """Every model must hold every key of ``keys`` with model 1's shape. Raises a one-line ``UserError`` naming the
    offending file and the first mismatched tensor (in model 1's key order)."""
    ref, ref_name = states[0], names[0]
    for k in keys:
        if k not in ref:
            raise UserError(f"{ref_name}: has no tensor {k}")
    for sd, name in zip(states[1:], names[1:]):
        for k in keys:
            if k not in sd:
                raise UserError(f"{name}: cannot merge with {ref_name}: tensor {k} is missing "
                                f"(different layer count or architecture?)")
            if sd[k].shape != ref[k].shape:
                why = ("models of envs with other state or action sizes: select the shared blocks, e.g. --include attn "
                       "mlp" if k.split(".", 1)[0] in _ENV_SIZED else "different hidden size or architecture?")
                raise UserError(f"{name}: cannot merge with {ref_name}: tensor {k} is {list(sd[k].shape)} in this "
                                f"model and {list(ref[k].shape)} in {ref_name} ({why})")
        # keys in S of this model that model 1 lacks: e.g. model 2 has more layers
        prefixes = _block_prefixes(keys)
        extra = [k for k in sd if k not in ref and any(k.startswith(p) for p in prefixes)]  # this model's order
        if extra:
            raise UserError(f"{name}: cannot merge with {ref_name}: tensor {extra[0]} does not exist in "
                            f"{ref_name} (different layer count?)")


def _block_prefixes(keys: Sequence[str]) -> set[str]:
    """``transformer.h.`` style prefixes of the merged keys, used to spot extra layers in other models."""
    out = set()
    for k in keys:
        parts = k.split(".")
        for i, p in enumerate(parts):
            if p.isdigit():
                out.add(".".join(parts[:i]) + ".")
                break
    return out


def merged_fraction(state: StateDict, keys: Sequence[str]) -> tuple[int, int, float]:
    """(merged float tensors, all float tensors, fraction of float elements merged)."""
    keys = set(keys)
    floats = {k: v for k, v in state.items() if mergeable(v)}
    n_merged = sum(v.numel() for k, v in floats.items() if k in keys)
    n_all = sum(v.numel() for v in floats.values())
    return sum(1 for k in floats if k in keys), len(floats), n_merged / max(n_all, 1)


def _start(states: Sequence[StateDict], device=None) -> StateDict:
    """A new state dict: clones of model 1's tensors (the part outside S)."""
    return {k: v.detach().clone().to(device) if device is not None else v.detach().clone()
            for k, v in states[0].items()}


def _float_keys(states: Sequence[StateDict], keys: Sequence[str]) -> list[str]:
    return [k for k in keys if mergeable(states[0][k])]


def _model_names(states: Sequence[StateDict], names: Sequence[str] | None) -> list[str]:
    if names is None:
        return [f"model {i + 1}" for i in range(len(states))]
    if len(names) != len(states):
        raise UserError(f"{len(names)} model names for {len(states)} models")
    return [str(n) for n in names]


def _checked_float_keys(states: Sequence[StateDict], keys: Sequence[str], names: Sequence[str] | None) -> list[str]:
    """What every merge checks first: at least one model, all compatible over ``keys`` (:func:`check_compatible`), and
    at least one floating-point tensor among ``keys``. Returns those floating-point keys."""
    if len(states) < 1:
        raise UserError("nothing to merge: no models given")
    if isinstance(keys, str):
        raise UserError(f"the merged keys must be a list of tensor names, got the string {keys!r}")
    check_compatible(states, _model_names(states, names), keys)
    fk = _float_keys(states, keys)
    if not fk:
        what = ("the selection is empty" if not len(keys)
                else f"the {len(keys)} selected keys hold no floating-point tensors")
        raise UserError(f"nothing to merge: {what} (check the include/exclude substrings, e.g. for a typo)")
    for name, sd in zip(_model_names(states, names), states):
        _check_finite_tensors(sd, fk, name)
    return fk


def _check_finite_tensors(state: StateDict, keys: Sequence[str], name: str):
    """Refuse a NaN or inf in ``state``'s tensors ``keys``: a mean would pass it on, TIES trim it away silently and
    a Fisher or RegMean merge spread it over the whole tensor, so each method would treat the damage differently."""
    bad = next((k for k in keys if not bool(torch.isfinite(state[k]).all())), None)
    if bad is not None:
        raise UserError(f"{name}: tensor {bad} contains NaN or inf")


def _check_finite(value: float, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise UserError(f"{what} must be a finite number, got {value}")
    return value


def _finish(out: StateDict, merged: dict[str, torch.Tensor], states: Sequence[StateDict], device=None) -> StateDict:
    for k, v in merged.items():
        v = v.to(states[0][k].dtype)
        out[k] = v.to(device) if device is not None else v
    return out


# ---- uniform ------------------------------------------------------------------------------------------------------

def merge_mean(states: Sequence[StateDict], keys: Sequence[str], p: float = 0.5,
               weights: Sequence[float] | None = None, device=None, *,
               names: Sequence[str] | None = None) -> StateDict:
    """Uniform merge over S. Two models: (1 − p)·θ₁ + p·θ₂ with p in [0, 1]; N ≥ 3 models: (1/N)·Σᵢ θᵢ (``p``
    ignored), unless explicit ``weights`` are given: one per model, finite, ≥ 0 and summing to 1 (within 1e-6), a
    convex combination. Everything outside S (and integer tensors) from model 1."""
    n = len(states)
    fk = _checked_float_keys(states, keys, names)
    if weights is None:
        if n == 2:
            p = _check_finite(p, "the merge weight p")
            if not 0.0 <= p <= 1.0:
                raise UserError(f"the merge weight p must be in [0, 1], got {p}")
        weights = [1.0 - p, p] if n == 2 else [1.0 / n] * n
    if len(weights) != n:
        raise UserError(f"{len(weights)} merge weights for {n} models")
    weights = [_check_finite(w, "a merge weight") for w in weights]
    if any(w < 0 for w in weights):
        raise UserError(f"merge weights must be >= 0, got {weights}")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise UserError(f"merge weights must sum to 1, got {weights} (sum {sum(weights):g})")
    merged = {}
    for k in fk:
        acc = torch.zeros(states[0][k].shape, dtype=torch.float32, device=states[0][k].device)
        for w, sd in zip(weights, states):
            acc += w * sd[k].to(acc.device, torch.float32)
        merged[k] = acc
    return _finish(_start(states, device), merged, states, device)


# ---- Fisher -------------------------------------------------------------------------------------------------------

def normalise_fisher(fisher: StateDict, keys: Sequence[str], norm: str = "trace") -> dict[str, torch.Tensor]:
    """f = F / trace(F) (``trace``: the sum over **every** tensor of the Fisher file, i.e. its ``_stats.sum``, as the
    original), F / ‖F‖₂ over the merged elements (``l2``, Matena & Raffel) or F (``none``). Returns the merged keys
    only, in float32."""
    if norm not in FISHER_NORMS:
        raise UserError(f"unknown --fisher_norm {norm!r}; choose one of {', '.join(FISHER_NORMS)}")
    sel = {k: fisher[k].detach().to(torch.float32) for k in keys}
    if norm == "none":
        return sel
    if norm == "trace":
        denom = sum(v.detach().to(torch.float64).sum() for k, v in fisher.items()
                    if isinstance(v, torch.Tensor) and not k.startswith("_"))
    else:
        denom = torch.sqrt(sum((v.to(torch.float64) ** 2).sum() for v in sel.values()))
    denom = float(denom)
    if denom == 0.0:
        raise UserError("a Fisher is zero everywhere (no gradient reached the merged tensors); cannot normalise it")
    return {k: v / denom for k, v in sel.items()}


def fisher_keys(states: Sequence[StateDict], fishers: Sequence[StateDict], keys: Sequence[str]) -> list[str]:
    """The keys of S that a Fisher merge combines: the floating-point ones that every Fisher holds. The others keep
    model 1's values."""
    return [k for k in _float_keys(states, keys) if all(k in f for f in fishers)]


def compact_names(keys: Sequence[str], limit: int = 12) -> str:
    """Tensor names shortened to their modules, layer indices folded to ``*`` (``transformer.h.*.ln_1``), at most
    ``limit`` of them, for one-line messages."""
    mods: list[str] = []
    for k in keys:
        parts = ["*" if p.isdigit() else p for p in k.split(".")]
        m = ".".join(parts[:-1]) if len(parts) > 1 and parts[-1] in ("weight", "bias") else ".".join(parts)
        if m not in mods:
            mods.append(m)
    shown = ", ".join(mods[:limit])
    return shown + (f" and {len(mods) - limit} more" if len(mods) > limit else "")


def merge_fisher(states: Sequence[StateDict], fishers: Sequence[StateDict], keys: Sequence[str], *,
                 norm: str = "trace", floor: float = 1e-6, favor_target: bool = False,
                 coeffs: Sequence[float] | None = None, device=None, verbose: bool = False,
                 names: Sequence[str] | None = None) -> StateDict:
    """Diagonal-Fisher merge over the keys of S that every Fisher holds:

        θ = Σᵢ λᵢ f̃ᵢ ⊙ θᵢ / Σⱼ λⱼ f̃ⱼ   (elementwise)

    fᵢ = normalised Fisher (:func:`normalise_fisher`); the floor: f̃ᵢ = fᵢ + ε·f̄ with f̄ the mean element of the
    normalised Fishers over all models and merged tensors (ε = ``floor``; 0 reproduces the original, where an element
    with zero Fisher in every model gives 0/0 = NaN). ``favor_target``: only model 1 is floored, f̃₁ = max(f₁, ε·f̄),
    so model 1 wins where every Fisher ≈ 0. λ = ``coeffs`` (default all 1, the original; one per model, finite, ≥ 0,
    not all 0). Keys of S without a Fisher in every model (buffers, or a key missing from one Fisher dict) are taken
    from model 1, like everything outside S; a Fisher tensor must have its model's shape.
    """
    n = len(states)
    if fishers is None or len(fishers) != n:
        raise UserError(f"{0 if fishers is None else len(fishers)} Fisher files for {n} models")
    _checked_float_keys(states, keys, names)
    if coeffs is None:
        coeffs = [1.0] * n
    else:
        coeffs = list(coeffs)
        if len(coeffs) != n:
            raise UserError(f"{len(coeffs)} Fisher merge coefficients for {n} models")
        coeffs = [_check_finite(c, "a Fisher merge coefficient") for c in coeffs]
        if any(c < 0 for c in coeffs) or not any(c > 0 for c in coeffs):
            raise UserError(f"Fisher merge coefficients must be >= 0 and not all 0, got {coeffs}")
    if favor_target and floor > 0 and coeffs[0] == 0:
        raise UserError("favor_target floors only model 1's Fisher, whose merge coefficient is 0: where the other "
                        "models' Fishers are 0 the merge would be 0/0")
    fkeys = fisher_keys(states, fishers, keys)
    if not fkeys:
        raise UserError("none of the merged tensors has Fisher information (the Fisher covers transformer.h only)")
    for i, f in enumerate(fishers):
        for k in fkeys:
            if not isinstance(f[k], torch.Tensor):
                raise UserError(f"the Fisher of model {i + 1}: entry {k} is a {type(f[k]).__name__}, not a tensor")
            if f[k].shape != states[i][k].shape:
                raise UserError(f"the Fisher of model {i + 1}: tensor {k} has shape {list(f[k].shape)}, the model "
                                f"{list(states[i][k].shape)}")
    for i, f in enumerate(fishers):
        tensors = [k for k, v in f.items() if isinstance(v, torch.Tensor) and not k.startswith("_")]
        _check_finite_tensors(f, tensors, f"the Fisher of model {i + 1}")
        neg = next((k for k in tensors if bool((f[k] < 0).any())), None)
        if neg is not None:
            raise UserError(f"the Fisher of model {i + 1}: tensor {neg} has negative entries; a diagonal Fisher is "
                            f">= 0")
    normed = [normalise_fisher(f, fkeys, norm) for f in fishers]
    if floor > 0:
        total = sum(float(v.to(torch.float64).sum()) for nf in normed for v in nf.values())
        count = sum(v.numel() for nf in normed for v in nf.values())
        # every Fisher 0 over the merged tensors (a branch no loss reaches, such as --disable_attention's attn):
        # any positive floor makes each element the plain (or, favouring the target, model 1's) value, not 0/0
        fbar = total / count if total > 0 else 1.0
        if favor_target:
            normed[0] = {k: torch.clamp(v, min=floor * fbar) for k, v in normed[0].items()}
        else:
            normed = [{k: v + floor * fbar for k, v in nf.items()} for nf in normed]
    merged, share = {}, [0.0] * n
    for k in fkeys:
        dev = states[0][k].device
        w = [c * nf[k].to(dev) for c, nf in zip(coeffs, normed)]
        den = sum(w)
        num = sum(wi * sd[k].to(dev, torch.float32) for wi, sd in zip(w, states))
        merged[k] = num / den
        if verbose:
            for i in range(n):
                share[i] += float((w[i] / den).mean())
    if verbose:
        print("fisher merge: mean weight of each model over the merged tensors: "
              + ", ".join(f"{s / len(fkeys):.3f}" for s in share), file=sys.stderr)
    return _finish(_start(states, device), merged, states, device)


# ---- task vectors -------------------------------------------------------------------------------------------------

def task_vectors(states: Sequence[StateDict], base: StateDict, keys: Sequence[str]) -> list[dict[str, torch.Tensor]]:
    """τᵢ = θᵢ − θ₀ over the floating-point keys of S (float32)."""
    fk = _float_keys(states, keys)
    for k in fk:
        if k not in base:
            raise UserError(f"the merge base has no tensor {k}")
        if base[k].shape != states[0][k].shape:
            raise UserError(f"the merge base's tensor {k} has shape {list(base[k].shape)}, the models "
                            f"{list(states[0][k].shape)}")
    _check_finite_tensors(base, fk, "the merge base")
    return [{k: sd[k].to(torch.float32) - base[k].to(sd[k].device, torch.float32) for k in fk} for sd in states]


def merge_task_arithmetic(states: Sequence[StateDict], base: StateDict, keys: Sequence[str], lam: float = 0.8,
                          device=None, *, names: Sequence[str] | None = None) -> StateDict:
    """Task arithmetic (Ilharco et al.): θ = θ₀ + λ·Σᵢ τᵢ over S. λ = 1/N gives the uniform mean. The base θ₀ must
    hold every floating-point key of S with the models' shape."""
    _checked_float_keys(states, keys, names)
    lam = _check_finite(lam, "the task-vector scale lambda")
    taus = task_vectors(states, base, keys)
    merged = {k: base[k].to(states[0][k].device, torch.float32) + lam * sum(t[k] for t in taus) for k in taus[0]}
    return _finish(_start(states, device), merged, states, device)


def _topk_mask(tau: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Keep the ``density`` fraction of entries of largest magnitude over the whole flattened task vector."""
    flat = torch.cat([v.reshape(-1).abs() for v in tau.values()])
    k = int(round(density * flat.numel()))
    if k <= 0:   # (every task vector trimmed to nothing: the merge would be the base itself)
        raise UserError(f"TIES density {density:g} keeps none of a task vector's {flat.numel()} entries "
                        f"(round(density x entries) = 0), so the merge would be the base itself; raise --ties_density")
    if k >= flat.numel():
        return {n: torch.ones_like(v, dtype=torch.bool) for n, v in tau.items()}
    # threshold = the k-th largest magnitude; ties at the threshold are kept (at most a few extra entries)
    thresh = torch.topk(flat, k, largest=True, sorted=False).values.min()
    return {n: v.abs() >= thresh for n, v in tau.items()}


def ties_task_vector(taus: Sequence[dict[str, torch.Tensor]], density: float = 0.2) -> dict[str, torch.Tensor]:
    """TIES (Yadav et al.) on task vectors: trim each τᵢ to its top-``density`` entries by magnitude (over all merged
    tensors together), elect a sign per element as sign(Σᵢ τ̂ᵢ) ("mass"), and average the trimmed entries that agree
    with the elected sign (0 where none does)."""
    if not 0.0 < density <= 1.0:
        raise UserError(f"--ties_density must be in (0, 1], got {density}")
    trimmed = []
    for tau in taus:
        mask = _topk_mask(tau, density)
        trimmed.append({k: torch.where(mask[k], v, torch.zeros_like(v)) for k, v in tau.items()})
    out = {}
    for k in taus[0]:
        stack = torch.stack([t[k] for t in trimmed])                      # [N, ...]
        sign = torch.sign(stack.sum(0))                                   # elected sign, 0 where the mass cancels
        agree = (torch.sign(stack) == sign) & (stack != 0)
        cnt = agree.sum(0)
        out[k] = torch.where(cnt > 0, (stack * agree).sum(0) / cnt.clamp(min=1), torch.zeros_like(stack[0]))
    return out


def merge_ties(states: Sequence[StateDict], base: StateDict, keys: Sequence[str], density: float = 0.2,
               lam: float = 1.0, device=None, *, names: Sequence[str] | None = None) -> StateDict:
    """TIES-merging: θ = θ₀ + λ·τ_m with τ_m from :func:`ties_task_vector`. The base θ₀ must hold every
    floating-point key of S with the models' shape."""
    _checked_float_keys(states, keys, names)
    lam = _check_finite(lam, "the task-vector scale lambda")
    tau_m = ties_task_vector(task_vectors(states, base, keys), density)
    merged = {k: base[k].to(states[0][k].device, torch.float32) + lam * v for k, v in tau_m.items()}
    return _finish(_start(states, device), merged, states, device)


# ---- RegMean --------------------------------------------------------------------------------------------------------

def linear_modules(model: torch.nn.Module, keys: Sequence[str]) -> dict[str, tuple[torch.nn.Module, bool]]:
    """The Conv1D / nn.Linear modules whose ``weight`` is in S: {module name: (module, is_conv1d)}."""
    from decision_transformer.models.gpt2 import Conv1D

    keys = set(keys)
    out = {}
    for name, mod in model.named_modules():
        if f"{name}.weight" in keys and isinstance(mod, (Conv1D, torch.nn.Linear)):
            out[name] = (mod, isinstance(mod, Conv1D))
    return out


@torch.no_grad()
def collect_grams(model: torch.nn.Module, keys: Sequence[str], batches, forward: Callable) -> dict[str, torch.Tensor]:
    """Gᵢ = XᵀX / n for every Conv1D / Linear layer of S (:func:`linear_modules`), from its input activations X (one
    row per **unmasked** token), in eval mode, float64 accumulation. Each batch of ``batches`` has a ``mask``
    attribute, the step mask [B, K] (> 0: a real step); ``forward(model, batch)`` runs the model on it (its return
    value is ignored: the Grams come from forward pre-hooks). A layer whose input is [B, r·K, in] (the DT's blocks see
    r = 3 tokens per step, step-major) uses the mask repeated r times per step. A layer that never ran has no Gram."""
    mods = linear_modules(model, keys)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current = {}

    def hook(name):
        """The forward pre-hook of layer ``name``: adds XᵀX of its unmasked input rows to that layer's sum."""
        def fn(mod, args):
            """Accumulate XᵀX (float64) and the row count of the unmasked rows of the layer's input [B, r·K, in]."""
            x = args[0]
            m = current["mask"]
            if x.dim() != 3 or x.shape[0] != m.shape[0] or x.shape[1] % m.shape[1] != 0:
                raise UserError(f"collect_grams: the input of {name} has shape {list(x.shape)}, not [B, r*K, in] "
                                f"for the step mask's {list(m.shape)} [B, K]")
            if x.shape[1] != m.shape[1]:
                m = m.repeat_interleave(x.shape[1] // m.shape[1], dim=1)
            rows = x.reshape(-1, x.shape[-1])[m.reshape(-1) > 0].to(torch.float64)
            g = rows.T @ rows
            sums[name] = sums[name] + g if name in sums else g
            counts[name] = counts.get(name, 0) + rows.shape[0]
        return fn

    handles = [mod.register_forward_pre_hook(hook(name)) for name, (mod, _) in mods.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            current["mask"] = batch.mask
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: sums[name] / max(counts[name], 1) for name in sums}


def merge_regmean(states: Sequence[StateDict], grams: Sequence[dict[str, torch.Tensor]], keys: Sequence[str],
                  alpha: float = 0.1, conv1d: dict[str, bool] | None = None, device=None, *,
                  names: Sequence[str] | None = None) -> StateDict:
    """RegMean (Jin et al.) for the linear layers of S:

        G̃ᵢ = α·Gᵢ + (1 − α)·diag(Gᵢ),   W = (Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ Wᵢ

    with W in Conv1D layout [in, out] (an ``nn.Linear`` weight [out, in] is transposed in and out). ``conv1d`` maps a
    module name to True for Conv1D, False for ``nn.Linear``; a module it does not name is taken as **Conv1D**. Pass
    it for any model with ``nn.Linear`` layers in S: ``{name: is_conv for name, (_, is_conv) in
    linear_modules(model, keys).items()}``, as ``merge_setup.gram_matrices`` does. Each Gram must be [in, in] for its
    weight in the declared layout, else a ``UserError`` names the module; a *square* ``nn.Linear`` weight left out of
    ``conv1d`` cannot be told from its shapes and is merged transposed (wrongly). Solved in float64, never inverted.
    Every other float tensor of S (biases, LayerNorms, layers without a Gram in every model): the plain mean."""
    n = len(states)
    fk = _checked_float_keys(states, keys, names)
    if grams is None or len(grams) != n:
        raise UserError(f"{0 if grams is None else len(grams)} Gram matrix sets for {n} models")
    if not 0.0 <= alpha <= 1.0:  # also false for NaN
        raise UserError(f"--regmean_alpha must be in [0, 1], got {alpha}")
    conv1d = conv1d or {}
    merged = {}
    for k in fk:
        mod = k[:-len(".weight")] if k.endswith(".weight") else None
        if mod is not None and all(mod in g for g in grams):
            is_conv = conv1d.get(mod, True)
            shape = list(states[0][k].shape)
            if len(shape) != 2:
                raise UserError(f"merge_regmean: {k} has shape {shape}, not a linear layer's 2-D weight")
            d_in = shape[0] if is_conv else shape[1]
            for i, g in enumerate(grams):
                gs = list(g[mod].shape) if isinstance(g[mod], torch.Tensor) else None
                if gs != [d_in, d_in]:
                    layout = "Conv1D [in, out]" if is_conv else "nn.Linear [out, in]"
                    hint = (" (an nn.Linear layer? pass conv1d={name: is_conv} from linear_modules(model, keys))"
                            if mod not in conv1d else "")
                    raise UserError(f"merge_regmean: the Gram matrix of {mod} for model {i + 1} has shape {gs}, but "
                                    f"its weight {shape} has {d_in} inputs in the {layout} layout{hint}")
                _check_finite_tensors(g, [mod], f"merge_regmean: the Gram matrices of model {i + 1}")
            lhs, rhs = 0, 0
            for sd, g in zip(states, grams):
                G = g[mod].to(torch.float64)
                Gt = alpha * G + (1 - alpha) * torch.diag(torch.diagonal(G))
                W = sd[k].to(G.device, torch.float64)
                W = W if is_conv else W.T
                lhs = lhs + Gt
                rhs = rhs + Gt @ W
            try:
                W = torch.linalg.solve(lhs, rhs)
            except torch.linalg.LinAlgError:
                raise UserError(f"merge_regmean: the summed Gram matrix of {mod} is singular (an input that is zero "
                                f"in every model's data?); leave {k} out of the merged set") from None
            merged[k] = (W if is_conv else W.T).to(torch.float32).to(states[0][k].device)
        else:
            merged[k] = sum(sd[k].to(torch.float32) for sd in states) / len(states)
    return _finish(_start(states, device), merged, states, device)


# ---- greedy soup --------------------------------------------------------------------------------------------------

def greedy_soup(states: Sequence[StateDict], keys: Sequence[str], score: Callable[[StateDict], float],
                device=None, verbose: bool = False, *, names: Sequence[str] | None = None
                ) -> tuple[StateDict, list[int]]:
    """Greedy soup (Wortsman et al.): rank candidates by the ``score`` of each alone (model 1 with S taken
    from candidate i), start from the best, and add each next candidate if the uniform mean of the kept set plus it
    scores strictly higher. Returns the merged state and the kept candidate indices (best first)."""
    n = len(states)
    _checked_float_keys(states, keys, names)
    alone = []
    for i in range(n):
        sd = merge_mean([states[0], states[i]], keys, weights=[0.0, 1.0], device=device) if i else _start(states, device)
        alone.append(float(score(sd)))
    order = sorted(range(n), key=lambda i: -alone[i])
    kept = [order[0]]
    best_sd = merge_mean([states[0], states[order[0]]], keys, weights=[0.0, 1.0], device=device)
    best = alone[order[0]]
    for i in order[1:]:
        cand = [states[0]] + [states[j] for j in kept + [i]]
        w = [0.0] + [1.0 / (len(kept) + 1)] * (len(kept) + 1)
        sd = merge_mean(cand, keys, weights=w, device=device)
        s = float(score(sd))
        if verbose:
            print(f"greedy soup: candidate {i + 1} -> score {s:.4f} (best {best:.4f})", file=sys.stderr)
        if s > best:
            kept.append(i)
            best, best_sd = s, sd
    if verbose:
        print(f"greedy soup: kept models {[i + 1 for i in kept]} (scores alone: "
              + ", ".join(f"{a:.4f}" for a in alone) + ")", file=sys.stderr)
    return best_sd, kept


# ---- identity layers ------------------------------------------------------------------------------------------------

def identity_values(state: StateDict, keys: Sequence[str]) -> StateDict:
    """``--identity_layers``: every key of S ending in ``weight`` ← 1, ending in ``bias`` ← 0 (meant for LayerNorms,
    e.g. ``--include ln_1``). Any other kind of tensor in S is an error. Returns a new state dict."""
    out = dict(state)
    for k in keys:
        if k.endswith("weight"):
            out[k] = torch.ones_like(state[k])
        elif k.endswith("bias"):
            out[k] = torch.zeros_like(state[k])
        else:
            raise UserError(f"--identity_layers: tensor {k} is neither a weight nor a bias")
    return out
