"""Train the bundled SAC behaviour policies (one-time job; resumable across sessions and machines).

    nice -n 19 python data/train_behaviour_policies.py --env hopper --max_minutes 60

Each call continues from ``--state_dir/{env}/state.pt`` (3 MB: networks, Adam state, RNGs, counters; the folder is
git-ignored and committed deliberately with ``git add -f data/policies_training/*/state.pt
data/policies_training/*/progress.jsonl data/policies_training/train.log`` - never the replay buffer) and stops
after ``--total_steps`` environment steps or ``--max_minutes``, checkpointing every few minutes and on
Ctrl-C/SIGTERM. Progress goes to stdout and ``--state_dir/{env}/progress.jsonl``. Policies land in
``--policy_dir/{env}/``: ``medium.pt``, ``expert.pt`` and the ``replay/`` snapshots that medium-replay is
regenerated from (see ``decision_transformer.sac.train_behaviour_policy`` for how the medium and expert policies are
picked: a 10-episode screen, then a 50-episode evaluation of the candidates). Redo one policy without touching the
other with, e.g., ``--env hopper --roles medium --run_name hopper-medium``. The replay buffer
(``replay_buffer.npz``, git-ignored) lets a resume on the same machine continue with the buffer it had; elsewhere the
buffer is refilled with the current policy first (also, after a ``note:`` line, when the file is damaged). Either way
the episode in progress starts again (the env's state is not saved), so a resumed run is not identical to one run
straight through. An evaluation that Ctrl-C/SIGTERM cut short is run first on resume, a resume keeps the state's
``--seed``, and a state with NaN or inf weights (a diverged run) is refused in one line.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decision_transformer.errors import quiet_startup  # noqa: E402

quiet_startup(__name__)  # Ctrl-C while torch loads: one line, exit 130

from decision_transformer.cli import positive_int
from decision_transformer.envs import D4RL_ENVS
from decision_transformer.errors import cli_entry

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: the float flags and what a valid value is (the int flags' type checks theirs)
NUMBER_RULES = {"max_minutes": ("a positive number", lambda v: v > 0),
                "expert_tolerance": ("a number >= 0", lambda v: v >= 0),
                "checkpoint_minutes": ("a positive number", lambda v: v > 0)}


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", nargs="+", default=["hopper"], choices=list(D4RL_ENVS),
                   help="trained one after the other")
    p.add_argument("--total_steps", type=positive_int, default=1_000_000)
    p.add_argument("--max_minutes", type=float, default=None, help="per env; stop (checkpointed) after this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--compile", action="store_true", help="torch.compile the SAC losses (needs a C++ compiler)")
    p.add_argument("--roles", nargs="+", default=["medium", "expert"], choices=["medium", "expert"],
                   help="which policies this run writes; a run for 'medium' alone stops once the medium policy "
                        "is final")
    p.add_argument("--run_name", default=None,
                   help="state folder under --state_dir (default: the env name; one env only when given)")
    p.add_argument("--long_eval_episodes", type=positive_int, default=50,
                   help="episodes of the second evaluation that medium and expert candidates get")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="matmul type of the update's hidden layers (bf16: about 1.6x the updates/s on CPUs with "
                        "AVX512-BF16; weights, Adam state, output layers and losses stay fp32)")
    p.add_argument("--expert_until", choices=["target", "total_steps"], default="target",
                   help="when the expert policy is final: once a candidate's 50-episode score is within "
                        "--expert_tolerance below D4RL's expert average (target), or only at --total_steps")
    p.add_argument("--expert_tolerance", type=float, default=5.0)
    p.add_argument("--checkpoint_minutes", type=float, default=5.0)
    p.add_argument("--state_dir", default=os.path.join(HERE, "policies_training"))
    p.add_argument("--policy_dir", default=os.path.join(ROOT, "decision_transformer", "policies"))
    args = p.parse_args(argv)
    from decision_transformer.cpu import MAX_THREADS

    if args.threads > MAX_THREADS:
        p.error(f"--threads {args.threads} is too large (at most {MAX_THREADS})")
    if args.run_name is not None and len(args.env) > 1:
        p.error("--run_name names one run: give one --env")
    if args.run_name is not None and (args.run_name in ("", ".", "..") or "/" in args.run_name
                                      or os.sep in args.run_name):
        p.error(f"--run_name {args.run_name!r} must be a plain folder name (it is made in --state_dir)")
    from decision_transformer.run import check_numbers

    check_numbers(args, NUMBER_RULES)  # and --seed; before any folder is made

    import signal

    import torch

    def stop(signum, frame):  # a polite kill (session end) checkpoints like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)

    from decision_transformer.generation import EXPERT_TARGET_SCORE, MEDIUM_TARGET_SCORE
    from decision_transformer.sac import train_behaviour_policy

    torch.set_num_threads(args.threads)
    for env in args.env:
        meta = train_behaviour_policy(
            env, os.path.join(args.state_dir, args.run_name or env), os.path.join(args.policy_dir, env),
            total_steps=args.total_steps, seed=args.seed, compile=args.compile,
            max_seconds=None if args.max_minutes is None else 60.0 * args.max_minutes,
            checkpoint_every_s=60.0 * args.checkpoint_minutes, medium_score=MEDIUM_TARGET_SCORE[env],
            roles=tuple(args.roles), long_eval_episodes=args.long_eval_episodes, precision=args.precision,
            expert_score=EXPERT_TARGET_SCORE[env] if args.expert_until == "target" else None,
            expert_tolerance=args.expert_tolerance,
            log=lambda m: print(m, flush=True))
        print(policy_summary(env, meta, args.roles, os.path.join(args.policy_dir, env)), flush=True)


def policy_summary(env: str, meta: dict, roles, policy_dir: str) -> str:
    """The closing line of one env: each role asked for, where its policy was chosen and whether that is final, or
    that none was found (no file written: train longer, or resume)."""
    parts = []
    for role, step, score, final, searching in (
            ("medium", "medium_step", "medium_eval", "medium_final", "still searching"),
            ("expert", "best_step", "best_eval", "expert_final", "the best so far: more --total_steps trains on")):
        if role not in roles:
            continue
        if meta.get(step) is None:
            parts.append(f"no {role} policy yet ({role}.pt not written; train longer or resume)")
        else:
            parts.append(f"{role} at {meta[step]} (score {meta[score]}, {'final' if meta.get(final) else searching})")
    return f"{env}: {meta['env_steps']} env steps; " + "; ".join(parts) + f" [{policy_dir}]"


if __name__ == "__main__":
    main()
