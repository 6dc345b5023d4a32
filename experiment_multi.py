"""Multi-task Decision Transformer (LAWSON's ``experiment_multi.py``): train on hopper, halfcheetah and walker2d
together, finetune per env, merge the finetuned models and evaluate on all three envs.

    python experiment_multi.py --dataset medium --activation_function=gelu_new --max_iters=10 \
        --num_steps_per_iter=10000 --save_model --save_mode=best --embed_dim=512 --n_head 4 -w
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from any working directory without installing

from decision_transformer.errors import cli_entry  # noqa: E402


@cli_entry
def main(argv=None):
    from decision_transformer.cli import prefix_other_ranks, warn_inert_flags

    prefix_other_ranks()
    from decision_transformer.multi_run import multi_parser, run_multi

    parser = multi_parser()
    args = parser.parse_args(argv)
    warn_inert_flags(parser, argv, args, "multi")
    run_multi(args)


if __name__ == "__main__":
    main()
