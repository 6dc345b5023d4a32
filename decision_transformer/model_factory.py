"""Build the DT that the scripts' flags describe, and the auxiliary losses they switch on.

Model variants (model.md §2, §8-§10):

* random init: GPT-2 config from ``--embed_dim --n_layer --n_head --activation_function``;
* ``--pretrained_lm``: the LM's architecture and weights (GPT-2 family or ImageGPT with its own norm;
  ``--igpt_legacy_ln`` = the originals' load into GPT-2 LayerNorms), attention dropout 0.1, residual ``--dropout``;
* ``--pretrained_block b``: a random-init DT whose block b is the LM's block b (architecture and weights);
* ``--extend_positions``: the timestep table is ``transformer.wpe`` (the LM's table, tiled when shorter than an
  episode).

Everything needed to rebuild the module structure is in ``DTConfig`` (``model.config.to_dict()`` is stored in every
checkpoint), so ``DecisionTransformer(DTConfig.from_dict(...))`` rebuilds any run without the LM files.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from decision_transformer.errors import UserError
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig


def _random_backbone(args) -> BackboneConfig:
    return BackboneConfig(n_embd=args.embed_dim, n_layer=args.n_layer, n_head=args.n_head,
                          n_inner=4 * args.embed_dim, activation_function=args.activation_function,
                          resid_pdrop=args.dropout, attn_pdrop=0.1, disable_attention=args.disable_attention)


def locate_pretrained(args):
    """The ``PretrainedLM`` of ``--pretrained_lm`` (config read, weights not yet), or None."""
    if not getattr(args, "pretrained_lm", None):
        if getattr(args, "pretrained_block", None) is not None:
            raise UserError("--pretrained_block needs --pretrained_lm (the model the block comes from), "
                            "e.g. --pretrained_lm gpt2")
        return None
    from decision_transformer.models.pretrained import locate_lm

    return locate_lm(args.pretrained_lm)


def check_lm_flags(args, spec, lm) -> None:
    """The flags that depend on the located LM (``--pretrained_block`` range, the host's ``--embed_dim``,
    ``--igpt_legacy_ln``, ``--gpt_kmeans`` within its vocabulary), checked as building the model and its losses
    would, but before the data is loaded (a missing dataset takes minutes to generate)."""
    try:
        build_model_config(args, spec, lm)
    except ValueError as e:
        raise UserError(str(e)) from None
    n = getattr(args, "gpt_kmeans", None)
    if n is not None and getattr(args, "pretrained_block", None) is None:   # (centres of the LM's own wte)
        from decision_transformer.training.kmeans import check_clusters

        check_clusters(n, lm.vocab_size)


def check_flags_before_data(args, spec, lm) -> None:
    """Every model and auxiliary-loss flag that can be checked without the data, checked before it is loaded or
    generated (minutes): the architecture the flags build (``check_lm_flags`` with an LM; ``--igpt_legacy_ln``
    without one), ``--gpt_kmeans`` (an LM-initialised model, a weight, the centre count, a ``--kmeans_cache`` of the
    LM's hidden size) and ``--joint`` (a GPT-2 text LM, its corpus and tokenizer found)."""
    if lm is not None:
        check_lm_flags(args, spec, lm)
    else:
        build_model_config(args, spec, None)
    if getattr(args, "gpt_kmeans", None) is not None:
        check_kmeans_flags(args)
        cache = getattr(args, "kmeans_cache", None)
        if cache and Path(cache).is_file():   # (one of another LM would be found only after the data)
            from decision_transformer.training.kmeans import read_centres

            read_centres(Path(cache), args.gpt_kmeans, lm.n_embd)
    if getattr(args, "joint", False):
        from decision_transformer.training.lm_cotrain import joint_sources

        joint_sources(args, lm)


def check_kmeans_flags(args) -> None:
    """``--gpt_kmeans`` needs a model whose token embeddings are the LM's (``--pretrained_lm`` as a whole, not one
    ``--pretrained_block``) and a weight ``--gpt_kmeans_const``."""
    if not getattr(args, "pretrained_lm", None):
        raise UserError("--gpt_kmeans needs a model initialised from --pretrained_lm (centres of its token "
                        "embeddings)")
    if getattr(args, "pretrained_block", None) is not None:
        raise UserError("--gpt_kmeans does not go with --pretrained_block: the centres are of the LM's token "
                        "embeddings, and with one transplanted block the model's token embeddings are random")
    if args.gpt_kmeans_const is None:
        raise UserError("--gpt_kmeans needs --gpt_kmeans_const (the loss weight; the papers use 0.1)")


def build_model_config(args, spec, lm=None) -> DTConfig:
    """``lm``: the located LM (``locate_pretrained(args)``); looked up here when not given."""
    if lm is None:
        lm = locate_pretrained(args)
    backbone = backbone_config_from_args(args, lm, spec.max_ep_len)
    return DTConfig(state_dim=spec.state_dim, act_dim=spec.act_dim, max_length=args.K, max_ep_len=spec.max_ep_len,
                    share_input_output_proj=args.share_input_output_proj,
                    embed_order=getattr(args, "embed_order", "ln_then_time"),
                    extend_positions=bool(getattr(args, "extend_positions", False)), backbone=backbone)


def backbone_config_from_args(args, lm, max_ep_len: int) -> BackboneConfig:
    """The GPT-2 backbone the flags describe: random (``--embed_dim`` ...), the located LM's, or random with the LM's
    block ``--pretrained_block``; with ``--extend_positions`` at least ``max_ep_len`` positions."""
    legacy = bool(getattr(args, "igpt_legacy_ln", False))
    if legacy and (lm is None or lm.model_type != "imagegpt"):
        raise UserError("--igpt_legacy_ln only applies with an ImageGPT --pretrained_lm (openai/imagegpt-small)")
    block = getattr(args, "pretrained_block", None)
    if lm is None:
        backbone = _random_backbone(args)
    elif block is None:
        from decision_transformer.models.pretrained import backbone_config_from_lm

        backbone = backbone_config_from_lm(lm, dropout=args.dropout, legacy_ln=legacy,
                                           disable_attention=args.disable_attention)
    else:
        from decision_transformer.models.pretrained import block_override_from_lm

        backbone = _random_backbone(args)
        if backbone.n_embd != lm.n_embd:
            raise UserError(f"--pretrained_block needs the host's --embed_dim to equal the LM's hidden size "
                            f"{lm.n_embd} (got {backbone.n_embd}); e.g. --embed_dim {lm.n_embd}")
        n_lm = int(lm.hf_config.n_layer)
        if not 0 <= block < min(backbone.n_layer, n_lm):
            raise UserError(f"--pretrained_block {block} is out of range: the host has {backbone.n_layer} blocks "
                            f"and {args.pretrained_lm} has {n_lm}")
        backbone.block_overrides = {str(block): block_override_from_lm(lm, dropout=args.dropout, legacy_ln=legacy)}
    if getattr(args, "extend_positions", False):
        backbone.n_positions = max(backbone.n_positions, max_ep_len)
    return backbone


def build_model(cfg: DTConfig, seed: int) -> DecisionTransformer:
    """A ``DecisionTransformer`` of ``cfg`` built with construction seeded by ``seed``; an invalid config is a
    ``UserError``."""
    try:
        return DecisionTransformer(cfg, seed=seed)
    except ValueError as e:
        raise UserError(str(e)) from None


def build_bc_model(args, spec):
    """The MLP of ``--model_type bc`` (``--embed_dim`` wide, ``--n_layer`` deep, K states in), seeded by ``--seed``."""
    from decision_transformer.models.mlp_bc import MLPBCConfig, MLPBCModel

    cfg = MLPBCConfig(spec.state_dim, spec.act_dim, hidden_size=args.embed_dim, n_layer=args.n_layer,
                      max_length=args.K)
    return MLPBCModel(cfg, seed=args.seed)


def warn_lm_sizes(args, lm):
    """``--embed_dim`` / ``--n_layer`` / ``--n_head`` given (other than their defaults) with a whole ``--pretrained_lm``
    backbone, whose sizes win: a warning naming each that differs from the LM's (as experiment_multi.py's)."""
    from decision_transformer.cli import experiment_parser

    defaults = experiment_parser().parse_args([])
    lm_sizes = {"embed_dim": lm.n_embd, "n_layer": lm.hf_config.n_layer, "n_head": lm.hf_config.n_head}
    diffs = [f"--{flag} {getattr(args, flag)} (the LM has {size})" for flag, size in lm_sizes.items()
             if getattr(args, flag, None) not in (None, getattr(defaults, flag), size)]
    if diffs:
        print(f"warning: {', '.join(diffs)}: no effect, the backbone is {lm.path}'s", file=sys.stderr)


def build_model_from_args(args, spec, lm=None) -> DecisionTransformer:
    """The model of a run before any checkpoint or merge is loaded into it. Construction is reseeded with
    ``--seed`` (TAKAGI), then the LM's weights (or its block b) are copied in."""
    if lm is None:
        lm = locate_pretrained(args)
    cfg = build_model_config(args, spec, lm)
    model = build_model(cfg, args.seed)
    if lm is not None:
        from decision_transformer.models.pretrained import load_lm_into_backbone, transplant_block

        block = getattr(args, "pretrained_block", None)
        if block is None:
            load_lm_into_backbone(model.transformer, lm)
            warn_lm_sizes(args, lm)
        else:
            transplant_block(model.transformer, lm, block)
        print(f"pretrained: {lm.path} ({lm.model_type}, {lm.source}, hidden {lm.n_embd}, "
              f"{lm.hf_config.n_layer} layers)" + (f", block {block} only" if block is not None else ""),
              file=sys.stderr)
    return model


# ---- auxiliary losses -------------------------------------------------------------------------------------------

class AuxLosses:
    """Sum of the switched-on auxiliary terms, called by the Trainer as ``(model, out, batch, step)`` and returning
    ``(loss, logs)``; the Trainer logs each key's value at the iteration's last step (no host sync per step).

    Logged: ``training/kmeans_loss`` (unweighted) and ``training/kmeans_weight``, ``training/init_reg_loss``
    (weighted, as added), ``training/lm_loss`` (unweighted cross-entropy) and ``training/lm_const``.
    """

    def __init__(self, kmeans=None, init_reg=None, lm=None):
        self.kmeans, self.init_reg, self.lm = kmeans, init_reg, lm

    def __call__(self, model, out, batch, step: int) -> tuple[torch.Tensor, dict]:
        s = step + 1                       # the originals' step counter starts at 1
        total = out.action_preds.new_zeros((), dtype=torch.float32)
        logs: dict = {}
        if self.kmeans is not None:
            w = self.kmeans.weight(s)
            km = self.kmeans.loss(out.all_embs)
            total = total + w * km
            logs["training/kmeans_loss"], logs["training/kmeans_weight"] = km.detach(), w
        if self.init_reg is not None:
            reg = self.init_reg.loss()
            total = total + reg
            logs["training/init_reg_loss"] = reg.detach()
        if self.lm is not None:
            w = self.lm.weight(s)
            ll = self.lm.loss(model)
            total = total + w * ll
            logs["training/lm_loss"], logs["training/lm_const"] = ll.detach(), w
        return total, logs


def make_extra_loss(args, model, *, script: str = "experiment", lm=None, device=None):
    """The auxiliary losses of a run as an ``AuxLosses`` (or None when none is on).

    ``script``: ``experiment`` (k-means on L2-normalised embeddings, anneal horizon 5000) or ``lm_cotraining``
    (unnormalised, horizon 15000, ``--disable_k_annealing``, ``--init_reg``, ``--joint``). Built after any checkpoint
    is loaded, so ``init_reg``'s reference weights are the ones training starts from.
    """
    from decision_transformer.training.kmeans import ANNEAL_STEPS, KMeansAlignment, load_or_compute_centres

    device = device if device is not None else next(model.parameters()).device
    kmeans = init_reg = lm_term = None
    if getattr(args, "gpt_kmeans", None) is not None:
        check_kmeans_flags(args)
        centres = load_or_compute_centres(model.transformer.wte.weight, args.gpt_kmeans, args.kmeans_cache,
                                          seed=args.seed)
        horizon = None if getattr(args, "disable_k_annealing", False) else ANNEAL_STEPS[script]
        kmeans = KMeansAlignment(centres, const=args.gpt_kmeans_const, form=getattr(args, "kmeans_form", "dim"),
                                 mean=args.kmeans_mean, normalize=script == "experiment",
                                 anneal_steps=horizon).to(device)
    if getattr(args, "init_reg", None):
        from decision_transformer.training.init_reg import InitReg

        init_reg = InitReg(model, args.init_reg)
    if getattr(args, "joint", False):
        from decision_transformer.training.lm_cotrain import build_lm_cotraining

        lm_term = build_lm_cotraining(args, model, lm if lm is not None else locate_pretrained(args), device)
    if kmeans is None and init_reg is None and lm_term is None:
        return None
    return AuxLosses(kmeans, init_reg, lm_term)
