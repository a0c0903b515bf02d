# mk/autoscale.mk — a real kube-controller-manager (the HPA controller) for the optional HPA
# conformance check (tests/benchmarks/test_hpa_conformance.py), which feeds the same metric
# sequence to the real controller and to benchmarks/autoscale/hpa.py and compares decisions.
# Include it from the top-level Makefile after mk/kube.mk, or use it alone:
#   make -f mk/autoscale.mk kube-controller-manager
#   make -f mk/autoscale.mk autoscale-conformance
#
# Where the binary comes from: the same Debian `kubernetes` source package (upstream v1.20.2)
# that mk/kube.mk unpacks for kube-apiserver; this file reuses its cache directory, source tree,
# GOPATH symlink, version file and Go build cache ($(KUBE_CACHE)), so the apiserver is built
# first (it fetches the source) and most packages are already compiled when the
# controller-manager build starts. Same build as debian/rules uses for kubectl: upstream's
# `make WHAT=cmd/kube-controller-manager` in GOPATH mode, vendored modules, no network.
# etcd comes from Debian's `etcd-server` (mk/kube.mk installs it).
#
# The build is cached ($(KUBE_CONTROLLER_MANAGER) is rebuilt only when missing) and niced to 19
# because it competes with everything else on small machines. `make kube-clean` removes it with
# the rest of the cache.

ifndef KUBE_APISERVER
include $(dir $(lastword $(MAKEFILE_LIST)))kube.mk
endif

KUBE_CONTROLLER_MANAGER := $(KUBE_CACHE)/bin/kube-controller-manager
AUTOSCALE_PY ?= .venv/bin/python

.PHONY: kube-controller-manager autoscale-conformance

kube-controller-manager: kube-deps $(KUBE_CONTROLLER_MANAGER)
	@echo "kube-controller-manager: $(KUBE_CONTROLLER_MANAGER)"

$(KUBE_CONTROLLER_MANAGER): | $(KUBE_APISERVER)
	cd $(KUBE_CACHE)/src/kubernetes-*/ && \
	  env HOME=$(KUBE_CACHE) GOPATH=$$PWD/.go GOCACHE=$(KUBE_CACHE)/gocache GOPROXY=off \
	    CGO_ENABLED=0 KUBE_GIT_VERSION_FILE=$$PWD/.kvgate-version \
	    nice -n 19 $(MAKE) --no-print-directory WHAT=cmd/kube-controller-manager && \
	  cp _output/bin/kube-controller-manager $@.tmp
	mv $@.tmp $@
	$@ --version

# Runs only the conformance check (it is marked slow: about a minute of real HPA syncs).
autoscale-conformance: kube-apiserver kube-controller-manager
	KVGATE_KUBE_APISERVER=$(KUBE_APISERVER) \
	KVGATE_KUBE_CONTROLLER_MANAGER=$(KUBE_CONTROLLER_MANAGER) \
	  $(AUTOSCALE_PY) -m pytest -q -m slow tests/benchmarks/test_hpa_conformance.py
