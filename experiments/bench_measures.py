"""The generalisation measures' cost on one network: ``python -m experiments.bench_measures [--images 500]``.

Trains the quick study's largest network (an MLP 3072-512-512-10, SGD, on ``synthetic:2000/500`` images — speed does
not depend on pixel values) for a few epochs, then measures it with each registered metric the generalisation study
uses, one ``minima.sharpness`` request per metric on ``--images`` training images, in this process. The baseline is
one exact evaluation of the network's loss over the same images, timed in the same run: each metric's time is printed
in seconds, as a multiple of that evaluation, and as its share of the total; then the total against the issue's
target (every measure of one quick-study network within 20 s on 2 cores) and the measures per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from minima import data
from minima.files import results
from minima.geometry.evaluate import evaluate_checkpoint
from minima.studies.sharpness import measure, measure_request_type
from minima.studies.train import TrainConfig, train

METRICS = ("hessian", "trace", "norms", "pacbayes", "alpha_sharpness", "gradient_noise")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_measures", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=500, help="training images the measures use (the quick study: 500)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        final = train(TrainConfig(model="mlp", model_kwargs={"widths": [512, 512]}, data="synthetic:2000/500",
                                  epochs=3, batch_size=64, optimizer="sgd", lr=0.01, out=str(run), progress=False))
        request = measure_request_type()
        common = {"checkpoints": [final], "train_subset": args.images, "trace_max_probes": 30, "topk": 1,
                  "norms_init": str(run / "init.pt"), "pacbayes_init": str(run / "init.pt")}
        images = {"train": data.load_source("synthetic:2000/500").subset(args.images, None, seed=0).train}
        evaluate_checkpoint(final, images)  # warm-up
        t0 = time.perf_counter()
        evaluate_checkpoint(final, images)  # the baseline: the checkpoint loaded and its loss evaluated once
        evaluation = time.perf_counter() - t0
        seconds, results_count = {}, 0
        for metric in METRICS:
            out = Path(tmp) / f"{metric}.h5"
            t0 = time.perf_counter()
            measure(request(**common, metrics=[metric], out=out))
            seconds[metric] = time.perf_counter() - t0
            results_count += len(results.load_sharpness(out))
    total = sum(seconds.values())
    print(f"\ntorch {torch.__version__}, {args.threads} threads; MLP 3072-512-512-10, {args.images} training images; "
          f"one exact evaluation (the checkpoint loaded, the loss over the images) {evaluation:.3f} s")
    print(f"{'metric':<16} {'seconds':>8} {'× evaluation':>13} {'share':>7}")
    for metric, s in seconds.items():
        print(f"{metric:<16} {s:8.2f} {s / evaluation:13.1f} {100 * s / total:6.1f}%")
    print(f"all {len(METRICS)} metrics ({results_count} results): {total:.1f} s — target ≤ 20 s "
          f"({'met' if total <= 20 else 'missed'}); {results_count / total:.1f} results per second")


if __name__ == "__main__":
    main()
