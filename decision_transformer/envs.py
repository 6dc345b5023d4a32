"""One table of environment facts: gymnasium ids, dimensions, return targets, RTG scale, D4RL reference returns.

Every other module asks this one; no env literal is repeated elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from decision_transformer.errors import UserError, deferred_interrupts, interrupted_by

#: Gymnasium MuJoCo version used for evaluation. ``v4`` has the v3 dynamics the originals evaluated on.
DEFAULT_ENV_VERSION = "v4"
SUPPORTED_ENV_VERSIONS = ("v4", "v5")

#: Dataset qualities of the D4RL gym-mujoco v2 suite.
DATASETS = ("random", "medium", "medium-replay", "medium-expert", "expert")


@dataclass(frozen=True)
class EnvSpec:
    """Facts of one environment: gymnasium name, state and action sizes, episode length, return targets, RTG scale and
    D4RL reference returns."""

    name: str               # short name used on the command line and in file names (``hopper``)
    gym_name: str           # gymnasium id without version (``Hopper``)
    state_dim: int
    act_dim: int
    max_ep_len: int
    targets: tuple[float, ...]  # return-to-go targets, first = the one LAWSON evaluates
    scale: float            # returns-to-go are divided by this
    ref_min_score: float | None  # D4RL REF_MIN_SCORE (random policy); None: no D4RL reference
    ref_max_score: float | None  # D4RL REF_MAX_SCORE (expert policy)
    versions: tuple[str, ...] = SUPPORTED_ENV_VERSIONS  # the --env_version values it exists in
    d4rl: bool = True       # D4RL has datasets for it (downloads, bundled behaviour policies)
    entry_point: str | None = None  # this project's own env class, registered with gymnasium on first use

    def gym_id(self, version: str = DEFAULT_ENV_VERSION) -> str:
        """The gymnasium id in ``version`` (``Hopper-v4``); a ``UserError`` for a version unsupported or not available
        for this env."""
        if version not in SUPPORTED_ENV_VERSIONS:
            raise UserError(f"unsupported --env_version {version!r}; choose one of {', '.join(SUPPORTED_ENV_VERSIONS)}")
        if version not in self.versions:
            raise UserError(f"{self.name} exists only as --env_version {' or '.join(self.versions)}, not {version}")
        return f"{self.gym_name}-{version}"

    @property
    def has_d4rl_score(self) -> bool:
        """Whether D4RL reference returns exist, so that returns have a normalised score."""
        return self.ref_min_score is not None and self.ref_max_score is not None

    def d4rl_score(self, returns):
        """D4RL-normalised score (x100) of raw returns (scalar or array)."""
        if not self.has_d4rl_score:
            raise UserError(f"{self.name} has no D4RL reference returns: no normalised score; compare raw returns")
        return 100.0 * (returns - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)

    def score_metrics(self, key: str, returns) -> dict[str, float]:
        """``{key}_d4rl_score_mean/std`` of raw returns; empty for an env without D4RL reference returns."""
        if not self.has_d4rl_score:
            return {}
        scores = self.d4rl_score(np.asarray(returns, dtype=np.float64))
        return {f"{key}_d4rl_score_mean": float(np.mean(scores)), f"{key}_d4rl_score_std": float(np.std(scores))}


ENVS: dict[str, EnvSpec] = {
    "hopper": EnvSpec("hopper", "Hopper", 11, 3, 1000, (3600.0, 1800.0), 1000.0, -20.272305, 3234.3),
    "halfcheetah": EnvSpec("halfcheetah", "HalfCheetah", 17, 6, 1000, (12000.0, 6000.0), 1000.0, -280.178953, 12135.0),
    "walker2d": EnvSpec("walker2d", "Walker2d", 17, 6, 1000, (5000.0, 2500.0), 1000.0, 1.629008, 4592.3),
    # the custom planar reacher (decision_transformer/reacher2d.py): no public data, no D4RL reference
    "reacher2d": EnvSpec("reacher2d", "Reacher2d", 12, 2, 100, (76.0, 40.0), 10.0, None, None,
                         versions=("v4",), d4rl=False, entry_point="decision_transformer.reacher2d:Reacher2dEnv"),
}

#: the envs of D4RL's gym-mujoco suite (the papers' envs): downloads, bundled behaviour policies, default env lists
D4RL_ENVS: tuple[str, ...] = tuple(name for name, spec in ENVS.items() if spec.d4rl)


def get_env_spec(name: str) -> EnvSpec:
    """The ``EnvSpec`` of ``name``; a ``UserError`` naming the known envs otherwise."""
    try:
        return ENVS[name]
    except KeyError:
        raise UserError(f"unknown env {name!r}; choose one of {', '.join(ENVS)}") from None


def check_dataset_name(dataset: str) -> str:
    """``dataset`` itself if it is one of ``DATASETS``, else a ``UserError``."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return dataset


