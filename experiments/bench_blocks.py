"""What curvature per block costs next to the whole network's, in Hessian-vector products and seconds.

    python -m experiments.bench_blocks [--train 1000] [--threads 2]

On a seeded BN-MLP (3×32×32 → 512 → 512 → 10, 1.8 M parameters, BatchNorm eval) and synthetic images, in this
process: λ_max (Lanczos, tolerance 1e-3), the trace (Hutch++, 30 products) and the density (2 probes × 20 steps),
each for the whole network and for its blocks (``--blocks layers``: the three Linear layers and the two BatchNorms),
and the Gauss–Newton λ_max beside the Hessian's. Prints per metric the products and seconds of all blocks together
as a ratio to the whole network's (each block product is one full Hessian-vector product restricted to the block,
so the ratio in products is about the number of blocks, less where small blocks converge sooner).
"""

from __future__ import annotations

import argparse
import time

import torch

from minima import data
from minima.curvature.blocks import parameter_blocks
from minima.curvature.objective import DatasetObjective, FixedBatches
from minima.curvature.registry import get_metric
from minima.geometry.evaluate import Batching
from minima.models import build_model

JOBS = {"hessian": {"k": 1, "tol": 1e-3, "method": "lanczos"}, "trace": {"method": "hutchpp", "max_probes": 30},
        "density": {"steps": 20, "probes": 2}}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_blocks", description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=1000, help="training images f is defined on")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ds = data.synthetic(n_train=args.train, n_test=10, image_shape=(3, 32, 32), num_classes=10, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", 10, input_shape=[3, 32, 32], widths=[512, 512], batchnorm=True)
    obj = DatasetObjective(model, FixedBatches.from_split(ds.train, ds.mean, ds.std, Batching(500)), bn="eval",
                           hvp_cache_bytes=2**31)
    x = obj.get_flat()
    f0 = obj.value(x)
    blocks = parameter_blocks([(n, q.numel()) for n, q in zip(obj.names, obj.params, strict=True)], "layers")
    print(f"torch {torch.__version__}, {args.threads} threads; BN-MLP {obj.numel:,} parameters, {args.train} synthetic "
          f"images; {len(blocks)} blocks: " + ", ".join(f"{b.label} ({b.size:,})" for b in blocks))

    def run(metric: str, job: dict) -> tuple[int, float, float]:
        before = obj.evaluations["hvp"]
        t0 = time.perf_counter()
        out = get_metric(metric).compute(obj, x, f0, job, 0)
        return obj.evaluations["hvp"] - before, time.perf_counter() - t0, float(out["value"])

    for metric, job in JOBS.items():
        whole = run(metric, job)
        parts = [run(metric, {**job, "block_params": list(b.names)}) for b in blocks]
        hvps, seconds = sum(q[0] for q in parts), sum(q[1] for q in parts)
        print(f"{metric:8s} whole: {whole[0]:4d} products {whole[1]:6.1f} s (value {whole[2]:.4g}); blocks: "
              f"{hvps:4d} products {seconds:6.1f} s — ratio {hvps / whole[0]:.2f} in products, "
              f"{seconds / whole[1]:.2f} in time")
    hess, ggn = run("hessian", JOBS["hessian"]), run("hessian", {**JOBS["hessian"], "curvature": "ggn"})
    print(f"λ_max: Hessian {hess[2]:.4g} ({hess[0]} products, {hess[1]:.1f} s), Gauss–Newton {ggn[2]:.4g} "
          f"({ggn[0]} products, {ggn[1]:.1f} s): {ggn[1] / max(hess[1], 1e-9):.2f}× the time")


if __name__ == "__main__":
    main()
