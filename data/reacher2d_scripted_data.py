"""reacher2d trajectories from a scripted reaching controller (the env has no public dataset).

    python data/reacher2d_scripted_data.py --dataset medium --episodes 300 --noise 0.1 0.5 1.0

Writes ``{data_path}/reacher2d-{dataset}-v2.pkl`` (the DT pickle layout, with ``next_observations``): whole 100-step
episodes of a Jacobian-transpose controller that moves the fingertip towards the target
(``decision_transformer.reacher2d.reaching_action``), with N(0, σ²) added to each action and clipped; episode i uses
the i-th ``--noise`` value, cycling. The dataset name is yours to choose: no D4RL quality is implied. Prints the
return statistics per noise level.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.cli import positive_int  # noqa: E402
from decision_transformer.errors import UserError, cli_entry  # noqa: E402
from decision_transformer.files import refuse_files_above, refuse_folders  # noqa: E402
from decision_transformer.paths import DATA_PATH_HELP, project_path  # noqa: E402


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="medium", help="the name in the file name: one of the --dataset names of the "
                                                       "training scripts (default medium; no quality implied)")
    p.add_argument("--episodes", type=positive_int, default=300)
    p.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.5, 1.0],
                   help="std of the Gaussian action noise, one per episode in turn (default 0.1 0.5 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_path", default=project_path("data"), help=DATA_PATH_HELP)
    p.add_argument("--force", action="store_true", help="replace a dataset of the same name (refused otherwise)")
    args = p.parse_args(argv)
    import math

    from decision_transformer.cli import check_seed
    from decision_transformer.envs import check_dataset_name

    check_dataset_name(args.dataset)
    check_seed(args.seed)
    for s in args.noise:
        if not (math.isfinite(s) and s >= 0):
            raise UserError(f"--noise values must be finite and >= 0, got {s}")

    import numpy as np

    from decision_transformer.data import pkl_name
    from decision_transformer.reacher2d import scripted_trajectories
    from decision_transformer.synthetic import write_pkl

    target = os.path.join(args.data_path, pkl_name("reacher2d", args.dataset))
    if os.path.lexists(target) and not args.force:   # before any rollout, as the other dataset writers
        raise UserError(f"{target} already exists; give another --data_path or --dataset, or pass --force to "
                        f"overwrite it")
    refuse_folders([target])
    refuse_files_above(args.data_path, "reacher2d_scripted_data.py")
    trajs = scripted_trajectories(args.episodes, noise=tuple(args.noise), seed=args.seed)
    out = write_pkl(target, trajs, replace=args.force)   # (one another process wrote meanwhile is kept)
    returns = np.array([t["rewards"].sum() for t in trajs])
    per = ", ".join(f"noise {s:g}: {returns[j::len(args.noise)].mean():.1f}" for j, s in enumerate(args.noise)
                    if len(returns[j::len(args.noise)]))
    print(f"{out}: {len(trajs)} episodes, {int(sum(len(t['rewards']) for t in trajs))} steps, return mean "
          f"{returns.mean():.1f} std {returns.std():.1f} ({per})")


if __name__ == "__main__":
    main()
