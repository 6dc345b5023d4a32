"""Command-line flags of ``experiment.py``, spelled and defaulted as the originals (see the README's flag tables)."""
from __future__ import annotations

import argparse
import copy
import os
import sys

from decision_transformer.envs import DEFAULT_ENV_VERSION, ENVS, SUPPORTED_ENV_VERSIONS
from decision_transformer.errors import UserError
from decision_transformer.paths import project_path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with the default of every option that takes a value, also of options without a help text; on/off
    switches show none (a ``store_false`` switch's default True would read as 'on by default')."""

    def _format_action(self, action):
        if (not action.help and action.option_strings and action.nargs != 0
                and action.default not in (None, argparse.SUPPRESS)):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action):
        # a switch, a default of None (its help says what happens without it) or a help text that states the default
        # itself: no "(default: ...)" appended, which read as "(default: None)" after the help's own default
        states_it = any(w in (action.help or "") for w in ("default:", "(default"))
        if action.nargs == 0 or action.default is None or states_it:
            return action.help
        return super()._get_help_string(action)


def add_data_flags(p: argparse.ArgumentParser):
    """The "data, environment, context" flags: data folder, env, dataset, mode, ``--K``, batch size and
    model type."""
    g = p.add_argument_group("data, environment, context")
    g.add_argument("--data_path", type=str, default=project_path("data"),
                   help="folder with {env}-{dataset}-v2.pkl (or D4RL hdf5); default: the project's data/ when started "
                        "inside the project, ./data when started outside it")
    g.add_argument("--env", type=str, default="hopper", help="hopper, halfcheetah, walker2d or reacher2d")
    g.add_argument("--dataset", type=str, default="medium",
                   help="random, medium, medium-replay, medium-expert or expert")
    g.add_argument("--mode", type=str, default="normal", help="normal, delayed (return on the last step) or noise")
    g.add_argument("--K", type=int, default=20, help="context length in timesteps (3K tokens)")
    g.add_argument("--pct_traj", type=float, default=1.0, help="train on the top-return trajectories covering this "
                                                                  "fraction of timesteps")
    g.add_argument("--batch_size", type=int, default=64)
    g.add_argument("--no_generate", action="store_true",
                   help="fail instead of generating a missing dataset from the bundled behaviour policies")
    g.add_argument("--model_type", type=str, default="dt", choices=["dt", "bc"],
                   help="dt, or bc: MLP behaviour cloning on the last K states (--embed_dim wide, --n_layer deep)")


def add_model_flags(p: argparse.ArgumentParser):
    """The "model" flags: sizes, activation, dropout, freezing, and initialisation from a checkpoint, a
    pretrained LM or one of its blocks."""
    g = p.add_argument_group("model")
    g.add_argument("--embed_dim", type=int, default=128)
    g.add_argument("--n_layer", type=int, default=3)
    g.add_argument("--n_head", type=int, default=1)
    g.add_argument("--activation_function", type=str, default="relu", help="transformers ACT2FN name or geglu")
    g.add_argument("--dropout", type=float, default=0.1, help="residual dropout; attention dropout is fixed at 0.1")
    g.add_argument("--disable_attention", action="store_true", help="blocks skip their attention branch")
    g.add_argument("--share_input_output_proj", action="store_true",
                   help="bias-free prediction heads tied to the input embeddings")
    g.add_argument("--embed_order", choices=["ln_then_time", "time_then_ln"], default="ln_then_time",
                   help="ln_then_time: LayerNorm, then add the timestep embedding (the seeds); "
                        "time_then_ln: the original DT paper's order")
    g.add_argument("--frozen", action="store_true", help="freeze transformer.h")
    g.add_argument("--freeze_subset", nargs="+", default=None, help="freeze parameters whose name contains any of these")
    g.add_argument("--load_checkpoint", type=str, default=None, help="load these weights (strictly) before training")
    g.add_argument("--pretrained_lm", "-plm", type=str, default=None,
                   help="initialise from a pretrained LM: gpt2, openai/imagegpt-small or a save_pretrained directory "
                        "(e.g. checkpoints/ChibiT); looked up locally, in checkpoints/ and in the HF cache, else (a Hub id) "
                        "downloaded from the Hugging Face Hub where it can be reached (HF_HUB_OFFLINE=1: never). Its config replaces --embed_dim/--n_layer/--n_head/--activation_function")
    g.add_argument("--pretrained_block", "-pb", type=int, default=None,
                   help="put block b of --pretrained_lm into a random-init DT (needs --embed_dim = the LM's hidden "
                        "size); 0 works")
    g.add_argument("--extend_positions", action="store_true",
                   help="the timestep embedding is transformer.wpe (the LM's position table, tiled when shorter "
                        "than an episode)")
    g.add_argument("--igpt_legacy_ln", action="store_true",
                   help="load ImageGPT into GPT-2 LayerNorms with zero biases, as the originals did "
                        "(otherwise ImageGPT's own RMS-style norm)")


