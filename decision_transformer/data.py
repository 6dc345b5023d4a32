"""Offline datasets: safe loading, validation, normalisation and the device-resident batch sampler.

Two on-disk formats are read:

* the DT pickle ``{env}-{dataset}-v2.pkl``: a list of per-trajectory dicts with numpy arrays ``observations``,
  ``actions``, ``rewards`` (and ``terminals``, ``next_observations``). It is read with a restricted unpickler that
  only rebuilds numpy arrays, lists, dicts and plain scalars, so a malicious file cannot run code;
* D4RL's flat hdf5 ``{env}_{dataset with '-'->'_'}-v2.hdf5``, split into episodes at terminals and timeouts
  exactly as the originals' conversion script did.

The sampler keeps the originals' semantics (length-weighted trajectory choice with replacement, uniform start,
left padding with their pad values, RTG / scale, clipped timesteps) but builds a whole batch with index
arithmetic over flat tensors that live on the training device.
"""
from __future__ import annotations

import io
import math
import numbers
import os
import pickle
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from decision_transformer.envs import EnvSpec, check_dataset_name, get_env_spec
from decision_transformer.errors import UserError, checked_device

# Padding values of the originals' ``get_batch`` (training). Evaluation pads with zeros instead.
PAD_ACTION = -10.0
PAD_DONE = 2
PAD_STATE_RAW = 0.0  # raw state 0, normalised afterwards -> -mean/std

REQUIRED_KEYS = ("observations", "actions", "rewards")


# --------------------------------------------------------------------------------------------------------------
# File names and lookup
# --------------------------------------------------------------------------------------------------------------

def pkl_name(env: str, dataset: str) -> str:
    """File name of the DT pickle of ``env``-``dataset`` (``hopper-medium-v2.pkl``)."""
    return f"{env}-{dataset}-v2.pkl"


def hdf5_name(env: str, dataset: str) -> str:
    """D4RL's hdf5 file name of ``env``-``dataset``, the dataset's dashes as underscores
    (``hopper_medium_replay-v2.hdf5``)."""
    return f"{env}_{dataset.replace('-', '_')}-v2.hdf5"


def stand_in_mark_path(pkl: str | os.PathLike) -> Path:
    """The file beside a DT pickle that marks it as converted from a smoke-test stand-in (``{name}.synthetic``, the
    stand-in's description inside): a pickle has no attributes to carry the hdf5's mark."""
    return Path(pkl).with_suffix(".synthetic")


def synthetic_stand_in(path: str | os.PathLike) -> str | None:
    """What a ``download_d4rl_datasets.py --synthetic`` hdf5 file (or a pickle converted from one: its mark file)
    says it holds; None for any other file (also one that cannot be read: reading it later says why)."""
    if Path(path).suffix == ".pkl":
        try:
            return stand_in_mark_path(path).read_text().strip() or "random-policy data"
        except OSError:
            return None
    import h5py

    from decision_transformer.synthetic import SYNTHETIC_ATTR

    try:
        with h5py.File(path, "r") as f:
            mark = f.attrs.get(SYNTHETIC_ATTR)
    except Exception:  # noqa: BLE001  (not hdf5, damaged, unreadable: not a marked stand-in)
        return None
    return None if mark is None else str(mark)


def check_dataset_place(data_path: str | os.PathLike, env: str, dataset: str):
    """``data_path`` is no file and holds no folder named like the dataset's pkl or hdf5: said at once, before a
    dataset is generated for minutes only to find it cannot be written there."""
    data_path = Path(data_path)
    if data_path.exists() and not data_path.is_dir():
        raise UserError(f"--data_path {data_path}: a file, not a folder of datasets")
    for c in (data_path / pkl_name(env, dataset), data_path / hdf5_name(env, dataset)):
        if c.is_symlink() and not c.exists():   # (taken for no dataset, it was generated, and then not written)
            raise UserError(f"{c} is a link to {os.readlink(c)}, which does not exist; remove the link or point it "
                            f"at the dataset")
        if c.exists() and not c.is_file():
            raise UserError(f"{c}: a folder (or other non-file) where the dataset file belongs; move it away or pass "
                            f"another --data_path")


