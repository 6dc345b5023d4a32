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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decision_transformer.errors import UserError, cli_entry  # noqa: E402

ENVS = ("halfcheetah", "hopper", "walker2d")
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
    p.add_argument("--data_path", default="data", help="folder with {env}-{dataset}-v2.pkl (or D4RL hdf5)")
    p.add_argument("--out", default=None, help="output file (default: {data_path}/state_stats.pkl)")
    p.add_argument("--envs", nargs="+", default=list(ENVS))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    args = p.parse_args(argv)
    table, missing = compute_stats(args.data_path, args.envs, args.datasets)
    if not table:
        raise UserError(f"no datasets found in {args.data_path} for {', '.join(args.envs)} x "
                        f"{', '.join(args.datasets)}")
    out = args.out or os.path.join(args.data_path, "state_stats.pkl")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(table, f)
    os.replace(tmp, out)
    print(f"{out}: {len(table)} datasets" + (f" (not found: {', '.join(missing)})" if missing else ""))


if __name__ == "__main__":
    main()
