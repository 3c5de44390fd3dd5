# kvd — the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo demo-stop test test-fast bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: venv
	$(BIN)/python scripts/demo.py

demo-stop:
	$(BIN)/python scripts/demo.py --stop

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-fast: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

bench: venv
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .demo
