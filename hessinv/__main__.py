"""``python -m hessinv demo``: see :mod:`hessinv.demo`."""

import sys

from .demo import main

if __name__ == "__main__":
    sys.exit(main())
