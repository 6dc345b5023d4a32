"""Run the whole analysis suite on a checkpoints folder and write one markdown report.

    python analysis/run_all.py --checkpoint_dir checkpoints --out_dir analysis_report
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))  # the repository root

from decision_transformer.errors import cli_entry  # noqa: E402


@cli_entry
def main(argv=None):
    from decision_transformer.analysis.report import build_parser, run  # torch: inside main, so Ctrl-C is one line

    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
