"""Minari <-> DT pickle (needs the optional package: pip install minari; nothing is downloaded).

    python data/minari_datasets.py import mujoco/hopper/medium-v0 --dataset medium --data_path data
    python data/minari_datasets.py export data/hopper-medium-v2.pkl dt/hopper/medium-v0

``import`` reads a dataset from the local Minari root (``--minari_root``, default ``$MINARI_DATASETS_PATH`` or
``~/.minari/datasets``) and writes ``{data_path}/{env}-{dataset}-v2.pkl`` (an existing one is replaced only with
``--force``). ``export`` writes a pkl (with ``next_observations``, as the converted and generated datasets have)
as a Minari dataset ``namespace/name-vN`` in that root.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.paths import DATA_PATH_HELP, project_path
from decision_transformer.errors import UserError, cli_entry


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="Minari dataset -> {env}-{dataset}-v2.pkl")
    imp.add_argument("dataset_id")
    imp.add_argument("--env", default=None, help="default: from the dataset id")
    imp.add_argument("--dataset", required=True, help="quality name for the pkl (medium, expert, ...)")
    imp.add_argument("--data_path", default=project_path("data"),
                     help=DATA_PATH_HELP)
    imp.add_argument("--force", action="store_true", help="replace an existing {env}-{dataset}-v2.pkl")
    exp = sub.add_parser("export", help="DT pkl -> Minari dataset")
    exp.add_argument("pkl")
    exp.add_argument("dataset_id")
    exp.add_argument("--env", default=None, help="default: from the pkl name")
    exp.add_argument("--author", default=None, help="dataset metadata (optional)")
    exp.add_argument("--author_email", default=None, help="dataset metadata (optional)")
    exp.add_argument("--code_permalink", default=None, help="dataset metadata: a link to the code that made the data")
    exp.add_argument("--description", default=None, help="dataset metadata (default: a line naming the env)")
    for s in (imp, exp):
        s.add_argument("--minari_root", default=None)
    args = p.parse_args(argv)

    from pathlib import Path

    from decision_transformer.data import (
        pkl_name,
        safe_pickle_load,
        synthetic_stand_in,
        validate_trajectories,
    )
    from decision_transformer.envs import check_dataset_name, get_env_spec
    from decision_transformer.minari_io import (
        check_dataset_id,
        env_from_dataset_id,
        export_minari,
        load_minari_trajectories,
        minari_stand_in,
    )
    from decision_transformer.synthetic import write_pkl

    if args.cmd == "import":
        env = args.env or env_from_dataset_id(args.dataset_id)
        get_env_spec(env)
        check_dataset_name(args.dataset)
        target = Path(args.data_path) / pkl_name(env, args.dataset)
        if target.is_dir():
            raise UserError(f"{target} is a folder")
        from decision_transformer.files import refuse_files_above

        refuse_files_above(target.parent, "minari_datasets.py import")   # (before the dataset is loaded)
        if target.exists() and not args.force:
            raise UserError(f"{target} already exists; pass --force to replace it or choose another --dataset "
                            f"or --data_path")
        trajs = load_minari_trajectories(args.dataset_id, root=args.minari_root)
        # the checked copies (next_observations too) are what is written
        trajs = validate_trajectories(trajs, get_env_spec(env), args.dataset_id, next_observations=True)
        keep = ("observations", "next_observations", "actions", "rewards", "terminals")
        mark = minari_stand_in(args.dataset_id, root=args.minari_root)
        out = write_pkl(target, [{k: t[k] for k in keep} for t in trajs], stand_in=mark, replace=args.force)
        print(f"{out}: {len(trajs)} trajectories, {sum(len(t['rewards']) for t in trajs)} timesteps"
              + (f" (a smoke-test stand-in: {mark}; marked as one)" if mark else ""))
    else:
        check_dataset_id(args.dataset_id)
        if not Path(args.pkl).is_file():
            raise UserError(f"{args.pkl}: file not found")
        env = args.env or env_from_dataset_id(Path(args.pkl).name)
        trajs = validate_trajectories(safe_pickle_load(args.pkl), get_env_spec(env), args.pkl, next_observations=True)
        mark = synthetic_stand_in(args.pkl)
        folder = export_minari(trajs, args.dataset_id, env, root=args.minari_root, author=args.author,
                               author_email=args.author_email, code_permalink=args.code_permalink,
                               description=args.description, stand_in=mark)
        print(f"{folder}: {len(trajs)} episodes"
              + (f" (a smoke-test stand-in: {mark}; its description says so)" if mark else ""))


if __name__ == "__main__":
    main()
