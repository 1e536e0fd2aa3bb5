"""The zoo: every run of a study trained, evaluated and measured, on minima's own pool of local workers or as a Slurm
job array (submitit), and one tidy table of them all.

The study's directory holds ``manifest.json`` (``format = "minima.zoo/1"``: the study as declared, the pool, every
run's index, hash, varied settings and directory, the Slurm jobs submitted), ``seconds.json`` (wall seconds of each
run's last piece of work here, for estimates) and ``runs.csv`` (:func:`minima.pipelines.runs.write_table`). The runs
live in the pool (default ``<study dir>/runs``), one directory per run hash. A study started again skips every
complete run, resumes every interrupted one from its ``last.pt`` and ends with the same table, whoever started the
processes: what differs between executors is only that.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import signal
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from minima import utc_now
from minima.core.allocator import keep_freed_memory
from minima.core.cli import duration
from minima.core.config import setting
from minima.core.vocab import Executor, check_choice
from minima.files.rundir import write_text_atomic
from minima.optim.steps import stop_on_signals
from minima.pipelines.runs import complete, run_one, write_table, zoo_state
from minima.pipelines.study import RunSpec, Study, load_study, parse_shard, shard

FORMAT = "minima.zoo/1"


class ZooInterrupted(RuntimeError):
    """SIGTERM or Ctrl-C reached the zoo: the runs in progress wrote their ``last.pt``; running the same command
    again continues (exit status 75, ``minima.optim.steps.EXIT_INTERRUPTED``, as for training)."""


@dataclass(frozen=True)
class Layout:
    """Where a study's files go: its directory and the pool of run directories."""

    study_dir: Path
    pool: Path

    @property
    def manifest(self) -> Path:
        """The study's ``manifest.json``: the resolved study and its runs."""
        return self.study_dir / "manifest.json"

    @property
    def table(self) -> Path:
        """The study's tidy table ``runs.csv``."""
        return self.study_dir / "runs.csv"

    @property
    def seconds(self) -> Path:
        """The study's ``seconds.json``: each finished run's wall time, for the estimate."""
        return self.study_dir / "seconds.json"


def layout(study_file: Path, out: str | None, pool: str | None) -> Layout:
    """``--out`` (default ``runs/zoo/<file stem>``) and ``--pool`` (default ``<out>/runs``)."""
    study_dir = Path(out) if out else Path("runs") / "zoo" / Path(study_file).stem
    return Layout(study_dir, Path(pool) if pool else study_dir / "runs")


