# mk/proxy.mk — the proxy overhead benchmark (issue 9). Included by the top-level Makefile.
#   make bench-proxy         kvgate vs direct, nginx, the aiohttp baseline, the transport-level
#                            floor prototype, sglang-router and vllm-router;
#                            3 repetitions (~15 min); writes benchmarks/results/proxy.{json,md}
#   make bench-proxy-quick   one short repetition (< 1 min); benchmarks/results/proxy-quick.*
# Setup it does itself: nginx and wrk from Debian (apt), sglang-router and vllm-router from PyPI,
# each into its own virtualenv under ~/.cache/kvgate on first use (skipped with a note if that
# fails).

PY ?= .venv/bin/python
PROXY_APT_PACKAGES := nginx wrk

.PHONY: bench-proxy bench-proxy-quick proxy-deps

proxy-deps:
	@missing=""; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

bench-proxy: $(STAMP) proxy-deps
	$(PY) -m benchmarks.proxy

bench-proxy-quick: $(STAMP) proxy-deps
	$(PY) -m benchmarks.proxy --quick
