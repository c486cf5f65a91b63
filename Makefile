# `make test` and `make train` create .venv and install what is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/data/ham10000_200x150
ARGS   ?=
MODEL  ?= models/skincancer.pkl

.PHONY: test lint train app clean-venv

# pip -qq prints errors only: some machines' pip settings warn once per package about a missing local index
# folder, over 200 lines that buried CI's log
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --quiet -r requirements.txt
	$(PY) -m pip install --quiet --quiet -e ".[test]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

# ruff over the package, tests, benches and notebooks; mypy over the package (both configured in pyproject.toml)
lint: $(VENV)/.installed
	$(PY) -m ruff check skincancer tests bench notebooks
	$(PY) -m mypy

train: $(VENV)/.installed
	$(PY) -m skincancer train --data $(DATA) $(ARGS)

app: $(VENV)/.installed
	$(PY) -m skincancer app --model $(MODEL) $(ARGS)

clean-venv:
	rm -rf $(VENV)