_MUJOCO_HANDLER_SET = False


def _route_mujoco_warnings():
    """MuJoCo prints compiler warnings to stderr and appends them to ``MUJOCO_LOG.TXT`` in the working directory.
    The v4 HalfCheetah model triggers a harmless deprecation notice on every build; route MuJoCo's warnings
    through Python's ``warnings`` instead, dropping that one."""
    global _MUJOCO_HANDLER_SET
    if _MUJOCO_HANDLER_SET:
        return
    try:
        # Ctrl-C or SIGTERM during MuJoCo's compiled import is lost in it (the import then succeeds) or turned into
        # ImportError("initialization failed"): held until the import is over (a tenth of a second), then raised
        with deferred_interrupts():
            import mujoco
    except ImportError as e:
        if interrupted_by(e, context=True):
            raise KeyboardInterrupt from e
        return  # pragma: no cover

    def handler(msg):
        """MuJoCo's warning callback: ``msg`` as a Python ``RuntimeWarning``, except the ``settotalmass`` notice."""
        if "settotalmass" not in msg:
            import warnings

            warnings.warn(f"MuJoCo: {msg}", RuntimeWarning, stacklevel=2)

    mujoco.set_mju_user_warning(handler)
    _MUJOCO_HANDLER_SET = True


def registered_id(name: str, version: str = DEFAULT_ENV_VERSION) -> str:
    """The gymnasium id of ``name`` in ``version``; the project's own envs (reacher2d) are registered first, with
    their episode length as the time limit."""
    spec = get_env_spec(name)
    gym_id = spec.gym_id(version)
    if spec.entry_point is not None:
        import gymnasium as gym

        if gym_id not in gym.registry:
            gym.register(gym_id, entry_point=spec.entry_point, max_episode_steps=spec.max_ep_len)
    return gym_id


def make_env(name: str, version: str = DEFAULT_ENV_VERSION):
    """A gymnasium env for ``name`` (no rendering). Imports gymnasium lazily: training alone does not need it."""
    import warnings

    get_env_spec(name).gym_id(version)
    try:
        import gymnasium as gym
    except ImportError as e:  # pragma: no cover - gymnasium is a hard dependency
        raise UserError(f"gymnasium[mujoco] is required for evaluation ({e})") from None
    try:
        _route_mujoco_warnings()
        gym_id = registered_id(name, version)
        with warnings.catch_warnings():
            # v4 is marked out of date in gymnasium 1.x; it is the version with the originals' (v3) dynamics.
            warnings.filterwarnings("ignore", message=".*out of date.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            return gym.make(gym_id, disable_env_checker=True)
    except RuntimeError as e:  # importing mujoco reads MUJOCO_GL
        if "MUJOCO_GL" not in str(e):
            raise
        raise UserError(f"{str(e).strip()}; unset it or use egl, osmesa or glfw (evaluation does not render)") from None
