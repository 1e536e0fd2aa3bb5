"""How close the estimates the commands print before they start come to the time they then take.

    python -m experiments.bench_estimates [--train 2000] [--grid 7] [--threads 2]

Runs, in this process, on a seeded BN-MLP (3×32×32 → 512 → 512 → 10, 2.1 M parameters) and synthetic data:
``python -m minima.interpolate`` (a line of ``--grid`` points), ``python -m minima.surface`` (a ``--grid``² plane)
and ``python -m minima.sharpness`` (every registered metric, Keskar's full space and a 100-dimensional subspace),
each into a fresh directory, reads the estimate each prints and the wall time it reports, and prints their ratio
(estimate / measured; the target is 0.5–2). The sharpness command also corrects its estimate after every result;
the first correction is printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import tempfile
import time
from pathlib import Path

import torch

from minima import data
from minima.files import checkpoint as ck
from minima.interpolate import main as interpolate_main
from minima.models import build_model
from minima.sharpness import main as sharpness_main
from minima.surface import main as surface_main


def _seconds(text: str) -> float:
    number, unit = re.search(r"([\d.]+) (s|min|h)\b", text).groups()
    return float(number) * {"s": 1, "min": 60, "h": 3600}[unit]


def _run(name: str, work: callable) -> tuple[float, float, str]:
    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = work()
    wall = time.perf_counter() - t0
    text = out.getvalue()
    if code != 0:
        raise SystemExit(f"{name} failed ({code}):\n{text}")
    estimate = re.search(r"estimated ([\d.]+ (?:s|min|h))", text)
    return _seconds(estimate.group(1)), wall, text


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_estimates", description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=2000, help="training images (and as many test images)")
    p.add_argument("--grid", type=int, default=7, help="points of the line, points per axis of the plane")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ds = data.synthetic(n_train=args.train, n_test=args.train, image_shape=(3, 32, 32), num_classes=10, seed=0)
    work = Path(tempfile.mkdtemp(prefix="bench_estimates_"))
    kwargs = {"input_shape": [3, 32, 32], "widths": [512, 512], "batchnorm": True}
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model("mlp", 10, **kwargs)
        meta = ck.make_meta(epoch=1, step=1, global_batch_size=256, world_size=1, seed=seed, train_config={},
                            data=ds.describe())
        paths.append(str(ck.save_checkpoint(ck.make_checkpoint("mlp", dict(kwargs, num_classes=10),
                                                               model.state_dict(), meta), work / f"m{seed}.pt")))
    print(f"torch {torch.__version__}, {args.threads} threads; BN-MLP 2.1 M parameters, synthetic 3×32×32, "
          f"{args.train} train / {args.train} test images; work in {work}")
    grid = f"-1:1:{args.grid}"
    runs = {
        "interpolate": lambda: interpolate_main([*paths, f"--alphas={grid}", "--no-plot", "--device", "cpu",
                                                 "--out", str(work / "line.h5")]),
        "surface": lambda: surface_main([paths[0], f"--x={grid}", f"--y={grid}", "--no-plot", "--device", "cpu",
                                         "--out", str(work / "plane.h5")]),
        "sharpness": lambda: sharpness_main([paths[0], "--metrics", "keskar,hessian,trace,adaptive,average",
                                             "--trace-max-probes", "20", "--train-subset", str(args.train // 2),
                                             "--device", "cpu", "--out", str(work / "sharpness.h5")]),
    }
    for name, run in runs.items():
        estimate, wall, text = _run(name, run)
        extra = ""
        corrected = re.search(r"1/\d+ done, about ([\d.]+ (?:s|min|h)) left", text)
        if corrected:  # each result's own time is printed as "(12.3 s"
            each = [float(s) for s in re.findall(r"^\[minima\.sharpness\] \S+ \S+: \S+ \(([\d.]+) s", text, re.M)]
            extra = (f"; results {sum(each):.0f} s in all (ratio {estimate / sum(each):.2f}); after the first: "
                     f"{_seconds(corrected.group(1)):.0f} s left estimated, {sum(each[1:]):.0f} s measured")
        print(f"{name:12s} estimated {estimate:7.1f} s, took {wall:7.1f} s: ratio {estimate / wall:.2f}{extra}")


if __name__ == "__main__":
    main()
