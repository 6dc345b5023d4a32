"""CPU runtime settings: torch's threads and glibc's allocator.

Threads: ``--threads auto`` leaves out the cores other processes keep busy.

torch starts one intra-op thread per core. On a core that another process keeps busy, OpenMP threads wait on each
other at every operation: on a 2-core machine with one other job running, training and evaluation of the default DT
ran 10x and 50x slower with 2 threads than with 1 (README, "CPU threads on a shared machine"). ``auto`` measures how
busy this process's cores are over a short sample and uses only the free ones. It never raises the thread count above
torch's current setting, so ``OMP_NUM_THREADS`` and an earlier ``torch.set_num_threads`` still cap it.

Allocator: glibc serves blocks above its mmap threshold (128 KiB, adapting up to 32 MiB) with fresh mappings and
returns freed memory at the top of the heap to the OS. A DT forward allocates activations of several MB each call, so
every call page-faults its memory in again; on the evaluation forward that cost as much as the arithmetic.
``tune_allocator`` raises both thresholds so the memory is reused (``benchmarks/bench_core.py`` measures the gain)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time
from typing import TYPE_CHECKING

from decision_transformer.errors import UserError

if TYPE_CHECKING:   # (torch is imported where it is used: the sweep launcher uses this module without it)
    import torch


def _cpu_times() -> dict[int, tuple[int, int]] | None:
    """Per-CPU (busy, total) jiffies from /proc/stat; None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            vals = [int(v) for v in fields[:8]]
            idle = vals[3] + vals[4]  # idle + iowait
            out[int(name[3:])] = (sum(vals) - idle, sum(vals))
    return out or None


def available_cpus() -> list[int]:
    """The ids of the CPUs this process may run on (its affinity; where that is unknown, all of
    ``os.cpu_count()``)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def busy_cores(cpus: list[int], sample_s: float = 0.25) -> float:
    """How many of ``cpus`` other processes keep busy, measured over ``sample_s`` (this process sleeps meanwhile);
    the 1-minute load average where /proc/stat is missing."""
    before = _cpu_times()
    if before is None:
        try:
            return min(float(len(cpus)), os.getloadavg()[0])
        except (AttributeError, OSError):
            return 0.0
    time.sleep(sample_s)
    after = _cpu_times() or {}
    busy = 0.0
    for c in cpus:
        if c in before and c in after:
            d_busy, d_total = after[c][0] - before[c][0], after[c][1] - before[c][1]
            busy += d_busy / d_total if d_total > 0 else 0.0
    return busy


def choose_threads(spec: str | int | None, *, available: int, busy: float, current: int) -> int:
    """The thread count for ``--threads spec``: a positive integer is used as given; ``auto`` (or None) gives the free
    cores, at least 1 and at most ``current``."""
    if spec is None or str(spec) == "auto":
        return max(1, min(current, round(available - busy)))
    try:
        n = int(spec)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_THREADS:
        raise UserError(f"--threads {spec!r}: use auto or a positive number of threads (at most {MAX_THREADS})")
    return n


#: the most ``--threads`` accepted (torch takes a C int; far above any machine's cores)
MAX_THREADS = 4096


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 512 << 20
_allocator_tuned: bool | None = None


def tune_allocator() -> bool:
    """Keep freed blocks up to 256 MiB in the heap (glibc only; once per process). Returns whether it applied.
    ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` in the environment leave the choice to the user."""
    global _allocator_tuned
    if _allocator_tuned is None:
        _allocator_tuned = False
        if not any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _allocator_tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
                bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _allocator_tuned


def configure_threads(spec: str | int | None, device: torch.device) -> int:
    """Set torch's intra-op threads for a run on ``device`` and return the count. On a GPU, ``auto`` changes nothing
    (the host only feeds the device and steps the envs)."""
    import torch  # here, so that the sweep launcher can use this module without loading torch

    tune_allocator()
    current = torch.get_num_threads()
    if device.type == "cuda" and (spec is None or str(spec) == "auto"):
        return current
    if spec is not None and str(spec) != "auto":
        n = choose_threads(spec, available=0, busy=0.0, current=current)
    elif current == 1:
        return 1  # nothing to leave out
    else:
        cpus = available_cpus()
        busy = busy_cores(cpus)
        n = choose_threads("auto", available=len(cpus), busy=busy, current=current)
        if n < current:
            print(f"threads: {n} (other processes keep {busy:.1f} of this machine's {len(cpus)} cores busy; "
                  f"pass --threads N to choose)", file=sys.stderr)
    if n != current:
        torch.set_num_threads(n)
    return n
