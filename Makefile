# Developer and CI entry points. Works on a fresh machine (root, no venv): `make test` builds everything it needs.
#   make venv    .venv with the project editable + all extras, pinned by constraints.txt
#   make photos  fetch + verify the real test photos (Debian packages) and derive data/photos/{small,val768}
#   make lint    ruff + mypy (configured in pyproject.toml)
#   make test    lint, then the whole pytest suite (PYTEST_ARGS="-k foo -x" to narrow it)
#   make demo    end-to-end demo (python -m demo: demo/run.py)
#   make bench   benchmarks (bench.run)
#   make mini    train the embedded mini models from scratch on CPU (~65-80 min) -> rdeic_core/zoo/mini-lo, mini, mini-hi
#   make clean   caches and build leftovers;  make distclean  also .venv and data/
SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=
MINI_ARGS ?=

# Nothing run from here may reach a model hub: weights come from local files only.
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: venv photos sysdeps lint test demo bench mini clean distclean

venv: $(STAMP)

# Re-installs only when the dependency declaration changed. No `pip install -U pip`: the bundled pip
# handles editable pyproject installs, and every package version comes from constraints.txt
# (torch is pinned there and in pyproject.toml, so an unpinned CUDA torch is never pulled).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -c constraints.txt -e ".[all]"
	@touch $@

photos: $(STAMP)
	$(PY) tools/photos.py fetch

# System packages the tests need: Chromium renders the audit report (tests/pipeline/restore). Debian package,
# installed only when missing (CI machines are fresh; developers' machines keep it).
sysdeps:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# Static checks, configured in pyproject.toml: ruff (lint rules, not formatting) over the whole tree,
# mypy over the packages listed in [tool.mypy] (~30 s cold, a few seconds with .mypy_cache).
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

test: $(STAMP) photos sysdeps lint
	$(PY) -m pytest $(PYTEST_ARGS)

# 8 photos at ~1.1 MP: archive, restore, audit on a local Ray + embedded S3, then JPEG/WebP at the
# nearest rate -> outputs/demo/report/report.html (~5 min on 2 CPU cores; DEMO_ARGS="--count 4" is quicker)
demo: $(STAMP) photos
	$(PY) -m demo $(DEMO_ARGS)

bench: $(STAMP) photos
	$(PY) -m bench.run $(BENCH_ARGS)

mini: $(STAMP) photos
	$(PY) tools/train_mini.py $(MINI_ARGS)

clean:
	rm -rf build .pytest_cache .hypothesis .mypy_cache .ruff_cache *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) data
