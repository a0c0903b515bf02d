# kvgate — every target sets up what it needs on a fresh machine (only Python assumed).
#   make demo   4 simulated replicas + the gateway in the foreground
#   make test   lint-free, typed, tested
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the tests drive for real (Prometheus server + promtool, dnsmasq for DNS discovery).
APT_PACKAGES := prometheus dnsmasq-base

.PHONY: help .venv demo test test-all lint fmt bench bench-routing bench-proxy bench-sim system-deps clean

help:
	@echo "make demo    run 4 simulated replicas and the gateway (http://127.0.0.1:8080)"
	@echo "make test    set everything up, lint, type-check and run the test suite"
	@echo "make bench   run the benchmarks (tables + JSON under benchmarks/results/)"
	@echo "make lint    ruff + mypy --strict on gateway/ and policies/"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

# `make .venv` is the documented way to get the environment; it also refreshes stale installs.
.venv: $(STAMP)

system-deps:
	@missing=""; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v dnsmasq >/dev/null || [ -x /usr/sbin/dnsmasq ] || missing="$$missing dnsmasq-base"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi

demo: $(STAMP)
	$(PY) -m benchmarks.demo

# Two workers: the suite is mostly waiting on real servers. The long tests run one after another
# on one worker (--dist loadgroup; tests/conftest.py), so no two of them compete for the cores.
PYTEST_WORKERS ?= 2

test: $(STAMP) system-deps lint
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup

test-all: $(STAMP) system-deps
	$(PY) -m pytest -q -m ''

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway policies benchmarks tests
	$(VENV)/bin/ruff format --check gateway policies benchmarks tests
	$(VENV)/bin/mypy gateway policies

fmt: $(STAMP)
	$(VENV)/bin/ruff format gateway policies benchmarks tests
	$(VENV)/bin/ruff check --fix gateway policies benchmarks tests

# Every benchmark, each printing a table and writing JSON under benchmarks/results/ (or its
# experiment directory). The long ones: bench-routing ~25 min, bench-proxy ~13 min,
# bench-soak 15 min; each has a -quick variant or a short CI test.
bench: bench-sim bench-routing-core bench-routing bench-saturation bench-autoscale bench-proxy bench-soak bench-streams

bench-sim: $(STAMP)
	$(PY) -m benchmarks.sim.calibrate
	$(PY) -m benchmarks.sim.speed

bench-routing-core: $(STAMP)
	$(PY) -m benchmarks.routing_core

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# Optional real kube-apiserver + etcd for the Kubernetes discovery test.
include mk/kube.mk
# Optional real kube-controller-manager for the HPA conformance check.
include mk/autoscale.mk
# Locust against the demo (bench-locust).
include mk/load.mk
# Proxy overhead benchmark against nginx and the Rust routers (bench-proxy).
include mk/proxy.mk
# Saturation benchmark and the issue-length scale-from-zero test.
include mk/lifecycle.mk
# Soak and 10k-stream benchmarks (bench-soak, bench-streams).
include mk/reliability.mk
# Routing-quality experiment (bench-routing, -quick, -live).
include mk/routing.mk
# Autoscaling experiment (bench-autoscale, -quick, -live).
include mk/autoscale-experiment.mk
