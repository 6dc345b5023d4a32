"""Flag checks shared by the benchmark scripts: counts that must be positive and the ``--device`` to measure on."""
from __future__ import annotations

import argparse
import math
import sys

import torch

from decision_transformer.cli import positive_int  # noqa: F401  (re-exported for the benchmarks)
from decision_transformer.errors import UserError


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def bench_device(name: str, *, cpu_fallback: bool = True) -> torch.device:
    """The torch device of ``--device name`` (cpu, cuda or cuda:N). Without a GPU, ``cuda`` falls back to the CPU
    with a warning, or is an error with ``cpu_fallback=False``. Leaves torch's threads and the allocator alone (the
    benchmarks measure with torch's defaults or their own ``--threads``)."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported --device {name!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            if not cpu_fallback:
                raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
            print(f"warning: --device {name} requested but CUDA is not available; running on cpu", file=sys.stderr)
            return torch.device("cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if dev.index is not None:   # synchronize(), the peak-memory counters and events then act on this GPU
            torch.cuda.set_device(dev)
    return dev
