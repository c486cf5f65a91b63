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

# ruff, as configured in pyproject.toml: the package, tests, benches and notebooks
lint: $(VENV)/.installed
	$(PY) -m ruff check skincancer tests bench notebooks

train: $(VENV)/.installed
	$(PY) -m skincancer train --data $(DATA) $(ARGS)

app: $(VENV)/.installed
	$(PY) -m skincancer app --model $(MODEL) $(ARGS)

clean-venv:
	rm -rf $(VENV)
