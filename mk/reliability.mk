# mk/reliability.mk — reliability benchmarks (issue 10). Included by the top-level Makefile.
#   make bench-soak        15 minutes at 80% of the simulated cluster's capacity through a real
#                          gateway process, with client disconnects and a replica restarting;
#                          table + benchmarks/results/soak.json (the CI-sized run is
#                          tests/gateway/test_soak_short.py)
#   make bench-streams     10,000 concurrent idle-ish streams through one gateway process (as
#                          many as the hard RLIMIT_NOFILE allows: 2 descriptors per stream);
#                          table + benchmarks/results/streams-10k.json
# Knobs: SOAK_DURATION (seconds, default 900), STREAMS (default 10000).

PY ?= .venv/bin/python
SOAK_DURATION ?= 900
STREAMS ?= 10000

.PHONY: bench-soak bench-streams

bench-soak: $(STAMP)
	$(PY) -m benchmarks.soak.run --duration $(SOAK_DURATION)

bench-streams: $(STAMP)
	$(PY) -m benchmarks.soak.streams --streams $(STREAMS)
