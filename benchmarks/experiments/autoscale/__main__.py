import sys

from benchmarks.experiments.autoscale.run import main

sys.exit(main())