def add_kmeans_flags(p: argparse.ArgumentParser):
    """The k-means language-alignment flags (``--gpt_kmeans`` switches the loss on)."""
    g = p.add_argument_group("k-means language alignment (needs --pretrained_lm)")
    g.add_argument("--gpt_kmeans", type=int, default=None,
                   help="number of k-means centres of the LM's token embeddings; switches the alignment loss on")
    g.add_argument("--gpt_kmeans_const", type=float, default=None,
                   help="weight of the alignment loss (required with --gpt_kmeans; the papers use 0.1)")
    g.add_argument("--kmeans_cache", type=str, default=None,
                   help="[N, H] centre file: read when present, else computed and saved there; "
                        "none = computed in memory")
    g.add_argument("--kmeans_mean", action="store_true", help="mean over centres instead of max")
    g.add_argument("--kmeans_form", choices=["dim", "cosine"], default="dim",
                   help="dim: the originals' per-dimension max (as implemented); cosine: the paper's max cosine "
                        "similarity per token")


def add_optim_flags(p: argparse.ArgumentParser):
    """The "optimisation" flags: learning rates, weight decay, warmup, grad clip and ``--fp16``."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", "-lr", type=float, default=1e-4)
    g.add_argument("--lm_learning_rate", "-lmlr", type=float, default=None,
                   help="transformer-group lr with --custom_transformer_decay")
    g.add_argument("--weight_decay", "-wd", type=float, default=1e-4)
    g.add_argument("--warmup_steps", type=int, default=10000)
    g.add_argument("--custom_transformer_decay", action="store_true",
                   help="transformer group: wd 0, lr -lmlr or -lr; other parameters: wd -wd")
    g.add_argument("--remove_grad_clip", "-rgc", action="store_true", help="no 0.25 grad-norm clip")
    g.add_argument("--fp16", action="store_true", help="accepted for compatibility; no effect in this script")


THREADS_HELP = ("CPU threads for torch: auto = the cores other processes are not keeping busy (never more than "
                "OMP_NUM_THREADS), or a number")


def add_run_flags(p: argparse.ArgumentParser, *, project: str = "decision-transformer", seed_default=666,
                  outdir_default="checkpoints"):
    """The "schedule, evaluation, logging, saving" flags, the fast-path flags and the originals' dead flags
    (accepted, hidden from ``--help``)."""
    g = p.add_argument_group("schedule, evaluation, logging, saving")
    g.add_argument("--num_eval_episodes", type=int, default=100)
    g.add_argument("--max_iters", type=int, default=40)
    g.add_argument("--num_steps_per_iter", type=int, default=2500, help="0 = evaluate only")
    g.add_argument("--env_targets", type=str, default=None,
                   help="comma-separated return targets; default: both standard targets of the env")
    g.add_argument("--env_version", type=str, default=DEFAULT_ENV_VERSION, choices=SUPPORTED_ENV_VERSIONS)
    g.add_argument("--device", type=str, default="auto", help="auto, cpu, cuda, cuda:N (cuda falls back to cpu "
                                                               "with a warning when no GPU is present)")
    g.add_argument("--threads", default="auto", help=THREADS_HELP)
    g.add_argument("--seed", type=int, default=seed_default)
    g.add_argument("--log_to_wandb", "-w", action="store_true", help="log to WandB (offline without credentials)")
    g.add_argument("--project", type=str, default=project, help="WandB project")
    g.add_argument("--outdir", type=str, default=outdir_default and project_path(outdir_default),
                   help="per-iteration checkpoints in {outdir}/{run_dir}/model_{iter}.pt; '' disables")
    g.add_argument("--save_model", action="store_true",
                   help="also save models/{env}/{model_type}_{exp_prefix}[_best].pt (dt_... or bc_...)")
    g.add_argument("--save_mode", choices=["last", "best", "both"], default="last")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in {outdir}/{run_dir} (a merge run, --pretrained_models: the newest "
                        "{outdir}/{run_dir}_{id} made with the same merge flags) after its last finished iteration; "
                        "only --max_iters, --device, --threads, --precision, --compile, --cuda_graph, "
                        "--num_eval_episodes, "
                        "--eval_workers, -w, --project, --save_model, --save_mode, --data_path, --outdir, --no_generate and "
                        "--end_break may differ from the run's flags")
    add_fast_path_flags(g)
    g.add_argument("--cuda_graph", action="store_true",
                   help="replay each training step's forward, backward and gradient clipping from one CUDA graph "
                        "(the batch sampler and AdamW step as usual): the paper's small DT is bound by kernel "
                        "launches on a GPU. CUDA only; not with torchrun, --compile, auxiliary losses or "
                        "lm_cotraining's --fp16")
    g.add_argument("--end_break", action="store_true", help="enter the debugger at the end")
    # Dead in the originals: parsed, recorded in the config, otherwise ignored.
    g.add_argument("--note", type=str, default=None, help=argparse.SUPPRESS)
    for flag in ("--naive", "--enable_merge_return", "--enable_merge_embed_ln", "--enable_timesteps",
                 "--enable_all_embed"):
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)


def add_merge_flags(p: argparse.ArgumentParser):
    """The model-merging flags (``--pretrained_models`` and the merge method's settings)."""
    g = p.add_argument_group("merging (see the README's merging section)")
    g.add_argument("--pretrained_models", nargs="*", default=[],
                   help="model files to merge, the target (--env's model) first; one model: loaded, or with "
                        "--pretrained_lm interpolated with the fresh LM model by --p")
    g.add_argument("--include", nargs="*", default=[],
                   help="key substrings of the merged tensors, e.g. attn mlp (none: every tensor)")
    g.add_argument("--exclude", nargs="*", default=[], help="key substrings left out of the merged tensors")
    g.add_argument("--p", type=float, default=0.5,
                   help="2 models: (1-p)·model 1 + p·model 2 (also the Fisher merge's coefficients)")
    switches = {"--copy_model": "train model 1 with the merged tensors (else they go into a fresh model built from "
                                "this command's size flags)",
                "--flip": "train model 2 with the merged tensors (one model with --pretrained_lm: swap the two "
                          "sides of --p)",
                "--copy_include": "one model, no LM: copy only the --include tensors into the fresh model",
                "--merge_frozen": "freeze the merged tensors during finetuning (needs --include)",
                "--identity_layers": "set the merged weights to 1 and biases to 0 (LayerNorms; needs "
                                     "--include; --merge_frozen freezes them)",
                "--use_fisher": "Fisher-weighted merge (= --merge_method fisher); Fisher files computed if missing",
                "--no_trace_norm": "do not normalise each Fisher by its trace (= --fisher_norm none)"}
    for flag, what in switches.items():
        g.add_argument(flag, action="store_true", help=what)
    g.add_argument("--f_batch_size", type=int, default=64, help="Fisher: windows per batch (part of its file name)")
    g.add_argument("--f_num_batches", type=int, default=100, help="Fisher: batches (part of its file name)")
    g.add_argument("--merge_method", default="mean",
                   choices=["mean", "fisher", "task_arithmetic", "ties", "regmean", "greedy_soup"])
    g.add_argument("--merge_base", default=None, help="base model for task vectors; default: the shared init "
                                                      "(--pretrained_lm, or model 1's seeded init)")
    g.add_argument("--merge_lambda", type=float, default=None, help="task-vector scale (default 0.8 task "
                                                                    "arithmetic, 1.0 TIES)")
    g.add_argument("--ties_density", type=float, default=0.2, help="TIES: fraction of each task vector kept")
    g.add_argument("--regmean_alpha", type=float, default=0.1, help="RegMean: off-diagonal Gram scale")
    g.add_argument("--regmean_n_windows", type=int, default=1000, help="RegMean: windows for the Gram matrices")
    g.add_argument("--fisher_type", default="batch", choices=["batch", "empirical", "gaussian"])
    g.add_argument("--fisher_floor", type=float, default=1e-6, help="relative Fisher floor; 0 = original (NaN risk)")
    g.add_argument("--fisher_norm", default="trace", choices=["trace", "l2", "none"])
    g.add_argument("--fisher_favor_target", action="store_true", help="floor only model 1's Fisher")


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    return _int_at_least(text, 0)


#: The longest episode of the supported envs: no context window (``--K``) is longer.
MAX_EP_LEN = max(spec.max_ep_len for spec in ENVS.values())


def check_context(K: int | None, max_ep_len: int = MAX_EP_LEN, env: str | None = None):
    """``--K`` (None: not given) no longer than an episode (a longer window adds only padding, and memory): of
    ``env`` where one is given, else of the longest env's."""
    if K is not None and K > max_ep_len:
        raise UserError(f"--K {K} exceeds the episode length {max_ep_len}" + (f" of {env}" if env else ""))


#: Upper bounds of the size flags whose memory grows piece by piece (a layer, an env, a window at a time), so that a
#: mistyped value stops at once instead of filling the machine's memory; each far above what the papers use
UPPER_BOUNDS = {"n_layer": 1024, "embed_dim": 65536, "num_eval_episodes": 10000, "regmean_n_windows": 1_000_000}


def check_upper_bounds(args):
    """A ``UserError`` for a size flag of ``args`` above its ``UPPER_BOUNDS`` entry."""
    for name, most in UPPER_BOUNDS.items():
        v = getattr(args, name, None)
        if isinstance(v, int) and v > most:
            raise UserError(f"--{name} {v} is too large (at most {most:,})")


def check_seed(seed: int | None):
    """A ``--seed`` (None: not given) that every seeded library accepts (numpy's range)."""
    if seed is not None and not 0 <= seed < 2**32:
        raise UserError(f"--seed must be in [0, 2^32), got {seed}")


#: ``--compile`` modes (torch.compile's): ``reduce-overhead`` also replays each step as CUDA graphs on a GPU
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def add_fast_path_flags(g):
    """``--precision`` and ``--compile`` (the training scripts' GPU fast path; TF32 and fused AdamW follow the device)."""
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="training autocast: auto = bf16 on CUDA GPUs that support it, fp32 elsewhere; bf16 also "
                        "on CPU when asked (about 2x the steps/s on CPUs with AVX512-BF16 or AMX); fp32 also "
                        "turns TF32 off on CUDA (the originals' arithmetic)")
    g.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                   help="torch.compile the model for training, in torch's default mode or the one given "
                        "(reduce-overhead: also CUDA graphs on a GPU)")
    g.add_argument("--eval_workers", type=eval_workers_type, default="auto",
                   help="worker processes that step the evaluation envs; auto = on CUDA up to 8 (one core left "
                        "free, at most one per episode; none below 8 episodes), 0 on CPU (the envs step in this "
                        "process)")


