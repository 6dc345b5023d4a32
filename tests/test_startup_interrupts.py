"""Ctrl-C or SIGTERM while a script is still importing torch and the toolkit (a second or more) ends it as later on:
``error: interrupted``, exit 130, no traceback. Once its ``cli_entry`` main runs, Ctrl-C is a KeyboardInterrupt again,
so that the script's ``finally`` blocks run."""
import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: every script a user starts (a file, or a module run with ``python -m``) that imports torch or numpy on the way
ENTRY_POINTS = [
    "experiment.py", "experiment_multi.py", "precompute_fisher.py", "lm_cotraining/experiment.py",
    "lm_cotraining/pretrain_chibit.py", "data/generate_datasets.py", "data/minari_datasets.py",
    "data/reacher2d_scripted_data.py", "data/train_behaviour_policies.py", "data/download_d4rl_datasets.py",
    "data/create_state_stats.py", "decision_transformer/legacy_import.py", "decision_transformer/results_table.py",
    "decision_transformer/sweep.py", "decision_transformer/merge_cli.py", "analysis/run_all.py",
    *sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("analysis/section-*/*.py"), *ROOT.glob("mine/*.py"),
                                                *ROOT.glob("benchmarks/*.py")]
            if "cli_entry" in p.read_text()),
]


def _python(code: str, sig: int) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python (Ctrl-C at its default), ``THE_SIGNAL`` in it standing for ``sig``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code.replace("THE_SIGNAL", str(int(sig)))], capture_output=True,
                          text=True, env=env, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


#: a script's first lines: the handlers of its startup installed
STARTED = ("import os, time\n"
           "from decision_transformer.errors import cli_entry, quiet_startup\n"
           "quiet_startup('__main__')\n")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_imports_is_one_line_and_exit_130(sig):
    out = _python(STARTED +
                  "os.kill(os.getpid(), THE_SIGNAL)\n"
                  "time.sleep(30)\n", sig)
    assert (out.returncode, out.stderr) == (130, "error: interrupted\n")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_inside_main_a_signal_runs_the_finally_blocks_again(sig):
    out = _python(STARTED +
                  "@cli_entry\n"
                  "def main(argv=None):\n"
                  "    try:\n"
                  "        os.kill(os.getpid(), THE_SIGNAL)\n"
                  "        time.sleep(30)\n"
                  "    finally:\n"
                  "        print('cleaned up', flush=True)\n"
                  "main()\n", sig)
    assert (out.returncode, out.stdout, out.stderr) == (130, "cleaned up\n", "error: interrupted\n")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("ending", ["done", "refused", "returned 3", "returned a path"])
def test_a_signal_during_the_teardown_after_main_ends_it_quietly_with_mains_status(sig, ending):
    """After main returns, the interpreter's teardown (torch's atexit callbacks: a second or so) ran with the default
    handlers again: SIGTERM killed a finished script with a silent 143, Ctrl-C gave a KeyboardInterrupt traceback
    from the atexit callback. Now the process ends at once with the status main gave it."""
    out = _python(STARTED +
                  "import atexit\n"
                  "from decision_transformer.errors import UserError\n"
                  "@cli_entry\n"
                  "def main(argv=None):\n"
                  "    atexit.register(lambda: (os.kill(os.getpid(), THE_SIGNAL), time.sleep(5),\n"
                  "                             print('teardown went on', flush=True)))\n"
                  f"    if {ending!r} == 'refused':\n"
                  "        raise UserError('bad value')\n"
                  "    print('done', flush=True)\n"
                  f"    return {{'returned 3': 3, 'returned a path': 'report.md'}}.get({ending!r})\n"
                  "status = main()\n"
                  "if isinstance(status, int):\n"
                  "    raise SystemExit(status)\n", sig)
    if ending == "refused":
        assert (out.returncode, out.stdout, out.stderr) == (2, "", "error: bad value\n")
    else:   # (a main that returns its status, as the benchmark checks: that status)
        assert (out.returncode, out.stdout, out.stderr) == (3 if ending == "returned 3" else 0, "done\n", "")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_atexit_callbacks_is_ignored(sig):
    """After the atexit callbacks, while the interpreter tears its modules down, Python resets its handlers to the
    defaults: SIGTERM there was a silent 143 (most of the second a torch script takes to end). Now it is ignored."""
    out = _python(STARTED +
                  "class Late:\n"
                  "    def __del__(self):   # (runs as the modules are torn down, after atexit)\n"
                  "        os.kill(os.getpid(), THE_SIGNAL)\n"
                  "        time.sleep(0.2)\n"
                  "late = Late()\n"
                  "@cli_entry\n"
                  "def main(argv=None):\n"
                  "    print('done', flush=True)\n"
                  "main()\n", sig)
    assert (out.returncode, out.stdout, out.stderr) == (0, "done\n", "")


def test_a_crash_after_main_keeps_its_traceback_and_nested_mains_leave_the_handlers_alone():
    out = _python(STARTED +
                  "import signal\n"
                  "@cli_entry\n"
                  "def inner(argv=None):\n"
                  "    pass\n"
                  "@cli_entry\n"
                  "def main(argv=None):\n"
                  "    inner()\n"
                  "    print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)\n"
                  "    raise ZeroDivisionError('boom')\n"
                  "main()\n", signal.SIGINT)
    assert out.stdout == "True\n" and out.returncode == 1
    assert "ZeroDivisionError: boom" in out.stderr and "Traceback" in out.stderr


def test_only_a_script_run_as_main_changes_the_handlers():
    out = _python("import signal\n"
                  "from decision_transformer.errors import quiet_startup\n"
                  "quiet_startup('decision_transformer.merge_cli')\n"
                  "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler,\n"
                  "      signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)\n", signal.SIGINT)
    assert out.stdout == "True True\n"


@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_every_entry_point_quiets_its_startup_before_importing_torch(path):
    """The first statement importing anything beyond the standard library and ``decision_transformer.errors`` comes
    after ``quiet_startup(__name__)`` (a script importing nothing more at its top does so inside its main, where
    ``cli_entry`` handles Ctrl-C)."""
    tree = ast.parse((ROOT / path).read_text())
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    quiet = heavy = None
    for i, node in enumerate(tree.body):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and \
                getattr(node.value.func, "id", None) == "quiet_startup" and quiet is None:
            assert [ast.unparse(a) for a in node.value.args] == ["__name__"]
            quiet = i
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) else [])
        if heavy is None and any(n.split(".")[0] not in stdlib and n != "decision_transformer.errors" for n in names):
            heavy = i
    assert heavy is None or (quiet is not None and quiet < heavy), (quiet, heavy)
    assert 'if __name__ == "__main__"' in (ROOT / path).read_text()
