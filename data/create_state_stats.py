"""Per-dataset state mean and std for the multi-task script's ``--norm_env`` (LAWSON's ``data/create_state_stats.py``).

    python data/create_state_stats.py --data_path data --out data/state_stats.pkl

Writes a pickled dict keyed ``{env}-{dataset}-v2`` whose values are ``{"state_mean", "state_std"}`` float32 arrays
(std + 1e-6, over every observation of the dataset), LAWSON's layout, for every dataset found among the given envs and
qualities; files that are missing are skipped (and listed). An existing table is updated: the entries computed here
replace theirs, the others (datasets not found here) are kept; ``--replace`` writes only the entries computed here.
An existing file that is not such a table is refused unless ``--replace`` is given.
"""
import argparse
import os
import pickle
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.envs import D4RL_ENVS  # noqa: E402
from decision_transformer.paths import project_path  # noqa: E402
from decision_transformer.errors import UserError, cli_entry  # noqa: E402

ENVS = tuple(sorted(D4RL_ENVS))
DATASETS = ("medium", "medium-replay", "medium-expert", "expert")


def read_table(path: str) -> dict:
    """The existing table at ``path``: a dict of ``{env}-{dataset}-v2`` -> {"state_mean", "state_std"} arrays."""
    import numpy as np

    from decision_transformer.data import safe_pickle_load

    advice = "move it away, or pass --replace to overwrite it"
    try:
        table = safe_pickle_load(path)
    except UserError as e:
        raise UserError(f"{path} exists but is not a readable state statistics table ({e}); {advice}") from None
    if not isinstance(table, dict):
        raise UserError(f"{path} exists but holds a {type(table).__name__}, not a state statistics table (a dict "
                        f"keyed by '{{env}}-{{dataset}}-v2'); {advice}")
    for key, entry in table.items():
        if not (isinstance(key, str) and isinstance(entry, dict)
                and all(isinstance(entry.get(k), np.ndarray) for k in ("state_mean", "state_std"))):
            raise UserError(f"{path} exists but its entry {key!r} is not a dict of state_mean and state_std arrays, "
                            f"so it is not a state statistics table; {advice}")
    return table


def check_kept(table: dict, kept, path: str) -> None:
    """The entries of an existing table that are written back unchanged must be usable statistics (finite, of the
    env's state size, std > 0): a broken one is named, not passed on. Entries recomputed now are not checked."""
    import numpy as np

    from decision_transformer.envs import ENVS as ALL_ENVS
    from decision_transformer.legacy_import import checked_state_stats

    advice = "move it away, or pass --replace to overwrite it"
    for key in kept:
        entry, env = table[key], key.split("-", 1)[0]
        if env in ALL_ENVS:
            try:
                checked_state_stats(entry["state_mean"], entry["state_std"], env, f"{path}: entry {key!r}: ")
            except UserError as e:
                raise UserError(f"{e}; {advice}") from None
        elif not all(np.isfinite(entry[k]).all() for k in ("state_mean", "state_std")):
            raise UserError(f"{path}: entry {key!r}: stored statistics contain NaN or inf; {advice}")


def locate_datasets(data_path: str, envs=ENVS, datasets=DATASETS) -> tuple[dict, list[str]]:
    """({env}-{dataset}-v2 -> (env, file) of each dataset found, the names of those not found), nothing loaded."""
    from decision_transformer.data import find_dataset_file

    found, missing = {}, []
    for env in envs:
        for ds in datasets:
            try:
                found[f"{env}-{ds}-v2"] = (env, find_dataset_file(data_path, env, ds))
            except UserError:
                missing.append(f"{env}-{ds}")
    return found, missing


def compute_stats(located: dict) -> dict:
    """The table entries of the datasets ``locate_datasets`` found (each loaded in turn)."""
    from decision_transformer.data import load_trajectories, state_stats

    table = {}
    for key, (env, path) in located.items():
        mean, std = state_stats(load_trajectories(path, env))
        table[key] = {"state_mean": mean.astype("float32"), "state_std": std.astype("float32")}
        print(f"{key}: {path}", file=sys.stderr)
    return table


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", default=project_path("data"),
                   help="folder with {env}-{dataset}-v2.pkl (or D4RL hdf5); default: the project's data/ when started "
                        "inside the project, ./data outside it")
    p.add_argument("--out", default=None, help="output file (default: {data_path}/state_stats.pkl)")
    p.add_argument("--envs", nargs="+", default=list(ENVS))
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--replace", action="store_true",
                   help="write only the entries computed now (default: update an existing table, keeping its "
                        "other entries)")
    args = p.parse_args(argv)
    from decision_transformer.envs import check_dataset_name, get_env_spec

    for env in args.envs:
        get_env_spec(env)  # an unknown name is a typo, not a missing file
    for ds in args.datasets:
        check_dataset_name(ds)
    out = args.out or os.path.join(args.data_path, "state_stats.pkl")
    if os.path.isdir(out):
        raise UserError(f"--out {out}: is a folder; give the file to write, e.g. {Path(out) / 'state_stats.pkl'}")
    from decision_transformer.files import refuse_files_above

    refuse_files_above(Path(out).parent, "--out")   # (before every dataset is loaded)
    merge = not args.replace and os.path.lexists(out)
    old = read_table(out) if merge else {}  # checked before the work
    located, missing = locate_datasets(args.data_path, args.envs, args.datasets)
    if not located:
        raise UserError(f"no datasets found in {args.data_path} for {', '.join(args.envs)} x "
                        f"{', '.join(args.datasets)}")
    check_kept(old, [k for k in old if k not in located], out)   # (before every dataset is loaded)
    found = compute_stats(located)
    from decision_transformer.files import atomic_write, exclusive

    with exclusive(out, "the state-stats table"):   # two updates at once: each keeps the other's entries
        merge = not args.replace and os.path.lexists(out)
        if merge:   # read again: another process may have written the table meanwhile
            old = read_table(out)
        kept = [k for k in old if k not in found]
        check_kept(old, kept, out)   # (before anything is written)
        table = {**old, **found}

        def write(tmp):
            with open(tmp, "wb") as f:
                pickle.dump(table, f)

        atomic_write(out, write)  # written whole, then renamed: an existing file is replaced only by a complete one
    merged = f" ({len(found)} computed now, {len(kept)} other entries kept from the existing table)" if merge else ""
    print(f"{out}: {len(table)} datasets{merged}" + (f" (not found: {', '.join(missing)})" if missing else ""))


if __name__ == "__main__":
    main()