def eval_workers_type(text: str):
    """``--eval_workers``: ``auto`` or a number of processes >= 0."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected auto or a number >= 0, got {text!r}")
    return n


def merge_signature(args) -> dict:
    """The merge flags of ``args`` (the ``add_merge_flags`` group) as JSON values: a merge run's folder is
    ``{run}_{exp_id}``, and ``--resume`` and the sweep launcher find it by these."""
    p = argparse.ArgumentParser(add_help=False)
    add_merge_flags(p)
    return {a.dest: getattr(args, a.dest, a.default) for a in p._actions}


def experiment_parser() -> argparse.ArgumentParser:
    """The parser of ``experiment.py``: every flag group above."""
    p = argparse.ArgumentParser(
        description="Train and evaluate a Decision Transformer on an offline MuJoCo dataset.",
        formatter_class=HelpFormatter)
    add_data_flags(p)
    add_model_flags(p)
    add_kmeans_flags(p)
    add_optim_flags(p)
    add_run_flags(p)
    add_merge_flags(p)
    return p


# ---- flags that take effect only together with another ---------------------------------------------------------------

#: (flags, whether the flag that enables them is on, that flag): a flag of the first group given on the command line
#: while the second is off does nothing, and is warned about
_MERGE_DESTS = ("include", "exclude", "p", "copy_model", "flip", "copy_include", "merge_frozen", "identity_layers",
                "use_fisher", "no_trace_norm", "f_batch_size", "f_num_batches", "merge_method", "merge_base",
                "merge_lambda", "ties_density", "regmean_alpha", "regmean_n_windows", "fisher_type", "fisher_floor",
                "fisher_norm", "fisher_favor_target", "spec_info", "fisher_dataset")
#: flags that only shape training (with --num_steps_per_iter 0 they would read as applied); the options of a switch
#: that is itself listed (--gpt_kmeans's, --custom_transformer_decay's) are left to the switch's own warning
_TRAINING_DESTS = ("learning_rate", "weight_decay", "warmup_steps", "custom_transformer_decay", "remove_grad_clip",
                   "frozen", "freeze_subset", "gpt_kmeans")
_TRAINING = "training steps (--num_steps_per_iter 0 trains nothing)"

INERT_RULES = {
    "experiment": [
        (_TRAINING_DESTS, lambda a: a.num_steps_per_iter > 0, _TRAINING),
        (("kmeans_cache", "kmeans_mean", "kmeans_form", "gpt_kmeans_const"), lambda a: a.gpt_kmeans is not None,
         "--gpt_kmeans"),
        (("lm_learning_rate",), lambda a: a.custom_transformer_decay, "--custom_transformer_decay"),
        (_MERGE_DESTS, lambda a: bool(a.pretrained_models), "--pretrained_models"),
        (("save_mode",), lambda a: a.save_model, "--save_model"),
    ],
    "lm_cotraining": [
        (("init_reg", "joint"), lambda a: a.num_steps_per_iter > 0, _TRAINING),
        (("disable_k_annealing",), lambda a: a.gpt_kmeans is not None, "--gpt_kmeans"),
        (("tokenizer_name", "nlp_dataset_name", "nlp_dataset_config_name", "gpt_lm_const", "lm_const_linear_decay",
          "no_token_cache"), lambda a: a.joint, "--joint"),
    ],
    "multi": [
        (("lm_learning_rate",), lambda a: a.custom_transformer_decay, "--custom_transformer_decay"),
        (_MERGE_DESTS, lambda a: bool(a.multi_pretrained_models), "--multi_pretrained_models"),
        (("p_list",), lambda a: a.eval_merge_pre, "--eval_merge_pre"),
        (("save_mode",), lambda a: a.save_model, "--save_model"),
        (("score_selected",), lambda a: bool(a.selected_training), "--selected_training"),
    ],
}


def given_flags(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The destinations of the flags given in ``argv`` (None: the command line), as opposed to left at their
    defaults."""
    try:
        probe = argparse.ArgumentParser(add_help=False)
        for action in parser._actions:  # the same options, with no defaults: only what argv sets appears
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                probe._add_action(copy.copy(action)).default = argparse.SUPPRESS
        return set(vars(probe.parse_known_args(argv)[0]))
    except (Exception, SystemExit):  # noqa: BLE001 - argparse internals of another Python: no warnings, no failure
        return set()


