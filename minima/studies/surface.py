"""Loss surfaces: loss and accuracy on a 2-D grid of a plane in parameter space, θ(x, y) = θ0 + x·d1 + y·d2.

Three planes (:mod:`minima.geometry.directions`): through one checkpoint along two seeded random directions,
normalised per filter by default (Li et al. 2018); the affine plane through three checkpoints (coordinates in units
of ‖B − A‖); the plane of the first two principal components of a training trajectory (through its last checkpoint,
the path projected onto it). The grid runner (:mod:`minima.studies.grid`) evaluates, resumes and shards the points;
this module gives the plane, its axes and its figure. A grid estimated above ``max_minutes`` asks for confirmation
on a terminal and is refused elsewhere unless ``yes`` is set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minima.core import distributed
from minima.core.config import differences, setting, to_dict
from minima.core.vocab import BNPolicy, Ignore, Norm
from minima.data import Dataset, Split, load_for_checkpoint, normalize
from minima.figures import save_surface_figure
from minima.files import checkpoint as ckpt_io
from minima.files import landscape, results
from minima.files.checkpoint import RESUMABLE_CHANGES
from minima.files.naming import run_label
from minima.geometry.directions import DirectionError, Plane, checkpoint_plane, random_plane, trajectory_plane
from minima.geometry.evaluate import check_model_accepts, recorded_loss
from minima.geometry.points import EvalData, EvalSettings
from minima.geometry.repair import Repairer
from minima.models import has_batchnorm, is_convolutional
from minima.studies.grid import (
    EvalOptions,
    GridStudy,
    check_options,
    confirm_limit,
    evaluation_setup,
    in_memory,
    parse_axis,
    recorded_attrs,
    run_grid,
)

DEFAULT_POINTS = 21


@dataclass(frozen=True)
class SurfaceRequest(EvalOptions):
    """Everything ``python -m minima.surface`` can be asked to do (stored in the output file)."""

    checkpoints: list[Path] = setting(help="one checkpoint (a random plane through it) or three (the plane through "
                                      "them)", positional=True, factory=list)
    trajectory: list[Path] = setting(help="checkpoints of one training run (≥ 3, e.g. runs/x/epoch_*.pt): the plane "
                                     "of their first two principal components", factory=list,
                                     default_text="none")
    x: str = setting("auto", "x grid: START:STOP:NUM (both ends included), a comma-separated list, or auto[:NUM]",
                     default_text=f"auto: -1:1:{DEFAULT_POINTS} for a random plane, else the marked points ± a "
                     "margin")
    y: str = setting("auto", "y grid: START:STOP:NUM, a comma-separated list, or auto[:NUM]",
                     default_text="auto, chosen for y as for x (not a copy of --x)")
    norm: Norm = setting("filter", "normalisation of random directions (Li et al.): per filter, per layer, or none")
    ignore: Ignore = setting("bn-and-bias", "random directions on 1-D parameters (biases, BatchNorm scale/shift): "
                             "zero (bn-and-bias), or a copy of the weights (none)")
    direction_seed: int = setting(0, "seed of the first random direction (the second uses seed + 1)")
    directions: Path | None = setting(None, "a loss-landscape direction file (net_plotter's xdirection/ydirection, "
                                      "--dir_type weights or states) instead of minima's random directions: the plane "
                                      "of a loss-landscape surface, to compare or overlay with python -m minima.plot",
                                      default_text="minima's own")
    repair: bool = setting(False, "REPAIR (Jordan et al. 2023) at every point of the plane through three checkpoints "
                           "of a network without BatchNorm: each hidden unit's pre-activation mean and std reset to "
                           "the mixture of the three checkpoints' with the point's barycentric weights", switch=True)
    out: Path | None = setting(None, "output .h5 file", default_text="<A>_surface.h5 beside A")
    max_minutes: float = setting(60.0, "ask (or, without a terminal, refuse) above this estimated time", unit="min")
    yes: bool = setting(False, "run even when the estimate exceeds --max-minutes (scripts)", switch=True)


@dataclass
class _Inputs:
    plane: Plane
    model: nn.Module
    origin: dict[str, Any]
    ds: Dataset
    sources: list[Path]
    hashes: list[str] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)


def surface(
    model: nn.Module, plane: Plane, train: Split, test: Split, xs: Sequence[float] | np.ndarray,
    ys: Sequence[float] | np.ndarray, bn: BNPolicy = "recompute", *, mean: Sequence[float], std: Sequence[float],
    batch_size: int = 1000, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    bn_split: Split | None = None, channels_last: bool | None = None,
) -> results.Grid:
    """The grid of a plane in memory (``model`` gives the architecture and is not modified): loss and accuracy at
    every (x, y), as a :class:`minima.files.results.Grid` with axes ``x`` and ``y``."""
    coords = {"x": np.asarray(xs, dtype=np.float64), "y": np.asarray(ys, dtype=np.float64)}
    s = EvalSettings(bn=bn, batch_size=batch_size, dtype=dtype, device=torch.device(device),
                     channels_last=is_convolutional(model) if channels_last is None else channels_last)
    d = EvalData(train, test, bn_split or train, tuple(mean), tuple(std))
    values = in_memory(model, lambda c: plane.point(float(c[0]), float(c[1])), coords, d, s)
    attrs = {"bn_policy": bn if has_batchnorm(model) else "none", "marks": json.dumps(plane.marks),
             "directions": json.dumps(plane.provenance)}
    if plane.path is not None:
        attrs["path"] = json.dumps(plane.path.tolist())
    return results.Grid(axes=("x", "y"), coords=coords, values=values, attrs=attrs)


def default_output(req: SurfaceRequest) -> Path:
    """Beside the plane's first checkpoint (a trajectory's last): ``<label>_surface.h5``."""
    first = Path(req.trajectory[-1] if req.trajectory else req.checkpoints[0])
    return first.parent / f"{run_label(first)}_surface.h5"


def run(req: SurfaceRequest) -> Path:
    """Run (or resume) a surface into an HDF5 grid file and return its path. Works under torchrun."""
    return run_grid(req, _prepare)


def _validate(req: SurfaceRequest) -> Path:
    if req.trajectory and req.checkpoints:
        raise ValueError("give checkpoints or --trajectory, not both")
    if req.directions is not None and (req.trajectory or len(req.checkpoints) != 1):
        raise ValueError("--directions takes the plane through one checkpoint; give exactly one checkpoint")
    if not req.trajectory and len(req.checkpoints) not in (1, 3):
        raise ValueError(f"a plane needs one checkpoint (random directions through it), three (the plane through "
                         f"them) or --trajectory CKPT…; got {len(req.checkpoints)} checkpoint(s)"
                         + ("; for the segment between two use python -m minima.interpolate A.pt B.pt"
                            if len(req.checkpoints) == 2 else ""))
    if req.repair and (req.trajectory or len(req.checkpoints) != 3):
        raise ValueError("--repair mixes the unit statistics of the plane's checkpoints; it needs the plane through "
                         "three checkpoints (A.pt B.pt C.pt), not a random or trajectory plane")
    return check_options(req, Path(req.out) if req.out is not None else default_output(req))


def _same_run(ckpts: Sequence[dict[str, Any]], paths: Sequence[Path]) -> None:
    """Refuse a trajectory whose checkpoints come from different training runs (other settings or seeds)."""
    first = ckpts[0]["meta"]["train_config"]
    for ck, path in zip(ckpts[1:], paths[1:], strict=True):
        diffs = differences(first, ck["meta"]["train_config"], ignore=RESUMABLE_CHANGES - {"out"})
        if diffs:
            raise ValueError(f"the trajectory mixes training runs: {paths[0]} and {path} were trained with different "
                             f"settings ({'; '.join(diffs[:3])}); pass the checkpoints of one run")
    steps = [int(ck["meta"]["step"]) for ck in ckpts]
    if len(set(steps)) != len(steps):
        raise ValueError("the trajectory names the same training step twice; pass each checkpoint once")


def _inputs(req: SurfaceRequest) -> _Inputs:
    paths = [Path(p) for p in (req.trajectory or req.checkpoints)]
    ckpts = [ckpt_io.load_checkpoint(p) for p in paths]
    for ck, path in zip(ckpts[1:], paths[1:], strict=True):
        ckpt_io.check_compatible(ckpts[0], ck, str(paths[0]), str(path))
    if req.trajectory:
        if len(paths) < 3:
            raise DirectionError(f"a trajectory plane needs at least 3 checkpoints; got {len(paths)} — save more "
                                 "with minima.train --save-every 1")
        _same_run(ckpts, paths)
        order = sorted(range(len(paths)), key=lambda i: int(ckpts[i]["meta"]["step"]))
        paths, ckpts = [paths[i] for i in order], [ckpts[i] for i in order]
    origin = ckpts[-1] if req.trajectory else ckpts[0]  # the plane's θ0
    model = ckpt_io.model_from_checkpoint(origin, req.trust_import)
    names = [_mark_name(p) for p in paths]
    states = [ck["state_dict"] for ck in ckpts]
    if req.trajectory:
        params = [n for n, p in model.named_parameters() if req.ignore == "none" or p.dim() > 1]
        plane = trajectory_plane(states, names, params)
    elif len(paths) == 3:
        plane = checkpoint_plane(states, names)
    elif req.directions is not None:
        parameters = [n for n, _ in model.named_parameters()]
        d1, d2, kind = landscape.load_directions(req.directions, states[0], parameters)
        plane = Plane(origin=states[0], d1=d1, d2=d2, marks={names[0]: (0.0, 0.0)},
                      provenance={"kind": "loss-landscape", "dir_file": str(req.directions), "dir_type": kind,
                                  "sha256": ckpt_io.sha256_file(req.directions)})
    else:
        plane = random_plane(model, states[0], req.direction_seed, req.norm, req.ignore, name=names[0])
    ds = load_for_checkpoint(origin["meta"]["data"], req.data, req.train_subset, req.test_subset,
                                      req.subset_seed, req.data_root, mode=req.subset_mode)
    check_model_accepts(model, ds)
    return _Inputs(plane=plane, model=model, origin=origin, ds=ds, sources=paths,
                   hashes=[ckpt_io.sha256_file(p) for p in paths], states=states)


def _mark_name(path: Path) -> str:
    """How a checkpoint is marked on a plane: its run's label, ``x0 (run)`` for a run's initial weights, ``run/epoch_k``
    for a saved epoch."""
    label = run_label(path)
    if path.stem == "init":
        return f"x0 ({label})"
    return f"{label}/{path.stem}" if path.stem.startswith("epoch_") or path.stem == "last" else label


def axis_points(text: str, name: str) -> int:
    """How many points the grid ``text`` of axis ``name`` has: ``auto[:NUM]`` NUM (default 21), else the points of
    :func:`~minima.studies.grid.parse_axis`; a bad grid refused in one line.

    >>> axis_points("-1:1:11", "--x"), axis_points("auto", "--x"), axis_points("auto:7", "--y")
    (11, 21, 7)
    """
    if not text.startswith("auto"):
        return len(parse_axis(text, name))
    count = text.partition(":")[2] or str(DEFAULT_POINTS)
    if text.partition(":")[0] != "auto" or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{name} grid {text!r}: auto takes a point count ≥ 1, e.g. auto:21")
    return int(count)


def auto_axes(req: SurfaceRequest, plane: Plane) -> dict[str, np.ndarray]:
    """The grid: ``--x``/``--y`` as given, or for ``auto[:NUM]`` (NUM points, default 21) [−1, 1] around a random
    plane's checkpoint, and the marked points (checkpoints, the trajectory) with a margin of half their spread (at
    least 0.5) otherwise."""
    marked = np.array(list(plane.marks.values()) + ([] if plane.path is None else plane.path.tolist()))
    axes = {}
    for k, (name, text) in enumerate((("x", req.x), ("y", req.y))):
        if not text.startswith("auto"):
            axes[name] = parse_axis(text, name)
            continue
        points = axis_points(text, name)
        if plane.provenance["kind"] in ("random", "loss-landscape"):
            axes[name] = np.linspace(-1.0, 1.0, points)
        else:
            lo, hi = float(marked[:, k].min()), float(marked[:, k].max())
            margin = max(0.5 * (hi - lo), 0.5 if plane.provenance["kind"] == "checkpoints" else 0.25 * (hi - lo))
            margin = margin if margin > 0 else 0.5
            axes[name] = np.linspace(lo - margin, hi + margin, points)
    return axes


def _prepare(req: SurfaceRequest, env: distributed.DistEnv) -> GridStudy:
    out = _validate(req)
    inp = _inputs(req)
    plane = inp.plane
    policy, s, d, record = evaluation_setup(req, inp.model, inp.ds, inp.origin["meta"]["data"], env.device,
                                            recorded_loss(inp.origin["meta"]))
    coords = auto_axes(req, plane)
    model, point = inp.model, lambda c: plane.point(float(c[0]), float(c[1]))
    if req.repair:
        model, s, point = _repair(inp, d, s)
    config = {"x": coords["x"].tolist(), "y": coords["y"].tolist(), "bn": policy, "directions": plane.provenance,
              "data": record["data"], "bn_samples": len(d.bn_split), "eval_batch_size": req.eval_batch_size,
              "dtype": req.dtype, "fold_bn": req.fold_bn, "world_size": env.world_size,
              "float32_math": req.float32_math, "repair": req.repair}
    identity: dict[str, Any] = {
        "checkpoints": json.dumps([str(p) for p in inp.sources]), "sha256": json.dumps(inp.hashes),
        "model": inp.origin["model"]["name"], "marks": json.dumps(plane.marks),
        "directions": json.dumps(plane.provenance)}
    if plane.path is not None:
        identity["path"] = json.dumps(plane.path.tolist())
    attrs = recorded_attrs(record, config, to_dict(req), identity)
    expected = {"sha256": attrs["sha256"], "bn_policy": policy,
                "config": {k: v for k, v in config.items() if k not in ("world_size", "x", "y")}}
    return GridStudy(
        command="minima.surface", out=out, coords=coords, point=point, model=model, settings=s, data=d, attrs=attrs,
        expected=expected, what=f"{plane.provenance['kind']} plane{', REPAIR' if req.repair else ''}",
        summary=lambda grid: _lowest(grid), figure=save_surface_figure,
        confirm=confirm_limit("minima.surface", req.max_minutes, req.yes))


def _repair(inp: _Inputs, d: EvalData, s: EvalSettings) -> tuple[nn.Module, EvalSettings, Any]:
    """The repaired model, the settings that evaluate it as set, and the point function of REPAIR on the plane
    through three checkpoints: at (x, y) the statistics mix with the barycentric weights of the point."""
    marks = list(inp.plane.marks.values())
    if len(marks) != 3:
        raise ValueError("--repair needs the three checkpoints marked apart on the plane; two share a name — pass "
                         "checkpoints of different runs or file names")
    (xb, yb), (xc, yc) = marks[1], marks[2]  # A is the origin
    solve = np.linalg.inv(np.array([[xb, xc], [yb, yc]], dtype=np.float64))
    repairer = Repairer(inp.model, inp.states, normalize(inp.ds.train.images[:2], inp.ds.mean, inp.ds.std), d, s)
    plane = inp.plane

    def point(c: np.ndarray) -> dict[str, torch.Tensor]:
        w_b, w_c = solve @ np.asarray(c[:2], dtype=np.float64)
        return repairer.state(plane.point(float(c[0]), float(c[1])), [1.0 - w_b - w_c, float(w_b), float(w_c)])

    return repairer.model, replace(s, bn="interpolate"), point


def _lowest(grid: results.Grid) -> str:
    loss = grid.values["train/loss"]
    finite = np.isfinite(loss)
    if not finite.any():
        return f"[minima.surface] no finite training loss on the grid; {int((~finite).sum())} non-finite point(s)"
    i, j = np.unravel_index(np.nanargmin(np.where(finite, loss, np.nan)), loss.shape)
    return (f"[minima.surface] lowest training loss {loss[i, j]:.4g} at (x, y) = ({grid.coords['x'][i]:.3g}, "
            f"{grid.coords['y'][j]:.3g}); {int((~finite).sum())} non-finite point(s)")
