# diffops: `make setup` (idempotent), `make demo`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
EMPTY_TREE := 4b825dc642cb6eb9a060e54bf8d69288fbee4904
export PIP_DISABLE_PIP_VERSION_CHECK := 1

STATE_DIR ?= $(CURDIR)/.state
PROMETHEUS = $(VENV)/prometheus/usr/bin/prometheus
DEB_CACHE ?= $(HOME)/.cache/diffops/debs

.PHONY: setup demo stop monitoring monitoring-down test bench lint code-check mutation schema lock clean system-packages

setup: $(VENV)/.installed $(PROMETHEUS)

# torch goes first (the CPU build unless TORCH_SPEC says otherwise), then the project under the pins.
# checkov (deploy/ checks) lives in .venv/checkov: its own pins conflict with ours. Azurite (the Azure Blob emulator
# the store tests start) is npm's, installed into .venv/azurite, never globally. rfc3987-syntax (pulled in by Neptune's
# client for URI format checks) builds a grammar when jsonschema imports it, and Ray imports jsonschema: it cost every
# Ray worker, gate job and CLI call 3-10 s of start, so it is removed (README, "Trackers").
$(VENV)/.installed: pyproject.toml constraints.txt deploy/checkov/requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip uninstall -q -y rfc3987-syntax
	deploy/checkov/install.sh $(BIN)/python
	@command -v npm >/dev/null || (apt-get update && apt-get install -y --no-install-recommends nodejs npm)
	@test -x $(VENV)/azurite/node_modules/.bin/azurite-blob || npm install --prefix $(VENV)/azurite --no-fund --no-audit azurite@3.37.0
	@touch $@

# prometheus and promtool (`diffops monitoring`, the alert and dashboard tests): Debian's package, downloaded once into
# DEB_CACHE (apt-get update only when the download fails) and extracted into the venv, never installed.
$(PROMETHEUS):
	@mkdir -p $(DEB_CACHE) $(VENV)/prometheus
	@ls $(DEB_CACHE)/prometheus_*.deb >/dev/null 2>&1 \
	  || (cd $(DEB_CACHE) && { apt-get download prometheus || { apt-get update && apt-get download prometheus; }; })
	dpkg-deb -x "$$(ls $(DEB_CACHE)/prometheus_*.deb | sort -V | tail -n 1)" $(VENV)/prometheus
	@test -x $@ && touch $@

# The controller on this repo's releases/ with a local Ray (127.0.0.1, token auth), serving /demo on :8000.
demo: setup
	$(BIN)/diffops lint
	$(BIN)/diffops diff $(EMPTY_TREE)..HEAD
	@echo ""
	@echo "diffops: starting the controller on releases/ (Ctrl-C stops it; Ray keeps serving until 'make stop')."
	@echo "Once 'demo' is live (diffops status --state-dir $(STATE_DIR)), try:"
	@echo "  curl -s -X POST http://127.0.0.1:8000/demo/generate -H 'Content-Type: application/json' -d '{\"prompt\": \"a red cube\"}' -o out.png"
	@echo "  $(BIN)/diffops generate demo 'a red cube' -o out.png"
	@echo ""
	$(BIN)/diffops controller run --repo . --state-dir $(STATE_DIR)

stop: setup
	$(BIN)/diffops ray stop

# Prometheus on 127.0.0.1:9090 with deploy/prometheus/: the demo controller's metrics (:9464) and Ray's nodes.
# Dashboards: import deploy/grafana/*.json into a Grafana (deploy/README.md). `make monitoring-down` stops it.
monitoring: setup
	$(BIN)/diffops monitoring up --state-dir $(STATE_DIR)

monitoring-down: setup
	$(BIN)/diffops monitoring down --state-dir $(STATE_DIR)

# The multi-node tests build hosts from network namespaces: iproute2's ip, util-linux's unshare/nsenter/setpriv.
# The dashboard screenshots: Debian's Chromium (driven by Playwright, never a browser download) and a font.
# strace: the offline trackers' test proves W&B and Neptune open no network connection.
system-packages:
	@command -v ip >/dev/null && command -v unshare >/dev/null && command -v nsenter >/dev/null && command -v setpriv >/dev/null \
	  && command -v chromium >/dev/null && test -d /usr/share/fonts/truetype/dejavu && command -v strace >/dev/null \
	  || (apt-get update && apt-get install -y --no-install-recommends iproute2 util-linux chromium fonts-dejavu-core strace)

# Two workers (pytest-xdist): the tests on Ray run in order on one of them (tests/conftest.py, RAY_MODULES), the rest
# spread over both.
test: setup system-packages code-check
	$(BIN)/python -m pytest -n 2 --durations=25

# The code itself: ruff (rules in pyproject.toml) and mypy --strict on controller/, serving/, checks/ and bench/.
code-check: setup
	$(BIN)/ruff check controller serving checks bench tests scripts deploy
	$(BIN)/mypy

# Mutation testing of the pure decision modules (about 40 min on 2 cores); the score is in the README.
mutation: setup
	scripts/mutation.sh

# Benchmarks (bench/): progress on stderr, then a table; JSON in bench/results.json.
# BENCH_ARGS="--quick" for smaller sizes, "--only reconcile,model_load" to pick families.
bench: setup
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: setup code-check
	$(BIN)/diffops lint

schema: setup
	$(BIN)/diffops schema -o releases/release.schema.json
	$(BIN)/diffops experiment schema -o experiments/experiment.schema.json

# Re-pin every dependency from the current environment.
lock: setup
	{ echo "# Pinned versions for every install (make setup uses: pip install -c constraints.txt)."; \
	  echo "# Regenerate: make lock"; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^diffops' | sed 's/+cpu$$//'; } > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
