"""Train a Decision Transformer initialised from a pretrained language model (REID / LAWSON ``lm_cotraining``):
k-means language alignment, ``--init_reg``, optional LM co-training (``--joint``).

    python ./lm_cotraining/experiment.py --env hopper --dataset medium --model_type dt -w \\
        --pretrained_lm ../checkpoints/chibiT --extend_positions --gpt_kmeans 1000 --gpt_kmeans_const 0.1 \\
        --kmeans_cache=../kmeans_cache/chibi_1000.pt --save_model --save_mode=best --dropout 0.1 --init_reg 1e-4

Relative paths resolve against the working directory; the script runs from any directory.
"""
import os
import sys

# the repository root (this file's parent folder), so the package imports without installing
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.cli import prefix_other_ranks, warn_inert_flags  # noqa: E402
from decision_transformer.cli_lm import lm_cotraining_parser  # noqa: E402
from decision_transformer.errors import cli_entry  # noqa: E402


@cli_entry
def main(argv=None):
    prefix_other_ranks()
    parser = lm_cotraining_parser()
    args = parser.parse_args(argv)
    warn_inert_flags(parser, argv, args, "experiment", "lm_cotraining")
    from decision_transformer.run import run_lm_cotraining

    run_lm_cotraining(args)


if __name__ == "__main__":
    main()
