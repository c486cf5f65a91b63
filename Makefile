# `make test` and `make train` create .venv and install what is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/data/ham10000_200x150
ARGS   ?=
MODEL  ?= models/skincancer.pkl

.PHONY: test train app clean-venv

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

train: $(VENV)/.installed
	$(PY) -m skincancer train --data $(DATA) $(ARGS)

app: $(VENV)/.installed
	$(PY) -m skincancer app --model $(MODEL) $(ARGS)

clean-venv:
	rm -rf $(VENV)
