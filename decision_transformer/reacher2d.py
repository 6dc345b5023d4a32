"""``reacher2d``: the planar two-link reaching task one of the original DT codebases evaluated, for the mujoco bindings.

The originals built it on old gym + mujoco-py from a custom model file. This module rebuilds that model (same
links, joints, damping, armature, integrator, time step and frame skip; the colours, light and the ``coordinate``
attribute that current MuJoCo rejects are left out) and the env's rules:

* reset: both joint angles uniform in [-2, 2] rad, velocities zero; the target is put at a point drawn uniformly
  from [-1.5, 1.5]² until its distance from the shoulder is in [0.5, 1.0];
* action: two motor torques, clipped to [-1, 1]; 15 physics steps of 0.01 s per env step (dt = 0.15 s);
* observation (12): sin(q) (2), cos(q) (2), dt·q̇ (2), fingertip xy, target xy, fingertip − target;
* reward: 1 when the L1 distance between fingertip and target (xy) is below 0.1, else 0; never terminates;
* episodes end after 100 steps (the time limit ``envs.registered_id`` registers ``Reacher2d-v4`` with).

There is no public dataset for it: data come from the user (``data/reacher2d-{dataset}-v2.pkl``, the usual DT
layout) or, for smoke runs, from ``download_d4rl_datasets.py --synthetic`` / ``generate_datasets.py --dataset
random``. It has no D4RL reference returns, so no normalised score is reported.
"""
from __future__ import annotations

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

FRAME_SKIP = 15
#: success radius (L1, in the plane) of the reward
REACH_DISTANCE = 0.1

MODEL_XML = """
<mujoco model="reacher2d">
  <compiler angle="radian" inertiafromgeom="true"/>
  <option gravity="0 0 0" integrator="RK4" timestep="0.01"/>
  <default>
    <joint armature="0.05" damping="1" limited="true"/>
    <geom condim="1" contype="1" conaffinity="1" density="1000" friction="1 0.1 0.1"/>
  </default>
  <worldbody>
    <geom name="floor" type="plane" pos="0 0 -0.15" size="2 2 0.1"/>
    <geom name="root" type="capsule" fromto="0 0 -0.1 0 0 0.1" size="0.1"/>
    <body name="shoulder" pos="0 0 -0.075" axisangle="0 0 1 0.785">
      <joint name="shoulder" type="hinge" axis="0 0 1" limited="false" damping="1.0"/>
      <geom name="upper_arm" type="capsule" fromto="0 0 0 0.6 0 0" size="0.05"/>
      <body name="elbow" pos="0.6 0 0" axisangle="0 0 1 -0.785">
        <joint name="elbow" type="hinge" axis="0 0 1" range="-2.0 3.5" damping="1.0"/>
        <geom name="forearm" type="capsule" fromto="0 0 0 0.4 0 0" size="0.05"/>
        <site name="fingertip" type="sphere" pos="0.45 0 0" size="0.05"/>
      </body>
    </body>
    <body name="target" pos="-0.5 0 -0.1">
      <geom name="target" type="cylinder" size="0.1 0.05" contype="0" conaffinity="0"/>
    </body>
  </worldbody>
  <actuator>
    <motor joint="shoulder" ctrllimited="true" ctrlrange="-1 1" gear="1"/>
    <motor joint="elbow" ctrllimited="true" ctrlrange="-1 1" gear="1"/>
  </actuator>
</mujoco>
"""


