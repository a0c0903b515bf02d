"""The saturation experiment (issue 5): overload held at the gateway by a saturation bound
versus dispatched at once onto the replicas' own queues. ``run`` runs it and writes
``benchmarks/results/saturation.json``; ``python -m benchmarks.experiments.saturation``."""
