"""Diagonal Fisher of a checkpoint's transformer blocks on its own dataset (LAWSON's ``dt/precompute_fisher.py``).

    python precompute_fisher.py --model ./models/hopper/dt_gym-experiment-hopper-medium-123456_best.pt \
        --f_batch_size 64 --f_num_batches 100

writes ``./models/hopper/info/dt_gym-experiment-hopper-medium-123456_best-bs64-nb100``, which
``experiment.py --use_fisher`` (same --f_batch_size / --f_num_batches) picks up.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from any working directory without installing

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.errors import cli_entry  # noqa: E402
from decision_transformer.fisher import precompute_parser, run_precompute  # noqa: E402


@cli_entry
def main(argv=None):
    run_precompute(precompute_parser().parse_args(argv))


if __name__ == "__main__":
    main()
