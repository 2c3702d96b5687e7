# Two commands do all set-up on a fresh machine: `make serve` and `make test` (both run `setup`).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
# uv: the one on PATH, else a private copy that `make` installs with pip into $(TOOLS) (a known
# path, unlike `pip install uv`, whose script folder depends on the Python and the user scheme).
TOOLS ?= .tools
UV    ?= $(shell command -v uv 2>/dev/null || echo $(TOOLS)/bin/uv)
# The venv's interpreter: Python 3.11 where there is one, else python3 (requires-python >= 3.11).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
# CUDA host -> official vLLM wheel; otherwise the community CPU build (../shared/SETUP.md).
FLAVOUR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
$(if $(filter $(FLAVOUR),cpu gpu),,$(error FLAVOUR must be cpu or gpu, got '$(FLAVOUR)'))
STAMP := $(VENV)/.vlmprune-setup-$(FLAVOUR)
# CPU only: the CPU wheel pins torch==2.13.0+cpu, whose torchvision cannot be installed from PyPI;
# the regular PyPI torch (runs on CPU) with its matching torchvision works (../shared/SETUP.md).
# A CUDA host keeps the official vLLM wheel's own torch pins: no override there.
CPU_OVERRIDES := torch==2.13.0 torchvision==0.28.0
OVERRIDES := $(if $(filter cpu,$(FLAVOUR)),$(VENV)/overrides.txt)

.PHONY: setup test serve clean flops uv

setup: $(STAMP)

# Prints the uv that set-up uses, installing the private copy first when there is none.
uv: $(UV)
	@echo $(UV)

$(TOOLS)/bin/uv:
	@echo "uv not found on PATH: installing it into $(TOOLS)/ with pip"
	@$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target $(TOOLS) uv
	@test -x $@ || { echo "pip installed uv but $@ is missing" >&2; exit 1; }

$(STAMP): pyproject.toml | $(UV)
	@test -x $(PY) || $(UV) venv $(VENV) -p $(PYTHON)
	$(if $(OVERRIDES),@printf '%s\n' $(CPU_OVERRIDES) > $(OVERRIDES))
	VIRTUAL_ENV=$(VENV) $(UV) pip install $(if $(OVERRIDES),--override $(OVERRIDES) )-e ".[$(FLAVOUR),server,dev]"
	@touch $(STAMP)

# pytest exits 5 when it collects nothing: that is a failure here, never a silent pass.
test: setup
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo 'pytest collected no tests' >&2; exit 1; fi; exit $$rc

serve: setup
	$(VENV)/bin/vlmprune serve

flops: setup
	$(VENV)/bin/vlmprune flops

clean:
	rm -rf $(VENV) $(TOOLS)
