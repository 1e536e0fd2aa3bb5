"""The GPU benchmark: every ratio measured in the same run, on one device (one command, < 5 min on one GPU).

    python -m experiments.bench_gpu                          # CUDA when available
    python -m experiments.bench_gpu --device cpu --train 2000 --test 500 --steps 4   # a smoke run of the code

1. Training: ``minima.train`` (C1, synthetic 3×32×32 data resident on the device, exact running metrics,
   per-step seeded RNG, float32 math as PyTorch sets it) against a bare loop with the data already on the device
   (normalised once, no metrics), images/s at batch 256 and 5000 — target ≥ 0.95×.
2. Sweep: :func:`minima.studies.interpolate.interpolate` (BN ``interpolate``, fp32 — TF32 off) against the
   reference loop of ``experiments.bench_interpolate`` (PIL + ``ToTensor``/``Normalize``, ``DataLoader`` batch 128
   with 8 pinned workers, textbook C1 on the device) — per-image ratio (target ≥ 25×) and the largest relative
   difference (≤ 1e-5).
3. Curvature: one forward+backward, the first HVP at a θ (builds the gradient graph) and a later one (stored graph)
   on 1,000 images; Lanczos top-5 wall time and HVP count.
4. Peak device memory of each part.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from experiments.bench_interpolate import baseline_sweep, seeded_c1
from minima import data
from minima.core.precision import float32_math
from minima.curvature.hessian import hessian_operator, top_eigenvalues
from minima.curvature.objective import DatasetObjective, FixedBatches
from minima.files.rundir import RunDir
from minima.geometry.evaluate import Batching
from minima.models import build_model
from minima.studies.interpolate import interpolate
from minima.studies.train import TrainConfig, train


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak(device: torch.device, into: dict[str, float], name: str) -> Iterator[None]:
    """Record the peak allocated device memory of the block (GB; CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        into[name] = torch.cuda.max_memory_allocated(device) / 1e9


def timed(fn: Callable[[], object], device: torch.device, repeat: int = 3) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def trainer_images_per_s(ds: data.Dataset, batch: int, device: torch.device, epochs: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(model="c1", epochs=epochs, batch_size=batch, device=str(device.type), eval_test=False,
                             progress=False, out=out, data_on_device="yes")
        train(config, dataset=ds)
        lines = RunDir(out).metrics()
    return max(line["images_per_s"] for line in lines)


def bare_images_per_s(ds: data.Dataset, batch: int, device: torch.device, epochs: int) -> float:
    torch.manual_seed(0)
    model = build_model("c1").to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all = data.normalize(ds.train.images.to(device), ds.mean, ds.std, channels_last=True)
    y_all = ds.train.labels.to(device)
    steps, best = len(y_all) // batch, 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(y_all), device=device)
        _sync(device)
        t0 = time.perf_counter()
        for s in range(steps):
            idx = perm[s * batch : (s + 1) * batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
            opt.step()
        _sync(device)
        best = max(best, steps * batch / (time.perf_counter() - t0))
    return best


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--train", type=int, default=50_000, help="synthetic training images")
    p.add_argument("--test", type=int, default=10_000, help="synthetic test images")
    p.add_argument("--points", type=int, default=4, help="α points of the sweep")
    p.add_argument("--epochs", type=int, default=2, help="training epochs per measurement (best epoch counts)")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers of the reference sweep")
    p.add_argument("--hvp-samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=None, help="cap the training set at steps × 5000 images")
    args = p.parse_args()
    device = torch.device(args.device)
    n_train = args.train if args.steps is None else min(args.train, args.steps * 5000)
    ds = data.synthetic(n_train=n_train, n_test=args.test, image_shape=(3, 32, 32), num_classes=10, seed=0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}; C1, synthetic 3×32×32, {len(ds.train)} train / {len(ds.test)} test")
    memory: dict[str, float] = {}

    for batch in (256, 5000):
        if len(ds.train) < batch:
            continue
        with peak(device, memory, f"train_b{batch}"):
            ours = trainer_images_per_s(ds, batch, device, args.epochs)
        bare = bare_images_per_s(ds, batch, device, args.epochs)
        print(f"training, batch {batch:5d}: minima.train {ours:9.0f} img/s, bare device-resident loop {bare:9.0f} "
              f"img/s, ratio {ours / bare:.2f} (target ≥ 0.95)")

    model_a, model_b = seeded_c1(1), seeded_c1(2)
    alphas = np.linspace(0.0, 1.0, args.points)
    images = args.points * (len(ds.train) + len(ds.test))
    small = ds.subset(train=500, test=500, seed=0)
    baseline_sweep(model_a, model_b, small, alphas[:1], device, args.workers)  # warm-up: workers, kernels
    t0 = time.perf_counter()
    ref = baseline_sweep(model_a, model_b, ds, alphas, device, args.workers)
    theirs = time.perf_counter() - t0
    with float32_math("fp32"), peak(device, memory, "sweep"):
        interpolate(model_a, model_b, small.train, small.test, alphas[:1], bn="interpolate", mean=ds.mean,
                    std=ds.std, device=device)
        (train_dev, test_dev), _ = data.place([ds.train, ds.test], "auto", device)
        _sync(device)
        t0 = time.perf_counter()
        curve = interpolate(model_a, model_b, train_dev, test_dev, alphas, bn="interpolate", mean=ds.mean, std=ds.std,
                            device=device)
        _sync(device)
        ours = time.perf_counter() - t0
    diff = max(float(np.max(np.abs(getattr(curve, k) - v) / np.maximum(np.abs(v), 1e-12))) for k, v in ref.items())
    print(f"sweep, {args.points} α × {len(ds.train) + len(ds.test)} images: reference ({args.workers} pinned workers) "
          f"{theirs:.2f} s, minima {ours:.2f} s → {theirs / ours:.1f}× per image (target ≥ 25×), "
          f"{images / ours:.0f} img/s; max relative difference {diff:.1e} (fp32; target ≤ 1e-5)")

    split = ds.train.take(torch.arange(min(args.hvp_samples, len(ds.train))))
    model = build_model("c1")
    with float32_math("fp32"), peak(device, memory, "curvature"):
        batches = FixedBatches.from_split(split, ds.mean, ds.std, Batching(len(split), device))
        stored = DatasetObjective(model, batches, hvp_cache_bytes=2**40)
        fresh = DatasetObjective(model, batches, hvp_cache_bytes=0)
        v = torch.randn(stored.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        fb = timed(stored.value_and_grad, device)
        first = timed(lambda: fresh.hvp(v), device)
        later = timed(lambda: stored.hvp(v), device)
        print(f"curvature, {len(split)} images: forward+backward {fb * 1e3:.1f} ms; first HVP {first * 1e3:.1f} ms "
              f"({first / fb:.2f}×); stored-graph HVP {later * 1e3:.1f} ms ({later / fb:.2f}×)")
        _sync(device)
        t0 = time.perf_counter()
        res = top_eigenvalues(hessian_operator(stored), k=5, tol=1e-3)
        _sync(device)
        print(f"Lanczos top-5 (tol 1e-3): {time.perf_counter() - t0:.2f} s, {res.hvps} HVPs, λ = "
              + ", ".join(f"{x:.4g}" for x in res.eigenvalues))
    if memory:
        print("peak device memory: " + ", ".join(f"{k} {v:.2f} GB" for k, v in memory.items()))


if __name__ == "__main__":
    main()
