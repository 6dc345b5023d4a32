"""Generate D4RL-style datasets in the gymnasium v4 envs from the bundled SAC behaviour policies (no network).

    python data/generate_datasets.py --env hopper --dataset medium
    python data/generate_datasets.py --env hopper walker2d --dataset medium medium-replay --data_path data

Writes ``{data_path}/{env}-{dataset}-v2.pkl`` (what the training scripts read), D4RL's hdf5 layout
``{env}_{dataset with '-'->'_'}-v2.hdf5`` (with ``timeouts`` and ``infos/qpos|qvel|action_log_probs``; skip with
``--no_hdf5``) and ``{env}-{dataset}-v2.stats.json``, and prints each dataset's transitions, episodes, return and
D4RL-normalised score beside D4RL's published average. Policies come from ``--policy_dir`` (default: the ones
bundled with the package; see data/train_behaviour_policies.py). Every policy the datasets need is loaded before
anything is written; an ``expert.pt`` that its training has not marked final is refused unless ``--allow_unfinished``.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.data import hdf5_name, pkl_name
from decision_transformer.envs import D4RL_ENVS, ENVS as ALL_ENVS
from decision_transformer.errors import UserError, cli_entry
from decision_transformer.files import exclusive, refuse_files_above, refuse_folders
from decision_transformer.paths import DATA_PATH_HELP, project_path

ENVS = list(D4RL_ENVS)  # "all": the envs with bundled behaviour policies
OTHER_ENVS = [e for e in ALL_ENVS if e not in D4RL_ENVS]  # no bundled policies: --dataset random, or your --policy_dir
DATASETS = ["random", "medium", "medium-replay", "medium-expert", "expert"]


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", nargs="+", required=True, choices=ENVS + OTHER_ENVS + ["all"],
                   help=f"all: {', '.join(ENVS)} (the envs with bundled behaviour policies)")
    p.add_argument("--dataset", nargs="+", required=True, choices=DATASETS + ["all"])
    p.add_argument("--num_transitions", type=int, default=None,
                   help="rows per dataset (default 1M; medium-expert: this many of each half; medium-replay: "
                        "every training step up to the medium policy, or the first N)")
    p.add_argument("--data_path", default=project_path("data"),
                   help=DATA_PATH_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy_dir", default=None, help="behaviour policies (default: bundled)")
    p.add_argument("--no_hdf5", action="store_true", help="write only the pkl (and stats)")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--allow_unfinished", action="store_true",
                   help="generate expert and medium-expert data from an expert policy whose training has not marked "
                        "it final (refused otherwise)")
    p.add_argument("--force", action="store_true",
                   help="replace datasets of the same names already in --data_path (refused otherwise: they may be "
                        "converted D4RL files)")
    args = p.parse_args(argv)
    if args.num_transitions is not None and args.num_transitions < 1:
        p.error("--num_transitions must be positive")
    if not 0 <= args.seed < 2 ** 32:
        p.error(f"--seed must be an integer from 0 to 2**32 - 1, got {args.seed}")

    envs = list(dict.fromkeys([e for a in args.env for e in (ENVS if a == "all" else [a])]))
    datasets = DATASETS if "all" in args.dataset else args.dataset
    from decision_transformer.generation import check_policies, generate_dataset

    for env in envs:  # before anything is written: every policy the datasets are rolled out from
        for dataset in datasets:
            expert_file, expert = check_policies(env, dataset, args.policy_dir).get("expert", (None, {"final": 1}))
            if not expert.get("final") and not args.allow_unfinished:
                raise UserError(f"{expert_file}: an expert policy from unfinished training (step {expert.get('step')}, "
                                f"eval score {expert.get('eval_score')}); {env}-{dataset} is not generated from it: "
                                f"train on (data/train_behaviour_policies.py), or pass --allow_unfinished to use it "
                                f"anyway")
    # a dataset already there may be real D4RL data converted earlier: never replaced unless asked to
    # (also with --no_hdf5: the pkl it writes would be read before a D4RL hdf5 of the same dataset)
    existing = [path for env in envs for dataset in datasets
                for path in (os.path.join(args.data_path, pkl_name(env, dataset)),
                             os.path.join(args.data_path, hdf5_name(env, dataset)))
                if os.path.lexists(path)]
    if existing and not args.force:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise UserError(f"{existing[0]}{more} already exist(s); generating would replace it with generated data: "
                        f"give another --data_path, or pass --force to overwrite")
    refuse_folders(existing)   # (--force: a folder cannot be replaced; said before anything is generated)
    refuse_folders(os.path.join(args.data_path, f"{env}-{dataset}-v2.stats.json")
                   for env in envs for dataset in datasets)
    refuse_files_above(args.data_path, "generate_datasets.py")
    for env in envs:
        for dataset in datasets:
            target = os.path.join(args.data_path, pkl_name(env, dataset))
            with exclusive(target, "a generated dataset"):   # another generation of it waits, then is refused
                made = [p for p in (target, os.path.join(args.data_path, hdf5_name(env, dataset)))
                        if os.path.lexists(p)]
                if made and not args.force:
                    raise UserError(f"{made[0]} was written by another process meanwhile; generating would replace it: "
                                    f"give another --data_path, or pass --force to overwrite")
                generate_dataset(args.data_path, env, dataset, num_transitions=args.num_transitions, seed=args.seed,
                                 policy_dir=args.policy_dir, write_hdf5=not args.no_hdf5,
                                 progress=not args.no_progress, replace=args.force)


if __name__ == "__main__":
    main()
