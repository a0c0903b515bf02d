# mk/load.mk — Locust, headless, against the demo gateway. Included by the top-level Makefile.
#
#   make bench-locust                                  # 20 s against http://127.0.0.1:8080
#   make bench-locust LOCUST_USERS=64 LOCUST_USER_RATE=0.1 LOCUST_RUN_TIME=60s
#
# If nothing listens on the target, the recipe starts `python -m benchmarks.demo` (4 simulated
# A10G replicas + kvgate) in the background, waits for the gateway's /v1/models, and stops the
# demo afterwards (also on failure or Ctrl-C). A gateway that is already up is used as it is.
# Offered load is LOCUST_USERS × LOCUST_USER_RATE req/s while requests finish within
# 1/LOCUST_USER_RATE s (constant_throughput); with the A10G profile an OpenOrca request takes
# ~10 s end to end, hence many slow users. In-flight requests finish after the time limit
# (--stop-timeout). Results: $(LOCUST_OUT)/locust_stats.csv (POST, TTFT and TPOT rows) + HTML.

SHELL := /bin/bash
LOCUST_HOST ?= http://127.0.0.1:8080
LOCUST_USERS ?= 32
LOCUST_USER_RATE ?= 0.2
LOCUST_SPAWN_RATE ?= 4
LOCUST_RUN_TIME ?= 20s
LOCUST_STOP_TIMEOUT ?= 30s
LOCUST_WORKLOAD ?= openorca
LOCUST_OUT ?= benchmarks/results/tmp/locust
DEMO_WAIT_S ?= 60
LOAD_PY := $(or $(PY),.venv/bin/python)
LOAD_STAMP := $(or $(STAMP),.venv/.installed)

.PHONY: bench-locust

bench-locust: $(LOAD_STAMP)
	@set -euo pipefail; \
	mkdir -p $(LOCUST_OUT); \
	up() { $(LOAD_PY) -c 'import sys, urllib.request as u; u.urlopen(sys.argv[1] + "/v1/models", timeout=2)' $(LOCUST_HOST) >/dev/null 2>&1; }; \
	if ! up; then \
	  echo "bench-locust: nothing at $(LOCUST_HOST); starting the demo (log: $(LOCUST_OUT)/demo.log)"; \
	  $(LOAD_PY) -m benchmarks.demo >$(LOCUST_OUT)/demo.log 2>&1 & demo_pid=$$!; \
	  trap 'kill -TERM $$demo_pid 2>/dev/null || true; wait $$demo_pid 2>/dev/null || true' EXIT; \
	  for _ in $$(seq $$(( $(DEMO_WAIT_S) * 4 ))); do up && break; \
	    kill -0 $$demo_pid 2>/dev/null || { echo "bench-locust: the demo exited:"; tail -20 $(LOCUST_OUT)/demo.log; exit 1; }; \
	    sleep 0.25; done; \
	  up || { echo "bench-locust: the demo is not up after $(DEMO_WAIT_S) s"; exit 1; }; \
	fi; \
	$(LOAD_PY) -m locust -f benchmarks/load/locustfile.py --headless --only-summary \
	  --host $(LOCUST_HOST) -u $(LOCUST_USERS) -r $(LOCUST_SPAWN_RATE) -t $(LOCUST_RUN_TIME) \
	  --stop-timeout $(LOCUST_STOP_TIMEOUT) --user-rate $(LOCUST_USER_RATE) \
	  --workload $(LOCUST_WORKLOAD) --csv $(LOCUST_OUT)/locust --html $(LOCUST_OUT)/locust.html \
	  </dev/null; \
	echo "bench-locust: results in $(LOCUST_OUT)/"
