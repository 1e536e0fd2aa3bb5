"""Aligning two networks: B's hidden units permuted to match A's, written as a normal checkpoint.

The permutation structure is traced from the model (:mod:`minima.geometry.permute`); the permutation is found by
weight matching or activation matching (:mod:`minima.geometry.matching`). The aligned checkpoint computes exactly
B's function — checked on a batch of training images before it is written (largest absolute logit difference
recorded) — and records its provenance in ``meta["alignment"]``: both checkpoints' paths and sha256, the method and
its settings, every group's permutation, and the matching objective before and after.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minima import utc_now
from minima.core import distributed
from minima.core.config import setting, to_dict
from minima.core.distributed import resolve_device
from minima.core.options import CheckpointData
from minima.core.vocab import AlignMethod, check_choice
from minima.data import load_for_checkpoint, normalize, stratified_subset
from minima.files import checkpoint as ckpt_io
from minima.files.naming import check_output, run_label
from minima.geometry.evaluate import Batching, check_model_accepts
from minima.geometry.matching import Matching, activation_matching, weight_matching
from minima.geometry.permute import PermutationSpec, UnpermutableError, permutation_spec, permute_state

# Largest |logit difference| between B and aligned B accepted as "the same function" (float32 rounding of sums
# taken in another order).
FUNCTION_TOLERANCE = 1e-4
DEFAULT_SAMPLES = 2000


@dataclass(frozen=True)
class AlignRequest(CheckpointData):
    """Everything ``python -m minima.align`` can be asked to do (recorded in the aligned checkpoint)."""

    checkpoint_a: Path = setting(help="checkpoint A (the reference; unchanged)", positional=True)
    checkpoint_b: Path = setting(help="checkpoint B (its hidden units are permuted to match A's)", positional=True)
    method: AlignMethod = setting("weights", "weight matching (Ainsworth et al. 2023, Algorithm 1) or activation "
                                  "matching (correlations on training images)")
    samples: int | None = setting(None, "training images activation matching correlates on (a stratified "
                                  "subset)", unit="samples",
                                  default_text=f"{DEFAULT_SAMPLES} (all when the data has fewer)")
    seed: int = setting(0, "seed of the order weight matching visits the permutations in")
    max_sweeps: int = setting(100, "weight matching stops after this many sweeps over the permutations even if "
                              "one still improves", unit="sweeps")
    out: Path | None = setting(None, "aligned checkpoint (.pt)", default_text="<B>_aligned_to_<A>.pt beside B")
    overwrite: bool = setting(False, "replace an existing --out", switch=True)


def default_output(req: AlignRequest) -> Path:
    """Beside B: ``<B>_aligned_to_<A>.pt``."""
    return Path(req.checkpoint_b).parent / f"{run_label(req.checkpoint_b)}_aligned_to_{run_label(req.checkpoint_a)}.pt"


def align(req: AlignRequest) -> tuple[Path, Matching]:
    """Align B to A as ``req`` says, write the aligned checkpoint and return its path and the matching. Under torchrun
    rank 0 does the work and writes the file; every rank returns its result, or raises its refusal."""
    with distributed.session(req.device) as env:
        return distributed.from_main(env, lambda: _align(req), also=(UnpermutableError,))


def _align(req: AlignRequest) -> tuple[Path, Matching]:
    check_choice("alignment method (--method)", req.method, AlignMethod)
    if req.samples is not None and req.samples < 2:
        raise ValueError(f"--samples {req.samples}: activation matching needs at least 2 images")
    ckpt_io.check_inputs([req.checkpoint_a, req.checkpoint_b])
    out = check_output(Path(req.out) if req.out is not None else default_output(req), "a checkpoint", ".pt")
    for given in (req.checkpoint_a, req.checkpoint_b):
        if out.resolve() == Path(given).resolve():
            raise ValueError(f"--out {out} is an input checkpoint; choose another file")
    if out.exists() and not req.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    ck_a, ck_b = ckpt_io.load_checkpoint(req.checkpoint_a), ckpt_io.load_checkpoint(req.checkpoint_b)
    ckpt_io.check_compatible(ck_a, ck_b, str(req.checkpoint_a), str(req.checkpoint_b))
    model_a = ckpt_io.model_from_checkpoint(ck_a, req.trust_import).eval()
    model_b = ckpt_io.model_from_checkpoint(ck_b, req.trust_import).eval()
    ds = load_for_checkpoint(ck_b["meta"]["data"], req.data, req.train_subset, None, req.subset_seed, req.data_root,
                             mode=req.subset_mode)
    check_model_accepts(model_a, ds)
    mean, std = tuple(ck_b["meta"]["data"]["mean"]), tuple(ck_b["meta"]["data"]["std"])
    example = normalize(ds.train.images[:2], mean, std)
    spec = permutation_spec(model_a, example)
    if not spec.groups:
        raise ValueError(f"{ck_a['model']['name']} has no hidden units that can be permuted; nothing to align")
    if req.samples is not None and req.samples > len(ds.train):
        raise ValueError(f"--samples {req.samples} exceeds the {len(ds.train)} training images; pass at most that")
    device = resolve_device(req.device)
    t0 = time.perf_counter()
    print(f"[minima.align] {req.method} matching of {len(spec.groups)} permutation(s) "
          f"({sum(g.size for g in spec.groups)} units) of {run_label(req.checkpoint_b)} to "
          f"{run_label(req.checkpoint_a)}", flush=True)
    subset = None
    if req.method == "weights":
        found = weight_matching(ck_a["state_dict"], ck_b["state_dict"], spec, req.seed, req.max_sweeps)
    else:
        n = req.samples if req.samples is not None else min(DEFAULT_SAMPLES, len(ds.train))
        split = ds.train.take(stratified_subset(ds.train.labels, n, req.subset_seed)) if n < len(ds.train) else ds.train
        subset = {"n": n, "seed": req.subset_seed, "data": ds.describe()}
        found = activation_matching(model_a.to(device), model_b.to(device), spec, split, mean, std,
                                    Batching(req.eval_batch_size, device))
    aligned = permute_state(ck_b["state_dict"], spec, found.perms)
    diff = _function_difference(ck_b, aligned, example, req.trust_import)
    if not diff <= FUNCTION_TOLERANCE:
        raise UnpermutableError(f"the permuted B differs from B by {diff:.3g} in its logits: the traced permutation "
                           "structure is wrong for this model; nothing was written")
    record = alignment_record(req, ck_a, ck_b, spec, found, diff, subset)
    aligned_ck = ckpt_io.make_checkpoint(ck_b["model"]["name"], ck_b["model"]["kwargs"], aligned,
                                         {**ck_b["meta"], "alignment": record})
    ckpt_io.save_checkpoint(aligned_ck, out)
    moved, units = units_moved(found.perms)
    said = f"{moved:,} of {units:,} units moved" + (": B already matches A" if moved == 0 else "")
    print(f"[minima.align] {said}; {found.objective_name}: {found.objective_before:.6g} → {found.objective_after:.6g}"
          f"{f' after {found.sweeps} sweep(s)' if req.method == 'weights' else ''} "
          f"({time.perf_counter() - t0:.1f} s); aligned B = B's function (largest logit difference {diff:.1e})",
          flush=True)
    print(f"[minima.align] wrote {out}", flush=True)
    return out, found


def units_moved(perms: Mapping[str, Any]) -> tuple[int, int]:
    """How many hidden units a permutation moves (``perm[i] ≠ i``), of how many, over all permuted groups."""
    arrays = [np.asarray(p) for p in perms.values()]
    return sum(int(np.sum(p != np.arange(len(p)))) for p in arrays), sum(len(p) for p in arrays)


def _function_difference(ck_b: dict[str, Any], aligned: dict[str, torch.Tensor], x: torch.Tensor,
                         trusted: tuple[str, ...]) -> float:
    model_b = ckpt_io.model_from_checkpoint(ck_b, trusted).eval()
    model_c = ckpt_io.model_from_checkpoint({**ck_b, "state_dict": aligned}, trusted).eval()
    with torch.no_grad():
        return float((model_b(x) - model_c(x)).abs().max())


def alignment_record(req: AlignRequest, ck_a: dict[str, Any], ck_b: dict[str, Any], spec: PermutationSpec,
                     found: Matching, diff: float, subset: dict[str, Any] | None) -> dict[str, Any]:
    """``meta["alignment"]`` of an aligned checkpoint (plain types only: loadable with ``weights_only=True``)."""
    return {
        "checkpoint_a": str(req.checkpoint_a), "sha256_a": ckpt_io.sha256_file(req.checkpoint_a),
        "checkpoint_b": str(req.checkpoint_b), "sha256_b": ckpt_io.sha256_file(req.checkpoint_b),
        "method": req.method, "seed": req.seed, "sweeps": found.sweeps, "subset": subset,
        "objective": {"name": found.objective_name, "before": found.objective_before,
                      "after": found.objective_after, "history": [float(v) for v in found.history]},
        "permutations": {g.name: [int(i) for i in np.asarray(found.perms[g.name])] for g in spec.groups},
        "groups": {g.name: {"size": g.size, "tensors": sorted({ax.key for ax in g.axes})} for g in spec.groups},
        "function_max_abs_diff": diff, "request": to_dict(req), "created": utc_now(),
    }
