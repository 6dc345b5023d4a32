"""WandB: credentials found as wandb finds them, a WandB that cannot start is one line, crashed and interrupted runs are
marked failed, merge runs have names of their own, a sweep agent's run id is the one recorded, the whole-suite driver
passes the WandB project on, and the user's WandB settings stay out of the tests. Offline runs are read back from
their ``.wandb`` files."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from conftest import ROOT, fails, load_script, write_source_models
from decision_transformer.errors import UserError
from decision_transformer.runlog import RunLogger, check_wandb_mode, wandb_credentials_present

KEY = "k" * 40   # (wandb checks a key's form: 40 characters)
TINY = ["--embed_dim", "16", "--n_layer", "1", "--K", "5", "--batch_size", "8", "--warmup_steps", "10",
        "--num_steps_per_iter", "2", "--num_eval_episodes", "0"]


def finished_records(wandb_dir: Path, run_id: str | None = None, wait: float = 10.0) -> dict:
    """``wandb_records`` once the run's ``exit`` record is there: wandb's writer process can append it tens of
    milliseconds after ``run.finish()`` returns. Gives up after ``wait`` seconds (``exit`` is then None)."""
    deadline = time.monotonic() + wait
    records = wandb_records(wandb_dir, run_id)
    while records["exit"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
        records = wandb_records(wandb_dir, run_id)
    return records


def wandb_records(wandb_dir: Path, run_id: str | None = None) -> dict:
    """The records of the offline run ``run_id`` (the only one when None) under ``wandb_dir``, by type: ``run``
    (the last), ``exit`` (the last; None when the run was not finished). Reads the LevelDB-style log wandb writes:
    a 7-byte header, then 32 KiB blocks of chunks (crc, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(wandb_dir.glob(f"wandb/offline-run-*-{run_id or '*'}/run-*.wandb"))
    assert files and (run_id or len(files) == 1), files
    out = {"run": None, "exit": None}
    for path in files:
        data, pos, buf = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:   # a block's tail too short for a chunk header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 2):
                buf = chunk
            elif kind in (3, 4):
                buf += chunk
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(buf)
                which = record.WhichOneof("record_type")
                if which in out:
                    out[which] = getattr(record, which)
    return out


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """WandB offline into ``tmp_path/wb`` (a fresh wandb session: wandb reads its variables once per session)."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    folder = tmp_path / "wb"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield folder
    wandb.teardown()


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """No key and no netrc; wandb's settings files are those of ``tmp_path`` (the working folder)."""
    for k in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


# 1. credentials for the server wandb logs to

def test_credentials_are_those_of_the_server_wandb_logs_to(no_credentials, monkeypatch):
    """A netrc key counts for wandb's own default server (``wandb login`` writes it under that host), for
    ``WANDB_BASE_URL``'s host, for the ``base_url`` of wandb's settings file (``wandb login --host``), and not for
    another host; the answers agree with wandb's own netrc reader."""
    from urllib.parse import urlsplit

    from wandb.sdk.wandb_settings import Settings

    netrc, tmp = no_credentials / "netrc", no_credentials
    default_host = urlsplit(Settings().base_url).netloc

    def found(machine: str) -> bool:
        netrc.write_text(f"machine {machine}\n  login user\n  password {KEY}\n")
        present = wandb_credentials_present()
        try:
            from wandb.sdk.lib.wbauth import read_netrc_auth   # (this wandb's reader, where it has one)
            from decision_transformer.runlog import wandb_base_url

            assert present == bool(read_netrc_auth(host=wandb_base_url())), machine
        except ImportError:
            pass
        return present

    assert not wandb_credentials_present()                      # no netrc at all
    assert found(default_host)                                  # `wandb login` of this wandb
    assert not found("wandb.example.org")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert found("wandb.example.org")                           # a self-hosted server
    assert not found("api.wandb.ai")                            # a key for another server is not one for it
    monkeypatch.delenv("WANDB_BASE_URL")
    (tmp / "wandb-config").mkdir()
    (tmp / "wandb-config" / "settings").write_text("[default]\nbase_url = https://wb.corp.example:8443\n")
    assert found("wb.corp.example:8443")                        # `wandb login --host https://wb.corp.example:8443`
    assert not found(default_host)
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert wandb_credentials_present()


# 2. a WandB that cannot start: one line, before files are written

def test_online_without_credentials_stops_before_the_data_is_read(no_credentials, monkeypatch, capsys):
    """``WANDB_MODE=online`` with no key: the scripts' first checks stop (no dataset read, nothing written), with the
    cause and the remedies."""
    import experiment

    monkeypatch.setenv("WANDB_MODE", "online")
    argv = ["--data_path", no_credentials / "no-data", "--no_generate", "--outdir", "out", "-w", *TINY]
    line = fails(experiment.main, argv, capsys)
    assert line.startswith("error: WANDB_MODE=online, but no WandB credentials for ") and "wandb login" in line
    assert "WANDB_MODE=offline" in line
    assert not (no_credentials / "out").exists()


def test_a_wandb_that_cannot_start_is_a_user_error(no_credentials, monkeypatch):
    """``wandb.init`` failing (server unreachable: CommError; refused settings: UsageError) or wandb not importable:
    a ``UserError`` naming the cause and the remedies, and the run folder's files are not written."""
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", KEY)   # credentials present: wandb goes online, and fails there
    run = no_credentials / "run"

    def init_fails(error):
        def init(**kwargs):
            raise error
        return init

    monkeypatch.setattr(wandb, "init", init_fails(wandb.errors.CommError(
        'Timed out while retrying: Post "https://wb.example/graphql": connection refused\nConsider ...')))
    with pytest.raises(UserError) as e:
        RunLogger(run, {"a": 1}, use_wandb=True)
    assert str(e.value).startswith("WandB could not reach ") and "connection refused" in str(e.value)
    assert "WANDB_BASE_URL" in str(e.value) and "WANDB_MODE=offline" in str(e.value) and "Consider" not in str(e.value)
    assert not (run / "config.json").exists()
    monkeypatch.setattr(wandb, "init", init_fails(wandb.errors.AuthenticationError("API key not valid")))
    with pytest.raises(UserError, match=r"WandB refused the credentials for .*`wandb login --relogin`"):
        RunLogger(run, {"a": 1}, use_wandb=True)
    monkeypatch.setattr(wandb, "init", init_fails(wandb.errors.UsageError("No API key configured.")))
    with pytest.raises(UserError, match=r"WandB could not start the run \(No API key configured.\); log in with"):
        RunLogger(run, {"a": 1}, use_wandb=True)
    monkeypatch.setitem(sys.modules, "wandb", None)   # import wandb fails
    with pytest.raises(UserError, match="the wandb package is not installed"):
        check_wandb_mode()
    with pytest.raises(UserError, match="wandb package is not installed"):
        RunLogger(run, {"a": 1}, use_wandb=True)
    assert not (run / "config.json").exists()


# 3. a crashed or interrupted run is marked failed

def test_finish_records_the_exit_code_of_the_error_on_its_way_out(offline):
    """``finish()`` in a ``finally`` (as the scripts call it): 130 on Ctrl-C; an error handled around the run is not
    the run's (0); an explicit error: its exit code."""
    logger = RunLogger(None, {}, use_wandb=True)
    interrupted = logger.wandb_run.id
    with pytest.raises(KeyboardInterrupt):
        try:
            raise KeyboardInterrupt
        finally:
            logger.finish()
    assert finished_records(offline, interrupted)["exit"].exit_code == 130
    try:
        raise ValueError("handled by the caller")
    except ValueError:
        logger = RunLogger(None, {}, use_wandb=True)
        finished = logger.wandb_run.id
        logger.finish()
    assert finished_records(offline, finished)["exit"].exit_code == 0
    logger = RunLogger(None, {}, use_wandb=True)
    crashed = logger.wandb_run.id
    logger.finish(RuntimeError("boom"))
    assert finished_records(offline, crashed)["exit"].exit_code == 1


# 3 and 6, end to end: a sweep agent's run stopped by Ctrl-C

def test_an_interrupted_sweep_run_is_failed_and_records_the_agents_run_id(offline, tmp_path, monkeypatch, capsys,
                                                                          hopper_data):
    """experiment.py -w under a sweep agent (WANDB_SWEEP_ID, WANDB_RUN_ID), Ctrl-C in iteration 2: exit 130, the
    WandB run (the agent's id, not the one the toolkit drew) ends with exit code 130, and config.json and the training
    state record the agent's id, which --resume continues."""
    import experiment
    from decision_transformer.runlog import recorded_wandb_id
    from decision_transformer.training import Trainer

    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep123")
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun1")
    train_iteration = Trainer.train_iteration

    def stop_in_2(self, num_steps, iteration, bar=None):
        if iteration == 2:
            raise KeyboardInterrupt
        return train_iteration(self, num_steps, iteration, bar)

    monkeypatch.setattr(Trainer, "train_iteration", stop_in_2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        experiment.main(["--data_path", str(hopper_data), "--max_iters", "3", "-w", *TINY])
    assert e.value.code == 130
    records = finished_records(offline)
    assert records["run"].run_id == "agentrun1" and records["exit"].exit_code == 130
    rd = tmp_path / "checkpoints" / "dt_medium_hopper_666_K5"
    assert json.loads((rd / "config.json").read_text())["wandb_run_id"] == "agentrun1"
    (rd / "config.json").unlink()
    assert recorded_wandb_id(rd) == "agentrun1"                 # (read from the training state)


def test_a_sweep_agents_run_id_is_recorded_and_resumed(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep123")
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun2")
    config = {"a": 1}
    logger = RunLogger(tmp_path / "run", config, use_wandb=True)
    logger.log({"x": 1.0}, 1)
    logger.finish()
    assert config["wandb_run_id"] == "agentrun2"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["wandb_run_id"] == "agentrun2"
    import wandb

    wandb.teardown()
    monkeypatch.delenv("WANDB_SWEEP_ID")
    monkeypatch.delenv("WANDB_RUN_ID")
    config = {"a": 1}
    logger = RunLogger(tmp_path / "run", config, use_wandb=True, resume=True, resume_after=1)
    assert logger.wandb_run.id == "agentrun2" and config["wandb_run_id"] == "agentrun2"
    logger.finish()


# 4. merge runs: a WandB name of their own; the readers keep finding plain runs by their TAKAGI name

def test_a_merge_run_has_its_own_wandb_name(offline, tmp_path, monkeypatch):
    """A merge run's name is the plain run's plus ``-{exp_id}`` (as its folder), so that --from_wandb, which reads
    runs by the plain name, does not take it for the plain run."""
    import experiment

    root, data, paths = write_source_models(tmp_path / "src", ("hopper", "walker2d"), n=300, max_ep_len=50,
                                            id_base=500000)
    monkeypatch.chdir(tmp_path)
    experiment.main(["--env", "hopper", "--data_path", str(data), "--pretrained_models", str(paths["hopper"]),
                     str(paths["walker2d"]), "--include", "attn", "--copy_model", "--max_iters", "1", "-w", *TINY])
    (rd,) = (tmp_path / "checkpoints").glob("dt_medium_hopper_666_K5_*")
    exp_id = json.loads((rd / "config.json").read_text())["exp_id"]
    assert rd.name.endswith(f"_{exp_id}")
    assert finished_records(offline)["run"].display_name == f"gym-experiment-hopper-medium-dt-666-K5-{exp_id}"


def test_from_wandb_leaves_out_merge_runs_of_the_plain_name(monkeypatch):
    """Merge runs logged before their names carried the run id have the plain run's name: the reader leaves them out
    by their config (--pretrained_models), and finds the plain run."""
    from decision_transformer.analysis import curves
    from decision_transformer.analysis.runs import RunKey

    name = "gym-experiment-hopper-medium-dt-666"

    class Run:
        def __init__(self, config, values):
            self.name, self.state, self.config, self.values = name, "finished", config, values

        def scan_history(self):
            return [{"_step": i, "evaluation/target_3600_return_mean": v} for i, v in enumerate(self.values)]

    runs = [Run({"pretrained_models": []}, [5.0, 7.0]), Run({"pretrained_models": ["a.pt", "b.pt"]}, [1.0])]

    class Api:
        def runs(self, path, filters=None):
            return [r for r in runs if r.name == filters["display_name"]]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=Api))
    rows = curves.run_metrics("unused", RunKey("dt", "medium", "hopper", 666), True)
    assert curves.metric_series(rows, "evaluation/target_3600_return_mean")[1].tolist() == [5.0, 7.0]
    del runs[0]
    with pytest.raises(UserError, match=rf"no finished WandB run named {name} in decision-transformer \(1 merge"):
        curves.run_metrics("unused", RunKey("dt", "medium", "hopper", 666), True)


# 5. the whole-suite driver passes the WandB project and entity on

def test_run_all_reads_the_wandb_project_and_entity_it_is_given(tmp_path, monkeypatch):
    asked = []

    class Run:
        name, state, config = "gym-experiment-hopper-medium-dt-666", "finished", {}

        def scan_history(self):
            return [{"_step": 0, "evaluation/target_3600_return_mean": 10.0}]

    class Api:
        def runs(self, path, filters=None):
            asked.append(path)
            return [Run()] if filters["display_name"] == Run.name else []

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=Api))
    run_folder = tmp_path / "ck" / "dt_medium_hopper_666"
    run_folder.mkdir(parents=True)
    (run_folder / "metrics.jsonl").write_text('{"iteration": 1}\n')   # (a run found; its metrics come from WandB)
    main = load_script("analysis/run_all.py").main
    main(["--checkpoint_dir", str(tmp_path / "ck"), "--out_dir", str(tmp_path / "out"), "--only", "scores",
          "--from_wandb", "--wandb_project", "dtproj", "--wandb_entity", "me"])
    assert asked and set(asked) == {"me/dtproj"}