def checked_state_stats(mean, std, env: str, where: str, stored: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) as float32 vectors of ``env``'s state dim of finite real numbers, std at least ``STD_EPS`` (every
    std is the data's std + ``STD_EPS``: dividing by less, such as a subnormal 1e-45, blows the normalised states up
    until training diverges); else one line that starts with ``where`` (the file and entry they come from, or the
    call they are given to: ``stored`` False)."""
    dim, out, what = get_env_spec(env).state_dim, [], "stored " if stored else ""
    for key, v in (("state_mean", mean), ("state_std", std)):
        try:
            raw = np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v)
            if np.iscomplexobj(raw):   # (float32 of it drops the imaginary parts with only a ComplexWarning)
                raise UserError(f"{where}{what}{key} holds complex numbers, not real ones")
            a = np.asarray(raw, dtype=np.float32)
        except (TypeError, ValueError):
            raise UserError(f"{where}{what}{key} is a {type(v).__name__}, not numbers") from None
        if a.shape != (dim,):
            raise UserError(f"{where}{what}{key} has shape {tuple(a.shape)}, {env} states have {dim} dims")
        if not np.isfinite(a).all():
            raise UserError(f"{where}{what}{key} contains NaN or inf")
        out.append(a)
    if (out[1] <= 0).any():
        raise UserError(f"{where}{what}state_std has values <= 0 (down to {out[1].min():.3g})")
    if (out[1] < np.float32(STD_EPS)).any():
        raise UserError(f"{where}{what}state_std has values below {STD_EPS:g} (down to {out[1].min():.3g}): every "
                        f"std is the data's std + {STD_EPS:g}, and states divided by less blow up")
    return out[0], out[1]


def check_batch_shape(batch_size, K):
    """A batch's ``batch_size`` and context ``K`` (a trainer's, a sampled batch's): positive integers (a batch of 0 rows gives a NaN loss, which
    would be reported as a divergence)."""
    for name, v in (("batch_size", batch_size), ("K", K)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:   # (numpy integers are integers)
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


#: the smoke-test stand-ins spoken of in this process (file, passed over)
_STAND_INS_SAID: set = set()


def say_stand_in(path: str | os.PathLike, env: str, dataset: str, passed_over: bool = False,
                 quiet: bool = False) -> str | None:
    """``synthetic_stand_in(path)``; a stand-in is spoken of on stderr once per file and process (a report runs many
    analyses on one file): used, or ``passed_over`` (one in D4RL's cache). ``quiet``: not at all."""
    mark = synthetic_stand_in(path)
    key = (str(path), passed_over)
    if mark is None or quiet or key in _STAND_INS_SAID:
        return mark
    _STAND_INS_SAID.add(key)
    if passed_over:
        print(f"note: {path} is a --synthetic smoke-test stand-in, not {env}-{dataset}: passed over", file=sys.stderr)
    else:
        print(f"warning: {path} is a smoke-test stand-in ({mark}), not D4RL's {env}-{dataset}", file=sys.stderr)
    return mark


def find_dataset_file(data_path: str | os.PathLike, env: str, dataset: str, quiet: bool = False) -> Path:
    """The pkl in ``data_path`` if present, else a D4RL hdf5 with D4RL's name in ``data_path`` or D4RL's cache. A
    smoke-test stand-in in D4RL's cache (``download_d4rl_datasets.py --synthetic``) is passed over: it is not the
    dataset (its conversion went to the ``--data_path`` of that command). Stand-ins are spoken of by
    ``say_stand_in``; ``quiet``: not at all (an up-front check; the load says it)."""
    data_path = Path(data_path)
    check_dataset_place(data_path, env, dataset)
    candidates = [data_path / pkl_name(env, dataset), data_path / hdf5_name(env, dataset)]
    d4rl_dir = os.environ.get("D4RL_DATASET_DIR", os.path.join(os.path.expanduser("~"), ".d4rl", "datasets"))
    candidates.append(Path(d4rl_dir) / hdf5_name(env, dataset))
    for i, c in enumerate(candidates):
        if c.is_file():
            if i == 2 and say_stand_in(c, env, dataset, passed_over=True, quiet=quiet) is not None:
                continue
            if i < 2:
                say_stand_in(c, env, dataset, quiet=quiet)
            return c
    if not get_env_spec(env).d4rl:
        how = ("for smoke runs `python data/generate_datasets.py --env {env} --dataset random` writes random-policy "
               "data" if dataset == "random" else "only random-policy data can be generated here")
        raise UserError(
            f"dataset not found: {candidates[0]} (also looked for {candidates[1]} and {candidates[2]}); {env} has no "
            f"public or bundled "
            f"data: put your own trajectories there (the DT pickle layout; see README 'reacher2d'), or pass "
            f"--data_path to the folder that holds them; {how.format(env=env)}")
    raise UserError(
        f"dataset not found: {candidates[0]} (also looked for {candidates[1]} and {candidates[2]}); "
        f"convert D4RL hdf5 files with `python data/download_d4rl_datasets.py --hdf5 FILE --data_path {data_path}`, "
        f"generate one with `python data/generate_datasets.py --env {env} --dataset {dataset} --data_path {data_path}`, "
        f"or pass --data_path to the folder that holds {pkl_name(env, dataset)}"
    )


# --------------------------------------------------------------------------------------------------------------
# Safe pickle loading
# --------------------------------------------------------------------------------------------------------------

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("builtins", "list"),      # (how a pickled CheckedTrajectories is rebuilt: a plain list)
    ("builtins", "bool"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "complex"),
    ("builtins", "bytes"),
    ("builtins", "bytearray"),
}


class Refused(pickle.UnpicklingError):
    """What the restricted unpicklers refuse (code, objects, malformed tensors), as against a damaged stream."""


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as numpy arrays pickled at protocol 2 use it (their bytes written as a latin-1 str), and
    nothing else: only a str in latin-1."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise Refused("_codecs.encode is allowed only for a str in latin-1")
    return text.encode("latin-1", errors="strict")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        """Only the allowed numpy and builtin globals, numpy's DType classes and latin-1 ``_codecs.encode``; anything
        else is ``Refused``."""
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if module in ("numpy", "numpy.dtypes") and name.endswith("DType"):
            return super().find_class(module, name)
        raise Refused(f"forbidden global {module}.{name}")


