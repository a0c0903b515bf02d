# mk/routing.mk — the routing-quality experiment (issue 7). Included by the top-level Makefile.
#
#   make bench-routing                 # full plan: report.md, results.json, PNGs (~1,300 CPU-s)
#   make bench-routing-quick           # shortened plan (< 1 min) into benchmarks/results/routing-quick
#   make bench-routing-render          # redraw report.md and figures from the committed results.json
#   make bench-routing-live            # the DES against the real gateway over HTTP (~3 min),
#                                      # then the report re-rendered with its result
#
# ROUTING_JOBS processes share the runs (default 2); the output does not depend on it.

ROUTING_JOBS ?= 2
ROUTING_PY := $(or $(PY),.venv/bin/python)
# The top-level Makefile's install stamp; empty when this file is used alone.
ROUTING_STAMP := $(STAMP)

.PHONY: bench-routing bench-routing-quick bench-routing-render bench-routing-live

bench-routing: $(ROUTING_STAMP)
	$(ROUTING_PY) -m benchmarks.experiments.routing --jobs $(ROUTING_JOBS)

bench-routing-quick: $(ROUTING_STAMP)
	$(ROUTING_PY) -m benchmarks.experiments.routing --quick --jobs $(ROUTING_JOBS)

bench-routing-render: $(ROUTING_STAMP)
	$(ROUTING_PY) -m benchmarks.experiments.routing --render-only

# Exit status is the validation's (1 when a check fails); the report is re-rendered either way.
bench-routing-live: $(ROUTING_STAMP)
	@status=0; $(ROUTING_PY) -m benchmarks.experiments.routing.validate_live || status=$$?; \
	$(ROUTING_PY) -m benchmarks.experiments.routing --render-only >/dev/null && exit $$status
