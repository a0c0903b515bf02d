import sys

from benchmarks.experiments.saturation.run import main

sys.exit(main())
