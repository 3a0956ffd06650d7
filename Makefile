# fruitdask: `make run` and `make test` work on a fresh clone (Python 3.10-3.13; Java 17 for Spark).
# Every Python package comes from the one lock, uv.lock, through its exports in requirements/
# (hashes checked): the test environment and the CPU image hold the same versions.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= fruitdask-output
PIP := $(PY) -m pip install -q --no-deps --require-hashes

.PHONY: run test install install-test system-deps lint bench image image-gpu lock clean

$(VENV)/.installed: requirements/cpu.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements/cpu.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements/dev.txt
	$(PIP) -r requirements/dev.txt
	$(PY) -m pip check
	touch $@

install: $(VENV)/.installed

## system-deps: what the tests need beyond Python (root, apt): chromium for the report's
## browser test; docker.io and debootstrap for the container tests (tests/test_containers.py).
system-deps:
	@bash tools/system-deps.sh

install-test: $(VENV)/.installed-test system-deps

## run: the pipeline on the bundled sample (120 real images), local cluster, output in ./$(OUT)
run: install
	$(PY) -m fruitdask run --output $(OUT) --allow-random-weights

## test: install the locked test environment and system packages, lint, type-check the
## commands and what they call (mypy, [tool.mypy] in pyproject.toml), run the whole suite
test: install-test
	$(PY) -m ruff check fruitdask tests tools
	$(PY) -m mypy
	$(PY) -m pytest

lint: install-test
	$(PY) -m ruff check fruitdask tests tools
	$(PY) -m mypy

## bench: raw Keras vs Dask (vs Spark) on the shared bench images
bench: install-test
	$(PY) -m fruitdask bench --images 200 --image-size 224

## image / image-gpu: build the container image (docker; BASE=... to change the base image)
image: install
	$(PY) tools/build_image.py --variant cpu $(if $(BASE),--base-image $(BASE))

image-gpu: install
	$(PY) tools/build_image.py --variant gpu $(if $(BASE),--base-image $(BASE))

## lock: re-solve uv.lock from pyproject.toml and re-export requirements/*.txt
lock: install-test
	$(PY) tools/lock.py --update

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info