def _storage_from_bytes(data):
    """A torch storage from the bytes plain pickling stored for it, read with ``torch.load(weights_only=True)``."""
    if not isinstance(data, (bytes, bytearray)):
        raise Refused(f"tensor storage given as {type(data).__name__}, not bytes")
    import warnings

    try:
        with warnings.catch_warnings():  # torch's notes on legacy storages: the refusal below says what matters
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's weights-only refusal: name what was refused
        name, op = re.search(r"GLOBAL ([\w.]+)", str(e)), re.search(r"Unsupported operand (\d+)", str(e))
        what = name.group(1) if name else f"or operation (pickle opcode {op.group(1)})" if op else "or content"
        raise Refused(f"forbidden global {what} in a tensor storage") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged bytes
        raise Refused(f"tensor storage not readable ({type(e).__name__}: {e})") from None


#: a broadcast view (stride 0) may hold more elements than its storage, up to this many bytes once materialised
_MAX_VIEW_BYTES = 1 << 30


def _checked_view(storage, offset, size, stride, requires_grad, hooks, dtype=None):
    """The checks torch's own rebuild leaves out: ``Tensor.set_`` grows a storage to fit any view, which would hand
    back uninitialised memory as data (or allocate whatever a tiny file asks for)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise Refused(f"tensor built on a {type(storage).__name__}, not a storage")
    dtype = storage.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype):
        raise Refused(f"tensor dtype given as {type(dtype).__name__}")

    def count(v):
        """True for an int >= 0 that is not a bool."""
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not (count(offset) and isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and len(size) == len(stride) and all(map(count, size)) and all(map(count, stride))):
        raise Refused("malformed tensor view (offset, sizes and strides must be integers >= 0)")
    if hooks or requires_grad not in (True, False):
        raise Refused("tensor with backward hooks or a non-boolean requires_grad")
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(size)
    available = storage._untyped_storage.nbytes()
    if numel and (offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1) * itemsize > available:
        raise Refused(f"a tensor of shape {tuple(size)} reaches beyond its storage of {available} bytes")
    if numel * itemsize > max(available, _MAX_VIEW_BYTES):
        raise Refused(f"a broadcast tensor of shape {tuple(size)} on {available} bytes: too large")
    return tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    size, stride = _checked_view(storage, offset, size, stride, requires_grad, hooks)
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    size, stride = _checked_view(storage, offset, size, stride, requires_grad, hooks, dtype)
    return torch._utils._rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata)


class _TensorUnpickler(_RestrictedUnpickler):
    """Also rebuilds torch tensors that plain pickling stored: their storages are loaded by ``torch.load`` with
    ``weights_only=True`` (safe from torch 2.6 on), so a file still cannot run code, and each view is checked to lie
    inside its storage."""

    def find_class(self, module, name):
        """Also torch's tensor rebuilds (views checked), storages read weights-only and torch dtypes; else as the
        parent."""
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3"):
            return _rebuild_tensor_v2 if name.endswith("v2") else _rebuild_tensor_v3
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _storage_from_bytes
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):  # v3's dtype argument
            return getattr(torch, name)
        return super().find_class(module, name)


def safe_unpickle(stream, tensors: bool = False):
    """Unpickle from an open binary stream, numpy arrays, lists, dicts and scalars only (``pickle.UnpicklingError``
    for anything else); with ``tensors``, also CPU copies of pickled torch tensors."""
    return (_TensorUnpickler if tensors else _RestrictedUnpickler)(stream).load()


def safe_pickle_load(path: str | os.PathLike):
    """Unpickle numpy arrays, lists, dicts and scalars only; anything else (code, objects) is refused."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f).load()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a dataset file") from None
    except Refused as e:
        raise UserError(f"{path}: refused to load ({e}); only numpy arrays, lists and dicts are allowed") from None
    except pickle.UnpicklingError as e:   # a stream cut short or not a pickle at all
        raise UserError(f"{path}: not a readable pickle (damaged, cut short or another format: {e})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, ImportError, MemoryError,
            OverflowError, SystemError, RuntimeError) as e:
        raise UserError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------------------------
# D4RL hdf5
# --------------------------------------------------------------------------------------------------------------

#: the arrays of a D4RL hdf5 file that loading reads (its ``infos/*`` and ``metadata/*`` are left on disk)
HDF5_TRAJECTORY_KEYS = ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts")


def read_hdf5(path: str | os.PathLike, keys=None) -> dict[str, np.ndarray]:
    """The datasets of a D4RL hdf5 file, keyed by their path (``infos/qpos``): all of them, or only ``keys``."""
    import h5py

    path = Path(path)
    out: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as f:
            def visit(name, obj):
                """Read dataset ``name`` into ``out`` when it is one of ``keys`` (all without ``keys``)."""
                if isinstance(obj, h5py.Dataset) and (keys is None or name in keys):
                    out[name] = obj[()]
            f.visititems(visit)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a dataset file") from None
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, OverflowError) as e:
        # a damaged file fails in h5py's open, its object visit ("Object visitation failed") or a dataset read
        why = str(e).strip() or type(e).__name__
        raise UserError(f"{path}: not a readable hdf5 file ({why})") from None
    return out


#: the flat arrays with one value per row: a trailing axis of one, as D4RL writes some, is squeezed (as d4rl does)
_ROW_KEYS = ("rewards", "terminals", "timeouts")


