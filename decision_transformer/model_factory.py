"""Build the DT that ``experiment.py``'s flags describe, and the auxiliary losses they switch on."""
from __future__ import annotations

from decision_transformer.errors import UserError
from decision_transformer.models import BackboneConfig, DecisionTransformer, DTConfig


def build_model_config(args, spec) -> DTConfig:
    backbone = BackboneConfig(n_embd=args.embed_dim, n_layer=args.n_layer, n_head=args.n_head,
                              n_inner=4 * args.embed_dim, activation_function=args.activation_function,
                              resid_pdrop=args.dropout, attn_pdrop=0.1, disable_attention=args.disable_attention)
    return DTConfig(state_dim=spec.state_dim, act_dim=spec.act_dim, max_length=args.K, max_ep_len=spec.max_ep_len,
                    share_input_output_proj=args.share_input_output_proj, embed_order=args.embed_order,
                    backbone=backbone)


def build_model(cfg: DTConfig, seed: int) -> DecisionTransformer:
    try:
        return DecisionTransformer(cfg, seed=seed)
    except ValueError as e:
        raise UserError(str(e)) from None


def build_model_from_args(args, spec) -> DecisionTransformer:
    """The model of a run (seeded construction), before any checkpoint or merge is loaded into it."""
    return build_model(build_model_config(args, spec), args.seed)


def make_extra_loss(args, model):
    """A callable ``(model, out, batch, step) -> loss`` added to the action MSE, or None."""
    return None
