"""``python -m minima.train``: train a network, one process or ``torchrun`` DDP, the same command.

The command: flags generated from :class:`minima.studies.train.TrainConfig`, layered over a ``--config`` TOML preset
(or, with ``--resume`` and no preset, over the run's own ``config.json``), then :func:`minima.studies.train.train`.
``TrainConfig`` and ``train`` are importable from here as documented.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from minima.core import config as cfg
from minima.core.cli import run_command
from minima.files.rundir import RunDir
from minima.optim.steps import EXIT_INTERRUPTED, TrainingInterrupted
from minima.studies.train import NonFiniteLossError, TrainConfig, TrainState, train

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainState", "TrainingInterrupted", "main", "parse_args", "train"]


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, bool]:
    """Config (defaults ← ``--config`` TOML ← flags, or ← the run's own ``config.json`` on ``--resume``)."""
    parser = cfg.ArgumentParser(prog="python -m minima.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML preset whose keys are the flags' names (e.g. experiments/configs/keskar_c1_sb.toml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last.pt (with its own config.json as the defaults)")
    cfg.add_arguments(parser, TrainConfig)
    args = parser.parse_args(argv)
    config = cfg.resolve(TrainConfig, args.config, args)
    stored = RunDir(config.out).config()
    if args.resume and args.config is None and stored:
        # Resuming needs no flags but --out: start from the run's own settings, then apply what was given.
        given = {k: v for k, v in vars(args).items() if v is not None and k in TrainConfig.__dataclass_fields__}
        config = cfg.resolve(TrainConfig, None, {**stored, **given})
    return config, args.resume


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m minima.train``: train; returns the exit status (75 when interrupted, 2 for bad input)."""
    def work() -> None:
        config, resume = parse_args(argv)
        if resume and not RunDir(config.out).last.exists():
            raise ValueError(f"{config.out} has no last.pt: nothing to resume; drop --resume to start a new run")
        train(config, resume=resume)

    # TrainingInterrupted: SIGTERM/Ctrl-C already wrote last.pt and says how to resume.
    return run_command("minima.train", work, user_errors=(NonFiniteLossError,),
                       statuses={TrainingInterrupted: EXIT_INTERRUPTED})


if __name__ == "__main__":
    sys.exit(main())