def _flat_columns(data: dict, source: str) -> tuple[dict[str, np.ndarray], int]:
    """The per-row arrays of a flat D4RL dict, checked: no scalars, ``rewards``/``terminals``/``timeouts`` of shape
    (N,) (or (N, 1), squeezed), the same N rows everywhere, numeric or boolean flags. Returns them and N."""
    cols = {}
    for k in ("observations", "next_observations", "actions") + _ROW_KEYS:
        if k not in data:
            continue
        v = np.asarray(data[k])
        if v.ndim == 0:
            raise UserError(f"{source}: {k!r} is a single value (shape ()), expected one row per transition")
        if k in _ROW_KEYS and v.ndim == 2 and v.shape[1] == 1:
            v = v[:, 0]
        cols[k] = v
    n = len(cols["rewards"])
    for k, v in cols.items():
        if k in _ROW_KEYS and v.ndim != 1:
            raise UserError(f"{source}: {k!r} has shape {v.shape}, expected ({n},): one value per row (rewards has "
                            f"{n} rows)")
        if len(v) != n:
            raise UserError(f"{source}: {k!r} has {len(v)} rows (shape {v.shape}), rewards has {n} "
                            f"(shape {cols['rewards'].shape})")
        if k in ("terminals", "timeouts"):
            cols[k] = _as_flags(v, source, k)
    return cols, n


def _as_flags(v, source: str, key: str) -> np.ndarray:
    """``terminals``/``timeouts`` as booleans; a non-numeric dtype or a NaN/inf flag is an error (NaN would read as
    True and silently cut an episode)."""
    v = np.asarray(v)
    if v.dtype != bool and not np.issubdtype(v.dtype, np.number):
        raise UserError(f"{source}: {key!r} has dtype {v.dtype}, expected booleans")
    if np.issubdtype(v.dtype, np.inexact) and not np.isfinite(v).all():
        raise UserError(f"{source}: {key!r} contains NaN or inf, expected 0/1 flags")
    return v.astype(bool)


