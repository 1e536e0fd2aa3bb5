"""Keskar's φ with scipy's L-BFGS-B routine driven directly against ``scipy.optimize.minimize``, in one process.

    python -m experiments.bench_lbfgsb [--train 256] [--threads 2] [--repeats 2]

On the Quickstart's network (a seeded BN-MLP 3×32×32 → 512 → 512 → 512 → 10, 2,106,890 parameters, BatchNorm on
batch statistics as Keskar's code) and synthetic images: φ(ε = 1e-3, full space, 10 L-BFGS-B iterations) measured
``--repeats`` times each way — :func:`minima.curvature.lbfgsb.minimize_box` (the default) and ``minimize`` itself —
and the seconds spent in the network (its value-and-gradient calls) apart. Prints both times, the ratio, and
whether φ, the evaluations and the iterations are identical (they must be: the same compiled routine, the same
arguments).
"""

from __future__ import annotations

import argparse
import time

import torch

from minima import data
from minima.curvature import lbfgsb, measures
from minima.curvature.objective import DatasetObjective, FixedBatches
from minima.geometry.evaluate import Batching
from minima.models import build_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_lbfgsb", description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=256, help="synthetic training images f is defined on")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ds = data.synthetic(n_train=args.train, n_test=16, image_shape=(3, 32, 32), num_classes=10, seed=0)
    model = build_model("mlp", num_classes=10, input_shape=(3, 32, 32), widths=(512, 512, 512), batchnorm=True)
    obj = DatasetObjective(model, FixedBatches.from_split(ds.train, ds.mean, ds.std, Batching(args.train)),
                           bn="batch")
    x = obj.get_flat()
    network = {"s": 0.0}

    def timed(theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        out = obj.value_and_grad(theta)
        network["s"] += time.perf_counter() - t0
        return out

    direct = measures.minimize_box
    print(f"[bench_lbfgsb] {obj.numel:,} parameters, {args.train} images, BN batch, ε = 1e-3, 10 iterations; "
          f"direct driver available: {lbfgsb._direct_works()}")
    results, seconds = {}, {}
    for name, driver in (("minimize", lbfgsb._with_minimize), ("direct", direct)):
        measures.minimize_box = driver
        try:
            best = float("inf")
            for _ in range(args.repeats):
                network["s"] = 0.0
                t0 = time.perf_counter()
                results[name] = measures.keskar_sharpness(timed, x, 1e-3, maxiter=10)
                best = min(best, time.perf_counter() - t0)
                seconds[name + " network"] = network["s"]
            seconds[name] = best
        finally:
            measures.minimize_box = direct
        r = results[name]
        print(f"  {name:8s}: {seconds[name]:6.2f} s per φ (of which the network {seconds[name + ' network']:.2f} s); "
              f"φ = {r.phi:.6f}, {r.function_evals} evaluations, {r.iterations} iterations")
    a, b = results["direct"], results["minimize"]
    same = (a.phi, a.function_evals, a.iterations, a.message) == (b.phi, b.function_evals, b.iterations, b.message)
    print(f"[bench_lbfgsb] direct is {seconds['minimize'] / seconds['direct']:.1f}× faster per φ; identical results: "
          f"{same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
