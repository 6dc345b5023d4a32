"""Per-block activations through forward hooks (TAKAGI's ``signal_propagation.get_activation``).

Nine entries per block, in the originals' order: ``ln_1``, ``attn.c_attn``, ``attn.c_proj``,
``attn.resid_dropout``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``, ``mlp.act``, ``mlp.dropout`` (108 for 12 blocks). Keys
are ``"{block}.{entry}"``. ``mlp.dropout`` is the MLP branch output before the residual add ("block output" in the
paper). Every block owns its modules, so each hook sees its own block (the originals' shared activation module
made every ``i.mlp.act`` hold the last block's output); a module shared between blocks is refused.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from decision_transformer.analysis.runs import batch_for, model_inputs
from decision_transformer.errors import UserError
from decision_transformer.models.gpt2 import eager_attention
from decision_transformer.training.trainer import module_mode

BLOCK_ENTRIES = ("ln_1", "attn.c_attn", "attn.c_proj", "attn.resid_dropout", "ln_2", "mlp.c_fc", "mlp.c_proj",
                 "mlp.act", "mlp.dropout")
BLOCK_OUTPUT = "mlp.dropout"


def blocks(model) -> torch.nn.ModuleList:
    """The model's transformer blocks (``model.transformer.h``); a model without them is refused."""
    try:
        return model.transformer.h
    except AttributeError:
        raise UserError(f"{type(model).__name__} has no transformer.h blocks to analyse") from None


def depth(model) -> int:
    """The number of transformer blocks of ``model``."""
    return len(blocks(model))


def hooked_modules(model, entries=BLOCK_ENTRIES) -> dict[str, torch.nn.Module]:
    """``{"{i}.{entry}": module}`` in block-major, entry order; entries a block lacks are skipped, but an entry given
    (other than the default ``BLOCK_ENTRIES``) that no block has, a misspelt name, is refused."""
    if isinstance(entries, str):
        entries = (entries,)
    out, seen, found = {}, {}, set()
    for i, block in enumerate(blocks(model)):
        for name in entries:
            try:
                mod = block.get_submodule(name)
            except AttributeError:
                continue
            found.add(name)
            key = f"{i}.{name}"
            if id(mod) in seen:
                raise UserError(f"modules {seen[id(mod)]} and {key} are the same object; their activations "
                                f"cannot be told apart")
            seen[id(mod)] = key
            out[key] = mod
    missing = [name for name in entries if name not in found] if tuple(entries) != BLOCK_ENTRIES else []
    if missing:
        raise UserError(f"no transformer block has a module {', '.join(map(repr, missing))}; entries are module "
                        f"names below a block, such as {', '.join(BLOCK_ENTRIES[:3])}")
    return out


@torch.no_grad()
def get_activations(model, batch, entries=BLOCK_ENTRIES,
                    select: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One forward of ``batch`` in eval mode (the model is left in the mode it was in); returns the
    (``select``-reduced) output of every hooked module as a float32 CPU tensor, keyed and ordered as
    ``hooked_modules``. Full outputs are [B, 3K, D] (c_attn 3D, c_fc and act 4D); ``select`` keeps memory small (e.g.
    three token positions)."""
    batch = batch_for(model, batch, "get_activations")
    mods = hooked_modules(model, entries)
    store: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(key):
        """A forward hook that stores its module's output under ``key``."""
        def hook(_module, _inp, out):
            """Store the output (the first element of a tuple), ``select``-reduced, as a float32 CPU tensor."""
            t = out[0] if isinstance(out, tuple) else out
            t = t.detach()
            if select is not None:
                t = select(t)
            store[key] = t.float().cpu()
        return hook

    try:
        for key, mod in mods.items():
            handles.append(mod.register_forward_hook(make_hook(key)))
        # padded positions' activations as the originals computed them
        with eager_attention(model), module_mode(model, False):
            model(*model_inputs(batch)[:4], attention_mask=batch.mask)
    finally:
        for h in handles:
            h.remove()
    return {k: store[k] for k in mods if k in store}


def check_finite_activations(acts: dict[str, torch.Tensor], source):
    """Refuse activations holding NaN or inf (weights that overflow in the forward pass), naming ``source`` and the
    first such layer in forward order."""
    bad = next((k for k, v in acts.items() if not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise UserError(f"{source}: the model's forward pass gives non-finite activations, first at {bad}")


def block_of(key: str) -> int:
    """The block index of a ``"{block}.{entry}"`` key."""
    return int(key.split(".", 1)[0])


def entry_of(key: str) -> str:
    """The entry name of a ``"{block}.{entry}"`` key (``"3.mlp.act"`` -> ``"mlp.act"``)."""
    return key.split(".", 1)[1]
