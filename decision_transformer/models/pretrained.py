"""Pretrained language/image models for initialising Decision Transformers, found on disk (or fetched from the Hub).

A ``--pretrained_lm NAME`` is looked up, in order, as

1. a directory ``NAME`` (relative to the working directory, or absolute) holding a ``save_pretrained`` model
   (``config.json`` + weights);
2. ``checkpoints/NAME``, and for a Hub id with an owner also ``checkpoints/<model name>`` (so
   ``--pretrained_lm ChibiT`` finds ``checkpoints/ChibiT`` and ``openai/imagegpt-small`` finds
   ``checkpoints/imagegpt-small``);
3. the Hugging Face cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), with
   ``local_files_only`` — ``gpt2`` and ``openai/imagegpt-small`` once downloaded on a networked machine;
4. for a Hub id found nowhere, a download from the Hugging Face Hub into that cache (the config, tokenizer files and
   one weight format), unless ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set.

A directory that differs only in letter case is accepted (the originals spell ChibiT both ``ChibiT`` and ``chibiT``).
Supported architectures: GPT-2 (``model_type`` ``gpt2``: GPT-2, ChibiT) and ImageGPT (``imagegpt``).

The DT's backbone takes the LM's architecture with the originals' dropout overrides (model.md §2): attention dropout
0.1, residual dropout ``--dropout``, embedding dropout the LM's own.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from decision_transformer import paths
from decision_transformer.errors import UserError, first_line
from decision_transformer.models.gpt2 import BackboneConfig

SUPPORTED_MODEL_TYPES = ("gpt2", "imagegpt")
#: buffers of old GPT-2 checkpoints that our blocks compute on the fly
_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (tests point ``HF_HOME`` elsewhere)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _is_model_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


def _case_variant(p: Path) -> Path | None:
    """``p`` with its last component matched case-insensitively against its parent's entries."""
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        return None
    want = p.name.lower()
    for child in sorted(parent.iterdir()):
        if child.name.lower() == want and _is_model_dir(child):
            return child
    return None


def _has_weights(p: Path) -> bool:
    """Whether folder ``p`` holds PyTorch weights (safetensors or ``pytorch_model*.bin``, sharded or not)."""
    return any(p.glob("*.safetensors")) or any(p.glob("pytorch_model*.bin"))


