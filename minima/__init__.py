"""minima — sharp vs flat minima: train small/large-batch checkpoints, interpolate, measure sharpness."""

import datetime as _dt

__version__ = "0.1.0"


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string (seconds precision): the ``created`` stamp of every file."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
