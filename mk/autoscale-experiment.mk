# mk/autoscale-experiment.mk — the autoscaling experiment (issue 8). Included by the top-level Makefile.
#
#   make bench-autoscale               # full plan: report.md, results.json, PNGs in
#                                      # benchmarks/experiments/autoscale/ (~5 min, 2 cores)
#   make bench-autoscale-quick         # shortened plan (< 1 min) into benchmarks/results/autoscale-quick
#   make bench-autoscale-render        # redraw report.md and figures from the committed results.json
#   make bench-autoscale-live          # the live demonstration: real gateway, KEDA model, from zero
#
# AUTOSCALE_JOBS processes share the runs (default 2); the output does not depend on it.

AUTOSCALE_JOBS ?= 2
AUTOSCALE_PY := $(or $(PY),.venv/bin/python)
AUTOSCALE_STAMP := $(or $(STAMP),.venv/.installed)

.PHONY: bench-autoscale bench-autoscale-quick bench-autoscale-render bench-autoscale-live

bench-autoscale: $(AUTOSCALE_STAMP)
	$(AUTOSCALE_PY) -m benchmarks.experiments.autoscale --jobs $(AUTOSCALE_JOBS)

bench-autoscale-quick: $(AUTOSCALE_STAMP)
	$(AUTOSCALE_PY) -m benchmarks.experiments.autoscale --quick --jobs $(AUTOSCALE_JOBS)

bench-autoscale-render: $(AUTOSCALE_STAMP)
	$(AUTOSCALE_PY) -m benchmarks.experiments.autoscale --render-only

bench-autoscale-live: $(AUTOSCALE_STAMP)
	$(AUTOSCALE_PY) -m benchmarks.autoscale.live
