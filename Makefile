# The README's commands. `make demo` and `make test` do all the set-up they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_ENV := PIP_CONSTRAINT=$(CURDIR)/constraints.txt
EXTRAS ?= serve,dev
DEMO_DIR ?= runs/demo
DEMO_PORT ?= 8765

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_ENV) $(PY) -m pip install --quiet --upgrade pip
	$(PIP_ENV) $(PY) -m pip install --quiet -c constraints.txt torch
	$(PIP_ENV) $(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(VENV)/bin/observe-r1 tiny-model $(DEMO_DIR)/model --size tiny --seed 0 --force
	$(VENV)/bin/observe-r1 synth-data $(DEMO_DIR)/data --n 200 --seed 0 --force
	$(VENV)/bin/observe-r1 chat --model $(DEMO_DIR)/model --sample $(DEMO_DIR)/data/data.jsonl --row 1 --seed 0
	@echo "--- serving the model and asking it through the openai client"
	$(VENV)/bin/observe-r1 serve --model $(DEMO_DIR)/model --served-model-name observe-r1-tiny \
		--port $(DEMO_PORT) --log-level warning & server=$$!; \
	$(VENV)/bin/observe-r1 ask --base-url http://127.0.0.1:$(DEMO_PORT)/v1 --model observe-r1-tiny \
		--image $(DEMO_DIR)/data/images/000002.png --question "Which bar is the tallest?" --seed 0 \
		--wait-ready 120; status=$$?; kill $$server; wait $$server; exit $$status

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
