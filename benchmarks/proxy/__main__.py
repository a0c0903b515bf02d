"""``python -m benchmarks.proxy``: the proxy overhead benchmark (see ``benchmarks.proxy.run``)."""

import sys

from benchmarks.proxy.run import main

sys.exit(main())
