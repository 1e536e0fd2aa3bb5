"""Batch-size sweep with the linear scaling rule, gradual warmup and a cosine schedule (Goyal et al. 2017).

    python -m experiments.batch_sweep --preset quick                  # BN-MLP, ≈ 10 min on 2 CPU cores
    python -m experiments.batch_sweep --preset paper                  # MobileNetV2 32…2048 (GPU work)

One model trained at each global batch size B with SGD (momentum 0.9, weight decay 1e-4 not on BN/bias),
LR = η_ref · B / 256 reached by per-iteration warmup, then cosine decay to 0; plus the largest batch once more
without warmup. For each run: final test accuracy, final training loss and Keskar's φ(ε = 1e-3, full space,
BatchNorm ``batch``). Writes a markdown table and ``figures/batch_sweep.png`` (accuracy and sharpness
against batch size, log-x). Finished runs are skipped, interrupted ones resumed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from experiments._pipeline import copy_figures, interruptible, write_summary
from minima import data as data_mod
from minima.core import config as cfg
from minima.core.allocator import keep_freed_memory
from minima.core.config import setting
from minima.files import results
from minima.geometry.evaluate import evaluate_checkpoint
from minima.optim.schedule import scaled_lr
from minima.studies.sharpness import MeasureRequest, measure
from minima.studies.train import NonFiniteLossError, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SweepPreset:
    """Every knob of the sweep, with units; read from ``experiments/configs/pipelines/batch_sweep_<name>.toml`` (or
    a TOML file given by path) over these defaults (the paper's MobileNetV2 protocol)."""

    model: str = setting("mobilenet_v2", "network")
    model_kwargs: dict = setting(help="model arguments", factory=dict)
    data: str | None = setting(None, "data source", default_text="$MINIMA_DATA, then the torchvision download")
    train_subset: int | None = setting(None, "stratified training subset", unit="samples", default_text="all")
    test_subset: int | None = setting(None, "stratified test subset", unit="samples", default_text="all")
    batches: tuple[int, ...] = setting((32, 64, 128, 256, 512, 1024, 2048), "global batch sizes", unit="samples")
    ref_lr: float = setting(0.1, "SGD learning rate at --ref-batch (scaled linearly with the batch)")
    ref_batch: int = setting(256, "reference batch size", unit="samples")
    epochs: int = setting(200, "epochs (cosine decay to 0 over them)", unit="epochs")
    warmup_epochs: float = setting(5.0, "gradual warmup", unit="epochs")
    weight_decay: float = setting(1e-4, "L2 weight decay (not on BN/bias)")
    augment: bool = setting(True, "random crop + flip")
    micro_batch: int | None = setting(None, "largest forward batch", unit="samples", default_text="the whole batch")
    sharpness_samples: int = setting(1000, "training samples for φ", unit="samples")
    eps: float = setting(1e-3, "Keskar box size ε")
    maxiter: int = setting(10, "L-BFGS-B iterations")


CONFIGS = ROOT / "experiments" / "configs" / "pipelines"
PRESET_NAMES = ("paper", "quick", "smoke")  # experiments/configs/pipelines/batch_sweep_<name>.toml


def load_preset(name_or_path: str) -> tuple[str, SweepPreset]:
    """(name, preset) for a preset name (``experiments/configs/pipelines/batch_sweep_<name>.toml``) or a TOML file."""
    return cfg.load_preset(SweepPreset, CONFIGS, "batch_sweep_", name_or_path)


def _run_one(p: SweepPreset, batch: int, warmup: bool, out: Path, ds: data_mod.Dataset,
             pretrained: str | None = None) -> dict[str, Any]:
    config = TrainConfig(
        pretrained=pretrained,
        model=p.model, model_kwargs=dict(p.model_kwargs), data=p.data, train_subset=p.train_subset,
        test_subset=p.test_subset, epochs=p.epochs, batch_size=batch, micro_batch=p.micro_batch, optimizer="sgd",
        lr=p.ref_lr, ref_batch=p.ref_batch, scaling="linear", warmup_epochs=p.warmup_epochs if warmup else 0.0,
        schedule="cosine", momentum=0.9, nesterov=False, weight_decay=p.weight_decay, decay_bn_bias=False,
        augment=p.augment, seed=0, init_seed=1337, out=str(out),
    )
    peak_lr = scaled_lr(p.ref_lr, p.ref_batch, batch, "linear")
    row: dict[str, Any] = {"batch": batch, "warmup": warmup, "peak_lr": peak_lr}
    final = out / "final.pt"
    if not final.exists():
        try:
            train(config, resume=(out / "last.pt").exists(), dataset=ds)
        except NonFiniteLossError as exc:
            return {**row, "diverged": str(exc).split(";")[0]}
    evals = evaluate_checkpoint(final, {"train": ds.train, "test": ds.test})
    tr, test = evals["train"], evals["test"]
    sharp = out / "sharpness.h5"
    measure(MeasureRequest(checkpoints=[final], metrics=["keskar"], eps=[p.eps], subspace=None, maxiter=p.maxiter,
                           train_subset=p.sharpness_samples, bn_mode="batch",
                           eval_batch_size=min(1000, p.sharpness_samples),
                           out=sharp))
    phi = next(float(r["phi"]) for r in results.load_sharpness(sharp) if r["metric"].startswith("keskar_full"))
    return {**row, "test_acc": 100 * test.accuracy, "train_acc": 100 * tr.accuracy, "train_loss": tr.loss, "phi": phi}


def table_markdown(rows: list[dict[str, Any]], p: SweepPreset, name: str, ds: data_mod.Dataset, wall: float) -> str:
    lines = [
        f"# Batch-size sweep — `{p.model}`, preset `{name}`", "",
        f"{len(ds.train)} training / {len(ds.test)} test images ({ds.spec.get('kind')}); SGD momentum 0.9, weight "
        f"decay {p.weight_decay:g} (not on BN/bias), LR {p.ref_lr:g}·B/{p.ref_batch} reached by {p.warmup_epochs:g} "
        f"epochs of per-iteration warmup, cosine to 0 over {p.epochs} epochs; augmentation {p.augment}. "
        f"φ: Keskar ε = {p.eps:g}, full space, BN batch, {p.sharpness_samples} training samples. "
        f"Wall time {wall / 60:.1f} min.", "",
        "| batch | warmup | peak LR | train acc (%) | test acc (%) | train loss | φ |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "diverged" in r:
            lines.append(f"| {r['batch']} | {'yes' if r['warmup'] else 'no'} | {r['peak_lr']:g} | diverged | "
                         f"diverged | — | — |")
        else:
            lines.append(f"| {r['batch']} | {'yes' if r['warmup'] else 'no'} | {r['peak_lr']:g} | {r['train_acc']:.2f} "
                         f"| {r['test_acc']:.2f} | {r['train_loss']:.4f} | {r['phi']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Test accuracy and φ against the batch size; ``title`` says what was trained on what."""
    ok = [r for r in rows if "diverged" not in r]
    warm = [r for r in ok if r["warmup"]]
    cold = [r for r in ok if not r["warmup"]]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    a1, a2 = fig.subplots(1, 2)
    a1.plot([r["batch"] for r in warm], [r["test_acc"] for r in warm], "o-", label="linear rule + warmup")
    a1.plot([r["batch"] for r in cold], [r["test_acc"] for r in cold], "s", color="tab:red", label="no warmup")
    a2.plot([r["batch"] for r in warm], [r["phi"] for r in warm], "o-")
    a2.plot([r["batch"] for r in cold], [r["phi"] for r in cold], "s", color="tab:red")
    for ax, lab in ((a1, "test accuracy (%)"), (a2, "Keskar φ(ε=1e-3)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch size")
        ax.set_ylabel(lab)
    a2.set_yscale("log")
    a1.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=130)
    return path


@interruptible("batch_sweep")  # Ctrl-C or SIGTERM: one line, exit 75, the same command continues
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.batch_sweep", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="quick",
                    help=f"{', '.join(PRESET_NAMES)} (experiments/configs/pipelines/batch_sweep_<name>.toml) or a "
                         "TOML file's path (default: quick)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="override the preset's batch sizes")
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: runs/batch_sweep_<preset>)")
    ap.add_argument("--figures", type=Path, default=None,
                    help="also copy batch_sweep.png into this directory, e.g. figures (default: run directory only)")
    ap.add_argument("--pretrained", default=None,
                    help="mobilenet_v2: 'imagenet' (torchvision download) or a local ImageNet state-dict file")
    args = ap.parse_args(argv)
    try:
        name, p = load_preset(args.preset)
    except (ValueError, FileNotFoundError) as exc:
        print(f"[experiments.batch_sweep] error: {exc}", file=sys.stderr)
        return 2
    keep_freed_memory()
    batches = tuple(args.batches or p.batches)
    out = args.out or Path("runs") / f"batch_sweep_{name}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ds = data_mod.load_source(p.data, p.train_subset, p.test_subset)
    ds = ds.subset(p.train_subset, p.test_subset, seed=0)
    runs = [(b, True, out / f"b{b}") for b in batches] + [(batches[-1], False, out / f"b{batches[-1]}_nowarmup")]
    rows = []
    for k, (b, warmup, where) in enumerate(runs, start=1):
        print(f"[experiments.batch_sweep] stage {k}/{len(runs)}: batch {b}{'' if warmup else ' without warmup'}"
              + (" (complete, kept)" if (where / "sharpness.h5").exists() else ""), flush=True)
        rows.append(_run_one(p, b, warmup, where, ds, args.pretrained))
    wall = time.perf_counter() - t0
    md = table_markdown(rows, p, name, ds, wall)
    write_summary(out, md, {"preset": cfg.to_dict(p), "rows": rows})
    fig = plot_sweep(rows, out / "batch_sweep.png", title=(
        f"{p.model}, {len(ds.train):,} train / {len(ds.test):,} test images ({ds.spec.get('kind')}), "
        f"{p.epochs} epochs, SGD + linear LR rule, cosine; φ on {p.sharpness_samples:,} training images"))
    (fig,) = copy_figures([fig], args.figures)
    print(md)
    print(f"[experiments.batch_sweep] wrote {out / 'summary.md'} and {fig} in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
