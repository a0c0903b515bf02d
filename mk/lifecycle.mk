# mk/lifecycle.mk — the replica-lifecycle experiments (issue 5). Included by the top-level Makefile.
#
#   make bench-saturation                       # ~2.5 min: capacity, then 3 arms at 120 %
#   make bench-saturation SATURATION_ARGS="--bound inflight:11 --duration-s 40"
#   make test-lifecycle-slow                    # scale from zero with 5-10 s cold starts
#
# bench-saturation starts its own simulated replicas and gateway processes (loopback, free
# ports), prints a table and writes benchmarks/results/saturation.json.

SATURATION_ARGS ?=
LIFECYCLE_PY := $(or $(PY),.venv/bin/python)
LIFECYCLE_STAMP := $(or $(STAMP),.venv/.installed)

.PHONY: bench-saturation test-lifecycle-slow

bench-saturation: $(LIFECYCLE_STAMP)
	$(LIFECYCLE_PY) -m benchmarks.experiments.saturation $(SATURATION_ARGS)

test-lifecycle-slow: $(LIFECYCLE_STAMP)
	$(LIFECYCLE_PY) -m pytest -q -s -m slow tests/gateway/test_lifecycle_live.py
