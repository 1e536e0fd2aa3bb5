"""``python -m minima.plot FILE.h5``: redraw figures from result files (see :mod:`minima.plots`)."""

import sys

from minima.plots import main

if __name__ == "__main__":
    sys.exit(main())
