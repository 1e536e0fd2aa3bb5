"""``python -m minima.zoo analyze``: score every measure of a study (or of any table of networks) as a predictor of
generalisation — Kendall τ, the granulated Ψ, PGDL's conditional mutual information, Dziugaite's robust sign errors
(:mod:`minima.pipelines.correlation`) — into ``scores.csv``, ``scores.md`` and ``correlations.png``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minima.core.config import setting
from minima.files import checkpoint as ckpt_io
from minima.files.rundir import write_text_atomic
from minima.pipelines import correlation


@dataclass(frozen=True)
class AnalysisRequest:
    """What ``python -m minima.zoo analyze`` is asked."""

    table: Path = setting(help="a zoo study's directory (its runs.csv) or any CSV with one row per network",
                          positional=True)
    hparams: str | None = setting(None, "the hyper-parameter columns, comma-separated (e.g. lr,depth,width)",
                                  default_text="a zoo table's varied settings without the seed")
    measures: str | None = setting(None, "the measure columns, comma-separated",
                                   default_text="every other column that holds numbers")
    test_images: int | None = setting(None, "test images each gap was measured on (the Hoeffding weights of the "
                                      "robust sign errors)", unit="images",
                                      default_text="from a zoo run's checkpoint; without it no sign errors")
    max_train_loss: float | None = setting(None, "leave out networks whose final training loss is above this (Jiang "
                                           "et al.: trained to cross-entropy 0.01)", unit="nats",
                                           default_text="keep all")
    min_ess: float = setting(12.0, "robust sign errors: smallest effective sample size of an environment")
    bootstrap: int = setting(200, "bootstrap draws over seeds for the intervals of τ and Ψ (0: none)")
    color: str | None = setting(None, "the hyper-parameter that colours the scatter panels",
                                default_text="the first")
    out: Path | None = setting(None, "directory of scores.csv, scores.md and correlations.png",
                               default_text="<study directory>/analysis, or <table stem>_analysis beside a CSV")


def _zoo_test_images(study_dir: Path) -> int | None:
    """The test-set size a zoo's runs were evaluated on (the first run with a final checkpoint)."""
    manifest = study_dir / "manifest.json"
    if not manifest.exists():
        return None
    for run in json.loads(manifest.read_text()).get("runs", []):
        final = Path(run["directory"]) / "final.pt"
        if final.exists():
            return int(ckpt_io.load_checkpoint(final)["meta"]["data"]["test_size"])
    return None


def _fmt(v: Any) -> str:
    return "—" if not isinstance(v, int | float) or not math.isfinite(v) else f"{v:+.3f}" if isinstance(v, float) \
        else str(v)


def markdown(rows: list[dict[str, Any]], nets: correlation.Networks, source: Path, test_images: int | None,
             min_ess: float = 12.0) -> str:
    """The scores as a markdown table with what they were computed on."""
    hp = list(nets.hparams)
    lines = [f"# Generalisation measures — {source}", "",
             f"{nets.n} networks; hyper-parameters {', '.join(hp)}; gap = train − test accuracy. Excluded: "
             + (", ".join(f"{n} ({why})" for why, n in nets.excluded.items()) or "none") + ". Robust sign errors "
             + (f"weighted for {test_images} test images." if test_images else "not computed (no test-set size)."),
             "", "| measure | τ | Ψ | " + " | ".join(f"ψ {h}" for h in hp)
             + " | CMI (S = 2) | CMI (S = 1) | CMI (S = 0) | sign error mean / max (environments) |",
             "|---|---|---|" + "---|" * len(hp) + "---|---|---|---|"]
    for r in rows:
        label = r["measure"] + (f" ({r['networks']} of {nets.n})" if r["networks"] < nets.n else "")
        if "kendall_tau" not in r:
            lines.append(f"| {label} |" + " — |" * (len(hp) + 5) + " fewer than 3 networks have it |")
            continue
        tau = _fmt(r["kendall_tau"]) + (f" [{r['kendall_tau_lo']:+.2f}, {r['kendall_tau_hi']:+.2f}]"
                                        if "kendall_tau_lo" in r else "")
        sign = (f"{r['sign_error_mean']:.3f} / {r['sign_error_max']:.3f} ({r['environments']} of "
                f"{r['environments_all']})" if r.get("environments") else
                f"none of {r['environments_all']} reach ESS {min_ess:g}" if "environments" in r else "—")
        lines.append(f"| {label} | {tau} | {_fmt(r['psi'])} | "
                     + " | ".join(_fmt(r[f"psi_{h}"]) for h in hp)
                     + f" | {_fmt(r['cmi'])} | {_fmt(r['cmi_s1'])} | {_fmt(r['cmi_s0'])} | {sign} |")
    lines += ["", "τ: Kendall's τ with the gap over all pairs (bootstrap 95 % interval over seeds); Ψ and ψ: Jiang et "
              "al.'s granulated τ; CMI: the PGDL competition's score with conditioning sets of S hyper-parameters "
              "(its own: S = 2), 1 for the gap itself, 0 for a measure that only follows the conditioning "
              "hyper-parameters; "
              f"sign errors: Dziugaite et al.'s weighted sign error over environments (pairs of configurations "
              f"differing in one hyper-parameter, over their seeds) of effective sample size ≥ {min_ess:g}."]
    return "\n".join(lines) + "\n"


def _names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def analyze(req: AnalysisRequest, say: Any = print) -> Path:
    """Score the table; write ``scores.csv``, ``scores.md`` and ``correlations.png`` into the output directory
    (created only once the table has been read and scored); returns that directory."""
    source = Path(req.table)
    if source.is_dir():
        csv_path, out, test_images = source / "runs.csv", req.out or source / "analysis", req.test_images
        if not csv_path.exists():
            raise ValueError(f"{source} has no runs.csv: give a zoo study's directory or a CSV file")
        test_images = test_images or _zoo_test_images(source)
    elif source.is_file():
        csv_path, out, test_images = source, req.out or source.with_name(f"{source.stem}_analysis"), req.test_images
    else:
        raise ValueError(f"{source} does not exist: give a zoo study's directory or a CSV file")
    nets = correlation.read_table(csv_path, _names(req.hparams), _names(req.measures), req.max_train_loss)
    if not nets.measures:
        raise ValueError(f"{csv_path} has no measure columns: give them with --measures")
    color = req.color or next(iter(nets.hparams), None)
    if color is not None and color not in nets.hparams:
        raise ValueError(f"--color {color}: not one of the hyper-parameters {list(nets.hparams)}")
    say(f"[minima.zoo] analyze: {nets.n} networks, {len(nets.measures)} measure(s), hyper-parameters "
        f"{list(nets.hparams)}" + (f"; excluded {nets.excluded}" if nets.excluded else ""))
    rows = correlation.score(nets, test_images, req.min_ess, req.bootstrap)
    out.mkdir(parents=True, exist_ok=True)
    correlation.write_scores(rows, out / "scores.csv")
    text = markdown(rows, nets, csv_path, test_images, req.min_ess)
    write_text_atomic(out / "scores.md", text)
    if color is not None:
        from minima.figures import plot_correlations

        fig = plot_correlations([r for r in rows if "kendall_tau" in r], list(nets.hparams), nets, color,
                                f"{csv_path}: {nets.n} networks, hyper-parameters {', '.join(nets.hparams)}")
        fig.savefig(out / "correlations.png", dpi=120)
    say(text)
    say(f"[minima.zoo] wrote {out / 'scores.csv'}, {out / 'scores.md'}"
        + (f" and {out / 'correlations.png'}" if color is not None else ""))
    return out
