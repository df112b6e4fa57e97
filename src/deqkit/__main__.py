"""``python -m deqkit``: the same as the ``deqkit`` command."""

import sys

from deqkit.app.main import main

if __name__ == "__main__":
    sys.exit(main())
