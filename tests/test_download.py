"""The D4RL converter (data/download_d4rl_datasets.py --hdf5) on small hdf5 files made here, and the downloader
against a local HTTP server on 127.0.0.1 that supports Range requests (resume, broken transfers, servers that
ignore ranges, checksum and size mismatches, no network)."""
from __future__ import annotations

import hashlib
import http.server
import importlib.util
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest

from decision_transformer import download
from decision_transformer.data import safe_pickle_load
from decision_transformer.download import download_file
from decision_transformer.errors import UserError
from decision_transformer.synthetic import write_hdf5

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("download_script", ROOT / "data" / "download_d4rl_datasets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


script = _load_script()


# ----------------------------------------------------------------------------------------------------------------
# Converter
# ----------------------------------------------------------------------------------------------------------------

def flat(n, dtype=np.float32, seed=0, ds=11, da=3):
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, ds)).astype(dtype)
    return {"observations": obs, "next_observations": obs + 1, "actions": rng.uniform(-1, 1, (n, da)).astype(dtype),
            "rewards": np.arange(n, dtype=dtype), "terminals": np.zeros(n, bool), "timeouts": np.zeros(n, bool)}


def test_convert_splits_at_terminals_and_timeouts_and_drops_tail(tmp_path):
    d = flat(20, dtype=np.float64)          # float64 as medium-replay
    d["terminals"][[4, 9]] = True           # episodes [0..4], [5..9]
    d["timeouts"][14] = True                # [10..14]; rows 15..19 are an unfinished tail
    src = write_hdf5(tmp_path / "hopper_medium_replay-v2.hdf5", d)
    out = Path(script.convert(str(src), str(tmp_path / "out")))
    assert out.name == "hopper-medium-replay-v2.pkl"
    trajs = safe_pickle_load(out)
    assert [len(t["rewards"]) for t in trajs] == [5, 5, 5]
    assert [t["rewards"][0] for t in trajs] == [0, 5, 10]
    assert [bool(t["terminals"][-1]) for t in trajs] == [True, True, False]   # a timeout is not a terminal
    for t in trajs:
        assert set(t) == {"observations", "next_observations", "actions", "rewards", "terminals"}
        assert all(t[k].dtype == np.float32 for k in ("observations", "next_observations", "actions", "rewards"))
        assert t["terminals"].dtype == bool
    np.testing.assert_array_equal(trajs[1]["observations"], d["observations"][5:10].astype(np.float32))


def test_convert_without_timeouts_uses_the_originals_counter(tmp_path):
    d = flat(2600)
    del d["timeouts"]
    d["terminals"][2200] = True
    src = write_hdf5(tmp_path / "hopper_medium-v2.hdf5", d)
    trajs = safe_pickle_load(script.convert(str(src), str(tmp_path)))
    # first episode 1000 steps, then 999 (the originals' off-by-one), then up to the terminal; tail dropped
    assert [len(t["rewards"]) for t in trajs] == [1000, 999, 202]
    assert sum(len(t["rewards"]) for t in trajs) == 2201


def test_convert_rejects_bad_names_and_files(tmp_path):
    bad = tmp_path / "hopper-medium.hdf5"
    bad.write_bytes(b"x")
    with pytest.raises(UserError, match="not a D4RL gym-mujoco v2 file name"):
        script.convert(str(bad), str(tmp_path))
    junk = tmp_path / "hopper_medium-v2.hdf5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(UserError, match="hopper_medium-v2.hdf5"):
        script.convert(str(junk), str(tmp_path))
    assert not (tmp_path / "hopper-medium-v2.pkl").exists()


# ----------------------------------------------------------------------------------------------------------------
# A loopback HTTP server with Range support
# ----------------------------------------------------------------------------------------------------------------

