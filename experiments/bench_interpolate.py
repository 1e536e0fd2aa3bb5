"""The α sweep of ``minima.interpolate`` against a reference-style baseline, in the same process.

    python -m experiments.bench_interpolate [--points 4] [--train 10000] [--test 10000] [--threads 2]

Baseline (how the public scripts evaluate a path): C1 in the textbook layer order (ReLU before max-pool); a
torchvision-style dataset that turns each uint8 image
into a PIL image, then ``ToTensor`` + ``Normalize``; a ``DataLoader`` with batch 128; per α,
``state_dict`` interpolation of every floating entry (running statistics included), ``model.eval()``,
float32 forward, loss summed per sample and divided by the count (so both sides compute the same quantity).

Toolkit: :func:`minima.interpolate.interpolate` with the same BatchNorm policy (``interpolate``), on the same
images: in-memory uint8 batches normalised on the fly, batch 1000, channels_last, BatchNorm folded into the
preceding layers for evaluation — timed twice: with the default allocator, then after
:func:`minima.core.allocator.keep_freed_memory` (what ``python -m minima.interpolate`` runs with). The baseline runs
first, with the default allocator, as the public scripts do.

Both use two C1 models (seeded, with randomised BatchNorm statistics so that interpolating them matters)
unless ``--ckpt-a/--ckpt-b`` name trained checkpoints, and α ∈ [0, 1] so every value is finite. Prints
seconds, the speed-up, the largest relative difference of the losses and accuracies, and GFLOP/s — and,
separately, the same for the toolkit's bfloat16 mode (``--dtype bfloat16``: autocast convolutions and matrix
products), whose numbers are not the float32 ones.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from minima import data
from minima.core.allocator import keep_freed_memory
from minima.files import checkpoint as ck
from minima.models import build_model, textbook_order
from minima.studies.interpolate import interpolate


class TorchvisionStyleCIFAR(torch.utils.data.Dataset):
    """What ``torchvision.datasets.CIFAR10.__getitem__`` does: HWC uint8 → PIL image → transform."""

    def __init__(self, split: data.Split, transform: transforms.Compose) -> None:
        self.images = split.images.permute(0, 2, 3, 1).numpy()
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def baseline_sweep(model_a: nn.Module, model_b: nn.Module, ds: data.Dataset, alphas: np.ndarray,
                   device: torch.device | None = None, workers: int = 0) -> dict:
    """The reference loop (see the module notes), on ``device`` (default the CPU); on a GPU with ``workers`` pinned
    DataLoader workers, sums kept on the device until each split is done."""
    device = device or torch.device("cpu")
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(ds.mean, ds.std)])
    loaders = {name: DataLoader(TorchvisionStyleCIFAR(getattr(ds, name), tf), batch_size=128, shuffle=False,
                                num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
               for name in ("train", "test")}
    sa, sb = model_a.state_dict(), model_b.state_dict()
    model = textbook_order(build_model("c1")).to(device)
    out = {f"{s}_{m}": [] for s in ("train", "test") for m in ("loss", "accuracy")}
    for alpha in alphas:
        model.load_state_dict({k: (1 - alpha) * v + alpha * sb[k] if v.is_floating_point() else v
                               for k, v in sa.items()})
        model.eval()
        with torch.no_grad():
            for name, loader in loaders.items():
                loss = torch.zeros((), dtype=torch.float64, device=device)
                correct = torch.zeros((), dtype=torch.int64, device=device)
                count = 0
                for x, y in loader:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    logits = model(x)
                    loss += F.cross_entropy(logits, y, reduction="sum").double()
                    correct += (logits.argmax(1) == y).sum()
                    count += len(y)
                out[f"{name}_loss"].append(float(loss) / count)
                out[f"{name}_accuracy"].append(int(correct) / count)
    return {k: np.array(v) for k, v in out.items()}


def seeded_c1(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("c1")
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.running_mean, std=0.5)
            nn.init.uniform_(m.running_var, 0.5, 2.0)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", type=int, default=4, help="α points in [0, 1]")
    p.add_argument("--train", type=int, default=10_000)
    p.add_argument("--test", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ckpt-a", type=Path, default=None)
    p.add_argument("--ckpt-b", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    try:
        ds = data.load_cifar10(download=False)
        source = "CIFAR-10 (" + ds.spec["kind"] + ")"
    except data.DataError:
        ds = data.synthetic(n_train=args.train, n_test=args.test, image_shape=(3, 32, 32), seed=0)
        source = "synthetic 3×32×32"
    ds = ds.subset(train=args.train, test=args.test, seed=0)
    if args.ckpt_a and args.ckpt_b:
        model_a, model_b = ck.load_model(args.ckpt_a)[0], ck.load_model(args.ckpt_b)[0]
    else:
        model_a, model_b = seeded_c1(1), seeded_c1(2)
    alphas = np.linspace(0.0, 1.0, args.points)
    n_images = args.points * (len(ds.train) + len(ds.test))
    print(f"torch {torch.__version__}, {args.threads} threads; {source}: {len(ds.train)} train + {len(ds.test)} "
          f"test images; {args.points} α points → {n_images} image evaluations per sweep")

    def sweep(dtype: torch.dtype = torch.float32) -> tuple[float, object]:
        t0 = time.perf_counter()
        curve = interpolate(model_a, model_b, ds.train, ds.test, alphas, bn="interpolate", mean=ds.mean,
                            std=ds.std, batch_size=1000, dtype=dtype)
        return time.perf_counter() - t0, curve

    # Warm-up of both sides on 500 + 500 images (first calls load libraries and create kernels).
    small = ds.subset(train=500, test=500, seed=0)
    baseline_sweep(model_a, model_b, small, alphas[:1])
    for dtype in (torch.float32, torch.bfloat16):
        interpolate(model_a, model_b, small.train, small.test, alphas[:1], bn="interpolate", mean=ds.mean,
                    std=ds.std, dtype=dtype)
    t0 = time.perf_counter()
    base = baseline_sweep(model_a, model_b, ds, alphas)
    theirs = time.perf_counter() - t0
    ours_default, _ = sweep()
    applied = keep_freed_memory()
    ours, curve = sweep()
    ours_bf16, curve_bf16 = sweep(torch.bfloat16)

    def differences(got: object) -> dict[str, float]:
        return {key: float(np.max(np.abs(getattr(got, key) - ref) / np.maximum(np.abs(ref), 1e-12)))
                for key, ref in base.items()}
    with FlopCounterMode(display=False) as counter:
        build_model("c1").eval()(torch.zeros(1, 3, 32, 32))
    flops = counter.get_total_flops() * n_images

    def line(name: str, seconds: float) -> str:
        return (f"{name:<38}: {seconds:7.1f} s  ({n_images / seconds:7.0f} img/s, "
                f"{flops / seconds / 1e9:6.1f} GFLOP/s)  speed-up {theirs / seconds:.2f}×")

    print(line("baseline (default allocator)", theirs))
    print(line("toolkit, default allocator", ours_default))
    print(line(f"toolkit, keep_freed_memory ({'applied' if applied else 'NOT applied'})", ours))
    print("  max relative difference to the baseline: "
          + ", ".join(f"{k} {v:.1e}" for k, v in differences(curve).items()))
    print(line("toolkit, bfloat16 autocast (separate)", ours_bf16))
    print("  max relative difference to the float32 baseline: "
          + ", ".join(f"{k} {v:.1e}" for k, v in differences(curve_bf16).items()))


if __name__ == "__main__":
    main()
