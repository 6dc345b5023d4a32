"""Figure 2 (--exp_type normal) and Figure 16 (--exp_type no_context) from run_mi_exp.py's results.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))  # the repository root

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.analysis.mi import build_plot_parser, plot_mi
from decision_transformer.errors import cli_entry


@cli_entry
def main(argv=None):
    plot_mi(build_plot_parser().parse_args(argv)).print_summary()


if __name__ == "__main__":
    main()