def _to_float32(v: np.ndarray, source: str, key: str) -> np.ndarray:
    """``v`` as float32; a finite value beyond float32's range is an error, not a silent inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = v.astype(np.float32, copy=False)
    if out is not v and np.issubdtype(v.dtype, np.floating) and not np.isfinite(out).all():
        big = np.isfinite(v) & ~np.isfinite(out)
        if big.any():
            raise UserError(f"{source}: {key!r} has values up to {np.abs(v[big]).max():.3g}, beyond float32's range "
                            f"(about 3.4e38): they overflow float32")
    return out


def split_episodes(data: dict[str, np.ndarray], source: str = "dataset",
                   max_steps: int | None = None, require_episode: bool = False) -> list[dict[str, np.ndarray]]:
    """Split flat D4RL arrays into trajectories, as the originals' conversion script did.

    A row closes its episode if ``terminals`` is set, or ``timeouts`` when the file has them; files without
    ``timeouts`` (v0) close an episode when the in-episode counter equals 999 (the originals' off-by-one: the
    first episode gets 1000 steps, later ones 999), or, with ``max_steps`` (an env outside D4RL, whose episodes
    have another length), after exactly ``max_steps`` steps. Rows after the last closing flag are dropped. Float
    arrays are cast to float32 (medium-replay files are float64). ``rewards``, ``terminals`` and ``timeouts`` of
    shape (N, 1) are read as (N,). With ``require_episode``, a file in which no episode ends is an error instead of
    an empty list.
    """
    for key in REQUIRED_KEYS + ("terminals",):
        if key not in data:
            raise UserError(f"{source}: missing key {key!r}")
    cols, n = _flat_columns(data, source)
    keys = [k for k in ("observations", "next_observations", "actions", "rewards", "terminals") if k in cols]
    terminals = cols["terminals"].astype(bool)
    use_timeouts = "timeouts" in cols
    if use_timeouts:
        ends = terminals | cols["timeouts"].astype(bool)
    else:
        ends = np.zeros(n, dtype=bool)
        step = 0
        for i in range(n):
            if max_steps is not None:  # exactly max_steps rows per episode
                step += 1
                if terminals[i] or step == max_steps:
                    ends[i], step = True, 0
                continue
            if terminals[i] or step == 999:
                ends[i] = True
                step = 0
            step += 1  # as the originals: the counter restarts at 1 after a closed episode
    end_idx = np.flatnonzero(ends)
    if not len(end_idx):
        if require_episode:
            if n == 0:
                raise UserError(f"{source}: the file holds no rows (its arrays are empty)")
            rule = ("no row has terminals or timeouts set" if use_timeouts else
                    f"no row has terminals set, the file has no timeouts and fewer than "
                    f"{1000 if max_steps is None else max_steps} rows")
            raise UserError(f"{source}: no episode ends in its {n} rows ({rule}); the unfinished last episode is "
                            f"dropped, as by D4RL's converter, so no trajectory is left")
        return []
    kept = int(end_idx[-1]) + 1  # the unfinished tail is dropped
    flat = {}
    for k in keys:
        arr = cols[k][:kept]
        if k == "terminals":
            arr = arr.astype(bool)
        elif np.issubdtype(arr.dtype, np.floating):
            arr = _to_float32(arr, source, k)
        flat[k] = arr
    trajs = []
    start = 0
    for e in end_idx:
        trajs.append({k: flat[k][start:e + 1] for k in keys})
        start = e + 1
    return trajs


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------

class CheckedTrajectories(list):
    """Trajectories ``validate_trajectories`` returned, checked for the env named ``env`` (a ``TrajectoryDataset`` of
    that env takes them as they are)."""

    def __init__(self, trajs, env: str):
        super().__init__(trajs)
        self.env = env

    def __reduce__(self):   # pickled (a user saving load_dataset's result) as a plain list, which the loader reads
        return list, (list(self),)


def validate_trajectories(trajs, spec: EnvSpec, source: str, *,
                          next_observations: bool = False) -> list[dict[str, np.ndarray]]:
    """Check structure, lengths, dtypes, dimensions and finiteness; return new dicts of the arrays used, as float32,
    and of the terminals, as a new bool array. An array that already is float32 is not copied: the result shares its
    memory with ``trajs`` (the array itself; rewards as a (T,) view). With ``next_observations``, trajectories that
    have them get them checked (shape, finiteness) and kept too."""
    if not isinstance(trajs, list) or not trajs:
        raise UserError(f"{source}: expected a non-empty list of trajectory dicts, got {type(trajs).__name__}"
                        + (" (empty)" if isinstance(trajs, list) else ""))
    out = []
    for i, t in enumerate(trajs):
        where = f"{source}: trajectory {i}"
        if not isinstance(t, dict):
            raise UserError(f"{where} is a {type(t).__name__}, expected a dict")
        for k in REQUIRED_KEYS:
            if k not in t:
                raise UserError(f"{where} lacks key {k!r}")
            if not isinstance(t[k], np.ndarray):
                raise UserError(f"{where}: {k!r} is a {type(t[k]).__name__}, expected a numpy array")
            if t[k].dtype.kind not in "iuf":   # (numpy counts timedelta64 as an integer type)
                raise UserError(f"{where}: {k!r} has dtype {t[k].dtype}, expected a float array")
        obs, act, rew = t["observations"], t["actions"], t["rewards"]
        if rew.ndim != 1 and not (rew.ndim == 2 and rew.shape[1] == 1):
            raise UserError(f"{where}: rewards have shape {rew.shape}, expected (T,)")
        n = len(rew)
        if n == 0:
            raise UserError(f"{where} is empty")
        if obs.ndim != 2 or obs.shape[1] != spec.state_dim:
            raise UserError(f"{where}: observations have shape {obs.shape}, expected (T, {spec.state_dim}) "
                            f"for {spec.name}")
        if act.ndim != 2 or act.shape[1] != spec.act_dim:
            raise UserError(f"{where}: actions have shape {act.shape}, expected (T, {spec.act_dim}) for {spec.name}")
        if len(obs) != n or len(act) != n:
            raise UserError(f"{where}: lengths differ (observations {len(obs)}, actions {len(act)}, rewards {n})")
        arrays = {"observations": obs, "actions": act, "rewards": rew.reshape(-1)}
        if next_observations and "next_observations" in t:
            nxt = t["next_observations"]
            if not isinstance(nxt, np.ndarray) or not (np.issubdtype(nxt.dtype, np.floating)
                                                       or np.issubdtype(nxt.dtype, np.integer)):
                raise UserError(f"{where}: 'next_observations' is not a numeric numpy array")
            if nxt.shape != (n, spec.state_dim):
                raise UserError(f"{where}: next_observations have shape {nxt.shape}, expected ({n}, "
                                f"{spec.state_dim}) for {spec.name}")
            arrays["next_observations"] = nxt
        clean = {}
        for k, v in arrays.items():
            clean[k] = _to_float32(v, where, k)
            if not np.isfinite(clean[k]).all():
                raise UserError(f"{where}: {k!r} contains NaN or inf")
        term = t.get("terminals", t.get("dones"))
        if term is not None:
            term = np.asarray(term).reshape(-1)
            if len(term) != n:
                raise UserError(f"{where}: terminals have length {len(term)}, expected {n}")
            clean["terminals"] = _as_flags(term, where, "terminals")
        else:
            clean["terminals"] = np.zeros(n, dtype=bool)
        out.append(clean)
    _check_returns_to_go(out, spec, source)
    long = [len(t["rewards"]) for t in out if len(t["rewards"]) > spec.max_ep_len]
    if long:  # accepted, as by the originals: the sampler clips timesteps to max_ep_len - 1
        what = "1 trajectory is" if len(long) == 1 else f"{len(long)} trajectories are"
        print(f"warning: {source}: {what} longer than {spec.name}'s {spec.max_ep_len}-step episodes (longest "
              f"{max(long)}); their steps from {spec.max_ep_len - 1} on share one timestep embedding", file=sys.stderr)
    outside = [i for i, t in enumerate(out) if np.abs(t["actions"]).max(initial=0.0) > 1.0 + ACTION_SLACK]
    if outside:  # accepted, as by the originals; the tanh action head cannot reach them
        worst = max(float(np.abs(out[i]["actions"]).max()) for i in outside)
        what = "1 trajectory has" if len(outside) == 1 else f"{len(outside)} trajectories (first: {outside[0]}) have"
        print(f"warning: {source}: {what} actions outside [-1, 1], up to {worst:.3g} in size: the model's tanh action head cannot output them; is this "
              f"{spec.name} data with its actions in the env's [-1, 1] range?", file=sys.stderr)
    return CheckedTrajectories(out, spec.name)


#: returns-to-go beyond this many times the env's scale (the model reads rtg / scale: about 0-12 for D4RL's data)
#: get a warning; training on such inputs usually diverges
RTG_WARN_SCALED = 1e4


def _check_returns_to_go(trajs, spec: EnvSpec, source: str):
    """Returns-to-go (summed in float64) must fit float32, which the sampler keeps them in: rewards that fit float32
    can still sum beyond it. Returns-to-go far beyond the env's scale load with a warning."""
    limit = float(np.finfo(np.float32).max)
    if not trajs:
        return
    # sum |r| bounds every |return-to-go| of a trajectory; only trajectories whose bound passes the warning
    # threshold need their exact returns-to-go (reduceat over one concatenation: no Python loop for the rest)
    lengths = np.array([len(t["rewards"]) for t in trajs])
    flat = np.abs(np.concatenate([np.asarray(t["rewards"], dtype=np.float64).reshape(-1) for t in trajs]))
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    bound = np.zeros(len(trajs))
    nonempty = lengths > 0
    if nonempty.any():
        bound[nonempty] = np.add.reduceat(flat, starts[nonempty])
    check = np.flatnonzero(bound > min(RTG_WARN_SCALED * spec.scale, limit))
    if not len(check):
        return
    worst, i = max((float(np.abs(np.cumsum(trajs[j]["rewards"][::-1], dtype=np.float64)).max()), int(j))
                   for j in check)
    if worst > limit:
        raise UserError(f"{source}: trajectory {i}: returns-to-go reach {worst:.3g}, beyond float32's range "
                        f"({limit:.3g}); are the rewards in the env's units?")
    if worst > RTG_WARN_SCALED * spec.scale:
        print(f"warning: {source}: returns-to-go reach {worst:.3g} (trajectory {i}), {worst / spec.scale:.3g} after "
              f"{spec.name}'s scale {spec.scale:g}: inputs this large usually make training diverge; are the rewards "
              f"in the env's units?", file=sys.stderr)


