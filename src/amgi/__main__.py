"""``python -m amgi`` is the ``amgi`` command."""

import sys

from amgi.cli import main

if __name__ == "__main__":
    sys.exit(main())
