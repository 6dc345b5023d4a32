"""CKA between every pair of hooked layers of two checkpoints, per token type (R̂ / s / a of the last step).

    python analysis/section-51-activation-similarity/compute_cka.py --model_name1 gpt2 --model_name2 gpt2 --epoch1 0 --epoch2 40
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))  # the repository root

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.analysis.cka import build_parser, run
from decision_transformer.errors import cli_entry


@cli_entry
def main(argv=None):
    run(build_parser().parse_args(argv)).print_summary()


if __name__ == "__main__":
    main()
