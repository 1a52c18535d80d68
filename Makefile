# raysweep: `make install`, `make test`, `make demo`. Each target sets itself up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install lock test test-e2e test-all test-multihost test-docker demo demo-width bench clean kuberay-validate gpu-kit gpu-kit-smoke

help:
	@echo "make install      create $(VENV) and install raysweep (editable) with its test extras, at constraints.txt's versions"
	@echo "make lock         re-resolve pyproject.toml's ranges into constraints.txt (LOCK_ARGS=\"-c old.txt\" keeps versions)"
	@echo "make gpu-kit      dist/gpu-kit/: project + slim Ray + missing wheels + run.sh for an offline GPU node (GPU_KIT_PYTHON=3.12)"
	@echo "make gpu-kit-smoke  the kit built for this Python, installed offline beside torch only, run.sh --cpu-smoke"
	@echo "make test         the unit tests and a real smoke sweep on the CPU (installs first if needed; ~6 min)"
	@echo "make test-e2e     the end-to-end Ray runs marked slow: resume, killed driver, DDP, stock Ray (~15 min)"
	@echo "make test-all     both tiers in one pytest run"
	@echo "make demo         an 8-trial sweep on the vendored CIFAR-10 photos (~3 min on 2 cores: README, Configs), then the scaling analysis"
	@echo "make demo-width   the joint law over data and width: 24 trials on the same photos (~9 min on 2 cores, no dashboard), then the analysis"
	@echo "make bench        decode, training-loop and Ray-overhead benchmarks (ratios measured side by side)"
	@echo "make test-multihost  sweeps on a Ray cluster of network-namespace hosts (root, iproute2; ~3 min)"
	@echo "make test-docker  container tests through the Docker SDK (starts dockerd if it can)"
	@echo "make kuberay-validate  the KubeRay manifests (deploy/kuberay/) against schemas from KubeRay's CRDs"
	@echo "make docker-build | docker-run ARGS=... | docker-run-cpu | docker-down | docker-logs"
	@echo "make docker-base-offline | docker-wheelhouse   what offline image builds use"

# pyproject.toml states ranges; constraints.txt holds the exact versions tested here (pip -c).
$(STAMP): constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Every package `pip install ".[test]"` resolves to (runtime, mlflow and test extras), pinned.
LOCK_ARGS ?=
lock:
	mkdir -p .cache
	$(PYTHON) -m pip install --quiet --dry-run --ignore-installed --report .cache/lock-report.json ".[test]" $(LOCK_ARGS)
	$(PYTHON) gpu_kit/lockfile.py .cache/lock-report.json > constraints.txt
	@echo "constraints.txt: $$(grep -c '==' constraints.txt) pins"

# Two tiers, both on the CPU and both run by .ci/run: `make test` (unit tests and one real smoke
# sweep through a Ray cluster, under 8 min of pytest on 2 cores) and `make test-e2e` (the tests
# marked slow: interrupt and resume, a killed driver, a failed worker, two-worker DDP, stock Ray).
test: install
	$(BIN)/python -m pytest -m "not slow and not docker and not multihost" $(PYTEST_ARGS)

test-e2e: install
	$(BIN)/python -m pytest -m "slow and not docker and not multihost" $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -m "not docker and not multihost" $(PYTEST_ARGS)

# The multi-host tests take minutes (three Ray nodes, three sweeps): their own target, which
# .ci/run calls too. A Ray head and two workers, each a network namespace on a bridge (tests/multihost.py): needs
# root and iproute2, and is skipped with the reason elsewhere. Leaves no namespace behind.
test-multihost: install
	$(BIN)/python -m pytest -m multihost -v $(PYTEST_ARGS) tests/test_multihost.py

# Starts dockerd for the run where none answers and this machine can (root, docker.io), and
# builds on the offline base where Docker Hub cannot be reached (see the container section).
test-docker: install
	$(OFFLINE_ENV) docker/engine.sh run docker/offline.sh run $(BIN)/python -m pytest -m docker -v $(PYTEST_ARGS) tests/test_docker_sdk.py

