"""Autoscaling controller models for the autoscaling experiment (issue 8).

``controller`` (the ``ScalingController`` protocol the experiment driver calls, and the
``Observation`` it passes: what a controller reads from the API server and metrics APIs),
``replica_calc`` (the HPA's per-metric arithmetic, ported from Kubernetes' ReplicaCalculator),
``hpa`` (the HorizontalPodAutoscaler controller: sync loop, tolerance, stabilisation windows,
``behavior`` policies, scale-up cap, min/max), ``keda`` (a KEDA ScaledObject: activation,
scale to and from zero, polling interval, cooldown, on top of its HPA).

The models are pure and clock-driven, so the discrete-event simulator and the live demo drive
the same objects; ``tests/benchmarks/test_hpa_conformance.py`` checks them against a real
kube-controller-manager where one is available.
"""
