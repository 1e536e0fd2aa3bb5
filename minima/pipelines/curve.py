"""A curve between two minima with everything ``python -m minima.curve`` does around it: align B to A first
(``--align``, :mod:`minima.studies.align`), train the curve (:func:`minima.studies.curve.train_curve`), then evaluate
the curve, the straight line between its endpoints and — when aligned — the straight line to the unaligned B on the t
grid (grid runner; BatchNorm re-estimated at every point), and draw them in one figure, ``curve_vs_lines.png``. A
composition of two studies, so it lives above them: the command and the connectivity pipeline both call
:func:`run`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from minima.core import distributed
from minima.figures import save_curves_figure
from minima.files import checkpoint as ckpt_io
from minima.files import results
from minima.files.naming import run_label
from minima.studies.align import AlignRequest, align
from minima.studies.curve import (
    CurveRequest,
    PathSpec,
    check_request,
    curve_dir,
    curve_paths,
    evaluate_path,
    line_path,
    load_endpoints,
    train_curve,
)
from minima.studies.grid import run_grid


def aligned_b(req: CurveRequest, folder: Path) -> Path:
    """B aligned to A in the curve's directory (reused on ``--resume`` when aligned from these very files)."""
    assert req.checkpoint_a is not None and req.checkpoint_b is not None
    out = folder / f"{run_label(req.checkpoint_b)}_aligned_to_{run_label(req.checkpoint_a)}.pt"
    if out.exists() and req.resume:
        record = ckpt_io.load_checkpoint(out)["meta"].get("alignment", {})
        if (record.get("sha256_a"), record.get("sha256_b"), record.get("method")) == (
                ckpt_io.sha256_file(req.checkpoint_a), ckpt_io.sha256_file(req.checkpoint_b), req.align_method):
            return out
    align(AlignRequest(checkpoint_a=req.checkpoint_a, checkpoint_b=req.checkpoint_b, method=req.align_method,
                       out=out, overwrite=True, data=req.data, data_root=req.data_root, train_subset=req.train_subset,
                       subset_seed=req.subset_seed, device=req.device, float32_math=req.float32_math,
                       eval_batch_size=req.eval_batch_size, trust_import=req.trust_import))
    return out


def run(req: CurveRequest) -> list[Path]:
    """What ``python -m minima.curve`` does, as a library call (pipelines use it): align B to A (``req.align``),
    train the curve, evaluate it, the straight line between its endpoints and — when aligned — the line to the
    unaligned B; draw them (``req.plot``). Returns the grid files (curve first) and the figure."""
    check_request(req)
    folder = curve_dir(req)
    extra: list[PathSpec] = []
    if req.evaluate is None:
        assert req.checkpoint_a is not None and req.checkpoint_b is not None
        ck_a, ck_b = load_endpoints(req.checkpoint_a, req.checkpoint_b)  # refused here: no file written yet
        trained = req
        if req.align:
            folder.mkdir(parents=True, exist_ok=True)
            trained = replace(req, checkpoint_b=aligned_b(req, folder), out=folder)
            extra.append(line_path(ck_a, ck_b, req.checkpoint_a, req.checkpoint_b, folder / "line_unaligned.h5",
                                   "straight line to the unaligned B"))
        curve_file = train_curve(trained)
    else:
        curve_file = Path(req.evaluate)
    paths, model, ds, recorded = curve_paths(req, curve_file)
    if extra:
        paths[1] = replace(paths[1], label="straight line to the aligned B")
    paths += extra
    outs = [run_grid(req, lambda r, env, p=p: evaluate_path(r, p, model, ds, recorded, env)) for p in paths]
    figure = folder / "curve_vs_lines.png"
    if req.plot and distributed.is_main():
        curves = [results.load_curve(o) for o in outs]
        ends = paths[0].identity
        save_curves_figure(curves, figure, labels=[p.label for p in paths],
                           xlabel="t along the curve = α along the lines (0: A, 1: B)",
                           title=f"A = {ends['label_a']}, B = {ends['label_b']}")
        print(f"[minima.curve] wrote {figure}", flush=True)
    return [*outs, figure]
