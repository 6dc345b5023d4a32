"""The slow reference paths the benchmarks and tests compare the fast ones with.

Transcriptions of the originals' code, kept slow on purpose: the per-sample batch builder of their ``get_batch``
(``reference_get_batch``) and their ``discount_cumsum``. ``tests/test_data.py`` checks the vectorised sampler of
:mod:`decision_transformer.data` against them (bit-identical windows); ``benchmarks/bench_core.py`` and
``benchmarks/bench_train.py`` time them as the originals' per-sample loop. They live in the package, not in the tests,
so that the benchmarks run where only the package's runtime dependencies are installed (no pytest). Needs numpy and
torch only.
"""
from __future__ import annotations

import numpy as np
import torch

#: hopper's episode limit and return scale, the defaults of ``reference_get_batch`` (as in the originals' hopper runs)
MAX_EP_LEN, SCALE = 1000, 1000.0


def original_discount_cumsum(x, gamma):
    """The originals' discount_cumsum, verbatim."""
    discount_cumsum = np.zeros_like(x)
    discount_cumsum[-1] = x[-1]
    for t in reversed(range(x.shape[0] - 1)):
        discount_cumsum[t] = x[t] + gamma * discount_cumsum[t + 1]
    return discount_cumsum


def reference_get_batch(trajectories, pairs, max_len, state_mean, state_std, max_ep_len=MAX_EP_LEN, scale=SCALE):
    """Per-sample transcription of the originals' ``get_batch`` for given (trajectory index, start) pairs.

    The only change from the original loop is that (traj, si) are given instead of drawn; the final torch
    conversion uses the originals' dtypes (mask float32, which training.md §4.7 declares equivalent)."""
    state_dim = trajectories[0]["observations"].shape[1]
    act_dim = trajectories[0]["actions"].shape[1]
    s, a, r, d, rtg, timesteps, mask = [], [], [], [], [], [], []
    for idx, si in pairs:
        traj = trajectories[int(idx)]
        si = int(si)
        s.append(traj["observations"][si:si + max_len].reshape(1, -1, state_dim))
        a.append(traj["actions"][si:si + max_len].reshape(1, -1, act_dim))
        r.append(traj["rewards"][si:si + max_len].reshape(1, -1, 1))
        d.append(traj["terminals"][si:si + max_len].reshape(1, -1))
        timesteps.append(np.arange(si, si + s[-1].shape[1]).reshape(1, -1))
        timesteps[-1][timesteps[-1] >= max_ep_len] = max_ep_len - 1  # padding cutoff
        rtg.append(original_discount_cumsum(traj["rewards"][si:], gamma=1.)[:s[-1].shape[1] + 1].reshape(1, -1, 1))
        if rtg[-1].shape[1] <= s[-1].shape[1]:
            rtg[-1] = np.concatenate([rtg[-1], np.zeros((1, 1, 1))], axis=1)

        # padding and state + reward normalization
        tlen = s[-1].shape[1]
        s[-1] = np.concatenate([np.zeros((1, max_len - tlen, state_dim)), s[-1]], axis=1)
        s[-1] = (s[-1] - state_mean) / state_std
        a[-1] = np.concatenate([np.ones((1, max_len - tlen, act_dim)) * -10., a[-1]], axis=1)
        r[-1] = np.concatenate([np.zeros((1, max_len - tlen, 1)), r[-1]], axis=1)
        d[-1] = np.concatenate([np.ones((1, max_len - tlen)) * 2, d[-1]], axis=1)
        rtg[-1] = np.concatenate([np.zeros((1, max_len - tlen, 1)), rtg[-1]], axis=1) / scale
        timesteps[-1] = np.concatenate([np.zeros((1, max_len - tlen)), timesteps[-1]], axis=1)
        mask.append(np.concatenate([np.zeros((1, max_len - tlen)), np.ones((1, tlen))], axis=1))

    return {
        "states": torch.from_numpy(np.concatenate(s, axis=0)).to(dtype=torch.float32),
        "actions": torch.from_numpy(np.concatenate(a, axis=0)).to(dtype=torch.float32),
        "rewards": torch.from_numpy(np.concatenate(r, axis=0)).to(dtype=torch.float32),
        "dones": torch.from_numpy(np.concatenate(d, axis=0)).to(dtype=torch.long),
        "rtg": torch.from_numpy(np.concatenate(rtg, axis=0)).to(dtype=torch.float32),
        "timesteps": torch.from_numpy(np.concatenate(timesteps, axis=0)).to(dtype=torch.long),
        "mask": torch.from_numpy(np.concatenate(mask, axis=0)).to(dtype=torch.float32),
    }
