"""The zoo's throughput and its own overhead: ``python -m experiments.bench_zoo [--study FILE]``.

Runs the study (default ``experiments/studies/zoo-16.toml``: 16 small MLP runs on 1,000 CIFAR-10 images, each
measured) twice through ``python -m minima.zoo``, each time from scratch in its own directory: with ``--workers 1
--threads 2`` and with ``--workers 2 --threads 1``. Prints for each the wall time and runs per hour; the baseline is
the work itself — the seconds each run's training, evaluation and measurement took inside its worker
(``seconds.json``), measured in the same run — so the zoo's overhead per run (process start, torch import, table
and manifest writes, scheduling) is (wall − Σ work) / runs for one worker. Then the ratio of the two throughputs,
and which cells of the two tables differ: a thread count changes the summation order of the CPU kernels, so the
numbers agree to rounding (≈ 1e-8 relative), unless a run is chaotic and amplifies it.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _table(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _differences(a: list[dict[str, str]], b: list[dict[str, str]]) -> str:
    """The columns where two tables differ, each with its largest relative difference (numbers) or count (text)."""
    said = []
    for column in a[0]:
        worst, count = 0.0, 0
        for x, y in zip(a, b, strict=True):
            if x[column] == y[column]:
                continue
            count += 1
            try:
                fx, fy = float(x[column]), float(y[column])
                worst = max(worst, abs(fx - fy) / max(abs(fx), abs(fy), 1e-300))
            except ValueError:
                worst = float("nan")
        if count:
            said.append(f"{column} ({count} rows, ≤ {worst:.1e})")
    return ", ".join(said) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default="experiments/studies/zoo-16.toml")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        walls, tables = {}, {}
        for workers, threads in ((1, 2), (2, 1)):
            out = Path(tmp) / f"w{workers}t{threads}"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "minima.zoo", args.study, "--out", str(out), "--workers",
                            str(workers), "--threads", str(threads)], check=True, capture_output=True, text=True)
            wall = walls[(workers, threads)] = time.perf_counter() - t0
            work = sum(json.loads((out / "seconds.json").read_text()).values())
            tables[(workers, threads)] = _table(out / "runs.csv")
            n = len(tables[(workers, threads)])
            print(f"--workers {workers} --threads {threads}: {wall:.1f} s for {n} runs, {3600 * n / wall:.0f} runs/h; "
                  f"the runs' own work {work:.1f} s ({work / n:.1f} s per run)"
                  + (f"; zoo overhead {(wall - work) / n:.2f} s per run" if workers == 1 else ""), flush=True)
        print(f"throughput --workers 2 --threads 1 / --workers 1 --threads 2: {walls[(1, 2)] / walls[(2, 1)]:.2f}×; "
              f"cells that differ between the two tables: {_differences(tables[(1, 2)], tables[(2, 1)])}",
              flush=True)


if __name__ == "__main__":
    main()