# Each demo is a new experiment (results are never overwritten); results/demo-latest points at it.
# Its law is the plain power law: from 200 to 1,600 images the curve shows no floor yet, so an
# irreducible term is not identifiable (pow3 puts it at 0); the report compares every family.
DEMO_ANALYSIS ?= --model pow2
DEMO_NAME := demo-$(shell date +%Y%m%d-%H%M%S)
demo: install
	$(BIN)/python -m raysweep.tune --config configs/demo.yaml --name $(DEMO_NAME) --storage-path results
	ln -sfn $(DEMO_NAME) results/demo-latest
	$(BIN)/python -m analysis.plot_scaling results/$(DEMO_NAME) $(DEMO_ANALYSIS)
	@echo "Figures: results/$(DEMO_NAME)/analysis/scaling.png, curves.png; report: results/$(DEMO_NAME)/analysis/report.md"

# The joint law over data and width: 3 widths x 4 fractions x 2 seeds on the same photos.
DEMO_WIDTH_NAME := demo-width-$(shell date +%Y%m%d-%H%M%S)
# Without Ray's dashboard: on 2 cores it takes ~6% of the CPU, the margin of this demo's 10
# minutes (make demo-width DEMO_WIDTH_ARGS= brings it back).
DEMO_WIDTH_ARGS ?= --no-dashboard
demo-width: install
	$(BIN)/python -m raysweep.tune --config configs/demo-width.yaml --name $(DEMO_WIDTH_NAME) --storage-path results $(DEMO_WIDTH_ARGS)
	ln -sfn $(DEMO_WIDTH_NAME) results/demo-width-latest
	$(BIN)/python -m analysis.plot_scaling results/$(DEMO_WIDTH_NAME) $(DEMO_ANALYSIS)
	@echo "Figures: results/$(DEMO_WIDTH_NAME)/analysis/joint.png, frontier.png; report: results/$(DEMO_WIDTH_NAME)/analysis/report.md"

# Offline: the schemas are made from KubeRay's own CRDs (deploy/kuberay/schemas/README.md) and
# refuse unknown fields, as the API server does. tests/test_kuberay.py runs these same lines.
KUBERAY_SCHEMAS := deploy/kuberay/schemas
kuberay-validate: install
	$(BIN)/check-jsonschema --schemafile $(KUBERAY_SCHEMAS)/rayjob_v1.json deploy/kuberay/rayjob.yaml
	$(BIN)/check-jsonschema --schemafile $(KUBERAY_SCHEMAS)/raycluster_v1.json deploy/kuberay/raycluster.yaml

bench: install
	$(BIN)/python -m raysweep.bench prepare
	$(BIN)/python -m raysweep.bench train
	$(BIN)/python -m raysweep.bench overhead

clean:
	rm -rf .cache results .pytest_cache

# --- an offline GPU node with its own PyTorch (README "A GPU node without network") ---------
GPU_KIT_PYTHON ?= 3.12
GPU_KIT_DIR    ?= dist/gpu-kit
gpu-kit:
	$(PYTHON) gpu_kit/build.py --python-version $(GPU_KIT_PYTHON) --out $(GPU_KIT_DIR)

# The kit for this machine's Python, installed with pip --no-index beside a venv that holds only
# torch, torchvision and the target's other packages (built once under .cache/), run on the CPU.
SMOKE_VENV ?= .cache/gpu-kit-smoke/venv
SMOKE_OUT  ?= .cache/gpu-kit-smoke/out
gpu-kit-smoke:
	$(PYTHON) gpu_kit/build.py --python-version $$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
	    --out .cache/gpu-kit-smoke/kit
	gpu_kit/target-venv.sh $(SMOKE_VENV)
	rm -rf $(SMOKE_OUT)
	PYTHON=$(SMOKE_VENV)/bin/python .cache/gpu-kit-smoke/kit/run.sh --cpu-smoke $(SMOKE_OUT)

