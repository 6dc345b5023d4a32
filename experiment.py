"""Train, merge and evaluate Decision Transformers on offline MuJoCo data (flags as the originals).

    python experiment.py --env hopper --dataset medium --model_type dt -w
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from any working directory without installing

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.cli import experiment_parser, prefix_other_ranks, warn_inert_flags  # noqa: E402
from decision_transformer.errors import cli_entry  # noqa: E402


@cli_entry
def main(argv=None):
    prefix_other_ranks()
    parser = experiment_parser()
    args = parser.parse_args(argv)
    warn_inert_flags(parser, argv, args, "experiment")
    from decision_transformer.run import run_experiment

    run_experiment(args)


if __name__ == "__main__":
    main()