def _write_json(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def write_manifest(study: Study, where: Layout, **extra: Any) -> None:
    """``manifest.json``: the study as declared and its runs (kept: the Slurm jobs recorded earlier)."""
    old = _read_json(where.manifest)
    _write_json(where.manifest, {
        "format": FORMAT, "name": study.name, "study_file": str(study.source.resolve()), "declared": study.declared,
        "pool": str(where.pool.resolve()), "created": old.get("created", utc_now()),
        "runs": [{"index": r.index, "run": r.run, "params": r.params, "directory": str(r.directory.resolve())}
                 for r in study.runs],
        "slurm_jobs": old.get("slurm_jobs", []) + extra.get("slurm_jobs", []),
    })


def prepare(study_file: Path, out: str | None, pool: str | None) -> tuple[Study, Layout, str | None]:
    """The study validated whole and its directories made (nothing else written), and — when ``manifest.json``
    lists other runs (the study file was edited: a grid value added, a seed more) — a line saying what changed: the
    runs are named by their configuration, so the ones in common are kept and only the new ones run."""
    where = layout(study_file, out, pool)
    study = load_study(study_file, where.pool)
    if where.study_dir.exists() and not where.study_dir.is_dir():
        raise ValueError(f"--out {where.study_dir} is a file; give a directory")
    before = [r["run"] for r in _read_json(where.manifest).get("runs", [])]
    changed = None
    if before and before != [r.run for r in study.runs]:
        added = len({r.run for r in study.runs} - set(before))
        gone = len(set(before) - {r.run for r in study.runs})
        changed = (f"[minima.zoo] the study differs from its manifest: {added} run(s) added, {gone} no longer in it "
                   f"(their directories stay in {where.pool}); the runs in common are kept")
    where.study_dir.mkdir(parents=True, exist_ok=True)
    where.pool.mkdir(parents=True, exist_ok=True)
    return study, where, changed


def summary(study: Study, runs: list[RunSpec] | None = None) -> Counter[str]:
    """How many runs are complete, diverged, failed, interrupted, running or pending."""
    return Counter(zoo_state(spec, study)[0] for spec in (runs if runs is not None else study.runs))


def said(counts: Counter[str]) -> str:
    """Run counts by state in words, in a fixed order.

    >>> said(Counter({"failed": 1, "complete": 3}))
    '3 complete, 1 failed'
    """
    order = ("complete", "diverged", "failed", "interrupted", "running", "pending")
    return ", ".join(f"{counts[k]} {k}" for k in order if counts[k])


def _init_worker(threads: int) -> None:
    """A worker process's settings, once: torch threads, freed memory kept (as every command does for itself:
    malloc settings are per process), Ctrl-C as KeyboardInterrupt."""
    import torch

    keep_freed_memory()
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def estimate(seconds: dict[str, float], todo: list[RunSpec], workers: int, threads: int) -> str:
    """The line that says how long ``todo`` will take on ``workers`` × ``threads``: from the ``seconds`` earlier runs
    of the study took here (``seconds.json``), or that the estimate follows the first finished run."""
    if not todo:
        return "[minima.zoo] nothing to run"
    known = list(seconds.values())
    workers = max(1, min(workers, len(todo)))
    if known and todo:
        per_run = sum(known) / len(known)
        return (f"[minima.zoo] estimated {duration(per_run * len(todo) / workers)} for {len(todo)} run(s) on "
                f"{workers} worker(s) × {threads} thread(s) (from {len(known)} earlier run(s), {duration(per_run)} "
                "each)")
    return (f"[minima.zoo] {len(todo)} run(s) on {workers} worker(s) × {threads} thread(s); the estimate follows "
            "the first finished run")


def run_local(study: Study, where: Layout, todo: list[RunSpec], workers: int, threads: int,
              say: Callable[[str], None] = print) -> Counter[str]:
    """The pending runs on ``workers`` processes of ``threads`` torch threads each (spawned once, reused), the table
    rewritten as each run ends. SIGTERM or Ctrl-C: the workers' runs write ``last.pt`` and stop, then
    :class:`ZooInterrupted`."""
    seconds = _read_json(where.seconds)
    say(estimate(seconds, todo, workers, threads))
    outcomes: Counter[str] = Counter()
    done_seconds: list[float] = []
    context = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                  initargs=(threads,))
    bar = tqdm(total=len(todo), desc=f"{study.name}: runs", unit="run", dynamic_ncols=True, disable=None)
    stopped: int | None = None
    try:
        with stop_on_signals() as stop:  # SIGTERM or Ctrl-C to the zoo itself: a flag, then the workers are told
            futures = {pool.submit(run_one, spec, study, threads): spec for spec in todo}
            pending = set(futures)
            while pending:
                finished, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                for future in finished:
                    spec = futures[future]
                    try:
                        outcome = future.result()
                    except (cf.process.BrokenProcessPool, cf.CancelledError) as exc:
                        outcome = {"run": spec.run, "state": "interrupted" if stop["signal"] else "failed",
                                   "reason": f"worker process ended: {exc}", "seconds": float("nan")}
                    outcomes[outcome["state"]] += 1
                    if outcome["state"] != "interrupted":
                        seconds[spec.run] = outcome["seconds"]
                        done_seconds.append(outcome["seconds"])
                        _write_json(where.seconds, seconds)
                    write_table(study, where.table)
                    bar.update(1)
                    left = len(todo) - sum(outcomes.values())
                    note = f" ({outcome['reason']})" if outcome["state"] not in ("complete",) and outcome["reason"] \
                        else ""
                    eta = (f", about {duration(sum(done_seconds) / len(done_seconds) * left / min(workers, left))} "
                           "left") if left and done_seconds else ""
                    tqdm.write(f"[minima.zoo] run {spec.index} {spec.run} {outcome['state']}{note} in "
                               f"{duration(outcome['seconds'])}; {sum(outcomes.values())}/{len(todo)} done{eta}")
                if stop["signal"] is not None and stopped is None:
                    stopped = stop["signal"]
                    for future in pending:
                        future.cancel()
                    for process in list(getattr(pool, "_processes", {}).values()):  # the runs stop at their next step
                        with suppress(ProcessLookupError):
                            os.kill(process.pid, signal.SIGTERM)
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
        write_table(study, where.table)
    if stopped is not None:
        raise ZooInterrupted(f"stopped by signal {stopped}: {said(summary(study))}; the runs in progress wrote their "
                             "last.pt — run the same command again to continue")
    return outcomes


