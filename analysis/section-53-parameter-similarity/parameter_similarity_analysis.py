"""Figures 3 and 4: per-tensor L2 distance and cosine similarity of transformer.h between two epochs.

    python analysis/section-53-parameter-similarity/parameter_similarity_analysis.py -plm checkpoints --epoch1 0 --epoch2 40
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))  # the repository root

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.analysis.params import build_parser, run
from decision_transformer.errors import cli_entry


@cli_entry
def main(argv=None):
    run(build_parser().parse_args(argv)).print_summary()


if __name__ == "__main__":
    main()
