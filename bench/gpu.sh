#!/usr/bin/env bash
# One prepared GPU check (fits in 5 minutes on an H100/H200): installs backbench, then times
# ViT-B/16 bare forward (bf16, channels-last, uint8 on device) and end-to-end extraction.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-gpu
# the machine's own CUDA torch, not this repo's CPU-machine pin
.venv-gpu/bin/pip install -q torch torchvision timm open_clip_torch "zarr>=3" numcodecs h5py scikit-learn \
  faiss-cpu typer rich matplotlib safetensors psutil google-crc32c
.venv-gpu/bin/pip install -q --no-deps -e .
mkdir -p "${OUT:-bench/out}"
.venv-gpu/bin/python bench/gpu.py --json "${OUT:-bench/out}/gpu.json"
