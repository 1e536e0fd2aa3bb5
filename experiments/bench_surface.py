"""A loss-surface grid of ``minima.surface`` against a loss-landscape-style loop, in the same process.

    python -m experiments.bench_surface [--grid 21] [--train 2000] [--test 2000] [--threads 2] [--data SOURCE]
    python -m experiments.bench_surface --device cuda --workers 8      # on a GPU (target ≥ 20×)

Baseline (how loss-landscape, Li et al.'s code, evaluates a plane): for every grid point, the shifted weights
θ + x·d1 + y·d2 computed in float32 per parameter and loaded with ``load_state_dict``; a torchvision-style dataset
(uint8 → PIL image → ``ToTensor`` + ``Normalize``) in a ``DataLoader`` with batch 128; ``model.eval()`` (the
checkpoint's BatchNorm running statistics, which its directions leave alone); cross-entropy summed per sample and
divided by the count. C1 in the textbook layer order, default allocator; run first.

Toolkit: :func:`minima.studies.surface.surface` on the same plane (the same two filter-normalised directions, zero on
biases, BatchNorm parameters and statistics) with the BatchNorm policy that equals the baseline's (``interpolate``:
the statistics move with the directions, which are zero on them), after :func:`minima.core.allocator.keep_freed_memory`
(what ``python -m minima.surface`` runs with): in-memory uint8 batches normalised on the fly, batch 1000,
channels_last, BatchNorm folded into the convolutions.

Prints both times, the ratio, seconds per grid point and the largest relative difference of the losses and
accuracies. C1 is seeded with randomised BatchNorm statistics unless ``--ckpt`` names a trained checkpoint.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from experiments.bench_interpolate import TorchvisionStyleCIFAR, seeded_c1
from minima import data
from minima.core.allocator import keep_freed_memory
from minima.core.precision import float32_math
from minima.files import checkpoint as ck
from minima.geometry.directions import Plane, random_plane
from minima.models import build_model, textbook_order
from minima.studies.surface import surface


def baseline_grid(state: dict[str, torch.Tensor], plane: Plane, ds: data.Dataset, xs: np.ndarray,
                  ys: np.ndarray, device: torch.device, workers: int) -> dict[str, np.ndarray]:
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(ds.mean, ds.std)])
    loaders = {name: DataLoader(TorchvisionStyleCIFAR(getattr(ds, name), tf), batch_size=128, shuffle=False,
                                num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
               for name in ("train", "test")}
    model = textbook_order(build_model("c1")).to(device)
    state = {k: v.to(device) for k, v in state.items()}
    d1 = {k: v.float().to(device) for k, v in plane.d1.items()}
    d2 = {k: v.float().to(device) for k, v in plane.d2.items()}
    out = {f"{s}/{m}": np.zeros((len(xs), len(ys))) for s in ("train", "test") for m in ("loss", "accuracy")}
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            model.load_state_dict({k: v + float(x) * d1[k] + float(y) * d2[k] if k in d1 else v
                                   for k, v in state.items()})
            model.eval()
            with torch.no_grad():
                for name, loader in loaders.items():
                    loss, correct, count = 0.0, 0, 0
                    for xb, yb in loader:
                        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                        logits = model(xb)
                        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
                        correct += int((logits.argmax(1) == yb).sum())
                        count += len(yb)
                    out[f"{name}/loss"][i, j] = loss / count
                    out[f"{name}/accuracy"][i, j] = correct / count
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_surface", description=__doc__.split("\n")[0])
    p.add_argument("--grid", type=int, default=21, help="points per axis, x and y in [-1, 1]")
    p.add_argument("--train", type=int, default=2000, help="training images per point")
    p.add_argument("--test", type=int, default=2000, help="test images per point")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=None, help="a CIFAR-10 source (default: synthetic data of --train/--test "
                   "images: speed only)")
    p.add_argument("--ckpt", type=Path, default=None, help="a trained C1 checkpoint (default: seeded weights)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (then the baseline uses --workers pinned workers)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the baseline (GPU: 8)")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    source = args.data or f"synthetic:{args.train}/{args.test}"
    ds = data.load_source(source).subset(args.train, args.test, seed=0)
    model: nn.Module = ck.load_model(args.ckpt)[0] if args.ckpt else seeded_c1(0)
    plane = random_plane(model, model.state_dict(), seed=0)
    xs = ys = np.linspace(-1.0, 1.0, args.grid)
    points = args.grid**2
    print(f"torch {torch.__version__}, {args.threads} threads; C1, {args.data} 3×32×32: {len(ds.train)} train + "
          f"{len(ds.test)} test images per point; {args.grid}×{args.grid} = {points} points")
    t0 = time.perf_counter()
    ref = baseline_grid(model.state_dict(), plane, ds, xs, ys, device, args.workers)
    base_s = time.perf_counter() - t0
    print(f"loss-landscape-style loop (default allocator): {base_s:8.1f} s  ({base_s / points:.2f} s per point)")
    keep_freed_memory()
    (train_d, test_d), _ = data.place([ds.train, ds.test], "auto", device)
    with float32_math("fp32"):
        surface(model, plane, train_d, test_d, xs[:1], ys[:1], bn="interpolate", mean=ds.mean, std=ds.std,
                device=device)  # warm-up
        t0 = time.perf_counter()
        grid = surface(model, plane, train_d, test_d, xs, ys, bn="interpolate", mean=ds.mean, std=ds.std,
                       device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ours_s = time.perf_counter() - t0
    print(f"minima.surface (keep_freed_memory)         : {ours_s:8.1f} s  ({ours_s / points:.2f} s per point)  "
          f"speed-up {base_s / ours_s:.2f}×")
    diffs = {k: float(np.max(np.abs(grid.values[k] - ref[k]) / np.maximum(np.abs(ref[k]), 1e-12))) for k in ref}
    print("  max relative difference to the baseline: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))


if __name__ == "__main__":
    main()
