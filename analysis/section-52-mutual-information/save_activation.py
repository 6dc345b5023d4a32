"""Save block outputs and the batch they came from, for mine/run_mi_exp.py.

    python analysis/section-52-mutual-information/save_activation.py --model_name gpt2 igpt dt --epoch 40
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "../..")))  # the repository root

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.analysis.mi import build_save_parser, run_save
from decision_transformer.errors import cli_entry


@cli_entry
def main(argv=None):
    run_save(build_save_parser().parse_args(argv)).print_summary()


if __name__ == "__main__":
    main()
