"""Download D4RL gym-mujoco v2 hdf5 files and convert them into the DT trajectory pickles ``{env}-{dataset}-v2.pkl``.

    python data/download_d4rl_datasets.py                       # download + verify + convert all 15 into data/
    python data/download_d4rl_datasets.py --envs hopper --datasets medium expert
    python data/download_d4rl_datasets.py --hdf5 ~/.d4rl/datasets/hopper_medium-v2.hdf5 --data_path data

Downloads come from D4RL's URLs (``--base_url`` or ``$D4RL_BASE_URL`` to change them) into ``--hdf5_dir``
(default ``$D4RL_DATASET_DIR`` or ``~/.d4rl/datasets``), resume partial ``.part`` files and are checked against
D4RL's sizes and sha256. ``--hdf5`` converts files you already have instead, recognised by D4RL's names
(``hopper_medium_replay-v2.hdf5``). Episodes are split at terminals and timeouts, the unfinished tail is dropped
and arrays are stored as float32. Without network use ``--hdf5``, or data/generate_datasets.py.
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.envs import D4RL_ENVS, ENVS
from decision_transformer.paths import DATA_PATH_HELP, project_path
from decision_transformer.errors import UserError, cli_entry

NAME_RE = re.compile(r"^(" + "|".join(ENVS) + r")_(random|medium|medium_replay|medium_expert|expert)-v2\.hdf5$")


def parse_name(path: str) -> tuple[str, str]:
    m = NAME_RE.match(os.path.basename(path))
    if not m:
        raise UserError(f"{path}: not a D4RL gym-mujoco v2 file name (expected e.g. hopper_medium_replay-v2.hdf5)")
    return m.group(1), m.group(2).replace("_", "-")


def convert(path: str, data_path: str, force: bool = True) -> str:
    """``path`` (a D4RL hdf5) as ``{data_path}/{env}-{dataset}-v2.pkl``; an existing pkl is replaced only with
    ``force``. A smoke-test stand-in's pkl gets its mark file (the training scripts then warn), and says so."""
    import numpy as np

    from decision_transformer.data import (
        HDF5_TRAJECTORY_KEYS,
        episode_steps,
        pkl_name,
        read_hdf5,
        split_episodes,
        synthetic_stand_in,
        validate_trajectories,
    )
    from decision_transformer.envs import get_env_spec
    from decision_transformer.synthetic import write_pkl

    env, dataset = parse_name(path)
    spec = get_env_spec(env)
    target = os.path.join(data_path, pkl_name(env, dataset))
    if not force and os.path.lexists(target):
        raise UserError(f"{target} exists: converting {path} would replace it; pass --force to overwrite")
    mark = synthetic_stand_in(path)
    trajs = split_episodes(read_hdf5(path, HDF5_TRAJECTORY_KEYS), source=path, max_steps=episode_steps(spec),
                           require_episode=True)
    # what is written is what was checked: float32 arrays, (T,) rewards, next_observations of the env's width
    trajs = validate_trajectories(trajs, spec, path, next_observations=True)
    # random-policy data under D4RL's name: marked as such; without force, a pkl another process wrote meanwhile is kept
    out = write_pkl(target, trajs, stand_in=mark, replace=force)
    if mark is not None:
        print(f"warning: {path} is a smoke-test stand-in ({mark}); {out} is marked as one", file=sys.stderr)
    returns = np.array([t["rewards"].sum() for t in trajs])
    steps = sum(len(t["rewards"]) for t in trajs)
    print(f"{out}: {len(trajs)} trajectories, {steps} timesteps, return mean {returns.mean():.2f} "
          f"std {returns.std():.2f} max {returns.max():.2f} min {returns.min():.2f}")
    return str(out)


def check_conversions(paths, data_path: str, force: bool) -> list[str]:
    """Every ``--hdf5`` file's name, existence and target checked before the first is converted (a bad second file
    used to be found after the first was written). Returns the files to convert: a file given twice once; two files
    that would write the same pkl are one line."""
    from decision_transformer.data import pkl_name
    from decision_transformer.files import refuse_folders

    todo, source = [], {}
    for path in paths:
        env, dataset = parse_name(path)
        if not os.path.isfile(path):
            raise UserError(f"{path}: file not found")
        target = os.path.join(data_path, pkl_name(env, dataset))
        if target in source:
            if os.path.samefile(source[target], path):
                continue
            raise UserError(f"{source[target]} and {path} would both be converted to {target}; give one of them")
        if not force and os.path.lexists(target):
            raise UserError(f"{target} exists: converting {path} would replace it; pass --force to overwrite")
        refuse_folders([target])
        source[target] = path
        todo.append(path)
    return todo


