# The two commands a user needs (see README): `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit lint venv build-demo serve clean-artifacts

venv: $(STAMP)

# Reinstall whenever a requirements file changes. --no-compile: Python compiles only the modules it imports,
# on first import, instead of pip compiling every file of torch and CUDA's packages (61 s instead of 109 s).
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

# Build the demo worlds, runs and artifacts if missing, then serve the app on 127.0.0.1:8501 (serve.py:
# app.py, with the pages' modules imported before the first visitor).
demo: venv build-demo serve

build-demo: venv
	$(BIN)/python -m demo_build

serve: venv
	$(BIN)/python -m streamlit run serve.py --server.address 127.0.0.1 --server.port 8501 \
		--server.headless true --browser.gatherUsageStats false

# The whole test suite (tiny worlds and short trainings; the browser test needs chromium + chromedriver).
test: venv
	$(BIN)/python -m pytest -q -ra

# The unit tier alone: every test that needs no demo build (tests/conftest.py marks the others e2e).
test-unit: venv
	$(BIN)/python -m pytest -q -ra -m "not e2e"

# Lint and format check (ruff, configured in pyproject.toml); .ci/run runs it before the tests.
lint: venv
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

clean-artifacts:
	rm -rf artifacts/data artifacts/checkpoints artifacts/runs