#: how far beyond [-1, 1] stored actions may go (float rounding of clipped actions) before a warning
ACTION_SLACK = 1e-4


def episode_steps(spec: EnvSpec) -> int | None:
    """``split_episodes``' ``max_steps`` for files of this env without ``timeouts``: D4RL's rule for its envs."""
    return None if spec.d4rl else spec.max_ep_len


def load_trajectories(path: str | os.PathLike, env: str) -> list[dict[str, np.ndarray]]:
    """Load and validate a pkl or D4RL hdf5 file for ``env``."""
    path = Path(path)
    spec = get_env_spec(env)
    if path.suffix in (".hdf5", ".h5"):
        trajs = split_episodes(read_hdf5(path, HDF5_TRAJECTORY_KEYS), source=str(path), max_steps=episode_steps(spec),
                               require_episode=True)
    else:
        trajs = safe_pickle_load(path)
    return validate_trajectories(trajs, spec, str(path))


def load_dataset(data_path: str | os.PathLike, env: str, dataset: str, *,
                 generate: bool = False, quiet: bool = False) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """Find, load and validate ``{env}-{dataset}-v2``; with ``generate``, a missing dataset is first generated
    from the bundled behaviour policies (``decision_transformer.generation.ensure_dataset``). ``quiet``: no word
    on a smoke-test stand-in (a second load of a file the caller has already loaded, and said so)."""
    get_env_spec(env)
    check_dataset_name(dataset)
    if generate:
        from decision_transformer.generation import ensure_dataset

        path = ensure_dataset(data_path, env, dataset, generate=True)
    else:
        path = find_dataset_file(data_path, env, dataset, quiet=quiet)
    return path, load_trajectories(path, env)


# --------------------------------------------------------------------------------------------------------------
# Preprocessing shared by the fast sampler and the reference sampler in the tests
# --------------------------------------------------------------------------------------------------------------