# --- containers (see README "Running on a GPU cluster") ---------------------
DOCKER     ?= docker
# Compose v2. Debian's docker-compose v1 cannot read these files: it rejects the top-level
# `name` and the `environment:` source of the token secret.
COMPOSE    ?= $(DOCKER) compose
IMAGE      ?= raysweep:latest
WORKERS    ?= 1
CONFIG     ?= configs/default.yaml
CPU_CONFIG ?= configs/demo.yaml
ARGS       ?=
# One Ray auth token for every container: $RAY_AUTH_TOKEN if set, else this file, created
# once (as `ray get-auth-token --generate` does). Compose copies it into each container.
RAY_AUTH_TOKEN_FILE ?= $(HOME)/.ray/auth_token
WITH_TOKEN = RAY_AUTH_TOKEN="$${RAY_AUTH_TOKEN:-$$(cat $(RAY_AUTH_TOKEN_FILE))}" RAYSWEEP_IMAGE=$(IMAGE)
# Image builds without Docker Hub (and without PyPI inside containers): a local stand-in base
# image and a wheelhouse built by the host's pip. OFFLINE=auto uses them when the Dockerfile's
# base image can be neither found nor pulled; OFFLINE=1 or OFFLINE=0 forces the choice.
OFFLINE      ?= auto
OFFLINE_BASE ?= python-standin:3.11-bookworm-local
WHEELHOUSE   ?= .cache/docker/wheelhouse
OFFLINE_ENV   = OFFLINE=$(OFFLINE) OFFLINE_BASE=$(OFFLINE_BASE) WHEELHOUSE=$(WHEELHOUSE) DOCKER="$(DOCKER)" \
                WHEEL_PYTHON=$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

.PHONY: docker-build docker-base-offline docker-wheelhouse docker-compose-v2 docker-token \
        docker-run docker-run-cpu docker-down docker-logs

docker-build:
	$(OFFLINE_ENV) docker/offline.sh build $(IMAGE)

# Debian bookworm + Debian's CPython 3.11 from the Debian archive (root, debootstrap).
docker-base-offline:
	docker/base-offline.sh $(OFFLINE_BASE)

docker-wheelhouse:
	$(OFFLINE_ENV) docker/offline.sh wheelhouse

docker-compose-v2:
	@$(COMPOSE) version >/dev/null 2>&1 || { echo "these targets need Compose v2 (\`$(COMPOSE)\`), which is not installed;" \
	  "docker-compose v1 cannot read the compose files. \`make test-docker\` runs the same containers without compose."; exit 2; }

docker-token:
	@test -n "$$RAY_AUTH_TOKEN" || test -s $(RAY_AUTH_TOKEN_FILE) || { \
	  mkdir -p $(dir $(RAY_AUTH_TOKEN_FILE)) && umask 077 && \
	  $(PYTHON) -c "import secrets; print(secrets.token_hex(32), end='')" > $(RAY_AUTH_TOKEN_FILE) && \
	  echo "wrote a new Ray auth token to $(RAY_AUTH_TOKEN_FILE)"; }

# Head and workers first (healthy), then the sweep; the cluster stays up for the dashboard.
docker-run: docker-compose-v2 docker-build docker-token
	$(WITH_TOKEN) $(COMPOSE) -f docker-compose.yml up -d --wait --scale ray-worker=$(WORKERS) ray-head ray-worker
	$(WITH_TOKEN) $(COMPOSE) -f docker-compose.yml run --rm sweep --config $(CONFIG) $(ARGS)

docker-run-cpu: docker-compose-v2 docker-build docker-token
	$(WITH_TOKEN) $(COMPOSE) -f docker-compose.cpu.yml up -d --wait --scale ray-worker=$(WORKERS) ray-head ray-worker
	$(WITH_TOKEN) $(COMPOSE) -f docker-compose.cpu.yml run --rm sweep --config $(CPU_CONFIG) $(ARGS)

# Both files are the one compose project "raysweep". Volumes (results, caches) are kept:
# `docker compose down -v` would delete them.
docker-down: docker-compose-v2
	RAY_AUTH_TOKEN=unused $(COMPOSE) -f docker-compose.yml down --remove-orphans

docker-logs: docker-compose-v2
	RAY_AUTH_TOKEN=unused $(COMPOSE) -f docker-compose.yml logs --follow --tail=200
