"""Discrete-event routing simulator: the real ``policies/`` objects over simulated replicas.

``scenario`` (a run described as plain, picklable data, and the bridge from a
``benchmarks.load`` workload to engine requests), ``gateway_model`` (one simulated gateway:
its own in-flight counts, scrapes with live staleness, the buffer and late binding),
``runner`` (runs a scenario on ``benchmarks.sim.virtual.VirtualCluster`` and measures it).
The routing experiment (``benchmarks.experiments.routing``) is built on ``runner``.
"""
