"""``python -m deqkit.compare [options]``: the same as ``deqkit compare``."""

import sys

from ._run import main

if __name__ == "__main__":
    sys.exit(main())
