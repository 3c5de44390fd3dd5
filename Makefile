# kvd — the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo demo-stop test test-fast bench fuzz clean

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

# Coverage-guided fuzzing of the wire codec (atheris, installed here only); minutes.
# `make test` runs the same property briefly on hypothesis input (tests/test_fuzz.py).
FUZZ_SECONDS ?= 300
fuzz: venv
	$(BIN)/pip install --quiet 'atheris>=2.3,<4'
	$(BIN)/python fuzz/fuzz_codec.py -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
		-artifact_prefix=.fuzz/ .fuzz/corpus

bench: venv
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .demo .fuzz
