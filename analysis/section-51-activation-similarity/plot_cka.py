"""Figure 1: the per-layer CKA diagonal of each model between two epochs, with the threshold line.

    python analysis/section-51-activation-similarity/plot_cka.py -thr 0.23 --epoch1 0 --epoch2 40
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))  # the repository root

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.analysis.cka import build_plot_parser, plot
from decision_transformer.errors import cli_entry


@cli_entry
def main(argv=None):
    plot(build_plot_parser().parse_args(argv)).print_summary()


if __name__ == "__main__":
    main()
