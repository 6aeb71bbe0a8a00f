"""``python -m medfed``: the same command line as ``medfed``."""

import sys

from medfed.cli import main

sys.exit(main())
