"""Per-dataset state mean and std for the multi-task script's ``--norm_env`` (LAWSON's ``data/create_state_stats.py``).

    python data/create_state_stats.py --data_path data --out data/state_stats.pkl

Writes a pickled dict keyed ``{env}-{dataset}-v2`` whose values are ``{"state_mean", "state_std"}`` float32 arrays
(std + 1e-6, over every observation of the dataset), LAWSON's layout, for every dataset found among the given envs and
qualities; files that are missing are skipped (and listed).
"""
import argparse
import os
import pickle
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decision_transformer.envs import D4RL_ENVS  # noqa: E402
from decision_transformer.paths import project_path  # noqa: E402
from decision_transformer.errors import UserError, cli_entry, write_problem  # noqa: E402

ENVS = tuple(sorted(D4RL_ENVS))
DATASETS = ("medium", "medium-replay", "medium-expert", "expert")


def compute_stats(data_path: str, envs=ENVS, datasets=DATASETS) -> tuple[dict, list[str]]:
    from decision_transformer.data import find_dataset_file, load_trajectories, state_stats

    table, missing = {}, []
    for env in envs:
        for ds in datasets:
            try:
                path = find_dataset_file(data_path, env, ds)
            except UserError:
                missing.append(f"{env}-{ds}")
                continue
            mean, std = state_stats(load_trajectories(path, env))
            table[f"{env}-{ds}-v2"] = {"state_mean": mean.astype("float32"), "state_std": std.astype("float32")}
            print(f"{env}-{ds}-v2: {path}", file=sys.stderr)
    return table, missing


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=project_path("data"), help="folder with {env}-{dataset}-v2.pkl (or D4RL hdf5); "
                   "default: the project's data folder")
    p.add_argument("--out", default=None, help="output file (default: {data_path}/state_stats.pkl)")
    p.add_argument("--envs", nargs="+", default=list(ENVS))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    args = p.parse_args(argv)
    from decision_transformer.envs import check_dataset_name, get_env_spec

    for env in args.envs:
        get_env_spec(env)  # an unknown name is a typo, not a missing file
    for ds in args.datasets:
        check_dataset_name(ds)
    out = args.out or os.path.join(args.data_path, "state_stats.pkl")
    if os.path.isdir(out):
        raise UserError(f"--out {out}: is a folder; give the file to write, e.g. {Path(out) / 'state_stats.pkl'}")
    table, missing = compute_stats(args.data_path, args.envs, args.datasets)
    if not table:
        raise UserError(f"no datasets found in {args.data_path} for {', '.join(args.envs)} x "
                        f"{', '.join(args.datasets)}")
    folder = os.path.dirname(os.path.abspath(out))
    tmp = None
    try:  # written whole, then renamed: an existing file is replaced only by a complete one
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(out) + ".", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            pickle.dump(table, f)
        os.replace(tmp, out)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {out}: {write_problem(out, e)}") from None
        raise
    print(f"{out}: {len(table)} datasets" + (f" (not found: {', '.join(missing)})" if missing else ""))


if __name__ == "__main__":
    main()