class Reacher2dEnv(gym.Env):
    """See the module docstring. No rendering."""

    metadata = {"render_modes": []}

    def __init__(self, render_mode=None):
        if render_mode is not None:
            raise ValueError("reacher2d does not render")
        self.model = mujoco.MjModel.from_xml_string(MODEL_XML)
        self.data = mujoco.MjData(self.model)
        self.dt = float(self.model.opt.timestep) * FRAME_SKIP
        self._tip = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_SITE, "fingertip")
        self._target = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, "target")
        self.observation_space = spaces.Box(-np.inf, np.inf, (12,), np.float64)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.goal = np.zeros(2)

    def _positions(self):
        return self.data.site_xpos[self._tip][:2].copy(), self.data.xpos[self._target][:2].copy()

    def _obs(self) -> np.ndarray:
        q = self.data.qpos.ravel()
        tip, target = self._positions()
        return np.concatenate([np.sin(q), np.cos(q), self.dt * self.data.qvel.ravel(), tip, target, tip - target])

    def reset(self, *, seed=None, options=None):
        """Random joint angles in [-2, 2] rad at rest and a new target 0.5 to 1.0 from the shoulder; returns
        (observation [12], {})."""
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        qpos = self.np_random.uniform(-2.0, 2.0, size=self.model.nq)
        while True:
            goal = self.np_random.uniform(-1.5, 1.5, size=2)
            if 0.5 <= np.linalg.norm(goal) <= 1.0:
                break
        self.goal = goal
        self.data.qpos[:] = qpos
        self.data.qvel[:] = 0.0
        self.model.body_pos[self._target][:2] = goal
        mujoco.mj_forward(self.model, self.data)
        return self._obs(), {}

    def step(self, action):
        """Apply the clipped torques for ``FRAME_SKIP`` physics steps; returns (observation [12], reward 1.0 within
        ``REACH_DISTANCE`` (L1) of the target else 0.0, False, False, {"distance", "reward_bonus"})."""
        self.data.ctrl[:] = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        mujoco.mj_step(self.model, self.data, nstep=FRAME_SKIP)
        tip, target = self._positions()
        distance = float(np.abs(tip - target).sum())
        reward = 1.0 if distance < REACH_DISTANCE else 0.0
        return self._obs(), reward, False, False, {"distance": distance, "reward_bonus": reward}


# ---- a scripted behaviour policy (the env has no public data) --------------------------------------------------------

SHOULDER_ANGLE = 0.785  # the shoulder body's fixed rotation in MODEL_XML; the elbow body's undoes it
LINKS = (0.6, 0.45)     # shoulder to elbow, elbow to the fingertip site


def reaching_action(obs: np.ndarray, gain: float = 5.0, damping: float = 0.5) -> np.ndarray:
    """Jacobian-transpose control of the fingertip towards the target, with joint-velocity damping: torques
    ``gain·Jᵀ(target − tip) − damping·q̇``, clipped to [-1, 1]. Everything comes from the observation."""
    q = np.arctan2(obs[0:2], obs[2:4])                 # sin, cos -> joint angles
    qd = obs[4:6] / (FRAME_SKIP * 0.01)                # the observation holds dt·q̇
    a0, a1 = SHOULDER_ANGLE + q[0], q[0] + q[1]
    l0, l1 = LINKS
    jac = np.array([[-l0 * np.sin(a0) - l1 * np.sin(a1), -l1 * np.sin(a1)],
                    [l0 * np.cos(a0) + l1 * np.cos(a1), l1 * np.cos(a1)]])
    return np.clip(gain * jac.T @ (-obs[10:12]) - damping * qd, -1.0, 1.0)


def scripted_trajectories(num_episodes: int, noise=(0.1, 0.5, 1.0), seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Whole episodes of ``reaching_action`` plus Gaussian action noise (episode i uses ``noise[i % len(noise)]``),
    in the DT pickle layout. Env resets and noise are seeded from ``seed``."""
    from decision_transformer.envs import make_env

    env = make_env("reacher2d")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num_episodes):
        sigma = noise[i % len(noise)]
        obs, _ = env.reset(seed=int(seed) * 100_003 + i)
        cols = {k: [] for k in ("observations", "next_observations", "actions", "rewards", "terminals")}
        done = False
        while not done:
            a = np.clip(reaching_action(obs) + rng.normal(0.0, sigma, 2), -1.0, 1.0).astype(np.float32)
            nobs, r, term, trunc, _ = env.step(a)
            for k, v in zip(cols, (obs, nobs, a, r, term)):
                cols[k].append(v)
            obs, done = nobs, term or trunc
        out.append({k: np.asarray(v, dtype=bool if k == "terminals" else np.float32) for k, v in cols.items()})
    env.close()
    return out
