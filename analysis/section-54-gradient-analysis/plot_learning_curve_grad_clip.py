"""Appendix G.3: return and action error with and without gradient clipping.

    python analysis/section-54-gradient-analysis/plot_learning_curve_grad_clip.py --model_name igpt
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))  # the repository root

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.analysis.curves import build_grad_clip_parser, run_grad_clip
from decision_transformer.errors import cli_entry


@cli_entry
def main(argv=None):
    run_grad_clip(build_grad_clip_parser().parse_args(argv)).print_summary()


if __name__ == "__main__":
    main()
