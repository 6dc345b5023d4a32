"""Command-line flags of ``lm_cotraining/experiment.py`` (REID/LAWSON ``lm_cotraining``; cli.md §3).

The flags of ``experiment.py``'s data/model/k-means/optimisation/run groups with the same meaning, minus the ones the
LM script never had (``--pretrained_block``, ``--remove_grad_clip``, ``--project``, merging), plus the
co-training flags. Defaults that differ: ``--max_iters 10``, ``--num_steps_per_iter 10000``, ``--extend_positions``
on (``--no_extend_positions`` turns it off), ``--outdir`` None (= ``models/{env}``), ``--fp16`` effective.
"""
from __future__ import annotations

import argparse

from decision_transformer.cli import (HelpFormatter, add_data_flags, add_kmeans_flags, add_merge_flags,
                                      add_model_flags, add_optim_flags, add_run_flags)

#: flags of experiment.py that the LM script does not accept (their defaults stay in the namespace)
_NOT_IN_LM_SCRIPT = ("pretrained_block", "remove_grad_clip", "project")


def _drop(p: argparse.ArgumentParser, keep_default, predicate):
    """Remove the options whose action satisfies ``predicate``; their dest keeps its default in the namespace."""
    for action in [a for a in p._actions if predicate(a)]:
        p._remove_action(action)
        for group in p._action_groups:
            if action in group._group_actions:
                group._group_actions.remove(action)
        for opt in action.option_strings:
            p._option_string_actions.pop(opt, None)
        if keep_default:
            p.set_defaults(**{action.dest: action.default})


def add_lm_cotraining_flags(p: argparse.ArgumentParser):
    """The "LM co-training and regularisation" flags: ``--joint`` text co-training and its corpus,
    the LM-loss weight and decay, k-means annealing, ``--init_reg``, ``--no_extend_positions``."""
    g = p.add_argument_group("LM co-training and regularisation")
    g.add_argument("--no_extend_positions", dest="extend_positions", action="store_false",
                   help="use a separate timestep table (--extend_positions is on by default in this script)")
    g.add_argument("--joint", action="store_true",
                   help="co-train the transformer as a causal LM on a local text corpus (one text batch per step)")
    g.add_argument("--no_token_cache", action="store_true",
                   help="tokenise the --joint corpus again instead of reusing {data_path}/token_cache/")
    g.add_argument("--tokenizer_name", type=str, default="gpt2",
                   help="tokenizer for --joint; the LM directory's own tokenizer is used when it has one and this "
                        "is left at gpt2")
    g.add_argument("--nlp_dataset_name", type=str, default="wikitext",
                   help="--joint corpus: a text file or folder (e.g. an extracted wikitext-103-raw-v1 folder), or "
                        "a folder {data_path}/{name}/{config}")
    g.add_argument("--nlp_dataset_config_name", type=str, default="wikitext-103-raw-v1")
    g.add_argument("--gpt_lm_const", type=float, default=1.0, help="weight of the LM loss")
    g.add_argument("--lm_const_linear_decay", action="store_true",
                   help="LM-loss weight decays linearly over the S = max_iters * num_steps_per_iter steps, "
                        "from --gpt_lm_const at the first step to --gpt_lm_const / S at the last")
    g.add_argument("--disable_k_annealing", action="store_true",
                   help="k-means loss weight constant (no sigmoid annealing over 15000 steps)")
    g.add_argument("--init_reg", type=float, default=None,
                   help="weight of sum ||theta - theta_0||_F over transformer.h (1e-4 in the Merging-DT README)")


def lm_cotraining_parser() -> argparse.ArgumentParser:
    """The parser of ``lm_cotraining/experiment.py``: experiment.py's groups without the flags the
    LM script never had, plus the co-training flags, with this script's defaults and help texts."""
    p = argparse.ArgumentParser(
        prog="lm_cotraining/experiment.py",   # (not "experiment.py": its errors would send to the other script's --help)
        description="Train a Decision Transformer initialised from a pretrained language model, with k-means "
                    "language alignment, init_reg and optional LM co-training.",
        formatter_class=HelpFormatter)
    add_data_flags(p)
    add_model_flags(p)
    add_kmeans_flags(p)
    add_optim_flags(p)
    add_run_flags(p, outdir_default=None)
    add_lm_cotraining_flags(p)
    merge_group_start = len(p._actions)
    add_merge_flags(p)
    merge_actions = set(p._actions[merge_group_start:])
    _drop(p, True, lambda a: a in merge_actions or a.dest in _NOT_IN_LM_SCRIPT)
    p.set_defaults(max_iters=10, num_steps_per_iter=10000, extend_positions=True, project="decision-transformer")
    for action in p._actions:
        if action.dest == "extend_positions" and action.option_strings == ["--extend_positions"]:
            action.help = "timestep embedding = the LM's wpe (on by default here; the originals could not turn it off)"
        elif action.dest == "fp16":
            action.help = "fp16 autocast + GradScaler on CUDA (gradients unscaled and clipped; init_reg kept)"
        elif action.dest == "outdir":
            action.help = ("per-iteration checkpoints in {outdir}/dt_{exp_prefix}/model_{iter}.pt; "
                           "default models/{env}; '' disables")
        elif action.dest == "resume":
            action.help = ("continue the newest {outdir}/dt_gym-experiment-{env}-{dataset}-{id} run made with these "
                           "flags after its last finished iteration (only --max_iters, --device, --threads, "
                           "--precision, --compile, --cuda_graph, --num_eval_episodes, --eval_workers, -w, --save_model, "
                           "--save_mode, --data_path, --outdir, --no_generate, --no_token_cache and --end_break may differ)")
        elif action.dest == "pretrained_lm":
            action.help = "required: a GPT-2-family directory (checkpoints/ChibiT) or a Hub id such as gpt2 (local or cached, else downloaded where the Hub can be reached)"
    return p
