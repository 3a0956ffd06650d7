# fruitdask: `make run` and `make test` work on a fresh clone (Python 3.10-3.13 + Java 17 for Spark).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= fruitdask-output

.PHONY: run test install install-test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test
	@# The report test opens report.html in a real headless browser (Debian's chromium).
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
		|| echo "WARNING: could not install chromium (needs root and apt): the report's browser test will be skipped"

## run: the pipeline on the bundled sample (120 real images), local cluster, output in ./$(OUT)
run: install
	$(PY) -m fruitdask run --output $(OUT) --overwrite --allow-random-weights

## test: install the test extras, lint, run the whole suite
test: install-test
	$(PY) -m ruff check fruitdask tests
	$(PY) -m pytest

lint: install-test
	$(PY) -m ruff check fruitdask tests

## bench: raw Keras vs Dask (vs Spark) on the shared bench images
bench: install-test
	$(PY) -m fruitdask bench --images 200 --image-size 224

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info
