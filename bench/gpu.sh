#!/usr/bin/env bash
# The whole GPU check in one command, for a bare GPU host with PyTorch but no diffusers and no
# network: wheels for what is missing lie in .whl/ beside the repo (see bench/RESULTS.md).
#   bash bench/gpu.sh [OUT_DIR]
set -euo pipefail
out=${1:-${OUT:-bench/out}}
mkdir -p "$out"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/zb-site .whl/*.whl
  export PYTHONPATH=/tmp/zb-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, diffusers, pydantic; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'pydantic', pydantic.__version__)" | tee -a "$out/gpu.txt"
python3 -m bench.throughput --out "$out/throughput.json" 2>&1 | tee "$out/throughput.log"
