"""A zoo study: a TOML file that declares many training runs over minima's own training request, and what to measure.

For example::

    name = "zoo-smoke"            # optional (default: the file's stem)
    seeds = [0, 1]                # every configuration once per seed (default [0]); the seed is TrainConfig.seed

    [train]                       # the request every run shares: any setting of python -m minima.train
    model = "mlp"
    epochs = 3

    [grid]                        # lists whose product gives the configurations
    lr = [0.01, 0.1]
    batch_size = [32, 128]

    [[variants]]                  # optional: each table one more set of settings, crossed with the grid
    optimizer = "sgd"

    [measure]                     # optional: measured on each run's final.pt (any minima.sharpness setting)
    metrics = ["hessian"]
    train_subset = 256

A run is the training request resolved (defaults filled in); it is named by a hash of that request without the
settings that do not change its numbers (``out``, ``progress``, ``threads``, ``log``), so two studies that declare
the same run share its directory in a common pool. Validation of the whole study (every key, every request, every
metric) happens here, before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from minima.core import config as cfg
from minima.studies.sharpness import measure_request_type, result_jobs
from minima.studies.train import TrainConfig, validate_config

STUDY_KEYS = ("name", "seeds", "train", "grid", "variants", "measure")
#: How a run is executed, not what it computes.
NOT_IN_HASH = ("out", "progress", "threads", "log", "print_every")
#: Settings added to the training request after its hash was introduced: left out while they hold their default, so a
#: zoo's existing runs keep their hashes (and directories) when the request grows.
ADDED_LATER = ("sam_rho", "sam_base", "asam_eta", "swa_start", "swa_lr", "swa_anneal_epochs", "cutout", "cutout_p",
               "label_smoothing")
MEASURE_SET_BY_ZOO = ("checkpoints", "out", "device")


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: its position (``index``), the settings that vary (``params``: grid, variant and seed
    values), its hash, and the resolved training request (``config.out`` is the run's directory)."""

    index: int
    run: str
    params: dict[str, Any]
    config: TrainConfig

    @property
    def directory(self) -> Path:
        """The run directory (the training request's ``out``)."""
        return Path(self.config.out)


@dataclass(frozen=True)
class Study:
    """A validated study: its name, source file, the runs in order, and the measurement request fields (as a dict,
    without checkpoints and output, which each run supplies)."""

    name: str
    source: Path
    runs: list[RunSpec]
    measure: dict[str, Any] = field(default_factory=dict)
    declared: dict[str, Any] = field(default_factory=dict)

    @property
    def varied(self) -> list[str]:
        """The names of the settings that vary between runs, in declaration order."""
        names: list[str] = []
        for spec in self.runs:
            names += [k for k in spec.params if k not in names]
        return names

    def measure_key(self) -> str:
        """16 hex digits naming the measurement request (its file in each run is ``measure-<key>.h5``)."""
        return cfg.resume_key(self.measure)


def run_hash(config: TrainConfig) -> str:
    """12 hex digits of the SHA-256 of the resolved training request without :data:`NOT_IN_HASH` and without the
    :data:`ADDED_LATER` settings that hold their defaults (sorted JSON)."""
    defaults = cfg.to_dict(TrainConfig())
    settings = {k: v for k, v in cfg.to_dict(config).items()
                if k not in NOT_IN_HASH and not (k in ADDED_LATER and v == defaults[k])}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _unknown(keys: list[str], valid: list[str], where: str) -> None:
    """One line naming the first unknown key, its nearest valid spelling, and where it was found."""
    for key in keys:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {sorted(valid)}"
            raise ValueError(f"{where}: unknown key {key!r}{hint}")


def _as_list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list, e.g. [0.01, 0.1]; got {value!r}")
    return value


def load_study(path: str | Path, pool: str | Path) -> Study:
    """The study of the TOML file ``path`` with its runs' directories under ``pool``; every key, training request and
    measurement request is checked first (one line for the first problem, naming the key)."""
    path = Path(path)
    declared = cfg.load_toml(path)
    _unknown(list(declared), list(STUDY_KEYS), str(path))
    train_fields = [f.name for f in dataclasses.fields(TrainConfig)]
    base = declared.get("train", {})
    grid = declared.get("grid", {})
    variants = declared.get("variants", [{}])
    if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
        raise ValueError(f"{path}: [[variants]] must be tables of training settings")
    seeds = _as_list(declared.get("seeds", [0]), f"{path}: seeds")
    for where, table in (("[train]", base), ("[grid]", grid), *(("[[variants]]", v) for v in variants)):
        _unknown(list(table), train_fields, f"{path} {where}")
        if "out" in table:
            raise ValueError(f"{path} {where}: 'out' is chosen by the zoo (each run's directory is named by its "
                             "hash); drop it")
    if "seed" in grid or any("seed" in v for v in variants) or "seed" in base:
        raise ValueError(f"{path}: give seeds as the top-level list seeds = [...], not as a training setting")
    for key, values in grid.items():
        _as_list(values, f"{path} [grid] {key}")
    name = str(declared.get("name", path.stem))
    keys = list(grid)
    runs: list[RunSpec] = []
    seen: dict[str, int] = {}
    combos = list(itertools.product(*(grid[k] for k in keys))) if keys else [()]
    for variant, combo, seed in itertools.product(variants, combos, seeds):
        params = {**dict(zip(keys, combo, strict=True)), **variant, "seed": seed}
        where = f"{path}: run {params}"
        try:
            config = cfg.resolve(TrainConfig, None, {**base, **params})
            validate_config(config)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
        digest = run_hash(config)
        if digest in seen:
            raise ValueError(f"{where} is the same run as run {seen[digest]} (every setting equal); each run once")
        seen[digest] = len(runs)
        runs.append(RunSpec(len(runs), digest, params, replace(config, out=str(Path(pool) / digest),
                                                                   progress=False)))
    measure = dict(declared.get("measure", {}))
    if measure:
        request_type = measure_request_type()
        _unknown(list(measure), [f.name for f in dataclasses.fields(request_type)
                                 if f.name not in MEASURE_SET_BY_ZOO], f"{path} [measure]")
        try:  # the metric names and their parameters, checked now
            result_jobs(cfg.resolve(request_type, None, {**measure, "checkpoints": ["x.pt"]}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path} [measure]: {exc}") from exc
    return Study(name=name, source=path, runs=runs, measure=measure, declared=declared)


def parse_shard(text: str) -> tuple[int, int]:
    """``K/N`` → (K, N) with 1 ≤ K ≤ N; the K-th of N shards takes the runs whose index ≡ K − 1 (mod N)."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes K/N, e.g. 2/4 (the second of four shards); got {text!r}") from None
    if not 1 <= k <= n:
        raise ValueError(f"--shard {text}: K must be in 1..N")
    return k, n


def shard(runs: list[RunSpec], k: int, n: int) -> list[RunSpec]:
    """The runs of shard ``k`` of ``n`` (1-based): every n-th run by index."""
    return [r for r in runs if r.index % n == k - 1]