# 8. the user's WandB settings do not reach the tests

def test_the_users_wandb_settings_do_not_reach_the_tests(tmp_path):
    """pytest started with a user's WandB variables set runs the check below with none of them."""
    user = {"WANDB_DIR": str(tmp_path / "user-wandb"), "WANDB_MODE": "online", "WANDB_API_KEY": KEY,
            "WANDB_BASE_URL": "https://wb.user.example", "WANDB_RUN_ID": "userrun", "WANDB_SWEEP_ID": "usersweep",
            "WANDB_CONFIG_DIR": str(tmp_path / "user-config"), "NETRC": str(tmp_path / "user-netrc")}
    (tmp_path / "user-netrc").write_text(f"machine wb.user.example login u password {KEY}\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-p",
                           "no:randomly", f"{Path(__file__).name}::test_wandb_variables_are_the_tests_own"],
                          cwd=ROOT / "tests", env={**os.environ, **user}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_wandb_variables_are_the_tests_own():
    assert os.environ["WANDB_MODE"] == "disabled"
    for name in ("WANDB_DIR", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_RUN_ID", "WANDB_SWEEP_ID"):
        assert name not in os.environ, name
    assert "user-" not in os.environ["WANDB_CONFIG_DIR"] + os.environ["NETRC"]
    assert not wandb_credentials_present()