def synthetic(args):
    from decision_transformer.cli import check_seed
    from decision_transformer.data import hdf5_name, pkl_name
    from decision_transformer.synthetic import SYNTHETIC_ATTR, rollout_flat, write_hdf5

    if args.synthetic < 1:
        raise UserError(f"--synthetic needs a positive number of episodes, got {args.synthetic}")
    check_seed(args.seed)  # (each env and dataset seeds its rollouts with --seed + 1000·i + j)
    # random-policy data under D4RL's names: never over real downloads or converted datasets unless asked to
    targets = [p for env in args.envs for dataset in args.datasets
               for p in (os.path.join(args.hdf5_dir, hdf5_name(env, dataset)),
                         os.path.join(args.data_path, pkl_name(env, dataset)))]
    existing = [p for p in targets if os.path.lexists(p)]
    if existing and not args.force:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise UserError(f"--synthetic would replace {existing[0]}{more} with random-policy data; give other "
                        f"--hdf5_dir and --data_path folders, or pass --force to overwrite")
    for i, env in enumerate(args.envs):
        for j, dataset in enumerate(args.datasets):
            data = rollout_flat(env, None, seed=args.seed + 1000 * i + j, num_episodes=args.synthetic)
            # marked, so the training scripts never take it from D4RL's cache for the real dataset
            # (without --force, files another process wrote since the check above are kept)
            path = write_hdf5(os.path.join(args.hdf5_dir, hdf5_name(env, dataset)), data, attrs={
                SYNTHETIC_ATTR: f"{args.synthetic} uniform-random-policy episodes (download_d4rl_datasets.py "
                                f"--synthetic)"}, replace=args.force)
            convert(str(path), args.data_path, force=args.force)


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hdf5", nargs="+", help="D4RL hdf5 files to convert (no download)")
    p.add_argument("--data_path", "--out_dir", dest="data_path", default=project_path("data"),
                   help=DATA_PATH_HELP)
    p.add_argument("--envs", nargs="+", default=sorted(D4RL_ENVS),
                   choices=sorted(D4RL_ENVS) + [e for e in ENVS if e not in D4RL_ENVS],
                   help="reacher2d has no D4RL files: only with --synthetic (or its own files with --hdf5)")
    p.add_argument("--datasets", nargs="+", default=["medium", "medium-replay", "expert", "medium-expert", "random"],
                   choices=["random", "medium", "medium-replay", "medium-expert", "expert"])
    p.add_argument("--hdf5_dir", default=os.environ.get("D4RL_DATASET_DIR",
                                                        os.path.join(os.path.expanduser("~"), ".d4rl", "datasets")),
                   help="where downloaded hdf5 files are kept")
    p.add_argument("--base_url", default=None, help="download base URL (default $D4RL_BASE_URL or D4RL's server)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check the sha256 of downloaded files (default on; the size is always checked, as it is what "
                        "an interrupted download resumes by)")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="no download: write N uniform-random-policy episodes per env and dataset as D4RL-named hdf5 "
                        "files into --hdf5_dir, then convert them as downloaded files (smoke tests, offline setups); "
                        "files of those names already there are refused unless --force")
    p.add_argument("--seed", type=int, default=0, help="--synthetic rollouts' seed")
    p.add_argument("--force", action="store_true",
                   help="--synthetic, --hdf5: overwrite existing hdf5 and pkl files of the same names (refused "
                        "otherwise); a download: convert over an existing pkl (kept otherwise, and not downloaded)")
    args = p.parse_args(argv)
    from decision_transformer.files import refuse_files_above

    refuse_files_above(args.data_path, "download_d4rl_datasets.py")   # (before any download, rollout or read)
    if args.synthetic is not None:
        synthetic(args)
        return
    if args.hdf5:
        for path in check_conversions(args.hdf5, args.data_path, args.force):
            convert(path, args.data_path, force=args.force)
        return
    from decision_transformer.data import hdf5_name, pkl_name, synthetic_stand_in
    from decision_transformer.download import base_url, fetch_d4rl
    from decision_transformer.envs import get_env_spec

    for env in args.envs:
        if not get_env_spec(env).d4rl:
            raise UserError(f"{env} has no D4RL files to download: use --synthetic N, or convert your own with --hdf5")
    root = base_url(args.base_url)
    for env in args.envs:
        for dataset in args.datasets:
            target = os.path.join(args.data_path, pkl_name(env, dataset))
            if not args.force and os.path.lexists(target):   # (a dataset converted already, or one of the user's)
                mark = synthetic_stand_in(target)
                if mark is not None:   # (random-policy data under D4RL's name: the real one is what was asked for)
                    print(f"warning: {target} exists and is a smoke-test stand-in ({mark}), not D4RL's data: kept, "
                          f"nothing downloaded; pass --force to download and convert D4RL's file over it",
                          file=sys.stderr)
                else:
                    print(f"{target} exists: kept, nothing downloaded (pass --force to download and convert again)")
                continue
            name = hdf5_name(env, dataset)
            path = fetch_d4rl(name, args.hdf5_dir, url=f"{root}/{name}", verify=args.verify,
                              progress=not args.no_progress)
            convert(str(path), args.data_path, force=args.force)


if __name__ == "__main__":
    main()
