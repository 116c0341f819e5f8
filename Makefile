# Two commands work on a fresh machine: `make demo` and `make test`. Both (re)create .venv when it is missing or
# older than the project's dependency files.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-all lint bench docs clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The demo writes only to its own folder (a README `ccim fit --config configs/synthetic.yaml` writes to
# runs/synthetic, which the demo leaves alone) and starts it afresh, so its checkpoint is always version_0.
DEMO_DIR := runs/demo

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/ccim fit --config configs/synthetic.yaml --trainer.default_root_dir $(DEMO_DIR)
	$(BIN)/ccim test --config configs/synthetic.yaml --trainer.default_root_dir $(DEMO_DIR) --ckpt_path last
	# Side by side (seed 0, a scratch folder of this run, the fit's 1,000-sample test sets): baseline, the CCIM model
	# just fitted (tested, not trained again), the best debiasing method, the oracle.
	$(BIN)/python -m benchmarks.debias --quick --jobs 2 --test-size 1000 \
		--ccim-checkpoint $(DEMO_DIR)/lightning_logs/version_0/checkpoints/last.ckpt

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The docs site in strict mode: a broken link or anchor, a page left out of mkdocs.yml's nav or an API name that does
# not resolve fails the build. The docs extra is installed once, beside the dev one.
DOCS_STAMP := $(VENV)/.installed-docs

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python benchmarks/head.py
	$(BIN)/python benchmarks/kmeans.py

clean:
	rm -rf $(VENV) runs lightning_logs *.egg-info site
