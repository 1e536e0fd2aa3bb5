"""Training throughput of ``minima.train`` against a bare PyTorch loop, measured in the same run.

    python -m experiments.bench_train [--model c1] [--threads 2] [--steps 6]

Both sides train the same model (channels_last for convolutional models), with Adam, on the same in-memory
synthetic 3×32×32 data (throughput does not depend on pixel values), at the same thread count:

* toolkit: :func:`minima.train.train` (uint8 batches normalised per step, exact running metrics, per-step
  reseeding, NaN checks), images/s as it reports in ``metrics.jsonl`` (training loop only);
* baseline: a bare loop over a pre-normalised float tensor — ``zero_grad``, forward, mean cross-entropy,
  backward, ``step`` — with the same micro-batch accumulation at the large batch.

For each batch size the best of two epochs of each side is kept and the ratio toolkit / baseline printed
(target ≥ 0.95): first both with the default allocator, then both after
:func:`minima.core.allocator.keep_freed_memory` (what ``python -m minima.train`` runs with), so the loop's overhead
and the allocator's gain are reported separately. Peak resident memory of a toolkit run at the large batch is
measured in a fresh subprocess, as the command line runs it (target for c1 on CPU: < 2 GB).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minima import data
from minima.core.allocator import keep_freed_memory
from minima.files.rundir import RunDir
from minima.models import build_model, is_convolutional
from minima.studies.train import TrainConfig, train


def toolkit_images_per_s(model: str, ds: data.Dataset, batch: int, micro: int | None, out: Path) -> float:
    config = TrainConfig(model=model, epochs=2, batch_size=batch, micro_batch=micro, device="cpu",
                         eval_test=False, progress=False, out=str(out))
    train(config, dataset=ds)
    lines = RunDir(out).metrics()
    return max(line["images_per_s"] for line in lines)


def baseline_images_per_s(model_name: str, ds: data.Dataset, batch: int, micro: int | None) -> float:
    torch.manual_seed(0)
    channels_last = is_convolutional(model_name)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(model_name).to(memory_format=fmt).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all = data.normalize(ds.train.images, ds.mean, ds.std, channels_last=channels_last)
    y_all = ds.train.labels
    micro = micro or batch
    best = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        steps = len(y_all) // batch
        for s in range(steps):
            opt.zero_grad(set_to_none=True)
            for m in range(0, batch, micro):
                sl = slice(s * batch + m, s * batch + m + micro)
                loss = F.cross_entropy(model(x_all[sl]), y_all[sl]) * (micro / batch)
                loss.backward()
            opt.step()
        best = max(best, steps * batch / (time.perf_counter() - t0))
    return best


PEAK_RSS = """
import resource, sys, tempfile
from minima import data
from minima.core.allocator import keep_freed_memory
keep_freed_memory()
from minima.studies.train import TrainConfig, train
ds = data.synthetic(n_train={n}, n_test=16, image_shape=(3, 32, 32), num_classes=10, seed=0)
with tempfile.TemporaryDirectory() as d:
    train(TrainConfig(model={model!r}, epochs=1, batch_size={batch}, micro_batch={micro}, device="cpu",
                      eval_test=False, progress=False, threads={threads}, out=d), dataset=ds)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB → MiB on Linux
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="c1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="steps per epoch at batch 256")
    parser.add_argument("--large-batch", type=int, default=5000)
    parser.add_argument("--micro-batch", type=int, default=250, help="micro-batch at the large batch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, model {args.model}")
    for allocator in ("default allocator", "keep_freed_memory"):
        if allocator == "keep_freed_memory" and not keep_freed_memory():
            print("keep_freed_memory does not apply on this platform")
            break
        for batch, micro, n in ((256, None, 256 * args.steps),
                                (args.large_batch, args.micro_batch, 2 * args.large_batch)):
            ds = data.synthetic(n_train=n, n_test=16, image_shape=(3, 32, 32), num_classes=10, seed=0)
            base = baseline_images_per_s(args.model, ds, batch, micro)
            with tempfile.TemporaryDirectory() as d:
                ours = toolkit_images_per_s(args.model, ds, batch, micro, Path(d) / "run")
            print(f"{allocator}, batch {batch:5d} (micro {micro or batch}): toolkit {ours:7.1f} img/s, "
                  f"bare loop {base:7.1f} img/s, ratio {ours / base:.3f}", flush=True)
    code = PEAK_RSS.format(n=args.large_batch, model=args.model, batch=args.large_batch, micro=args.micro_batch,
                           threads=args.threads)
    rss = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                .stdout.strip().splitlines()[-1])
    print(f"peak RSS of a toolkit run at batch {args.large_batch} (micro {args.micro_batch}): {rss:.0f} MiB")
    code_full = PEAK_RSS.format(n=args.large_batch, model=args.model, batch=args.large_batch, micro=None,
                                threads=args.threads)
    rss_full = float(subprocess.run([sys.executable, "-c", code_full], capture_output=True, text=True,
                                    check=True).stdout.strip().splitlines()[-1])
    print(f"peak RSS of a toolkit run at batch {args.large_batch} (no accumulation): {rss_full:.0f} MiB")


if __name__ == "__main__":
    main()