class Server:
    """Serves ``files`` (name -> bytes) on 127.0.0.1. Options: ``ignore_range`` (always 200 + whole body) and
    ``break_after`` (the first full response is cut after that many bytes)."""

    def __init__(self, files, ignore_range=False, break_after=None):
        self.files, self.ignore_range, self.break_after = files, ignore_range, break_after
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                outer.requests.append((name, rng))
                if name not in outer.files:
                    self.send_error(404)
                    return
                body = outer.files[name]
                start = 0
                if rng and not outer.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                chunk = body[start:]
                self.send_header("Content-Length", str(len(chunk)))
                self.end_headers()
                if outer.break_after is not None and start == 0:
                    outer.break_after, cut = None, outer.break_after
                    self.wfile.write(chunk[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(2)   # drop the connection mid-body
                    return
                self.wfile.write(chunk)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


PAYLOAD = np.random.default_rng(0).bytes(300_000)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def test_download_resumes_a_partial_file(tmp_path):
    dest = tmp_path / "f.hdf5"
    (tmp_path / "f.hdf5.part").write_bytes(PAYLOAD[:100_000])
    with Server({"f.hdf5": PAYLOAD}) as s:
        download_file(f"{s.url}/f.hdf5", dest, size=len(PAYLOAD), sha256=DIGEST, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert s.requests == [("f.hdf5", "bytes=100000-")]
    assert not (tmp_path / "f.hdf5.part").exists()


def test_download_resumes_after_a_broken_connection(tmp_path):
    dest = tmp_path / "f.hdf5"
    with Server({"f.hdf5": PAYLOAD}, break_after=70_000) as s:
        download_file(f"{s.url}/f.hdf5", dest, size=len(PAYLOAD), sha256=DIGEST, progress=False, timeout=5)
    assert dest.read_bytes() == PAYLOAD
    assert len(s.requests) == 2 and s.requests[0][1] is None
    assert s.requests[1][1].startswith("bytes=") and int(s.requests[1][1][6:-1]) > 0


def test_download_restarts_when_the_server_ignores_ranges(tmp_path):
    dest = tmp_path / "f.hdf5"
    (tmp_path / "f.hdf5.part").write_bytes(b"garbage" * 10)
    with Server({"f.hdf5": PAYLOAD}, ignore_range=True) as s:
        download_file(f"{s.url}/f.hdf5", dest, size=len(PAYLOAD), sha256=DIGEST, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert s.requests == [("f.hdf5", "bytes=70-")]   # asked to resume, got the whole file, started over


def test_checksum_mismatch_deletes_the_download(tmp_path):
    dest = tmp_path / "f.hdf5"
    with Server({"f.hdf5": PAYLOAD}) as s, pytest.raises(UserError, match="sha256 mismatch") as e:
        download_file(f"{s.url}/f.hdf5", dest, size=len(PAYLOAD), sha256="0" * 64, progress=False)
    assert "\n" not in str(e.value)
    assert not dest.exists() and not (tmp_path / "f.hdf5.part").exists()


def test_size_mismatch_and_http_errors(tmp_path):
    with Server({"f.hdf5": PAYLOAD}) as s:
        with pytest.raises(UserError, match="size mismatch"):
            download_file(f"{s.url}/f.hdf5", tmp_path / "f.hdf5", size=len(PAYLOAD) - 5, progress=False)
        with pytest.raises(UserError, match="HTTP 404"):
            download_file(f"{s.url}/missing.hdf5", tmp_path / "m.hdf5", progress=False)
    with pytest.raises(UserError, match="only http"):
        download_file("file:///etc/passwd", tmp_path / "x", progress=False)


@pytest.mark.parametrize("ignore_range", [False, True])
def test_a_served_file_shorter_than_expected_is_a_size_mismatch_at_once(tmp_path, ignore_range):
    """A mirror whose file is shorter than D4RL's, sent whole: "download incomplete after 5 attempts ... run again to
    resume" (each run fetched it again, forever) became the size mismatch, after one request."""
    with Server({"f.hdf5": PAYLOAD}, ignore_range=ignore_range) as s:
        with pytest.raises(UserError, match=f"^f.hdf5: size mismatch \\({len(PAYLOAD)} bytes, expected "
                                            f"{len(PAYLOAD) + 5}\\); the partial file was deleted$"):
            download_file(f"{s.url}/f.hdf5", tmp_path / "f.hdf5", size=len(PAYLOAD) + 5, progress=False, retry_wait=0)
    assert s.requests == [("f.hdf5", None)]
    assert not (tmp_path / "f.hdf5.part").exists() and not (tmp_path / "f.hdf5").exists()


def test_no_network_with_a_partial_download_is_the_offline_advice(tmp_path, capsys):
    """A ``.part`` left by an earlier run and no network: the same one-line advice as without one (not "incomplete
    after 5 attempts"), the part kept for a later run."""
    url = _closed_port_url()
    part = tmp_path / "hopper_medium-v2.hdf5.part"
    part.write_bytes(b"x" * 1000)
    with pytest.raises(SystemExit) as e:
        script.main(["--envs", "hopper", "--datasets", "medium", "--hdf5_dir", str(tmp_path),
                     "--data_path", str(tmp_path), "--base_url", url, "--no_progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot download") and "--hdf5" in err and "\n" not in err, err
    assert err.endswith(f"(the 1000 bytes downloaded so far are kept in {part}: run again to resume)"), err
    assert part.read_bytes() == b"x" * 1000


def _closed_port_url():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    return f"http://127.0.0.1:{port}"


def test_no_network_gives_one_line_advice(tmp_path, capsys):
    url = _closed_port_url()
    with pytest.raises(SystemExit) as e:
        script.main(["--envs", "hopper", "--datasets", "medium", "--hdf5_dir", str(tmp_path),
                     "--data_path", str(tmp_path), "--base_url", url, "--no_progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot download") and "--hdf5" in err and "\n" not in err
    assert "Traceback" not in err


def test_download_and_convert_end_to_end(tmp_path, monkeypatch):
    from decision_transformer.synthetic import rollout_flat

    src = write_hdf5(tmp_path / "src" / "hopper_medium-v2.hdf5", rollout_flat("hopper", 400, seed=1, max_ep_len=100))
    body = src.read_bytes()
    monkeypatch.setitem(download.D4RL_FILES, "hopper_medium-v2.hdf5", (len(body), hashlib.sha256(body).hexdigest()))
    with Server({"hopper_medium-v2.hdf5": body}) as s:
        monkeypatch.setenv("D4RL_BASE_URL", s.url)
        script.main(["--envs", "hopper", "--datasets", "medium", "--hdf5_dir", str(tmp_path / "cache"),
                     "--data_path", str(tmp_path / "out"), "--no_progress"])
        # a second run finds the verified file and does not download again
        script.main(["--envs", "hopper", "--datasets", "medium", "--hdf5_dir", str(tmp_path / "cache"),
                     "--data_path", str(tmp_path / "out"), "--no_progress"])
    assert len(s.requests) == 1
    trajs = safe_pickle_load(tmp_path / "out" / "hopper-medium-v2.pkl")
    assert sum(len(t["rewards"]) for t in trajs) <= 400 and len(trajs) >= 4
    # a cached file that does not match D4RL's checksum is reported, not silently used
    monkeypatch.setitem(download.D4RL_FILES, "hopper_medium-v2.hdf5", (len(body), "1" * 64))
    with pytest.raises(UserError, match="does not match"):
        download.fetch_d4rl("hopper_medium-v2.hdf5", tmp_path / "cache", progress=False)


def test_d4rl_table_matches_the_reference():
    assert len(download.D4RL_FILES) == 15
    assert download.D4RL_FILES["walker2d_medium_replay-v2.hdf5"][0] == 86_323_963
    assert all(len(h) == 64 for _, h in download.D4RL_FILES.values())


def test_synthetic_writes_whole_random_episodes_in_d4rl_layout(tmp_path, capsys):
    from decision_transformer.data import read_hdf5

    script.main(["--synthetic", "3", "--envs", "hopper", "--datasets", "medium", "random",
                 "--hdf5_dir", str(tmp_path / "h5"), "--data_path", str(tmp_path / "out")])
    for ds, name in (("medium", "hopper_medium-v2.hdf5"), ("random", "hopper_random-v2.hdf5")):
        flat = read_hdf5(tmp_path / "h5" / name)
        ends = flat["terminals"] | flat["timeouts"]
        assert ends.sum() == 3 and ends[-1]                  # three whole episodes, nothing cut
        trajs = safe_pickle_load(tmp_path / "out" / f"hopper-{ds}-v2.pkl")
        assert len(trajs) == 3 and sum(len(t["rewards"]) for t in trajs) == len(ends)
    # different seeds per dataset
    a = read_hdf5(tmp_path / "h5" / "hopper_medium-v2.hdf5")["actions"]
    b = read_hdf5(tmp_path / "h5" / "hopper_random-v2.hdf5")["actions"]
    assert not np.array_equal(a[:5], b[:5])
    with pytest.raises(SystemExit) as e:
        script.main(["--synthetic", "0", "--hdf5_dir", str(tmp_path / "h5")])
    assert e.value.code == 2 and "positive number of episodes" in capsys.readouterr().err


def test_a_synthetic_stand_in_in_d4rls_cache_is_never_taken_for_the_dataset(tmp_path, monkeypatch, capsys):
    """--synthetic's hdf5 files go to D4RL's cache by default: the training scripts, looking for a dataset missing
    from their --data_path, used to train on such a smoke-test file. It is marked and passed over there (the dataset
    is then generated or reported missing); in --data_path itself it is used, with a warning; an unmarked hdf5 in
    the cache is still read."""
    import shutil

    from decision_transformer.data import find_dataset_file
    from decision_transformer.errors import UserError
    from decision_transformer.synthetic import rollout_flat

    cache = tmp_path / "cache"
    monkeypatch.setenv("D4RL_DATASET_DIR", str(cache))
    script.main(["--synthetic", "2", "--envs", "hopper", "--datasets", "medium", "--hdf5_dir", str(cache),
                 "--data_path", str(tmp_path / "synth")])
    capsys.readouterr()
    with pytest.raises(UserError, match="dataset not found"):
        find_dataset_file(tmp_path / "empty", "hopper", "medium")
    assert f"{cache / 'hopper_medium-v2.hdf5'} is a --synthetic smoke-test stand-in" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    shutil.copy(cache / "hopper_medium-v2.hdf5", tmp_path / "mine")
    assert find_dataset_file(tmp_path / "mine", "hopper", "medium") == tmp_path / "mine" / "hopper_medium-v2.hdf5"
    err = capsys.readouterr().err
    assert "warning: " in err and "smoke-test stand-in (2 uniform-random-policy episodes" in err
    (cache / "hopper_medium-v2.hdf5").unlink()
    write_hdf5(cache / "hopper_medium-v2.hdf5", rollout_flat("hopper", 300, seed=1, max_ep_len=100))
    assert find_dataset_file(tmp_path / "empty", "hopper", "medium") == cache / "hopper_medium-v2.hdf5"


def test_a_stand_ins_pickle_is_marked_and_hdf5_conversion_keeps_an_existing_pickle(tmp_path, capsys):
    """--synthetic also converts its stand-ins into --data_path, where the training scripts read the pkl first: the
    pkl carries the mark (a `.synthetic` file beside it) and reading it warns, as reading the stand-in hdf5 does;
    --hdf5 of a stand-in marks its pkl too. --hdf5 does not replace an existing pkl without --force, and a pkl
    written over a marked one (the real conversion, generation) drops the mark."""
    from decision_transformer.data import find_dataset_file
    from decision_transformer.synthetic import make_dataset, rollout_flat

    synth = tmp_path / "synth"
    script.main(["--synthetic", "2", "--envs", "hopper", "--datasets", "medium", "--hdf5_dir", str(tmp_path / "h5"),
                 "--data_path", str(synth)])
    assert "is marked as one" in capsys.readouterr().err
    assert find_dataset_file(synth, "hopper", "medium") == synth / "hopper-medium-v2.pkl"
    assert "warning: " + str(synth / "hopper-medium-v2.pkl") + " is a smoke-test stand-in (2 uniform-random-policy" \
        in capsys.readouterr().err
    mine = tmp_path / "mine"
    make_dataset(mine, "hopper", "medium", 400, max_ep_len=100)
    before = (mine / "hopper-medium-v2.pkl").read_bytes()
    with pytest.raises(SystemExit) as e:
        script.main(["--hdf5", str(tmp_path / "h5" / "hopper_medium-v2.hdf5"), "--data_path", str(mine)])
    assert e.value.code == 2 and (mine / "hopper-medium-v2.pkl").read_bytes() == before
    assert f"error: {mine / 'hopper-medium-v2.pkl'} exists: converting" in capsys.readouterr().err
    script.main(["--hdf5", str(tmp_path / "h5" / "hopper_medium-v2.hdf5"), "--data_path", str(mine), "--force"])
    assert (mine / "hopper-medium-v2.synthetic").is_file()
    real = tmp_path / "real" / "hopper_medium-v2.hdf5"
    write_hdf5(real, rollout_flat("hopper", 300, seed=1, max_ep_len=100))
    script.main(["--hdf5", str(real), "--data_path", str(mine), "--force"])
    assert not (mine / "hopper-medium-v2.synthetic").exists()
    capsys.readouterr()
    find_dataset_file(mine, "hopper", "medium")
    assert "stand-in" not in capsys.readouterr().err


@pytest.mark.parametrize("force", [False, True])
def test_two_hdf5_files_for_one_pkl_are_refused_and_one_file_twice_is_converted_once(tmp_path, capsys, force):
    """``--hdf5 a/hopper_medium-v2.hdf5 b/hopper_medium-v2.hdf5`` wrote the first and then stopped on it (or with
    --force silently replaced it with the second); both are checked first now. The same file given twice was refused
    as replacing its own fresh pkl: it is converted once."""
    first, second = tmp_path / "a" / "hopper_medium-v2.hdf5", tmp_path / "b" / "hopper_medium-v2.hdf5"
    write_hdf5(first, flat(20) | {"timeouts": np.arange(20) % 10 == 9})
    write_hdf5(second, flat(30, seed=1) | {"timeouts": np.arange(30) % 10 == 9})
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        script.main(["--hdf5", str(first), str(second), "--data_path", str(out)] + ["--force"] * force)
    assert e.value.code == 2 and not out.exists()
    assert capsys.readouterr().err.strip() == (f"error: {first} and {second} would both be converted to "
                                               f"{out / 'hopper-medium-v2.pkl'}; give one of them")
    script.main(["--hdf5", str(first), str(tmp_path / "a" / ".." / "a" / first.name), "--data_path", str(out)]
                + ["--force"] * force)
    assert [len(t["rewards"]) for t in safe_pickle_load(out / "hopper-medium-v2.pkl")] == [10, 10]
    assert capsys.readouterr().out.count("hopper-medium-v2.pkl: 2 trajectories") == 1


def test_a_stand_ins_pickle_is_never_in_place_without_its_mark(tmp_path, monkeypatch):
    """The mark is written before the pickle takes D4RL's name: an interruption between the two used to leave
    random-policy data under that name unmarked, trained on without a warning. An interrupted write of the pickle
    takes a mark made for it alone away again, and leaves a real pickle it would have replaced unmarked."""
    import os

    from decision_transformer import synthetic
    from decision_transformer.synthetic import make_dataset

    h5 = tmp_path / "h5" / "hopper_medium-v2.hdf5"
    script.main(["--synthetic", "2", "--envs", "hopper", "--datasets", "medium", "--hdf5_dir", str(h5.parent),
                 "--data_path", str(tmp_path / "first")])
    pkl, mark = tmp_path / "data" / "hopper-medium-v2.pkl", tmp_path / "data" / "hopper-medium-v2.synthetic"
    seen = []

    def watch(put):
        """``put`` (os.replace, or os.link: a file written only where none is), noting whether the mark is there."""
        def watched(src, dst):
            if Path(dst) == pkl:
                seen.append(mark.is_file())
            return put(src, dst)
        return watched

    monkeypatch.setattr(os, "replace", watch(os.replace))
    monkeypatch.setattr(os, "link", watch(os.link))
    script.main(["--hdf5", str(h5), "--data_path", str(pkl.parent)])
    assert seen == [True] and mark.is_file()
    # an interrupted stand-in write over a real pickle: the real one stays, unmarked
    make_dataset(tmp_path / "real", "hopper", "random", 400, max_ep_len=100)   # (unmarked under this name)
    synthetic.write_pkl(pkl, pickle.loads((tmp_path / "real" / "hopper-random-v2.pkl").read_bytes()))
    real = pkl.read_bytes()
    assert not mark.exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt   # Ctrl-C while the pickle is written

    monkeypatch.setattr(synthetic.pickle, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthetic.write_pkl(pkl, [], stand_in="2 episodes")
    assert pkl.read_bytes() == real and not mark.exists()


def test_run_from_the_data_folder_writes_there(tmp_path, monkeypatch):
    """The seeds' `cd data; python download_d4rl_datasets.py`: run from inside the project's data folder, the
    datasets go to that folder (where training reads them), not to data/data; from the project's root to data."""
    from decision_transformer import paths

    project = tmp_path / "project"
    monkeypatch.setattr(paths, "PROJECT_ROOT", project)
    (project / "data").mkdir(parents=True)
    monkeypatch.chdir(project / "data")
    script.main(["--synthetic", "2", "--envs", "hopper", "--datasets", "random", "--hdf5_dir", str(tmp_path / "h5")])
    assert (project / "data" / "hopper-random-v2.pkl").is_file() and not (project / "data" / "data").exists()
    assert paths.project_path("data") == "."
    monkeypatch.chdir(project)
    assert paths.project_path("data") == "data"
    (project / "mine").mkdir()
    monkeypatch.chdir(project / "mine")
    assert paths.project_path("data") == "../data"
    monkeypatch.chdir(tmp_path)                                   # outside the project: as written
    assert paths.project_path("data") == "data"


def test_synthetic_refuses_to_replace_existing_files(tmp_path, capsys):
    """--synthetic writes random-policy data under D4RL's names: an existing hdf5 (a real download) or pkl is not
    replaced unless --force is given, and the refusal comes before anything is written."""
    from conftest import fails

    h5, out = tmp_path / "h5", tmp_path / "out"
    h5.mkdir()
    out.mkdir()
    (h5 / "hopper_random-v2.hdf5").write_bytes(b"a real D4RL download")
    (out / "hopper-medium-v2.pkl").write_bytes(b"a converted dataset")
    argv = ["--synthetic", "1", "--envs", "hopper", "--datasets", "medium", "random", "--hdf5_dir", h5,
            "--data_path", out]
    msg = fails(script.main, argv, capsys)
    assert str(out / "hopper-medium-v2.pkl") in msg and "1 more" in msg and "--force" in msg
    assert sorted(p.name for p in h5.iterdir()) == ["hopper_random-v2.hdf5"]
    assert sorted(p.name for p in out.iterdir()) == ["hopper-medium-v2.pkl"]
    assert (h5 / "hopper_random-v2.hdf5").read_bytes() == b"a real D4RL download"
    assert (out / "hopper-medium-v2.pkl").read_bytes() == b"a converted dataset"
    script.main([str(a) for a in argv] + ["--force"])
    assert sorted(p.name for p in h5.iterdir()) == ["hopper_medium-v2.hdf5", "hopper_random-v2.hdf5"]
    for ds in ("medium", "random"):
        assert len(safe_pickle_load(out / f"hopper-{ds}-v2.pkl")) == 1
    assert sorted(p.name for p in out.iterdir()) == ["hopper-medium-v2.pkl", "hopper-medium-v2.synthetic",  # marked
                                                     "hopper-random-v2.pkl", "hopper-random-v2.synthetic"]


def test_write_hdf5_replaces_a_file_only_by_a_complete_one(tmp_path):
    """The hdf5 is written to a temporary file and renamed: a write that fails leaves the old file as it was and no
    temporary file."""
    from decision_transformer.data import read_hdf5

    path = write_hdf5(tmp_path / "hopper_medium-v2.hdf5", flat(20))
    before = path.read_bytes()
    bad = {"broken": np.array([object(), object()]), **flat(20)}   # h5py cannot store object arrays
    with pytest.raises(TypeError):
        write_hdf5(path, bad)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert set(read_hdf5(path)) == set(flat(20))


def test_convert_writes_the_checked_float32_arrays(tmp_path):
    """What is written is what was validated: (N, 1) rewards as (T,), integer observations as float32,
    next_observations kept (float32) after their own shape and finiteness checks."""
    d = flat(20, dtype=np.float64)
    d["terminals"][9] = True
    d["timeouts"][19] = True
    d["rewards"] = d["rewards"].reshape(-1, 1)
    d["observations"] = np.arange(20 * 11, dtype=np.int32).reshape(20, 11)
    src = write_hdf5(tmp_path / "hopper_medium-v2.hdf5", d)
    trajs = safe_pickle_load(script.convert(str(src), str(tmp_path / "out")))
    assert [len(t["rewards"]) for t in trajs] == [10, 10]
    for t in trajs:
        assert set(t) == {"observations", "next_observations", "actions", "rewards", "terminals"}
        assert t["rewards"].shape == (10,)
        assert all(t[k].dtype == np.float32 for k in ("observations", "next_observations", "actions", "rewards"))
    np.testing.assert_array_equal(trajs[1]["observations"], d["observations"][10:].astype(np.float32))
    np.testing.assert_array_equal(trajs[1]["next_observations"], d["next_observations"][10:].astype(np.float32))
    target = tmp_path / "out" / "hopper-medium-v2.pkl"
    before = target.read_bytes()
    for problem, words in (("nan", ["next_observations", "NaN"]), ("width", ["next_observations", "(10, 5)", "11"])):
        bad = flat(20)
        bad["terminals"][[9, 19]] = True
        if problem == "nan":
            bad["next_observations"][3, 2] = np.nan
        else:
            bad["next_observations"] = bad["next_observations"][:, :5]
        src = write_hdf5(tmp_path / "hopper_medium-v2.hdf5", bad)
        with pytest.raises(UserError) as e:
            script.convert(str(src), str(tmp_path / "out"))
        assert str(src) in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
        assert target.read_bytes() == before


def test_the_offline_hint_names_the_data_scripts_from_where_it_runs(tmp_path, monkeypatch):
    """Without network the error says how to convert local files; started inside the project's data/ folder (the
    seed's `cd data`), its paths are written from there."""
    from decision_transformer import paths
    from decision_transformer.download import _offline_error

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    monkeypatch.setattr(paths, "PROJECT_ROOT", project)
    monkeypatch.chdir(project)
    msg = str(_offline_error("http://x/y", "no route"))
    assert "`python data/download_d4rl_datasets.py --hdf5 FILE ... --data_path data`" in msg
    monkeypatch.chdir(project / "data")
    msg = str(_offline_error("http://x/y", "no route"))
    assert "`python ./download_d4rl_datasets.py --hdf5 FILE ... --data_path .`" in msg and "./generate_datasets.py" in msg


def test_a_d4rl_file_downloaded_by_another_process_meanwhile_is_checked_not_fetched_again(tmp_path, monkeypatch):
    """Two processes fetching one D4RL file shared its .part: the second failed with a traceback. The second now waits
    for the first and verifies what it downloaded."""
    import contextlib
    import hashlib

    body = b"d4rl bytes" * 100

    @contextlib.contextmanager
    def made_meanwhile(path, what="it"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        yield

    monkeypatch.setitem(download.D4RL_FILES, "hopper_medium-v2.hdf5", (len(body), hashlib.sha256(body).hexdigest()))
    monkeypatch.setattr(download, "exclusive", made_meanwhile)
    monkeypatch.setattr(download, "download_file", lambda *a, **k: pytest.fail("fetched again"))
    assert download.fetch_d4rl("hopper_medium-v2.hdf5", tmp_path / "cache", progress=False) == \
        tmp_path / "cache" / "hopper_medium-v2.hdf5"


def test_progress_bars_are_silent_when_stderr_is_not_a_terminal(capsys):
    """Dataset generation and downloads wrote their bars into log files (stderr redirected); like every other bar
    here they are off there."""
    from decision_transformer import generation

    bar = generation._progress(100, "hopper-medium")
    bar.update(50)
    bar.close()
    assert bar.disable and capsys.readouterr().err == ""


def test_hdf5_conversions_are_all_checked_before_the_first(tmp_path, capsys):
    """A bad name or a missing second --hdf5 file, or a --data_path under a file, is refused before the first file
    is converted (the first was written, then the second refused)."""
    from conftest import fails, load_script
    from decision_transformer.synthetic import rollout_flat, write_hdf5

    (tmp_path / "in").mkdir()
    good = write_hdf5(tmp_path / "in" / "hopper_medium-v2.hdf5", rollout_flat("hopper", None, num_episodes=2))
    main = load_script("data/download_d4rl_datasets.py").main
    for bad, why in ((tmp_path / "in" / "badname.hdf5", "not a D4RL gym-mujoco v2 file name"),
                     (tmp_path / "in" / "walker2d_medium-v2.hdf5", "file not found")):
        msg = fails(main, ["--hdf5", good, bad, "--data_path", tmp_path / "out"], capsys)
        assert msg.startswith(f"error: {bad}: {why}"), msg
    assert not (tmp_path / "out").exists()
    (tmp_path / "afile").write_text("not a folder\n")
    msg = fails(main, ["--hdf5", good, "--data_path", tmp_path / "afile" / "d"], capsys)
    assert msg.endswith(f"but {tmp_path / 'afile'} is a file"), msg


def test_a_download_keeps_an_existing_pkl_unless_forced(tmp_path, capsys):
    """A pkl already at the download's target (converted before, or the user's own) is kept and nothing is
    downloaded; before, the download was converted over it without --force."""
    target = tmp_path / "hopper-medium-v2.pkl"
    target.write_bytes(b"the user's dataset")
    url = _closed_port_url()   # (a download attempt would fail)
    script.main(["--envs", "hopper", "--datasets", "medium", "--hdf5_dir", str(tmp_path / "cache"),
                 "--data_path", str(tmp_path), "--base_url", url, "--no_progress"])
    assert f"{target} exists: kept, nothing downloaded (pass --force" in capsys.readouterr().out
    assert target.read_bytes() == b"the user's dataset"
    # a smoke-test stand-in (--synthetic) kept there is said to be one: the seed's download step run after a
    # smoke test kept random-policy data with the same words as a real dataset
    stand_in = tmp_path / "hopper-medium-v2.synthetic"
    stand_in.write_text("4 uniform-random-policy episodes")
    script.main(["--envs", "hopper", "--datasets", "medium", "--hdf5_dir", str(tmp_path / "cache"),
                 "--data_path", str(tmp_path), "--base_url", url, "--no_progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {target} exists and is a smoke-test stand-in (4 uniform-random-policy episodes), not "
                   f"D4RL's data: kept, nothing downloaded; pass --force to download and convert D4RL's file over it"]
    stand_in.unlink()
    with pytest.raises(SystemExit) as e:   # --force: downloads (here: fails offline), the pkl untouched
        script.main(["--envs", "hopper", "--datasets", "medium", "--hdf5_dir", str(tmp_path / "cache"),
                     "--data_path", str(tmp_path), "--base_url", url, "--no_progress", "--force"])
    assert e.value.code == 2 and "cannot download" in capsys.readouterr().err
    assert target.read_bytes() == b"the user's dataset"
