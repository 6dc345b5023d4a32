"""The GPU suite's logs as the README's table: the targets checked, the device named, the overlap default suggested.

    python benchmarks/gpu_summary.py benchmarks/results        # the folder gpu_suite.sh wrote (its $OUT)

Reads ``device.txt`` and the logs of ``gpu_suite.sh`` (``bench_train.txt``, ``bench_train_gpt2.txt``, ``bench_core.txt``,
``bench_train_compile.txt``, ``check_precision_*.txt``, ``bench_analysis.txt``, ``cuda_checks.txt``); a log that is
missing or was cut short leaves its rows out and says so. Prints markdown:

* the device line (``nvidia-smi``'s name, memory and driver);
* the three targets with the measured figure and met / not met: evaluation of 50 episodes batched against one by one
  (at least 30x; the best configuration of env workers, overlap groups and CUDA graphs), training at the paper config
  on the device (the faster of eager and ``--cuda_graph``) against the per-sample loop of the same run (at least 5x;
  the compiled run's ratio is shown beside it), MFU at GPT-2
  size (at least 35%; the best row of ``bench_train.txt``, batch 64, and ``bench_train_gpt2.txt``, a larger batch,
  eager or ``--cuda_graph``, named with its batch and path);
* every measured row of training and of ``bench_core`` (evaluation, sampler, env stepping, evaluation forward), the
  precision checks' results and the analysis speed-ups;
* the CUDA correctness checks of ``cuda_checks.py``, with the names of those that failed;
* the ``overlap_groups`` setting that was fastest at 50 episodes, for the CUDA default in
  ``decision_transformer/evaluation.py``.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from decision_transformer.errors import UserError, cli_entry  # noqa: E402

TARGETS = {"eval": 30.0, "train": 5.0, "mfu": 35.0}
GRAPH_LABEL = "on-device, CUDA graph step"     # bench_train.py's row of --cuda_graph
PRECISION_CONFIGS = ("paper", "gpt2")      # the numerics checks gpu_suite.sh runs
LOGS = ("bench_train.txt", "bench_train_gpt2.txt", "bench_core.txt", "bench_train_compile.txt",
        *(f"check_precision_{c}.txt" for c in PRECISION_CONFIGS), "bench_analysis.txt", "cuda_checks.txt")


def _cells(line: str) -> list[str] | None:
    line = line.strip()
    if not (line.startswith("|") and line.endswith("|") and not line.endswith("\\|")):
        return None
    return [c.strip() for c in re.split(r"(?<!\\)\|", line[1:-1])]   # (a bar escaped as \| stays in its cell)


def _separator(cells) -> bool:
    return bool(cells) and all(c and set(c) <= set("-:") for c in cells)


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """The markdown tables of ``text``: (header cells, rows of cells). A table starts at a row followed by a separator
    row; other lines (warnings a step wrote into its log between two rows) do not end it."""
    lines = text.splitlines()
    out, current = [], None
    for i, line in enumerate(lines):
        cells = _cells(line)
        if cells is None or _separator(cells):
            continue
        if i + 1 < len(lines) and _separator(_cells(lines[i + 1])):
            current = (cells, [])
            out.append(current)
        elif current is not None and len(cells) == len(current[0]):
            current[1].append(cells)
    return out


def table(text: str, first_header: str) -> list[dict[str, str]]:
    """The rows (as {header: cell}) of the first table whose first header cell starts with ``first_header``."""
    for header, rows in tables(text):
        if header[0].startswith(first_header):
            return [dict(zip(header, r)) for r in rows if len(r) == len(header)]
    return []


def number(cell: str) -> float | None:
    """``"1,234.5"``, ``"12.0x"``, ``"41.3%"`` -> float; ``"-"`` or anything else -> None."""
    try:
        return float(cell.replace(",", "").rstrip("x%").strip())
    except (AttributeError, ValueError):
        return None


def _mfu(row: dict) -> float | None:
    key = next((k for k in row if k.startswith("MFU")), None)
    return number(row[key]) if key else None


def _batch(text: str) -> str | None:
    """The batch size bench_train.py printed in its header (``...; batch 64, K 20; ...``)."""
    m = re.search(r"; batch (\d+), K \d+;", text)
    return m.group(1) if m else None


#: rows of each step profile shown in the summary
PROFILE_TOP = 8


def profiles(text: str) -> list[tuple[str, list[str]]]:
    """bench_train.py --profile's tables in a log: (the row each profiles, its ``PROFILE_TOP`` first lines: the
    column header and the operators with the most time). A profile comes just before its row's table line."""
    lines, out = text.splitlines(), []
    for i, line in enumerate(lines):
        if not line.startswith("profile of "):
            continue
        if "failed" in line:
            body = []
        else:
            rules = [j for j in range(i + 1, min(len(lines), i + 8 + PROFILE_TOP)) if lines[j].startswith("---")]
            top = lines[rules[1] + 1:rules[1] + 1 + PROFILE_TOP] if len(rules) >= 2 else []
            top = top[:next((k for k, t in enumerate(top) if t.startswith("---")), len(top))]   # (the closing rule)
            body = lines[rules[0] + 1:rules[1]] + top if len(rules) >= 2 else []
        row = next((c for j in range(i + 1, len(lines)) for c in [_cells(lines[j])] if c and len(c) > 2
                    and not _separator(c)), None)
        out.append((f"{row[0]}, {row[1]}" if row else "?", [line] + [b.rstrip() for b in body]))
    return out


