#!/usr/bin/env bash
# One prepared GPU check (about 4 minutes on an H100/H200): ViT-B/16 bare forward (bf16,
# channels-last, uint8 on device; eager and compiled) and end-to-end extraction from JPEG
# files with GPU decode. Uses the machine's own CUDA torch/torchvision/timm; zarr and its
# codecs come from .whl/ when the machine has no package index (see README), else from pip.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import zarr, numcodecs" 2>/dev/null; then
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
  else
    python3 -m pip install -q "zarr>=3" numcodecs
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, torchvision, timm, zarr; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'zarr', zarr.__version__)"
mkdir -p "${OUT:-bench/out}"
python3 bench/gpu.py --json "${OUT:-bench/out}/gpu.json" "$@"
