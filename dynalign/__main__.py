"""``python -m dynalign``: the ``dynalign`` command line."""

import sys

from dynalign.cli import main

if __name__ == "__main__":
    sys.exit(main())
