# Two commands do all set-up on a fresh machine: `make serve` and `make test` (both run `setup`).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
UV    ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
# CUDA host -> official vLLM wheel; otherwise the community CPU build (../shared/SETUP.md).
FLAVOUR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.vlmprune-setup-$(FLAVOUR)

.PHONY: setup test serve clean flops

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(UV) >/dev/null 2>&1 || { echo "installing uv"; python3 -m pip install --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh; }
	@test -x $(PY) || $(UV) venv $(VENV) -p 3.11
	@printf 'torch==2.13.0\ntorchvision==0.28.0\n' > $(VENV)/overrides.txt
	VIRTUAL_ENV=$(VENV) $(UV) pip install --override $(VENV)/overrides.txt -e ".[$(FLAVOUR),server,dev]"
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
	rm -rf $(VENV)
