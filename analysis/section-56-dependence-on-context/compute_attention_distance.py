"""Figure 10: change of the attention distance per block between two epochs (K=1 runs, K=20 contexts).

    python analysis/section-56-dependence-on-context/compute_attention_distance.py --epoch1 0 --epoch2 4
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))  # the repository root

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.analysis.attention import build_parser, run
from decision_transformer.errors import cli_entry


@cli_entry
def main(argv=None):
    run(build_parser().parse_args(argv)).print_summary()


if __name__ == "__main__":
    main()
