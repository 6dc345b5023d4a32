"""Resumes of the behaviour-policy training (decision_transformer/sac.py) and the generation tool's policy checks
(decision_transformer/generation.py, data/generate_datasets.py) that an audit found wanting: the replay buffer a run
saved itself after a refill is reused, a damaged buffer file is a note and a refill, a state with NaN weights is
refused, a NaN score is never a candidate, an evaluation an interrupt cut short runs on resume, a resume uses the
state's seed, and generation refuses an unfinished expert and checks every policy before it writes anything."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from conftest import fails, load_script
from test_generation import save_actor

from decision_transformer import envs as envs_module
from decision_transformer import generation, sac
from decision_transformer.errors import UserError
from decision_transformer.sac import ReplayBuffer, SACConfig, expert_screen, train_behaviour_policy

#: a tiny run on real Hopper-v4 that never finds a medium candidate (unreachable target) and never evaluates
QUIET = {"eval_every": 10 ** 7, "eval_episodes": 1, "snapshot_every": 10 ** 6, "start_steps": 100,
         "medium_score": 1e6, "medium_window": 1.0, "long_eval_episodes": 1,
         "config": SACConfig(hidden=32, batch_size=64), "buffer_capacity": 5000}
#: one that evaluates every 300 steps, every screen making a medium candidate
EVALUATED = {**QUIET, "eval_every": 300, "snapshot_every": 200, "medium_score": 0.0, "medium_window": 1e9,
             "medium_tolerance": -1.0}


def _edit_meta(state_path, **changes):
    state = torch.load(state_path, weights_only=True)
    meta = json.loads(state["meta"])
    meta.update(changes)
    state["meta"] = json.dumps(meta)
    torch.save(state, state_path)


def _resumes(logs):
    return [m for m in logs if "resuming at" in m]


# ----------------------------------------------------------------------------------------------------------------
# 1. the buffer a run saved after a refill is its own
# ----------------------------------------------------------------------------------------------------------------

def test_a_resume_after_a_refill_continues_with_the_buffer_it_saved(tmp_path, monkeypatch):
    """A resume without its buffer refills min(steps, 25k) rows, so the buffer's pointer no longer follows the env
    steps; the next resume on the same machine discarded that buffer (and refilled again) for good. The state now
    records which buffer it was saved with."""
    monkeypatch.setattr(sac, "REFILL_STEPS", 300, raising=False)   # (the real 25k makes no difference but time)
    state, pol, logs = tmp_path / "s", tmp_path / "p", []
    train_behaviour_policy("hopper", state, pol, total_steps=200, log=logs.append, **QUIET)
    # a run that had trained past the refill size (> 25k steps: only there does a refill differ from the steps)
    _edit_meta(state / "state.pt", env_steps=25_200)
    (state / "replay_buffer.npz").unlink()                           # another machine
    train_behaviour_policy("hopper", state, pol, total_steps=25_250, log=logs.append, **QUIET)
    train_behaviour_policy("hopper", state, pol, total_steps=25_300, log=logs.append, **QUIET)
    assert _resumes(logs) == ["hopper: resuming at 25200 env steps (without its replay buffer)",
                              "hopper: resuming at 25250 env steps (with its replay buffer)"]
    with np.load(state / "replay_buffer.npz") as z:                 # the refill, then 50 + 50 steps
        assert len(z["rew"]) == int(z["ptr"]) == 300 + 100


def test_a_buffer_file_other_than_the_states_is_not_used(tmp_path):
    """The record is of the buffer's content: another buffer of the same size (another run's, or an older save of
    this one) is refilled over, as before."""
    state, pol, logs = tmp_path / "s", tmp_path / "p", []
    train_behaviour_policy("hopper", state, pol, total_steps=200, log=logs.append, **QUIET)
    b = ReplayBuffer(11, 3, 5000)
    b.load(state / "replay_buffer.npz")
    b.rew[0] += 1.0
    b.save(state / "replay_buffer.npz")
    train_behaviour_policy("hopper", state, pol, total_steps=250, log=logs.append, **QUIET)
    assert _resumes(logs) == ["hopper: resuming at 200 env steps (without its replay buffer)"]


# ----------------------------------------------------------------------------------------------------------------
# 2. a damaged replay_buffer.npz
# ----------------------------------------------------------------------------------------------------------------

def _damage(path, how):
    good = dict(np.load(path))
    if how == "garbage":
        path.write_bytes(b"not a numpy file at all")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "missing key":
        np.savez(path.open("wb"), **{k: v for k, v in good.items() if k != "done"})
    elif how == "wrong shape":   # (one column: broadcast silently into 11 before)
        np.savez(path.open("wb"), **{**good, "obs": good["obs"][:, :1]})
    elif how == "nan":
        np.savez(path.open("wb"), **{**good, "rew": np.full_like(good["rew"], np.nan)})
    elif how == "bad pointer":
        np.savez(path.open("wb"), **{**good, "ptr": np.int64(10 ** 9)})


@pytest.mark.parametrize("how", ["garbage", "truncated", "missing key", "wrong shape", "nan", "bad pointer"])
def test_a_damaged_replay_buffer_is_a_note_and_a_refill(tmp_path, how):
    state, pol, logs = tmp_path / "s", tmp_path / "p", []
    train_behaviour_policy("hopper", state, pol, total_steps=200, log=logs.append, **QUIET)
    buf = state / "replay_buffer.npz"
    _damage(buf, how)
    meta = train_behaviour_policy("hopper", state, pol, total_steps=260, log=logs.append, **QUIET)
    notes = [m for m in logs if m.startswith("note: ")]
    assert len(notes) == 1 and notes[0].startswith(f"note: {buf}: not a usable replay buffer (")
    assert "refilling the buffer as if it were missing (the file is replaced at the next checkpoint)" in notes[0]
    assert _resumes(logs) == ["hopper: resuming at 200 env steps (without its replay buffer)"]
    assert meta["env_steps"] == 260
    with np.load(buf) as z:                      # replaced by the refilled buffer at the checkpoint
        assert len(z["rew"]) == 260 and np.isfinite(z["rew"]).all()
    assert zipfile.is_zipfile(buf)


# ----------------------------------------------------------------------------------------------------------------
# 3. NaN weights in state.pt, NaN scores
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where, keys", [("actor.l1.weight", ("actor", "l1.weight")),
                                         ("critic_target.weights.1", ("critic_target", "weights.1")),
                                         ("log_alpha", ("log_alpha",)),
                                         ("optimizer.state.0.exp_avg_sq", ("optimizer", "state", 0, "exp_avg_sq"))])
def test_a_state_with_non_finite_weights_is_refused(tmp_path, where, keys):
    """A diverged state resumed silently and wrote NaN policies (expert.pt marked final at total_steps)."""
    state, pol = tmp_path / "s", tmp_path / "p"
    train_behaviour_policy("hopper", state, pol, total_steps=200, log=lambda m: None, **EVALUATED)
    saved = torch.load(state / "state.pt", weights_only=True)
    obj = saved["agent"]
    for k in keys[:-1]:
        obj = obj[k]
    obj[keys[-1]] = torch.full_like(obj[keys[-1]], float("nan") if len(keys) > 1 else float("inf"))
    torch.save(saved, state / "state.pt")
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    with pytest.raises(UserError) as e:
        train_behaviour_policy("hopper", state, pol, total_steps=600, log=lambda m: None, **EVALUATED)
    msg = str(e.value)
    assert msg.startswith(f"{state / 'state.pt'}: cannot resume from this training state: {where} holds NaN or inf")
    assert "\n" not in msg and "move it away" in msg
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()
            if not p.name.endswith(".lock")} == {p: b for p, b in before.items() if not p.name.endswith(".lock")}


def test_the_script_refuses_a_diverged_state_in_one_line(tmp_path, capsys):
    """data/train_behaviour_policies.py: one ``error:`` line naming state.pt and the tensor, exit 2, files kept."""
    state, pol = tmp_path / "state" / "hopper", tmp_path / "policies" / "hopper"
    train_behaviour_policy("hopper", state, pol, total_steps=150, medium_score=44.3, log=lambda m: None)  # (defaults)
    saved = torch.load(state / "state.pt", weights_only=True)
    saved["agent"]["critic"]["biases.2"][:] = float("nan")
    torch.save(saved, state / "state.pt")
    before = (state / "state.pt").read_bytes()
    main = load_script("data/train_behaviour_policies.py").main
    msg = fails(main, ["--env", "hopper", "--total_steps", "300", "--state_dir", tmp_path / "state", "--policy_dir",
                       tmp_path / "policies"], capsys)
    assert msg.startswith(f"error: {state / 'state.pt'}: cannot resume from this training state: critic.biases.2 "
                          f"holds NaN or inf")
    assert (state / "state.pt").read_bytes() == before


def test_a_nan_score_is_never_a_candidate(tmp_path, monkeypatch):
    """A NaN long evaluation was kept as medium and expert policy (best_eval NaN, which no later score beats); a NaN
    screen became the expert screen, which no later screen came within the window of."""
    assert expert_screen(None, float("nan"), 10.0) is None
    assert expert_screen(float("nan"), 50.0, 10.0) == 50.0
    assert expert_screen(40.0, float("inf"), 10.0) is None
    real = sac.evaluate_policy

    def nan_long(actor, env_name, episodes, seed):
        rets = real(actor, env_name, episodes, seed)
        return np.full_like(rets, np.nan) if seed >= 20_000_000 else rets

    monkeypatch.setattr(sac, "evaluate_policy", nan_long)
    state, pol = tmp_path / "s", tmp_path / "p"
    meta = train_behaviour_policy("hopper", state, pol, total_steps=600, log=lambda m: None, **EVALUATED)
    assert meta["medium_step"] is None and meta["medium_eval"] is None
    assert meta["best_step"] is None and meta["best_eval"] is None
    assert not (pol / "medium.pt").exists() and not (pol / "expert.pt").exists()

    monkeypatch.setattr(sac, "evaluate_policy", lambda actor, env_name, episodes, seed: np.full(episodes, np.nan))
    meta = train_behaviour_policy("hopper", tmp_path / "s2", tmp_path / "p2", total_steps=300, log=lambda m: None,
                                  **EVALUATED)
    assert meta["expert_screen"] is None and meta["best_eval"] is None


# ----------------------------------------------------------------------------------------------------------------
# 4. an interrupt during (or just before) an evaluation
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["screen", "long evaluation", "update"])
def test_an_evaluation_an_interrupt_cut_short_runs_on_resume(tmp_path, monkeypatch, where):
    """env_steps was advanced before the evaluation of that step, and the interrupt's checkpoint saved it: the
    evaluation (and its medium / expert candidates) was skipped for good."""
    real_eval, real_update, calls = sac.evaluate_policy, sac.SAC.update, {"n": 0}

    def interrupting_eval(actor, env_name, episodes, seed):
        if seed == {"screen": 10_000_300, "long evaluation": 20_000_300}.get(where) and not calls["n"]:
            calls["n"] += 1
            raise KeyboardInterrupt
        return real_eval(actor, env_name, episodes, seed)

    def interrupting_update(self, *batch):
        if where == "update" and self.num_updates == 199 and not calls["n"]:   # the update of step 300
            calls["n"] += 1
            raise KeyboardInterrupt
        return real_update(self, *batch)

    monkeypatch.setattr(sac, "evaluate_policy", interrupting_eval)
    monkeypatch.setattr(sac.SAC, "update", interrupting_update)
    state, pol, logs = tmp_path / "s", tmp_path / "p", []
    with pytest.raises(KeyboardInterrupt):
        train_behaviour_policy("hopper", state, pol, total_steps=600, log=logs.append, **EVALUATED)
    assert calls["n"] == 1
    saved = json.loads(torch.load(state / "state.pt", weights_only=True)["meta"])
    assert saved["env_steps"] == 300 and saved["medium_step"] is None      # nothing of the evaluation kept
    meta = train_behaviour_policy("hopper", state, pol, total_steps=600, log=logs.append, **EVALUATED)
    steps = [json.loads(line)["step"] for line in (state / "progress.jsonl").read_text().splitlines()]
    assert steps == [300, 600]
    assert "hopper: running the evaluation of step 300 that an interrupt cut short" in logs
    assert meta["medium_step"] in (300, 600) and "eval_pending" not in meta


def test_an_evaluation_cut_short_at_total_steps_runs_on_resume(tmp_path, monkeypatch):
    """At the last step the resume said "nothing left to train" and made the expert final without it."""
    real_eval = sac.evaluate_policy

    def interrupting_eval(actor, env_name, episodes, seed):
        if seed == 10_000_300:
            raise KeyboardInterrupt
        return real_eval(actor, env_name, episodes, seed)

    monkeypatch.setattr(sac, "evaluate_policy", interrupting_eval)
    state, pol, logs = tmp_path / "s", tmp_path / "p", []
    with pytest.raises(KeyboardInterrupt):
        train_behaviour_policy("hopper", state, pol, total_steps=300, log=logs.append, **EVALUATED)
    monkeypatch.setattr(sac, "evaluate_policy", real_eval)
    meta = train_behaviour_policy("hopper", state, pol, total_steps=300, log=logs.append, **EVALUATED)
    assert [json.loads(line)["step"] for line in (state / "progress.jsonl").read_text().splitlines()] == [300]
    assert meta["best_step"] == 300 and torch.load(pol / "expert.pt", weights_only=True)["final"] is True


# ----------------------------------------------------------------------------------------------------------------
# 5. the state's seed
# ----------------------------------------------------------------------------------------------------------------

def test_a_resume_with_another_seed_uses_the_states_seed(tmp_path, monkeypatch):
    """The note said the state's seed is used, but the episodes' env seeds followed the asked one."""
    seeds, real = [], envs_module.make_env

    def recording_make_env(*args, **kwargs):
        env = real(*args, **kwargs)
        reset = env.reset

        def recorded_reset(*a, seed=None, **kw):
            seeds.append(seed)
            return reset(*a, seed=seed, **kw)

        env.reset = recorded_reset
        return env

    state, pol, logs = tmp_path / "s", tmp_path / "p", []
    train_behaviour_policy("hopper", state, pol, total_steps=400, max_seconds=1e-6, log=logs.append, **QUIET)
    monkeypatch.setattr(envs_module, "make_env", recording_make_env)
    meta = train_behaviour_policy("hopper", state, pol, total_steps=400, seed=5, log=logs.append, **QUIET)
    assert "note: resuming with the state's seed 0 (asked 5)" in logs
    assert meta["seed"] == 0 and meta["env_steps"] == 400
    given = [s for s in seeds if s is not None]
    assert given and all(s < 1_000_003 for s in given), given          # 0 * 1_000_003 + episodes


# ----------------------------------------------------------------------------------------------------------------
# 6. generation: an unfinished expert, every policy checked first
# ----------------------------------------------------------------------------------------------------------------

def test_generation_refuses_an_unfinished_expert_unless_allowed(tmp_path, capsys):
    """README: "Generation refuses an unfinished expert"; the tool only warned and wrote the dataset."""
    gen = load_script("data/generate_datasets.py")
    pol, data = tmp_path / "pol", tmp_path / "data"
    save_actor(pol / "hopper" / "medium.pt", "hopper", 1, 3000, kind="medium")
    expert = save_actor(pol / "hopper" / "expert.pt", "hopper", 2, 500, kind="expert", eval_score=70.0)
    for dataset in ("expert", "medium-expert"):
        msg = fails(gen.main, ["--env", "hopper", "--dataset", dataset, "--num_transitions", "300", "--data_path",
                               data, "--policy_dir", pol, "--no_progress"], capsys)
        assert msg == (f"error: {expert}: an expert policy from unfinished training (step 500, eval score 70.0); "
                       f"hopper-{dataset} is not generated from it: train on (data/train_behaviour_policies.py), "
                       f"or pass --allow_unfinished to use it anyway")
    assert not data.exists() or not list(data.iterdir())
    with pytest.warns(RuntimeWarning, match="expert policy from unfinished training"):
        gen.main(["--env", "hopper", "--dataset", "expert", "--num_transitions", "300", "--data_path", str(data),
                  "--policy_dir", str(pol), "--no_progress", "--no_hdf5", "--allow_unfinished"])
    assert (data / "hopper-expert-v2.pkl").is_file()


def test_a_broken_expert_is_found_before_the_medium_half_is_generated(tmp_path, capsys, monkeypatch):
    """medium-expert rolled out the whole medium half before it loaded expert.pt; the tool wrote the medium dataset
    of ``--dataset medium expert`` before it found the expert broken."""
    pol, data = tmp_path / "pol", tmp_path / "data"
    save_actor(pol / "hopper" / "medium.pt", "hopper", 1, 3000, kind="medium")
    broken = pol / "hopper" / "expert.pt"
    broken.write_bytes(b"PK\x03\x04 not a checkpoint")
    rollouts = []
    real = generation.rollout_policy
    monkeypatch.setattr(generation, "rollout_policy", lambda *a, **k: rollouts.append(a) or real(*a, **k))
    with pytest.raises(UserError, match=f"{broken}: not a readable policy file"):
        generation.generate_flat("hopper", "medium-expert", 200, policy_dir=pol)
    assert rollouts == []
    gen = load_script("data/generate_datasets.py")
    msg = fails(gen.main, ["--env", "hopper", "--dataset", "medium", "expert", "--num_transitions", "300",
                           "--data_path", data, "--policy_dir", pol, "--no_progress"], capsys)
    assert msg.startswith(f"error: {broken}: not a readable policy file")
    assert rollouts == [] and (not data.exists() or not list(data.iterdir()))


def test_a_nan_score_an_earlier_version_stored_counts_as_none(tmp_path):
    """Such a best_eval was beaten by no later score, and such an expert screen let no later screen in."""
    state, pol, logs = tmp_path / "s", tmp_path / "p", []
    train_behaviour_policy("hopper", state, pol, total_steps=200, log=logs.append, **EVALUATED)
    _edit_meta(state / "state.pt", best_eval=float("nan"), best_step=100, expert_screen=float("nan"))
    meta = train_behaviour_policy("hopper", state, pol, total_steps=300, log=logs.append, **EVALUATED)
    assert f"note: {state / 'state.pt'}: its best_eval is nan; treated as none yet" in logs
    assert meta["best_step"] == 300 and np.isfinite(meta["best_eval"]) and np.isfinite(meta["expert_screen"])


def test_a_policy_dir_under_a_file_is_refused_before_any_folder_is_made(tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder\n")
    main = load_script("data/train_behaviour_policies.py").main
    msg = fails(main, ["--env", "hopper", "--total_steps", "300", "--state_dir", tmp_path / "state", "--policy_dir",
                       tmp_path / "afile"], capsys)
    assert msg == f"error: --policy_dir writes to {tmp_path / 'afile' / 'hopper' / 'replay'}/, but " \
                  f"{tmp_path / 'afile'} is a file"
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]
