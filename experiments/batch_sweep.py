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

import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from experiments._pipeline import (
    Pipeline,
    accuracy_difference,
    copy_figures,
    interruptible,
    within_noise,
    write_summary,
)
from minima import data as data_mod
from minima.core.allocator import keep_freed_memory
from minima.core.config import setting
from minima.files import results
from minima.files.rundir import RunDir
from minima.models import own_import
from minima.optim.schedule import scaled_lr
from minima.pipelines.declared import Declared, Section, Spec
from minima.pipelines.runs import evaluate_run
from minima.pipelines.stages import Rates, Stage
from minima.studies.sharpness import measure, measure_request_type, recorded, result_jobs
from minima.studies.train import NonFiniteLossError, TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sweep:
    """The sweep's own setting (the top level of its preset; [train] and [sharpness] are library requests)."""

    batches: tuple[int, ...] = setting((32, 64, 128, 256, 512, 1024, 2048), "global batch sizes (the largest once "
                                       "more without warmup)", unit="samples")


# the paper's MobileNetV2 protocol: SGD 0.9, wd 1e-4 not on BN/bias, LR 0.1·B/256 by per-iteration warmup, cosine
SPEC = Spec("batch_sweep", Sweep, {
    "train": Section(TrainConfig, {"model": "mobilenet_v2", "epochs": 200, "optimizer": "sgd", "lr": 0.1,
                                   "ref_batch": 256, "scaling": "linear", "warmup_epochs": 5.0, "schedule": "cosine",
                                   "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4, "decay_bn_bias": False,
                                   "augment": True, "seed": 0, "init_seed": 1337},
                     frozenset({"batch_size", "out"}), "every run of the sweep (minima.train)"),
    # Keskar's φ(ε = 1e-3), full space, BatchNorm batch
    "sharpness": Section(measure_request_type(), {"metrics": ["keskar"], "eps": (1e-3,), "subspace": None,
                                                  "maxiter": 10, "train_subset": 1000, "bn_mode": "batch",
                                                  "eval_batch_size": 1000},
                         frozenset({"checkpoints", "out", "trust_import", "metrics"}),
                         "Keskar's φ of every final network (minima.sharpness)"),
})
PIPELINE = Pipeline(SPEC, ROOT / "experiments" / "configs" / "pipelines")


def load_preset(name_or_path: str, overrides: Sequence[str] = ()) -> Declared:
    """A sweep preset (``experiments/configs/pipelines/batch_sweep_<name>.toml`` or a TOML file) with overrides."""
    return PIPELINE.load(name_or_path, overrides)


def runs(p: Declared, out: Path) -> list[tuple[int, bool, Path]]:
    """(batch, warmup, run directory) of every run: each batch size with warmup, the largest once more without."""
    batches = p.own.batches
    return [(b, True, out / f"b{b}") for b in batches] + [(batches[-1], False, out / f"b{batches[-1]}_nowarmup")]


def _diverged(d: Path) -> bool:
    return RunDir(d).status().state == "diverged"


def run_stages(p: Declared, out: Path, data: Callable[[], data_mod.Dataset]) -> list[Stage]:
    """Per run (group: its directory's name): train, evaluate exactly once, measure φ — a diverged run is complete
    after its training stage (its row says so)."""
    t, s = p.values("train"), p.values("sharpness")
    stages = []
    for batch, warmup, d in runs(p, out):
        final = d / "final.pt"
        config = p.request("train", batch_size=batch, out=str(d),
                           **({} if warmup else {"warmup_epochs": 0.0}))
        sharp = p.request("sharpness", checkpoints=[final], out=d / "sharpness.h5",
                          trust_import=own_import(t["model"]),
                          eval_batch_size=min(s["eval_batch_size"], s.get("train_subset") or s["eval_batch_size"]))

        def fit(c: TrainConfig = config, d: Path = d) -> None:
            with contextlib.suppress(NonFiniteLossError):  # in the run's status.json; its row says "diverged"
                train(c, resume=(d / "last.pt").exists(), dataset=data())

        def train_estimate(r: Rates) -> float:
            ds = data()
            return r.training(t["epochs"], len(ds.train), len(ds.test))

        def sharp_estimate(r: Rates, q: Any = sharp) -> float:
            n = q.train_subset or len(data().train)
            return sum(r.measurement(m.cost(job), n) for m, _, job in result_jobs(q) if m.cost is not None)

        name = d.name
        stages += [
            Stage(f"{name}/train", name, lambda f=final, d=d: f.exists() or _diverged(d), fit, train_estimate),
            Stage(f"{name}/evaluate", name, lambda d=d: (d / "evaluation.json").exists() or _diverged(d),
                  lambda d=d: evaluate_run(d, own_import(t["model"]), t.get("eval_batch_size", 1000)),
                  lambda r: r.grid(1, len(data().train) + len(data().test)), (f"{name}/train",)),
            Stage(f"{name}/sharpness", name, lambda d=d, q=sharp: _diverged(d) or recorded(q),
                  lambda q=sharp: measure(q), sharp_estimate, (f"{name}/train",)),
        ]
    return stages


def row(p: Declared, batch: int, warmup: bool, d: Path) -> dict[str, Any]:
    """One run's row, from its files (nothing is computed)."""
    t = p.values("train")
    found: dict[str, Any] = {"batch": batch, "warmup": warmup,
                             "peak_lr": scaled_lr(t["lr"], t["ref_batch"], batch, t["scaling"])}
    status = RunDir(d).status()
    if status.state == "diverged":
        return {**found, "diverged": (status.reason or "non-finite loss").split(";")[0]}
    e = json.loads((d / "evaluation.json").read_text())
    phi = next(float(r["phi"]) for r in results.load_sharpness(d / "sharpness.h5")
               if r["metric"].startswith("keskar_full"))
    return {**found, "test_acc": 100 * e["test_accuracy"], "train_acc": 100 * e["train_accuracy"],
            "train_loss": e["train_loss"], "phi": phi}