class SlurmRun:
    """One run as a submitit job: calling it trains/evaluates/measures the run; ``checkpoint`` (called by submitit on
    pre-emption or time-out, after the run wrote ``last.pt``) requeues the same call, which resumes."""

    def __init__(self, study: Study, threads: int | None) -> None:
        self.study = study
        self.threads = threads

    def __call__(self, spec: RunSpec) -> dict[str, Any]:
        """Run one run in this (cluster) process; returns its table row."""
        keep_freed_memory()  # a fresh process on the cluster
        return run_one(spec, self.study, self.threads)

    def checkpoint(self, spec: RunSpec) -> Any:
        """The requeue hook of submitit: resubmit the same run (it resumes from its ``last.pt``)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, spec)


def submit_slurm(study: Study, where: Layout, todo: list[RunSpec], *, parallelism: int, timeout_min: int,
                 partition: str | None, account: str | None, cpus_per_task: int, gpus_per_node: int,
                 cluster: str = "slurm") -> str:
    """One job array of the pending runs (at most ``parallelism`` at once); returns its job id at once. ``cluster``:
    ``slurm``, or submitit's ``debug`` (every run in this process, for tests)."""
    try:
        import submitit
    except ImportError:
        raise ValueError("--executor slurm needs submitit: pip install 'minima[slurm]'") from None
    try:
        executor = submitit.AutoExecutor(folder=where.study_dir / "slurm" / "%j", cluster=cluster)
    except RuntimeError as exc:  # submitit's "Could not detect srun"
        raise ValueError(f"--executor slurm: {exc} — without Slurm use --executor local, or --shard K/N under "
                         "another scheduler") from None
    params: dict[str, Any] = {"timeout_min": timeout_min, "slurm_array_parallelism": parallelism,
                              "cpus_per_task": cpus_per_task, "name": f"minima-zoo-{study.name}"}
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if partition:
        params["slurm_partition"] = partition
    if account:
        params["slurm_account"] = account
    executor.update_parameters(**params)
    jobs = executor.map_array(SlurmRun(study, cpus_per_task), todo)
    job_id = str(jobs[0].job_id).split("_")[0] if jobs else ""
    if cluster == "debug":
        for job in jobs:
            job.result()
    write_manifest(study, where, slurm_jobs=[{"job_id": job_id, "runs": [r.run for r in todo],
                                              "submitted": utc_now()}])
    return job_id


def pending_runs(study: Study, k: int, n: int) -> list[RunSpec]:
    """The runs of shard ``k`` of ``n`` that are not complete yet."""
    return [r for r in shard(study.runs, k, n) if not complete(r, study)]