def check_trace_norm(given: set[str], args):
    """``--no_trace_norm`` (= ``--fisher_norm none``) with ``--fisher_norm trace`` also given: a contradiction that the
    default's value alone cannot show (``l2`` is refused where the merge is set up)."""
    if {"no_trace_norm", "fisher_norm"} <= given and args.no_trace_norm and args.fisher_norm == "trace":
        raise UserError("--no_trace_norm (= --fisher_norm none) contradicts --fisher_norm trace")


def warn_inert_flags(parser: argparse.ArgumentParser, argv, args, *kinds: str):
    """One warning line per flag of ``INERT_RULES[kind]`` that ``argv`` gives while the flag enabling it is off; and
    ``check_trace_norm``."""
    given = given_flags(parser, argv)
    check_trace_norm(given, args)
    for kind in kinds:
        for dests, enabled, switch in INERT_RULES[kind]:
            if enabled(args):
                continue
            for dest in dests:
                if dest in given:
                    print(f"warning: --{dest} has no effect without {switch}", file=sys.stderr)


def prefix_other_ranks() -> None:
    """The training scripts' first step: under torchrun, rank N > 0 prints only its warning and error lines, prefixed
    ``[rank N]``, from the start (``distributed.quiet_other_ranks``; the flag warnings came out once per rank,
    unprefixed). Plain runs import nothing here."""
    if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        from decision_transformer.distributed import quiet_other_ranks

        quiet_other_ranks()