def table_markdown(rows: list[dict[str, Any]], p: Declared, ds: data_mod.Dataset, wall: float) -> str:
    t, sh = p.values("train"), p.values("sharpness")
    ok = [r for r in rows if "diverged" not in r]
    base = min((r for r in ok if r["warmup"]), key=lambda r: r["batch"], default=None)
    lines = [
        f"# Batch-size sweep — `{t['model']}`, preset `{p.name}`", "",
        f"{len(ds.train)} training / {len(ds.test)} test images ({ds.spec.get('kind')}); SGD momentum "
        f"{t['momentum']:g}, weight decay {t['weight_decay']:g} (not on BN/bias), LR {t['lr']:g}·B/{t['ref_batch']} "
        f"reached by {t['warmup_epochs']:g} epochs of per-iteration warmup, {t['schedule']} to 0 over {t['epochs']} "
        f"epochs; augmentation {t['augment']}. φ: Keskar ε = {', '.join(f'{e:g}' for e in sh['eps'])}, full "
        f"space, BN {sh['bn_mode']}, {sh['train_subset']} training samples. "
        f"Wall time {wall / 60:.1f} min.", "",
        f"| batch | warmup | peak LR | train acc (%) | test acc (%) | vs batch {base['batch'] if base else '—'} "
        "(points) | train loss | φ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "diverged" in r:
            lines.append(f"| {r['batch']} | {'yes' if r['warmup'] else 'no'} | {r['peak_lr']:g} | diverged | "
                         f"diverged | — | — | — |")
        else:
            lines.append(f"| {r['batch']} | {'yes' if r['warmup'] else 'no'} | {r['peak_lr']:g} | {r['train_acc']:.2f} "
                         f"| {r['test_acc']:.2f} | {versus(r, base, len(ds.test))} | {r['train_loss']:.4f} | "
                         f"{r['phi']:.2f} |")
    lines += ["", f"“vs batch …”: test accuracy minus that of the smallest batch trained with warmup, ± its binomial "
              f"standard error over the {len(ds.test)} test images (one seed); “≈” marks a difference within 2 "
              "standard errors — not distinguishable from noise."]
    return "\n".join(lines) + "\n"


def versus(row: dict[str, Any], base: dict[str, Any] | None, test_images: int) -> str:
    """``row``'s test accuracy minus ``base``'s in points ± the binomial standard error, "≈ " in front when within
    2 standard errors; "—" for the base itself or without one."""
    if base is None or row is base:
        return "—"
    diff, se, _ = accuracy_difference([row["test_acc"]], [base["test_acc"]], test_images)
    return f"{'≈ ' if within_noise(diff, se) else ''}{diff:+.2f} ± {se:.2f}"


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
    ap = PIPELINE.parser(__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="the batch sizes: the same as batches=A/B/C")
    ap.add_argument("--pretrained", default=None, help="mobilenet_v2: 'imagenet' (torchvision download) or a local "
                    "ImageNet state-dict file: the same as train.pretrained=…")
    args = ap.parse_intermixed_args(argv)
    overrides = list(args.overrides) + (
        [f"batches={'/'.join(map(str, args.batches))}"] if args.batches else []) + (
        [f"train.pretrained={args.pretrained}"] if args.pretrained else [])
    try:
        p = load_preset(args.preset, overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"[experiments.batch_sweep] error: {exc}", file=sys.stderr)
        return 2
    keep_freed_memory()
    t = p.values("train")
    out = args.out or Path("runs") / f"batch_sweep_{p.name}"
    t0 = time.perf_counter()

    def load() -> data_mod.Dataset:
        ds = data_mod.load_source(t.get("data"))
        return ds.subset(t.get("train_subset"), t.get("test_subset"), seed=0)

    data = functools.cache(load)

    def rates() -> Rates:  # the sweep measures Keskar's φ of every run
        ds = data()
        return Rates.for_network(t["model"], t.get("model_kwargs"), ds.num_classes, ds.image_shape,
                                 batch=min(p.own.batches[0], 256), keskar=True)

    try:
        data()
        runner = PIPELINE.execute(run_stages(p, out, data), out, args, rates, p.to_dict())
    except (ValueError, OSError, data_mod.DataError) as exc:
        print(f"[experiments.batch_sweep] error: {exc}", file=sys.stderr)
        return 2
    if runner is None or not runner.complete:
        return 0
    rows = [row(p, b, warmup, d) for b, warmup, d in runs(p, out)]
    wall = time.perf_counter() - t0
    ds = data()
    md = table_markdown(rows, p, ds, wall)
    write_summary(out, md, {"preset": p.to_dict(), "rows": rows})
    fig = plot_sweep(rows, out / "batch_sweep.png", title=(
        f"{t['model']}, {len(ds.train):,} train / {len(ds.test):,} test images ({ds.spec.get('kind')}), "
        f"{t['epochs']} epochs, SGD + linear LR rule, cosine; φ on {p.values('sharpness')['train_subset']:,} training "
        "images"))
    (fig,) = copy_figures([fig], args.figures)
    print(md)
    print(f"[experiments.batch_sweep] wrote {out / 'summary.md'} and {fig} in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
