"""``python -m benchmarks.load`` is ``python -m benchmarks.load.openloop``."""

import sys

from benchmarks.load.cli import main

sys.exit(main())