def summarise(folder: Path) -> tuple[str, dict]:
    """(markdown, figures) of the logs in ``folder``; figures: eval / train / mfu / mfu_at / overlap (None where
    missing)."""
    def read(name):
        f = folder / name
        return f.read_text(errors="replace") if f.is_file() else None

    lines, missing = [], []
    figures = {"eval": None, "train": None, "mfu": None, "mfu_at": None, "overlap": None, "train_path": None}
    device = read("device.txt")
    dev = [l for l in (device or "").splitlines() if l.strip() and not l.startswith("name")]
    lines.append(f"Device: {dev[0].strip() if dev else 'unknown (no device.txt)'}\n")

    train = table(read("bench_train.txt") or "", "config")
    compiled = table(read("bench_train_compile.txt") or "", "config")
    for name, rows in (("bench_train.txt", train), ("bench_train_compile.txt", compiled)):
        if not rows:
            missing.append(name)

    def steps(rows, config, batches):
        return next((number(r["steps/s"]) for r in rows if r["config"] == config and r["batches"] == batches), None)

    # the target: on-device training (the faster of eager and --cuda_graph) against the per-sample loop of the same
    # run (bench_train.txt); the compiled run's own ratio is shown beside it
    slow, fast = steps(train, "paper", "per-sample loop"), steps(train, "paper", "on-device")
    graphed = steps(train, "paper", GRAPH_LABEL)      # --cuda_graph, where the suite measured it
    best = max((f for f in (fast, graphed) if f), default=None)
    figures["train"] = best / slow if slow and best else None
    figures["train_path"] = "--cuda_graph" if graphed and best == graphed else "eager"
    slow_c = steps(compiled, "paper", "per-sample loop")
    fast_c = [number(r["steps/s"]) for r in compiled if r["config"] == "paper" and "compile" in r["batches"]]
    compiled_ratio = max(f for f in fast_c if f) / slow_c if slow_c and any(fast_c) else None
    # MFU at GPT-2 size: every on-device row (eager, --cuda_graph) at batch 64 and at the larger batch of
    # bench_train_gpt2.txt; the target takes the best, named
    mfu_rows = []
    for name in ("bench_train.txt", "bench_train_gpt2.txt"):
        text = read(name) or ""
        for r in table(text, "config"):
            if r["config"] == "gpt2" and r["batches"] != "per-sample loop" and _mfu(r) is not None:
                mfu_rows.append((f"batch {_batch(text) or '?'}, {r['batches']}", _mfu(r)))
    if mfu_rows:
        figures["mfu_at"], figures["mfu"] = max(mfu_rows, key=lambda row: row[1])
    large = table(read("bench_train_gpt2.txt") or "", "config")
    if not large:
        missing.append("bench_train_gpt2.txt")

    ev = table(read("bench_core.txt") or "", "evaluation (")
    if not ev:
        missing.append("bench_core.txt")
    def ratio(r):   # from the two rates (printed to 0.01), not the rounded ratio column
        return number(r["batched ep/s"]) / number(r["one-by-one ep/s"])

    at50 = [r for r in ev if r.get("episodes") == "50" and number(r.get("batched ep/s", ""))
            and number(r.get("one-by-one ep/s", ""))]
    if at50:
        figures["eval"] = max(ratio(r) for r in at50)
        fastest = max(at50, key=lambda r: number(r["batched ep/s"]) or 0)
        figures["overlap"] = fastest["overlap groups"]

    def verdict(key, unit):
        v = figures[key]
        if v is None:
            return "not measured", "-"
        return f"{v:.1f}{unit}", "met" if v >= TARGETS[key] else "NOT met"

    lines += ["| target | required | measured | result |", "|---|---:|---:|---|"]
    for key, what, unit in (("eval", "evaluation, 50 episodes, batched vs one by one", "x"),
                            ("train", "training steps/s at the paper config, on-device vs per-sample loop", "x"),
                            ("mfu", "MFU at GPT-2 size (768 x 12), bf16", "%")):
        got, ok = verdict(key, unit)
        if key == "mfu" and figures["mfu_at"]:
            got += f" ({figures['mfu_at']})"
        lines.append(f"| {what} | {TARGETS[key]:g}{unit} | {got} | {ok} |")
    if figures["train"] is not None and graphed and fast:
        lines.append(f"\nTraining at the paper config against the per-sample loop of the same run: eager on-device "
                     f"{fast / slow:.1f}x, with `--cuda_graph` {graphed / slow:.1f}x (the target row: the faster).")
    if len(mfu_rows) > 1:
        lines.append("\nMFU at GPT-2 size: " + "; ".join(f"{at} {v:.1f}%" for at, v in mfu_rows) + ".")
    if compiled_ratio is not None:
        lines.append(f"\nTraining at the paper config under `--compile reduce-overhead`: {compiled_ratio:.1f}x the "
                     f"per-sample loop of the same run.")
    if figures["overlap"] is not None:
        lines.append(f"\nFastest 50-episode evaluation with overlap groups = {figures['overlap']} (the CUDA default of "
                     f"`overlap_groups` in decision_transformer/evaluation.py).")

    def show(title, header, rows):
        if rows:
            lines.extend(["", f"**{title}**", "", "| " + " | ".join(header) + " |",
                          "|" + "|".join("---" for _ in header) + "|"]
                         + ["| " + " | ".join(r.get(h, "") for h in header) + " |" for r in rows])

    if train:
        show("Training (bench_train.txt, eager)", list(train[0]), train)
    if compiled:   # (a table of its own: its rows look like the eager ones)
        show("Training under --compile (bench_train_compile.txt)", list(compiled[0]), compiled)
    if large:
        show(f"Training at GPT-2 size, batch {_batch(read('bench_train_gpt2.txt')) or '?'}", list(large[0]), large)
    show("Evaluation", list(ev[0]) if ev else [], ev)
    for header, rows in tables(read("bench_core.txt") or ""):   # the sampler, env stepping and forward tables
        if not header[0].startswith("evaluation ("):
            show(header[0][:1].upper() + header[0][1:], header, [dict(zip(header, r)) for r in rows])
    for config in PRECISION_CONFIGS:
        name = f"check_precision_{config}.txt"
        rows = table(read(name) or "", "variant")
        show(f"Precision ({config})", list(rows[0]) if rows else [], rows)
        if not rows:
            missing.append(name)
    for row, body in profiles(read("bench_train_gpt2.txt") or ""):
        lines.extend(["", f"**Profile ({row}, batch {_batch(read('bench_train_gpt2.txt')) or '?'})**", "", "```",
                      *body, "```"])
    analysis = table(read("bench_analysis.txt") or "", "analysis")
    show("Analyses", list(analysis[0]) if analysis else [], analysis)
    if not analysis:
        missing.append("bench_analysis.txt")
    checks = table(read("cuda_checks.txt") or "", "check")
    show("CUDA checks (cuda_checks.py)", list(checks[0]) if checks else [], checks)
    if not checks:
        missing.append("cuda_checks.txt")
    failed = [r["check"] for r in checks if r.get("result") not in ("pass", "skip")]
    if failed:
        lines.append(f"\nCUDA checks failed: {', '.join(failed)}.")
    if checks:
        unreached = [c for c in check_names() if c not in {r["check"] for r in checks}]
        if unreached:
            lines.append(f"\nCUDA checks not run: {', '.join(unreached)}.")
    if missing:
        lines.append(f"\nNo rows in: {', '.join(missing)} (missing, or stopped before its first row).")
    cut = [f"{name} ({budget} s)" for name in LOGS for budget in [cut_short(read(name) or "")] if budget]
    if cut:
        lines.append(f"\nCut short by their time budgets: {', '.join(cut)}; the rows after those shown were not "
                     f"measured.")
    return "\n".join(lines) + "\n", figures


def cut_short(text: str) -> str | None:
    """The time budget (seconds, as gpu_suite.sh wrote it) of a log whose step was stopped by it, or None."""
    m = re.search(r"^== \S+: stopped after its (\d+) s budget", text, re.M)
    return m.group(1) if m else None


def check_names() -> tuple[str, ...]:
    """cuda_checks.py's ``CHECK_NAMES``, read from its source (no torch import here)."""
    import ast

    tree = ast.parse((Path(__file__).parent / "cuda_checks.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CHECK_NAMES" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("cuda_checks.py defines no CHECK_NAMES")


@cli_entry
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the folder gpu_suite.sh wrote (its $OUT; default there: benchmarks/results)")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder of GPU suite logs")
    if not any((folder / name).is_file() for name in (*LOGS, "device.txt")):   # (a wrong folder: not a table of gaps)
        raise UserError(f"{folder}: none of gpu_suite.sh's logs ({', '.join(LOGS)}) is in it; give the folder "
                        f"gpu_suite.sh wrote (its $OUT)")
    text, _ = summarise(folder)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
