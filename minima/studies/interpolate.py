"""The α line: loss and accuracy along θ(α) = (1 − α)·θ_A + α·θ_B between two checkpoints, or θ + α·d along a
filter-normalised random direction through one (Li et al. 2018), as a one-axis grid (axis ``alpha``) on the grid
runner (:mod:`minima.studies.grid`): this module gives the coordinates, the point function, the summary table
and the endpoint check.

With BatchNorm policy ``interpolate``, α = 0 and α = 1 must reproduce checkpoints A and B evaluated as they are:
the largest relative difference is stored and a mismatch beyond the dtype's tolerance is exit status 1
(:class:`EndpointMismatchError`), the curve kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from minima.core import distributed
from minima.core.config import setting, to_dict
from minima.core.vocab import BNPolicy, Direction, check_choice
from minima.data import Split, load_for_checkpoint, normalize
from minima.figures import save_curve_figure
from minima.files import checkpoint as ckpt_io
from minima.files import results
from minima.files.naming import run_label
from minima.geometry.barriers import barriers
from minima.geometry.directions import StateDict, lerp_state, random_direction, shift_state
from minima.geometry.evaluate import check_model_accepts, recorded_loss
from minima.geometry.points import EvalData, EvalSettings
from minima.geometry.repair import Repairer
from minima.models import has_batchnorm, is_convolutional
from minima.studies.grid import (
    EvalOptions,
    GridStudy,
    check_options,
    curve_table,
    evaluation_setup,
    in_memory,
    parse_axis,
    recorded_attrs,
    run_grid,
)

DEFAULT_ALPHAS = "-1:2:25"
# Largest relative difference the endpoint check accepts: float rounding of the folded vs unfolded network
# (bfloat16: autocast rounding of every product; docs/benchmarks.md has the measured differences).
ENDPOINT_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1e-2}
parse_alphas = parse_axis  # the α grid's parser, under the name users import from minima.interpolate


class EndpointMismatchError(RuntimeError):
    """α = 0 or α = 1 of a curve does not reproduce its checkpoint evaluated directly."""


def interpolate(
    model_a: nn.Module, model_b: nn.Module, train: Split, test: Split, alphas: Sequence[float] | np.ndarray,
    bn: BNPolicy = "recompute", *, mean: Sequence[float], std: Sequence[float], batch_size: int = 1000,
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", bn_split: Split | None = None,
    channels_last: bool | None = None,
) -> results.Curve:
    """The curve between two models in memory (the models are not modified).

    ``mean``/``std``: the normalisation the models were trained with (``Dataset.mean``/``std``, or the
    checkpoint's ``meta["data"]``). ``bn_split``: data for BatchNorm re-estimation (default ``train``).
    ``channels_last``: default on for convolutional models.
    """
    alphas = np.asarray(alphas, dtype=np.float64)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    ckpt_io.check_same_layout(state_a, state_b, "model_a", "model_b")
    s = EvalSettings(bn=bn, batch_size=batch_size, dtype=dtype, device=torch.device(device),
                     channels_last=is_convolutional(model_a) if channels_last is None else channels_last)
    d = EvalData(train, test, bn_split or train, tuple(mean), tuple(std))
    values = in_memory(model_a, lambda c: lerp_state(state_a, state_b, float(c[0])), {"alpha": alphas}, d, s)
    return results.curve_from_values(
        alphas, values, {"bn_policy": bn if has_batchnorm(model_a) else "none", "label_a": "A", "label_b": "B"})


@dataclass(frozen=True)
class SweepRequest(EvalOptions):
    """Everything ``python -m minima.interpolate`` can be asked to do (stored in the output file)."""

    checkpoint_a: Path = setting(help="checkpoint A (α = 0)", positional=True)
    checkpoint_b: Path | None = setting(None, "checkpoint B (α = 1); omit it with --direction random",
                                        positional=True)
    alphas: str = setting(DEFAULT_ALPHAS, "α grid: START:STOP:NUM (NUM points, both ends included) or a "
                          "comma-separated list")
    direction: Direction = setting("segment", "segment A→B, or a filter-normalised random direction through A "
                                   "(Li et al. 2018)")
    direction_seed: int = setting(0, "seed of the random direction")
    repair: bool = setting(False, "REPAIR (Jordan et al. 2023) at every point: each hidden unit's pre-activation mean "
                           "and std on training data reset to the interpolation of the endpoints'; for networks "
                           "without BatchNorm (with BatchNorm, --bn recompute is the equivalent reset)", switch=True)
    out: Path | None = setting(None, "output .h5 file", default_text="<A>_vs_<B>.h5 or <A>_random<seed>.h5 beside A")


def default_output(req: SweepRequest) -> Path:
    """Beside checkpoint A: ``<A>_vs_<B>.h5``, or ``<A>_random<seed>.h5`` for a random direction."""
    a, where = run_label(req.checkpoint_a), Path(req.checkpoint_a).parent
    if req.direction == "random":
        return where / f"{a}_random{req.direction_seed}.h5"
    assert req.checkpoint_b is not None
    return where / f"{a}_vs_{run_label(req.checkpoint_b)}.h5"


def run(req: SweepRequest) -> Path:
    """Run (or resume) a sweep into an HDF5 grid file and return its path. Works under torchrun."""
    return run_grid(req, _prepare, shared=(EndpointMismatchError,))


def _validate(req: SweepRequest) -> tuple[np.ndarray, Path]:
    check_choice("direction", req.direction, Direction)
    if req.direction == "segment" and req.checkpoint_b is None:
        raise ValueError("interpolation needs two checkpoints (ckptA ckptB); for a random direction through "
                         "one checkpoint use --direction random")
    if req.direction == "random" and req.checkpoint_b is not None:
        raise ValueError("--direction random takes one checkpoint, got two")
    if req.repair and req.direction != "segment":
        raise ValueError("--repair interpolates the statistics of two endpoints; it needs a segment A→B, not "
                         "--direction random")
    ckpt_io.check_inputs([req.checkpoint_a, req.checkpoint_b])
    out = check_options(req, Path(req.out) if req.out is not None else default_output(req))
    return parse_axis(req.alphas), out


def _load_pair(req: SweepRequest) -> tuple[dict[str, Any], dict[str, Any] | None]:
    ck_a = ckpt_io.load_checkpoint(req.checkpoint_a)
    ck_b = ckpt_io.load_checkpoint(req.checkpoint_b) if req.checkpoint_b is not None else None
    if ck_b is not None:
        ckpt_io.check_compatible(ck_a, ck_b, str(req.checkpoint_a), str(req.checkpoint_b))
        ckpt_io.check_same_normalisation(ck_a, ck_b)
    return ck_a, ck_b


def _prepare(req: SweepRequest, env: distributed.DistEnv) -> GridStudy:
    alphas, out = _validate(req)
    ck_a, ck_b = _load_pair(req)
    model = ckpt_io.model_from_checkpoint(ck_a, req.trust_import)
    ds = load_for_checkpoint(ck_a["meta"]["data"], req.data, req.train_subset, req.test_subset, req.subset_seed,
                             req.data_root, mode=req.subset_mode)
    check_model_accepts(model, ds)
    policy, s, d, record = evaluation_setup(req, model, ds, ck_a["meta"]["data"], env.device,
                                            recorded_loss(ck_a["meta"]))

    state_a = ck_a["state_dict"]
    if ck_b is not None and req.repair:
        repairer = Repairer(model, [state_a, ck_b["state_dict"]], normalize(ds.train.images[:2], ds.mean, ds.std), d, s)
        # the inserted BatchNorm layers hold the statistics set at the point: evaluated as they are
        model, s = repairer.model, replace(s, bn="interpolate")
        state_b = ck_b["state_dict"]

        def point(c: np.ndarray) -> StateDict:
            alpha = float(c[0])
            return repairer.state(lerp_state(state_a, state_b, alpha), [1.0 - alpha, alpha])
    elif ck_b is not None:
        state_b = ck_b["state_dict"]

        def point(c: np.ndarray) -> StateDict:
            return lerp_state(state_a, state_b, float(c[0]))
    else:
        direction = random_direction(model, state_a, req.direction_seed)

        def point(c: np.ndarray) -> StateDict:
            return shift_state(state_a, direction, float(c[0]))

    config = {
        "alphas": alphas.tolist(), "bn": policy, "direction": req.direction,
        "direction_seed": req.direction_seed if req.direction == "random" else None,
        "filter_normalized": req.direction == "random", "data": record["data"],
        "bn_samples": len(d.bn_split), "eval_batch_size": req.eval_batch_size, "dtype": req.dtype,
        "fold_bn": req.fold_bn, "world_size": env.world_size, "float32_math": req.float32_math,
        "repair": req.repair,
    }
    identity = {
        "checkpoint_a": str(req.checkpoint_a), "checkpoint_b": str(req.checkpoint_b or ""),
        "sha256_a": ckpt_io.sha256_file(req.checkpoint_a),
        "sha256_b": ckpt_io.sha256_file(req.checkpoint_b) if req.checkpoint_b else "",
        "model": ck_a["model"]["name"], "label_a": run_label(req.checkpoint_a),
        "label_b": run_label(req.checkpoint_b) if req.checkpoint_b else f"random direction (seed "
                                                                         f"{req.direction_seed})",
    }
    attrs = recorded_attrs(record, config, to_dict(req), identity)
    expected = {"sha256_a": identity["sha256_a"], "sha256_b": identity["sha256_b"], "bn_policy": policy,
                "config": {k: v for k, v in config.items() if k != "world_size"}}

    def check(path: Path, grid: results.Grid) -> None:
        found = barriers(results.grid_curve(grid)) if req.direction == "segment" else {}
        if found:
            results.set_attrs(path, found)
        if policy == "interpolate":
            _endpoint_check(path, results.grid_curve(grid), ck_a, ck_b, d, s, req.trust_import)

    return GridStudy(
        command="minima.interpolate", out=out, coords={"alpha": alphas}, point=point, model=model, settings=s,
        data=d, attrs=attrs, expected=expected, what=f"α line, {req.direction}{', REPAIR' if req.repair else ''}",
        summary=lambda grid: curve_table(results.grid_curve(grid), "alpha", "minima.interpolate",
                                         with_barriers=req.direction == "segment"),
        figure=lambda grid, path: save_curve_figure(results.grid_curve(grid), path), check=check)


def _endpoint_check(out: Path, curve: results.Curve, ck_a: dict, ck_b: dict | None, d: EvalData,
                    s: EvalSettings, trusted: Sequence[str] = ()) -> None:
    """With interpolated BN statistics, α = 0 and α = 1 must reproduce checkpoints A and B evaluated as
    they are; store and print the largest relative difference (a validity check of the whole pipeline), and
    raise :class:`EndpointMismatchError` naming the endpoint when it exceeds the dtype's tolerance."""
    checks: dict[str, Any] = {}
    for alpha, ck, name in ((0.0, ck_a, "a"), (1.0, ck_b, "b")):
        hits = np.flatnonzero(curve.alpha == alpha)
        if ck is None or not len(hits):
            continue
        model = s.place(ckpt_io.model_from_checkpoint(ck, trusted))
        diffs = []
        for split_name, split in (("train", d.train), ("test", d.test)):
            ref = s.evaluate(model, split, d.mean, d.std)
            got_loss = getattr(curve, f"{split_name}_loss")[hits[0]]
            got_acc = getattr(curve, f"{split_name}_accuracy")[hits[0]]
            diffs += [abs(got_loss - ref.loss) / max(abs(ref.loss), 1e-12), abs(got_acc - ref.accuracy)]
        checks[f"endpoint_{name}_max_rel_diff"] = float(max(diffs))
    if not checks:
        return
    results.set_attrs(out, checks)
    tolerance = ENDPOINT_TOLERANCE[s.dtype]
    bad = {k: v for k, v in checks.items() if not v <= tolerance}
    if bad:
        detail = "; ".join(f"checkpoint {k.split('_')[1].upper()} (α = {0 if '_a_' in k else 1}) differs by {v:.2e}"
                           for k, v in bad.items())
        raise EndpointMismatchError(
            f"endpoint check failed: {detail} (relative, tolerance {tolerance:g} for {s.dtype}) between the curve "
            f"and the checkpoint evaluated directly; the curve in {out} is kept, but its values are suspect — "
            "check that both checkpoints load and evaluate as trained (BatchNorm, dtype, --no-fold-bn)")
    print(f"[minima.interpolate] endpoint check OK: α=0/1 vs checkpoints evaluated directly, "
          f"max relative difference {max(checks.values()):.2e}", flush=True)
