"""The zoo's throughput and its own overhead, against a baseline measured in the same process.

``python -m experiments.bench_zoo [--study experiments/studies/zoo-16.toml]``

* baseline: every run of the study trained, evaluated and measured by :func:`minima.pipelines.runs.run_one` one
  after another in this process (2 torch threads): the work itself, without the zoo;
* ``--workers 1 --threads 2`` and ``--workers 2 --threads 1``: the same study through ``python -m minima.zoo`` (a
  fresh command each, its own pool of run directories).

Prints wall seconds and runs per hour of each, the zoo's overhead per run ((zoo wall − baseline) / runs, with one
worker of the baseline's threads), and whether the three tables are equal cell for cell.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from minima.pipelines.runs import run_one, write_table
from minima.pipelines.study import load_study


def _table(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default="experiments/studies/zoo-16.toml")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        study = load_study(args.study, root / "base" / "runs")
        torch.set_num_threads(2)
        t0 = time.perf_counter()
        for spec in study.runs:
            run_one(spec, study, 2)
        base = time.perf_counter() - t0
        (root / "base").mkdir(exist_ok=True)
        write_table(study, root / "base" / "runs.csv")
        n = len(study.runs)
        print(f"baseline (run_one in one process, 2 threads): {base:.1f} s for {n} runs, {3600 * n / base:.0f} runs/h",
              flush=True)
        walls = {}
        for workers, threads in ((1, 2), (2, 1)):
            out = root / f"w{workers}t{threads}"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "minima.zoo", args.study, "--out", str(out), "--workers",
                            str(workers), "--threads", str(threads)], check=True, capture_output=True, text=True)
            walls[(workers, threads)] = time.perf_counter() - t0
            same = _table(out / "runs.csv") == _table(root / "base" / "runs.csv")
            print(f"minima.zoo --workers {workers} --threads {threads}: {walls[(workers, threads)]:.1f} s, "
                  f"{3600 * n / walls[(workers, threads)]:.0f} runs/h, table equal to the baseline's: {same}",
                  flush=True)
        print(f"zoo overhead per run (--workers 1 --threads 2 vs baseline): {(walls[(1, 2)] - base) / n:.2f} s; "
              f"--workers 2 --threads 1 / --workers 1 --threads 2 throughput: {walls[(1, 2)] / walls[(2, 1)]:.2f}×",
              flush=True)


if __name__ == "__main__":
    main()
