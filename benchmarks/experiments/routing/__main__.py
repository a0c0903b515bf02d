import sys

from benchmarks.experiments.routing.run import main

sys.exit(main())
