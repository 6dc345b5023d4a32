"""Figure 5: gradient confusion (minimum pairwise cosine of clipped per-sample gradients).

    python analysis/section-54-gradient-analysis/compute_grad_confusion.py --epoch 1 --batch_size 50
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))  # the repository root

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.analysis.grads import build_confusion_parser, run_confusion
from decision_transformer.errors import cli_entry


@cli_entry
def main(argv=None):
    run_confusion(build_confusion_parser().parse_args(argv)).print_summary()


if __name__ == "__main__":
    main()
