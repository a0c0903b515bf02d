"""The routing-quality experiment (issue 7): policies compared on a simulated 8 x A10G cluster.

``plan`` (what runs), ``run`` (runs it, pools seeds, writes ``results.json``), ``schema`` (that
file's shape), ``goals``, ``findings``, ``report`` and ``plots`` (everything rendered from the
JSON), ``validate_live`` with ``live_processes`` (the same scenario, scaled down, through the
real gateway and simulated replicas over HTTP).
"""
