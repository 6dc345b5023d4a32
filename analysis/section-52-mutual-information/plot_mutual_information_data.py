"""Figure 22: data mutual information I(s;a), I(R;a) per env from run_mi_exp.py --exp_type data.
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))  # the repository root

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.analysis.mi import build_plot_data_parser, plot_mi_data
from decision_transformer.errors import cli_entry


@cli_entry
def main(argv=None):
    plot_mi_data(build_plot_data_parser().parse_args(argv)).print_summary()


if __name__ == "__main__":
    main()
