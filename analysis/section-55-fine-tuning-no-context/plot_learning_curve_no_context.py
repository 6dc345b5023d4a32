"""Figure 8 and Table 2 (K=1 vs K=20); with -block, Figure 9 (block replacement).

    python analysis/section-55-fine-tuning-no-context/plot_learning_curve_no_context.py
    python analysis/section-55-fine-tuning-no-context/plot_learning_curve_no_context.py -block
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))  # the repository root

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.analysis.curves import build_no_context_parser, run_no_context
from decision_transformer.errors import cli_entry


@cli_entry
def main(argv=None):
    run_no_context(build_no_context_parser().parse_args(argv)).print_summary()


if __name__ == "__main__":
    main()