def discount_cumsum(x: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """Reverse discounted cumulative sum, computed from the end as the originals did (same float ops)."""
    out = np.zeros_like(x)
    out[-1] = x[-1]
    for t in reversed(range(x.shape[0] - 1)):
        out[t] = x[t] + gamma * out[t + 1]
    return out


def apply_delayed_mode(trajs):
    """``--mode delayed``: the whole return is paid on the last step."""
    out = []
    for t in trajs:
        t = dict(t)
        r = np.zeros_like(t["rewards"])
        r[-1] = t["rewards"].sum()
        t["rewards"] = r
        out.append(t)
    return out


#: added to every state std (as the originals): no std of a table or checkpoint is below it
STD_EPS = 1e-6


def state_stats(trajs) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (+``STD_EPS``) over every observation of the dataset, float32, as the originals."""
    states = np.concatenate([t["observations"] for t in trajs], axis=0).astype(np.float32, copy=False)
    with np.errstate(over="ignore"):
        mean, std = np.mean(states, axis=0), np.std(states, axis=0) + STD_EPS
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise UserError(f"the observations are too large to normalise (up to {np.abs(states).max():.3g}): their mean "
                        f"or standard deviation overflows float32")
    return mean, std


#: ``--mode``: the originals' dataset / rollout variants.
MODES = ("normal", "delayed", "noise")


def check_mode(mode) -> None:
    """One line unless ``mode`` is one of ``MODES``."""
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}; choose normal, delayed or noise")


def check_pct_traj(pct_traj) -> None:
    """One line unless ``pct_traj`` is a number in (0, 1] (NaN is not)."""
    if not 0.0 < pct_traj <= 1.0:
        raise UserError(f"--pct_traj must be in (0, 1], got {pct_traj}")


def select_top_trajectories(returns: np.ndarray, lengths: np.ndarray, pct_traj: float) -> np.ndarray:
    """Indices of the best-return trajectories whose lengths add up to at most ``pct_traj`` of all timesteps (at
    least 1), taken best first until the next one would exceed that budget; the best trajectory is always kept, even
    when it alone is longer than the budget.

    Uses KZL's final ``<=`` (every trajectory kept at 1.0); REID/TAKAGI/LAWSON's ``<`` dropped the worst one.
    """
    check_pct_traj(pct_traj)
    budget = max(int(pct_traj * lengths.sum()), 1)
    order = np.argsort(returns, kind="stable")  # ascending, as the originals
    total = lengths[order[-1]]
    n = 1
    ind = len(order) - 2
    while ind >= 0 and total + lengths[order[ind]] <= budget:
        total += lengths[order[ind]]
        n += 1
        ind -= 1
    return order[-n:]


# --------------------------------------------------------------------------------------------------------------
# The device-resident dataset and sampler
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """One training batch. Shapes: states [B, K, ds], actions [B, K, da], rewards [B, K, 1], dones [B, K],
    rtg [B, K + 1, 1] (already divided by the scale), timesteps [B, K], mask [B, K] (1 = real step)."""

    states: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    dones: torch.Tensor
    rtg: torch.Tensor
    timesteps: torch.Tensor
    mask: torch.Tensor


class TrajectoryDataset:
    """Flat tensors of every trajectory on ``device``, with normalised states and precomputed returns-to-go.

    ``states`` is stored normalised with the dataset's own mean/std unless ``state_mean``/``state_std`` are given
    (the multi-task script can take them from elsewhere).
    """

    def __init__(self, trajs, env: str, *, mode: str = "normal", pct_traj: float = 1.0, device="cpu",
                 state_mean: np.ndarray | None = None, state_std: np.ndarray | None = None):
        spec = get_env_spec(env)
        device = checked_device(device)
        if isinstance(trajs, tuple) and len(trajs) == 2 and isinstance(trajs[0], (str, os.PathLike)):
            raise TypeError("TrajectoryDataset takes the trajectories; load_dataset returns (data file, trajectories): "
                            "data_file, trajs = load_dataset(...)")
        for i, t in enumerate(trajs):   # (another env's trajectories named as such, before the checks below)
            if not isinstance(t, dict):
                raise TypeError(f"trajectory {i} is a {type(t).__name__}, not a dict of arrays")
            if not all(isinstance(t.get(k), np.ndarray) for k in ("observations", "actions")):
                continue   # (said by validate_trajectories below)
            dims = (np.shape(t["observations"])[1:], np.shape(t["actions"])[1:])
            if dims != ((spec.state_dim,), (spec.act_dim,)):
                raise UserError(f"trajectory {i} has observations of shape {list(np.shape(t['observations']))} and "
                                f"actions of shape {list(np.shape(t['actions']))}; {env} has {spec.state_dim} state "
                                f"and {spec.act_dim} action dimensions")
        if not (isinstance(trajs, CheckedTrajectories) and trajs.env == spec.name):
            # trajectories built by hand: checked and converted as load_dataset does (float32 arrays, (T,) rewards,
            # terminals or the originals' dones, no empty or non-finite one)
            trajs = validate_trajectories(list(trajs), spec, "trajectories")
        check_mode(mode)
        if mode == "delayed":
            trajs = apply_delayed_mode(trajs)
        self.spec = spec
        self.env = env
        self.scale = spec.scale
        self.max_ep_len = spec.max_ep_len
        self.device = torch.device(device)
        mean, std = state_stats(trajs)
        if state_mean is not None or state_std is not None:   # (given ones: checked as a checkpoint's)
            mean, std = checked_state_stats(mean if state_mean is None else state_mean,
                                            std if state_std is None else state_std, env, "TrajectoryDataset: ",
                                            stored=False)
        self.state_mean, self.state_std = mean, std

        lengths = np.array([len(t["rewards"]) for t in trajs], dtype=np.int64)
        returns = np.array([t["rewards"].sum() for t in trajs], dtype=np.float64)
        self.traj_lens_all = lengths
        self.traj_returns_all = returns
        self.num_timesteps = int(lengths.sum())
        self.kept = select_top_trajectories(returns, lengths, pct_traj)  # indices into trajs, worst..best

        obs = np.concatenate([t["observations"] for t in trajs], axis=0)
        # The originals normalise in float64 (their padded arrays are float64) and cast afterwards.
        norm_obs = (obs.astype(np.float64) - self.state_mean) / self.state_std
        rtg = np.concatenate([discount_cumsum(t["rewards"], 1.0) for t in trajs], axis=0)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        dv = self.device
        self.states = torch.from_numpy(norm_obs.astype(np.float32)).to(dv)                      # [N, ds]
        self.actions = torch.from_numpy(np.concatenate([t["actions"] for t in trajs])).to(dv)   # [N, da]
        self.rewards = torch.from_numpy(np.concatenate([t["rewards"] for t in trajs])).to(dv)   # [N]
        self.dones = torch.from_numpy(np.concatenate([t["terminals"] for t in trajs]).astype(np.int64)).to(dv)
        self.rtg = torch.from_numpy(rtg.astype(np.float32)).to(dv)                               # [N]
        # divided by the scale here, on the host: a GPU divides a tensor by a number as a product with its
        # reciprocal, which can differ from the division in the last bit, and a batch would then depend on the
        # device. (The float32 values divided in float64 and rounded: the originals' numbers, bit for bit.)
        self.rtg_scaled = torch.from_numpy((rtg.astype(np.float32).astype(np.float64) / self.scale)
                                           .astype(np.float32)).to(dv)                          # [N]
        self.traj_starts = torch.from_numpy(starts).to(dv)
        self.traj_lens = torch.from_numpy(lengths).to(dv)
        pad_state = (np.full(spec.state_dim, PAD_STATE_RAW, dtype=np.float64) - self.state_mean) / self.state_std
        self.pad_state = torch.from_numpy(pad_state.astype(np.float32)).to(dv)
        # Uniform sampling over the kept timesteps == length-weighted trajectory choice + uniform start.
        kept_lens = lengths[self.kept]
        self.kept_idx = torch.from_numpy(self.kept.astype(np.int64)).to(dv)
        self.kept_cum = torch.from_numpy(np.cumsum(kept_lens)).to(dv)
        self.num_kept_timesteps = int(kept_lens.sum())

    def __len__(self):
        return len(self.traj_lens_all)

    # ---- sampling ---------------------------------------------------------------------------------------------
    def sample_indices(self, batch_size: int, generator: torch.Generator | None = None):
        """(trajectory index, start) pairs: trajectory with probability len/sum(len) over the kept set,
        start uniform in [0, len - 1]. Drawn as one uniform timestep of the kept set, which is the same law. A CPU
        ``generator`` draws on the CPU for a dataset on a GPU too (the analyses' batches, the same on every device)."""
        dev = generator.device if generator is not None and generator.device.type == "cpu" else self.device
        u = torch.randint(0, self.num_kept_timesteps, (batch_size,), device=dev, generator=generator).to(self.device)
        j = torch.searchsorted(self.kept_cum, u, right=True)                     # position in the kept list
        traj = self.kept_idx[j]
        start = u - (self.kept_cum[j] - self.traj_lens[traj])
        return traj, start

    def sample_batch(self, batch_size: int, K: int, generator: torch.Generator | None = None) -> Batch:
        """``batch_size`` windows of K steps drawn as ``sample_indices`` and built by ``get_windows``: states
        [B, K, ds], actions [B, K, da], rtg [B, K + 1, 1] ... (see ``Batch``)."""
        check_batch_shape(batch_size, K)
        traj, start = self.sample_indices(batch_size, generator)
        return self.get_windows(traj, start, K)

    def get_windows(self, traj: torch.Tensor, start: torch.Tensor, K: int) -> Batch:
        """Windows of K steps from ``start`` in ``traj``, left-padded as the originals' ``get_batch``."""
        dv = self.device
        traj = traj.to(dv)
        start = start.to(dv)
        length = self.traj_lens[traj]                                            # [B]
        tlen = torch.clamp(length - start, max=K)                                # real steps per window
        pad = K - tlen                                                           # [B]
        j = torch.arange(K, device=dv).unsqueeze(0)                              # [1, K]
        offset = j - pad.unsqueeze(1)                                            # step offset from start
        real = offset >= 0                                                       # [B, K]
        flat = self.traj_starts[traj].unsqueeze(1) + start.unsqueeze(1) + offset.clamp(min=0)
        flat = torch.where(real, flat, torch.zeros_like(flat))

        states = torch.where(real.unsqueeze(-1), self.states[flat], self.pad_state)
        actions = torch.where(real.unsqueeze(-1), self.actions[flat], torch.full_like(self.actions[flat], PAD_ACTION))
        rewards = torch.where(real, self.rewards[flat], torch.zeros((), device=dv)).unsqueeze(-1)
        dones = torch.where(real, self.dones[flat], torch.full((), PAD_DONE, device=dv, dtype=torch.long))
        timesteps = torch.where(real, start.unsqueeze(1) + offset, torch.zeros((), device=dv, dtype=torch.long))
        timesteps = timesteps.clamp(max=self.max_ep_len - 1)

        # RTG has K + 1 entries: tlen + 1 values from start (0 past the episode end), left-padded with zeros.
        j1 = torch.arange(K + 1, device=dv).unsqueeze(0)
        off1 = j1 - pad.unsqueeze(1)
        in_ep = (off1 >= 0) & (start.unsqueeze(1) + off1 < length.unsqueeze(1))
        flat1 = self.traj_starts[traj].unsqueeze(1) + start.unsqueeze(1) + off1.clamp(min=0)
        flat1 = torch.where(in_ep, flat1, torch.zeros_like(flat1))
        rtg = torch.where(in_ep, self.rtg_scaled[flat1], torch.zeros((), device=dv))
        mask = real.to(torch.float32)
        return Batch(states, actions, rewards, dones, rtg.unsqueeze(-1), timesteps, mask)
