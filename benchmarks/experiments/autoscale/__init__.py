"""The autoscaling experiment (issue 8): which signal should scale LLM replicas.

``sim`` (one run: scenario, signal, controller, front end -> measures), ``run`` (the plan,
the target sweep, parallel execution, ``results.json``), ``report`` (report.md and figures).
"""
