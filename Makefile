# Everything runs inside .venv, created on demand from python3 + PyPI.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# Keeps pip -- including the isolated build of basicsr's sdist, which declares
# setup_requires=torch -- on the CPU build of torch (see constraints.txt).
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv test demo clean distclean

venv: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py constraints.txt | $(VPY)
	@echo "Installing into $(VENV) (CPU torch, constraints.txt); first run takes a few minutes"
	$(VPY) -m pip install --progress-bar off torch==2.13.0
	$(VPY) -m pip install --progress-bar off -e '.[test,demo]'
	touch $@

test: venv
	$(VPY) -m pytest -q tests $(PYTEST_ARGS)

demo: venv
	$(VPY) -m grl_plugin.cli.demo

# Build artefacts and caches (keeps .venv and results/).
clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Also removes the virtual environment.
distclean: clean
	rm -rf $(VENV)
