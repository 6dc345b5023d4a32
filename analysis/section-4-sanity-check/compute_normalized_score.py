"""Table 1 (K=20) / Table 2 (--K 1): best and last normalised scores per env and model over seeds.

    python analysis/section-4-sanity-check/compute_normalized_score.py --score_norm dataset --select best
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))  # the repository root

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.analysis.scores import build_parser, run
from decision_transformer.errors import cli_entry


@cli_entry
def main(argv=None):
    run(build_parser().parse_args(argv)).print_summary()


if __name__ == "__main__":
    main()