def _hf_cached_snapshot(name: str, weights: bool = True) -> Path | None:
    """The Hugging Face cache's snapshot of ``name``; with ``weights``, only one that holds weight files (a snapshot
    of its tokenizer alone, from ``--tokenizer_name``, is not a model)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    try:
        p = Path(snapshot_download(repo_id=name, local_files_only=True, cache_dir=str(hf_cache_dir())))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None
    return p if _is_model_dir(p) and (not weights or _has_weights(p)) else None


class WouldDownload(Exception):
    """Raised by ``find_model_dir(download=False)`` where the model is not here but the Hub could give it."""


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


#: The files of a Hub model a DT needs besides one weight format: its config and tokenizer.
HUB_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
             "merges.txt", "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json")


def _hub_download(name: str, flag: str, weights: bool = True) -> tuple[Path | None, str]:
    """``(snapshot folder, "")`` of Hub model ``name`` downloaded into the Hugging Face cache: its config and tokenizer
    files and (``weights``; a tokenizer needs none) one weight format (safetensors where the repository has them,
    else ``pytorch_model.bin``), not the TensorFlow, Flax or ONNX copies. ``(None, why)`` offline, or when the Hub cannot be reached or has no such
    model; ``why`` goes into the not-found message."""
    why = _hub_closed()
    if why:
        return None, why
    try:
        import huggingface_hub

        files = [f for f in huggingface_hub.HfApi().list_repo_files(name) if "/" not in f]
    except Exception as e:  # noqa: BLE001 - no network, no such repository, a gated one: said in one line
        return None, f" (the Hugging Face Hub could not give it: {first_line(e)})"
    wanted = [f for f in files if f.endswith(".safetensors")] or [f for f in files if f == "pytorch_model.bin"]
    if "config.json" not in files or (weights and not wanted):
        return None, " (the Hub's repository has no config.json with PyTorch weights)"
    wanted = wanted if weights else []
    import sys

    print(f"{flag} {name}: downloading its config and tokenizer files{' and ' + ', '.join(wanted) if wanted else ''} "
          f"from the Hugging Face Hub into {hf_cache_dir()} ...", file=sys.stderr)
    try:
        p = Path(huggingface_hub.snapshot_download(repo_id=name, cache_dir=str(hf_cache_dir()),
                                                   allow_patterns=[f for f in files if f in HUB_FILES] + wanted))
    except Exception as e:  # noqa: BLE001
        return None, f" (its download from the Hugging Face Hub failed: {first_line(e)})"
    return (p, "") if _is_model_dir(p) else (None, f" (the download in {p} has no config.json)")


def _hub_closed() -> str:
    """Why nothing can be downloaded from the Hub (offline mode, or its host cannot be reached), "" when it can."""
    if _hub_offline():
        return " (HF_HUB_OFFLINE is set: nothing is downloaded)"
    unreachable = _hub_unreachable()
    if unreachable:   # (at once: the Hub client would retry for half a minute)
        return f" (the Hugging Face Hub is not reachable from here: {unreachable}; HF_HUB_OFFLINE=1 skips trying)"
    return ""


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hub's host cannot be connected to (a name that does not resolve, no route, a timeout), or None when it
    can, or when a proxy is configured (the client then connects through it)."""
    import socket
    import urllib.parse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    url = urllib.parse.urlsplit(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    try:
        with socket.create_connection((host, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            return None
    except OSError as e:
        return f"{host}: {e.strerror or type(e).__name__}"


def find_model_dir(name: str, what: str = "pretrained model", flag: str = "--pretrained_lm",
                   download: bool = True) -> tuple[Path, str]:
    """Resolve ``name`` to a local directory: (path, where it was found). One-line ``UserError`` if absent. Without
    ``download``, a Hub id that is not here raises ``WouldDownload`` where the Hub could be asked for it."""
    if not name:
        raise UserError(f"{flag} is empty")
    given = Path(name).expanduser()
    candidates = [given]
    explicit_path = name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
    in_checkpoints = given.parts[:1] == ("checkpoints",)
    if not explicit_path and not in_checkpoints:
        # checkpoints/ below the working folder, then the project's own (a script started from a sub-folder)
        for root in (Path("checkpoints"), paths.PROJECT_ROOT / "checkpoints"):
            for c in (root / name,) + ((root / given.name,) if given.name != name else ()):   # Hub id: its name too
                if all(c.absolute().resolve() != k.absolute().resolve() for k in candidates):
                    candidates.append(c)
    ups = len(given.parts) - len(given.parts[next((i for i, q in enumerate(given.parts) if q != ".."),
                                                   len(given.parts)):])
    if ups and len(given.parts) > ups:
        # the originals ran from a sub-folder (``../checkpoints/chibiT``): where the path is not there, the same path
        # below this folder and below the project's root (checkpoints/ChibiT, matched case-insensitively)
        inner = Path(*given.parts[ups:])
        for c in (inner, paths.PROJECT_ROOT / inner):
            if all(c.absolute().resolve() != k.absolute().resolve() for k in candidates):
                candidates.append(c)
    for c in candidates:
        found = c if _is_model_dir(c) else _case_variant(c)
        if found is not None:
            if c is not given:
                import sys

                print(f"{flag} {name}: using {found}", file=sys.stderr)
            return found, "local"
    snap = _hf_cached_snapshot(name, weights=what != "tokenizer")
    if snap is not None:
        return snap, "hf-cache"
    hub = "" if explicit_path or in_checkpoints else None
    if hub is None and not download:
        hub = _hub_closed()
        if not hub:
            raise WouldDownload(name)
    if hub is None:
        snap, hub = _hub_download(name, flag, weights=what != "tokenizer")
        if snap is not None:
            return snap, "hub"
    looked = " and ".join(str(c.absolute()) for c in candidates)
    stem = given.name or name
    if explicit_path or in_checkpoints:   # a path, not a Hub id
        out = name
        if ups and len(given.parts) > ups:   # (an originals' ../ path: made inside the project, where it is found too)
            out = os.path.relpath(paths.PROJECT_ROOT / Path(*given.parts[ups:]))
        how = (f"create or copy a save_pretrained model directory there (ChibiT without a download: python "
               f"lm_cotraining/pretrain_chibit.py --text FILE --out {out})")
    else:
        how = (f"copy a save_pretrained directory to checkpoints/{stem} or pass its path to {flag}, or run "
               f"`hf download {name}` on a networked machine and copy its cache folder to HF_HOME")
    raise UserError(f"{what} {name!r} not found: no save_pretrained directory (config.json + weights) at {looked}, "
                    f"and not in the Hugging Face cache {hf_cache_dir()}{hub}; {how}; see checkpoints/README.md")


@dataclass
class PretrainedLM:
    """A located pretrained model: its directory, transformers config, and (lazily) its base-model weights."""

    name: str
    path: Path
    source: str
    hf_config: object
    _state: dict | None = field(default=None, repr=False)

    @property
    def model_type(self) -> str:
        """transformers' ``model_type`` of the model (``gpt2`` or ``imagegpt``)."""
        return self.hf_config.model_type

    @property
    def n_embd(self) -> int:
        """Hidden size of the model."""
        return int(self.hf_config.n_embd)

    @property
    def n_positions(self) -> int:
        """Number of position embeddings (rows of ``wpe``)."""
        return int(self.hf_config.n_positions)

    @property
    def vocab_size(self) -> int:
        """Number of token embeddings (rows of ``wte``)."""
        return int(self.hf_config.vocab_size)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Base-model weights (``wte``, ``wpe``, ``h.{i}.*``, ``ln_f.*``) as float32 CPU tensors."""
        if self._state is None:
            self._state = _read_weights(self)
        return self._state


def locate_lm(name: str, download: bool = True) -> PretrainedLM:
    """Find ``name`` (see the module docstring) and read its config; weights are read on first use. ``download``:
    see ``find_model_dir``."""
    path, source = find_model_dir(name, download=download)
    try:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # a malformed config.json or an architecture transformers does not know
        raise UserError(f"{path}: cannot read the model config ({first_line(e)})") from None
    mt = getattr(hf_config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{path}: unsupported architecture {mt!r}; --pretrained_lm supports GPT-2-family (gpt2, "
                        f"ChibiT) and ImageGPT models")
    if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False) or getattr(hf_config, "reorder_and_upcast_attn",
                                                                               False):
        raise UserError(f"{path}: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
    if not getattr(hf_config, "scale_attn_weights", True):
        raise UserError(f"{path}: scale_attn_weights=False is not supported")
    return PretrainedLM(name=name, path=path, source=source, hf_config=hf_config)


def _read_weights(lm: PretrainedLM) -> dict[str, torch.Tensor]:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    backbone_config_from_lm(lm, dropout=0.1)   # a config.json no model can be built from is said as such, not as
    #                                            weight files that transformers cannot load
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # mismatched shapes are reported below, naming the tensor (transformers' own report is silenced here)
        model, info = AutoModel.from_pretrained(str(lm.path), local_files_only=True, output_loading_info=True,
                                                ignore_mismatched_sizes=True)
    except Exception as e:
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        files = sorted(f.name for f in lm.path.iterdir() if f.name.startswith(("model", "pytorch_model"))
                       and f.suffix in (".bin", ".safetensors", ".json"))
        if not any(f.endswith((".bin", ".safetensors")) for f in files):
            raise UserError(f"{lm.path}: no weight file (model.safetensors or pytorch_model.bin) beside its "
                            f"config.json") from None
        raise UserError(f"{lm.path}: cannot load the model weights from {', '.join(files)}, damaged or not a weight "
                        f"file ({type(e).__name__}" + (f": {why})" if why else ")")) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()
    bad = sorted(info.get("mismatched_keys") or [])
    if bad:
        key, stored, built = bad[0][:3]
        raise UserError(f"{lm.path}: its weight files do not fit its config.json: {key} is {list(stored)} in the "
                        f"files, {list(built)} by the config" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    missing = [k for k in info.get("missing_keys", []) if not k.endswith(_BUFFER_SUFFIXES)]
    if missing:
        raise UserError(f"{lm.path}: the weight files lack {missing[0]}{_more_tensors(missing)}")
    # blocks the config does not build (config.json with a smaller n_layer): loading would drop them silently
    extra = sorted(re.sub(r"^transformer\.", "", k) for k in info.get("unexpected_keys", [])
                   if re.search(r"(^|\.)h\.\d+\.", k) and not k.endswith(_BUFFER_SUFFIXES))
    if extra:
        raise UserError(f"{lm.path}: its weight files hold {extra[0]}{_more_tensors(extra)}, blocks beyond the "
                        f"{model.config.num_hidden_layers} its config.json builds; the config does not fit the weights")
    state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()
             if not k.endswith(_BUFFER_SUFFIXES)}
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{lm.path}: the weights hold NaN or inf values, in {bad[0]}{_more_tensors(bad)} (a damaged "
                        f"model)")
    return state


def _more_tensors(names: list) -> str:
    """' and 1 more tensor', ' and 2 more tensors' after the first of ``names``; '' for one."""
    n = len(names) - 1
    return f" and {n} more tensor{'s' * (n > 1)}" if n else ""


# ---- architecture and weights into our backbone ---------------------------------------------------------------

def backbone_config_from_lm(lm: PretrainedLM, *, dropout: float, legacy_ln: bool = False,
                            disable_attention: bool = False) -> BackboneConfig:
    """The DT backbone of an LM-initialised run: the LM's shape, the originals' dropout overrides.

    ImageGPT keeps its RMS-style norm unless ``legacy_ln`` (the originals loaded it into GPT-2's LayerNorm:
    mean-centring, with zero biases that the checkpoint does not have).
    """
    c = lm.hf_config
    norm = "imagegpt" if lm.model_type == "imagegpt" and not legacy_ln else "layernorm"
    try:
        return BackboneConfig(
            n_embd=int(c.n_embd), n_layer=int(c.n_layer), n_head=int(c.n_head),
            n_inner=None if c.n_inner is None else int(c.n_inner),
            activation_function=str(c.activation_function),
            resid_pdrop=float(dropout), attn_pdrop=0.1, embd_pdrop=float(c.embd_pdrop),
            layer_norm_epsilon=float(c.layer_norm_epsilon), initializer_range=float(c.initializer_range),
            vocab_size=int(c.vocab_size), n_positions=int(c.n_positions), disable_attention=disable_attention,
            norm_type=norm)
    except (ValueError, TypeError) as e:  # a config.json no model can be built from (n_head 0, a NaN epsilon ...)
        raise UserError(f"{lm.path}: its config.json describes no usable model ({e})") from None


def tile_positions(table: torch.Tensor, rows: int) -> torch.Tensor:
    """Extend a [P, H] position table to ``rows`` rows as the originals: rows 0 and 1 kept, rows 2..P-1 repeated
    (new[i] = old[2 + (i - 2) mod (P - 2)] for i >= 2). A table already long enough is returned unchanged."""
    P = table.shape[0]
    if rows <= P:
        return table
    if P <= 2:
        raise UserError(f"cannot tile a position table of {P} rows to {rows}")
    idx = torch.arange(rows)
    idx = torch.where(idx < 2, idx, 2 + (idx - 2) % (P - 2))
    return table[idx]


def _copy_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], prefix: str, source: str,
               allow_missing: tuple[str, ...] = ()):
    own = module.state_dict()
    missing = [k for k in own if prefix + k not in sd and not k.endswith(allow_missing)]
    bad = [f"{prefix}{k} (LM {list(sd[prefix + k].shape)}, DT {list(v.shape)})" for k, v in own.items()
           if prefix + k in sd and sd[prefix + k].shape != v.shape]
    if missing or bad:
        what = f"lacks {prefix}{missing[0]}" if missing else f"has a different shape for {bad[0]}"
        raise UserError(f"{source}: the pretrained weights do not fit the DT backbone: {what}")
    with torch.no_grad():
        for k, v in own.items():
            if prefix + k in sd:
                v.copy_(sd[prefix + k])


_NORM_BIASES = ("ln_1.bias", "ln_2.bias", "ln_f.bias")


def _copy_lm_weights(module: torch.nn.Module, sd: dict[str, torch.Tensor], prefix: str, lm: PretrainedLM,
                     legacy: bool):
    """``_copy_into`` for LM weights. A legacy-LN ImageGPT load (``legacy``) fills LayerNorms from a checkpoint that has
    no norm biases: they are set to zero, as GPT-2's initialisation left them in the originals."""
    _copy_into(module, sd, prefix, str(lm.path), allow_missing=_NORM_BIASES if legacy else ())
    if legacy:
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith(_NORM_BIASES):
                    p.zero_()


def _block_diffs(have: BackboneConfig, want: dict) -> list[tuple[str, object, object]]:
    """(field, host value, LM value) for each setting that no weight shape shows and that differs between a host
    block's configuration ``have`` and the LM block ``want`` (from :func:`block_override_from_lm`)."""
    want_inner = want["n_inner"] if want["n_inner"] is not None else 4 * have.n_embd
    return [(name, h, w) for name, h, w in (
        ("n_head", have.n_head, want["n_head"]), ("n_inner", have.inner_dim, want_inner),
        ("activation_function", have.activation_function, want["activation_function"]),
        ("norm_type", have.norm_type, want["norm_type"]),
        ("layer_norm_epsilon", have.layer_norm_epsilon, want["layer_norm_epsilon"])) if h != w]


def _check_host_block(cfg: BackboneConfig, lm: PretrainedLM, b: int, fix: str):
    """Refuse a host block ``b`` (of the backbone configured by ``cfg``) whose architecture differs from the LM's
    block in a setting that no weight shape shows; ``fix`` says how to build the host instead."""
    have = cfg.for_block(b)
    # ImageGPT's block goes into an RMS-norm block, or a LayerNorm one with --igpt_legacy_ln
    legacy = lm.model_type == "imagegpt" and have.norm_type == "layernorm"
    diffs = _block_diffs(have, block_override_from_lm(lm, dropout=0.0, legacy_ln=legacy))
    if diffs:
        raise UserError(f"{lm.path}: block {b} of the host backbone has "
                        + ", ".join(f"{name} {h!r}" for name, h, _ in diffs) + ", the LM's block has "
                        + ", ".join(f"{name} {w!r}" for name, _, w in diffs) + f": build the host with {fix}")


def load_lm_into_backbone(backbone: torch.nn.Module, lm: PretrainedLM):
    """Copy the LM's weights into ``backbone`` (built by ``backbone_config_from_lm``). A longer ``wpe`` (extended
    positions) receives the LM's table tiled. Legacy-LN ImageGPT loads leave the LayerNorm biases at zero.

    A host of another depth, or whose blocks differ from the LM's in heads, MLP width, activation, norm or norm
    epsilon, is refused (``UserError``): the weights would fit it by shape and run as another network."""
    cfg = getattr(backbone, "config", None)
    if isinstance(cfg, BackboneConfig):
        depth = int(lm.hf_config.n_layer)
        if len(backbone.h) != depth:
            raise UserError(f"{lm.path}: the LM has {depth} blocks, the host backbone {len(backbone.h)}: build the "
                            f"host with backbone_config_from_lm(lm, dropout=...)")
        for b in range(depth):
            _check_host_block(cfg, lm, b, "backbone_config_from_lm(lm, dropout=...)")
    sd = dict(lm.state_dict())
    rows = backbone.wpe.weight.shape[0]
    sd["wpe.weight"] = tile_positions(sd["wpe.weight"], rows)
    legacy = lm.model_type == "imagegpt" and backbone.config.norm_type == "layernorm"
    _copy_lm_weights(backbone, sd, "", lm, legacy)


def transplant_block(backbone: torch.nn.Module, lm: PretrainedLM, b: int):
    """Overwrite block ``b`` of a random-init backbone with the LM's block ``b`` (--pretrained_block).

    The host's block ``b`` must be built with the LM block's architecture: build the host with
    ``block_overrides={str(b): block_override_from_lm(lm, dropout=...)}`` (as --pretrained_block does). A host block
    of other heads, MLP width, activation, norm or norm epsilon is refused (``UserError``): the weights would fit it
    by shape and run as another network."""
    cfg = getattr(backbone, "config", None)
    if isinstance(cfg, BackboneConfig):
        n = len(backbone.h)
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < n:
            raise UserError(f"block {b!r} is out of range: the host backbone has {n} blocks")
        _check_host_block(cfg, lm, b, f"block_overrides={{'{b}': block_override_from_lm(lm, dropout=...)}}")
    # an ImageGPT block in a LayerNorm block (--igpt_legacy_ln): the checkpoint has no norm biases
    legacy = lm.model_type == "imagegpt" and getattr(backbone.h[b].ln_1, "bias", None) is not None
    _copy_lm_weights(backbone.h[b], lm.state_dict(), f"h.{b}.", lm, legacy)


def block_override_from_lm(lm: PretrainedLM, *, dropout: float, legacy_ln: bool = False) -> dict:
    """What block ``b`` of a --pretrained_block host takes from the LM (heads, MLP width, activation, norm)."""
    bb = backbone_config_from_lm(lm, dropout=dropout, legacy_ln=legacy_ln)
    return {"n_head": bb.n_head, "n_inner": bb.n_inner, "activation_function": bb.activation_function,
            "resid_pdrop": bb.resid_pdrop, "attn_pdrop": bb.attn_pdrop,
            "layer_norm_epsilon": bb.layer_norm_epsilon, "norm_type": bb.norm_type}