def default_workers(threads: int | None) -> tuple[int, int]:
    """(workers, threads): all the machine's cores, one thread per worker unless ``threads`` is given."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    t = threads or 1
    return max(1, cores // t), t


@dataclass(frozen=True)
class ZooRequest:
    """What ``python -m minima.zoo`` is asked: the study file, where its files go, who runs it and how much of it."""

    study: Path = setting(help="the study's TOML file (see minima.pipelines.study)", positional=True)
    out: str | None = setting(None, "the study's directory (manifest.json, runs.csv)",
                              default_text="runs/zoo/<study file stem>")
    pool: str | None = setting(None, "directory of the run directories (one per run hash; studies naming the same "
                               "pool share their common runs)", default_text="<out>/runs")
    executor: Executor = setting("local", "local: minima's pool of worker processes; slurm: one job array through "
                                 "submitit (pip install 'minima[slurm]'), returns at once")
    workers: int | None = setting(None, "local worker processes", default_text="the machine's cores / --threads")
    threads: int | None = setting(None, "torch threads per local worker (per Slurm task: --cpus-per-task)",
                                  default_text="1")
    shard: str = setting("1/1", "K/N: only the runs whose index ≡ K − 1 (mod N), to split a study between machines "
                         "or scheduler jobs")
    status: bool = setting(False, "print where every run stands and rewrite runs.csv; train nothing", switch=True)
    dry_run: bool = setting(False, "print the runs and what is complete; train nothing", switch=True)
    slurm_parallelism: int = setting(16, "Slurm: most array tasks running at once", unit="tasks")
    slurm_time: int = setting(60, "Slurm: time limit of each task (a task cut off resumes on requeue)", unit="minutes")
    slurm_partition: str | None = setting(None, "Slurm partition", default_text="the cluster's default")
    slurm_account: str | None = setting(None, "Slurm account", default_text="the cluster's default")
    slurm_gpus: int = setting(0, "Slurm: GPUs per task")


def zoo(req: ZooRequest, say: Callable[[str], None] = print) -> Counter[str]:
    """Run (or submit, or report on) the study of ``req``; returns the count of runs per state at the end."""
    check_choice("executor (--executor)", req.executor, Executor)
    k, n = parse_shard(req.shard)
    if (req.workers is not None and req.workers < 1) or (req.threads is not None and req.threads < 1):
        raise ValueError("--workers and --threads must be ≥ 1")
    study, where, changed = prepare(Path(req.study), req.out, req.pool)
    if changed:
        say(changed)
    write_manifest(study, where)
    mine = shard(study.runs, k, n)
    todo = [r for r in mine if not complete(r, study)]
    counts = summary(study)
    head = (f"[minima.zoo] {study.name}: {len(study.runs)} runs ({said(counts)})"
            + (f"; shard {k}/{n}: {len(mine)} runs, {len(todo)} to do" if n > 1 else f"; {len(todo)} to do")
            + f"; study directory {where.study_dir}, runs in {where.pool}")
    say(head)
    if req.status or req.dry_run:
        if req.dry_run:
            workers, threads = default_workers(req.threads)
            say(estimate(_read_json(where.seconds), todo, req.workers or workers, threads))
            for r in mine:
                state = zoo_state(r, study)[0]
                say(f"  run {r.index:4d} {r.run} {state:<11} " + " ".join(f"{k}={v}" for k, v in r.params.items()))
        jobs = _read_json(where.manifest).get("slurm_jobs", [])
        if jobs and req.status:
            say(f"[minima.zoo] Slurm jobs: {', '.join(j['job_id'] for j in jobs)} (squeue -j ID, sacct -j ID)")
        write_table(study, where.table)
        say(f"[minima.zoo] table: {where.table}")
        return counts
    if not todo:
        write_table(study, where.table)
        say(f"[minima.zoo] nothing to do: every run is complete; table {where.table}")
        return counts
    if req.executor == "slurm":
        threads = req.threads or 1
        job = submit_slurm(study, where, todo, parallelism=req.slurm_parallelism, timeout_min=req.slurm_time,
                           partition=req.slurm_partition, account=req.slurm_account, cpus_per_task=threads,
                           gpus_per_node=req.slurm_gpus)
        say(f"[minima.zoo] submitted Slurm job array {job}: {len(todo)} runs, at most {req.slurm_parallelism} at "
            f"once; follow it with squeue -j {job} or python -m minima.zoo {req.study} "
            f"{'--out ' + str(where.study_dir) + ' ' if req.out else ''}--status")
        return summary(study)
    workers, threads = default_workers(req.threads)
    workers = min(req.workers or workers, len(todo))
    run_local(study, where, todo, workers, threads, say)
    counts = summary(study)
    say(f"[minima.zoo] {study.name}: {said(counts)}; table {where.table}")
    return counts
